//! Helpers shared by the benchmarks: the demo plugin configuration with a collector, demo
//! licenses, process memory, percentiles.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{LicenseSpec, SigningKey};

/// The batch signing secret the benchmarks' filters and collectors share.
pub const INGEST_SECRET: &str = "bench-ingest-secret-0123456789";

/// `envoy/tollgate.json` with a `collector` section flushing every `flush_interval_ms`.
pub fn plugin_config(flush_interval_ms: u64) -> Result<Value> {
    let path = workspace_root().join("envoy/tollgate.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    config["collector"] = json!({
        "instance": "bench/tollgate",
        "key_id": "bench",
        "secret": INGEST_SECRET,
        "flush_interval_ms": flush_interval_ms,
    });
    Ok(config)
}

/// A `pro` license for `search`, signed with the demo key.
pub fn license(account: &str, id: &str) -> Result<String> {
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json"))?;
    let mut spec = LicenseSpec::new(account, id, "pro", &["search"]);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    spec.mint(&key)
}

/// Resident memory of a process, KiB (`VmRSS` in /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `p`-quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

/// A free port on 127.0.0.1 with nothing listening.
pub fn free_port() -> Result<u16> {
    tollgate_devkit::ports::unused_port()
}
