//! The delay from a response to its usage being queryable from the collector: one request
//! through a real Envoy with the filter, then the collector's query API polled every 2 ms
//! until the call shows. Requests start at random points of the flush interval.
//!
//! ```text
//! cargo run --release -p tollgate-bench --bin usage-delay -- [samples] [flush-interval-ms]
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tollgate_bench::{license, percentile, plugin_config, INGEST_SECRET};
use tollgate_collector::{open, IngestKeys, Running};
use tollgate_devkit::{Bootstrap, Envoy, Upstream};

/// Usage queries need the admin token.
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

fn stored_calls(agent: &ureq::Agent, url: &str) -> Result<u64> {
    let body: Value = serde_json::from_str(
        &agent
            .get(url)
            .set("authorization", &format!("Bearer {ADMIN_TOKEN}"))
            .call()?
            .into_string()?,
    )?;
    Ok(body["rows"]
        .as_array()
        .map(|rows| rows.iter().filter_map(|r| r["units"].as_u64()).sum())
        .unwrap_or(0))
}

fn main() -> Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context("usage: usage-delay [samples] [flush-interval-ms]")?;
    let samples = args.first().copied().unwrap_or(100);
    let flush_ms = args.get(1).copied().unwrap_or(1000);

    let dir = std::env::temp_dir().join(format!("tollgate-bench-delay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    tollgate_collector::telemetry::set_info_logs(false);
    let keys = IngestKeys::parse([format!("bench={INGEST_SECRET}").as_str()])?;
    let mut state = tollgate_collector::AppState::new(
        std::sync::Arc::from(open(&format!(
            "sqlite://{}",
            dir.join("usage.db").display()
        ))?),
        keys,
    );
    state.admin_token = Some(ADMIN_TOKEN.into());
    let collector = Running::start_state(0, state)?;
    let upstream = Upstream::start(0)?;
    let mut bootstrap = Bootstrap::new(plugin_config(flush_ms)?, upstream.port());
    bootstrap.collector_ports = vec![collector.addr.port()];
    let envoy = Envoy::start("bench-delay", &bootstrap.to_json(), 2)?;

    let token = format!("Bearer {}", license("delay-co", "lic-delay")?);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let query = collector.url("/v1/usage?license=lic-delay&meter=calls&outcome=allowed");
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut delays_ms = Vec::with_capacity(samples as usize);
    for i in 1..=samples {
        // Start at a random point of the flush cycle.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % flush_ms.max(1)));
        let response = agent
            .get(&envoy.url("/v1/search"))
            .set("authorization", &token)
            .call()?;
        let _ = response.into_string()?;
        let answered = Instant::now();
        loop {
            if stored_calls(&agent, &query)? >= i {
                break;
            }
            if answered.elapsed() > Duration::from_secs(30) {
                bail!("usage of call {i} not queryable after 30 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        delays_ms.push(answered.elapsed().as_secs_f64() * 1000.0);
    }
    delays_ms.sort_by(f64::total_cmp);
    let mean = delays_ms.iter().sum::<f64>() / delays_ms.len().max(1) as f64;
    println!(
        "response -> queryable usage, {samples} samples, flush_interval_ms {flush_ms}, Envoy 2 workers, collector on SQLite:"
    );
    println!(
        "  p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms, mean {mean:.0} ms",
        percentile(&delays_ms, 0.50),
        percentile(&delays_ms, 0.90),
        percentile(&delays_ms, 0.99),
        percentile(&delays_ms, 1.0)
    );
    drop(envoy);
    drop(collector);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
