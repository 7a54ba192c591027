//! The filter's cost, side by side with its baselines, in one run: Envoy with one worker
//! pinned to CPU 0 answering directly (no upstream), the load generator pinned to CPU 1.
//!
//! ```sh
//! cargo run --release -p tollgate-bench --bin filter-bench -- [--mode paired|sequential] [--seconds 10] [--rounds 3] [--rate 2000] [--variants a,b,...]
//! ```
//!
//! `--mode paired` (the default) gives ratios: each variant and a `none` run at the same
//! instant on CPU 0, each under its own wrk on CPU 1, with the same requests, and the ratio of
//! their CPU per request; `--rounds` pairs per variant, interleaved, reported as the median
//! with the min-max of the pairs. A fresh Envoy per variant varies by up to 2x from run to run
//! on a VM, so only such same-instant pairs resolve a few microseconds.
//! `--mode sequential` runs one Envoy at a time, the same load for every variant,
//! interleaved over the rounds: absolute figures (req/s, latency at saturation and at a fixed
//! rate, memory), each also as a ratio to `none` of another instant.
//!
//! Variants:
//! - `none`: Envoy with no filter (the floor);
//! - `cpp`: Envoy's C++ `jwt_authn` (with its token cache) and `local_ratelimit`;
//! - `native`, `native-no-collector`, `native-no-headers`, `native-100k`: Tollgate's dynamic
//!   module (`make native`) with the warm configuration of `tollgate` (metering and shipping to
//!   the live collector), without the collector, without the four license headers, and at
//!   100,000 licenses; `native-no-writes`: no header written at all (no license headers, the
//!   token left in place, no `RateLimit` headers); `native-license-headers`: only the four
//!   license headers written (what Envoy's C++ chain would need two more filters for);
//!   `native-combined`: only the one `upstream_headers.combined` header; `native-metadata`:
//!   the license context in dynamic metadata (`license_metadata`), no header written;
//!   `native-public`: every route public and no license header configured, the module's own
//!   floor (its hooks, one header read, a route lookup, nothing written); `native-100k-bare`:
//!   100,000 licenses with no collector, rate limit or header (the token cache's memory);
//! - `tollgate`: the filter with a warm token cache, metering and shipping to a live collector;
//! - `cold-eddsa`, `cold-es256`, `cold-rs256`: every request's signature is checked (a token
//!   cache of one entry and 64 tokens in turn: each request misses, as a new token would);
//! - `native-cold-eddsa`: the same for the native module;
//! - `cpp-cold-eddsa`, `cpp-cold-es256`, `cpp-cold-rs256`: the same for `jwt_authn`
//!   (its cache off);
//! - `licenses-1k`, `licenses-100k`: warm tokens of 1,000 or 100,000 distinct licenses;
//!   `licenses-100k-bare` the same with no collector, rate limit or headers (the token cache's
//!   share of the memory); `cpp-licenses-100k`: `jwt_authn` caching the same 100,000 tokens;
//! - `wasm-empty`, `wasm-calls`, `wasm-calls-writes`: the floor of any proxy-wasm filter (the
//!   `tollgate-wasm-floor` crate, same SDK and runtime): no host call; the clock and header
//!   reads of Tollgate's warm path; and those plus four request headers written;
//! - `tollgate-no-collector`, `tollgate-no-rate-limit`, `tollgate-no-headers`, `tollgate-bare`
//!   (all three off): where the warm filter's time goes, feature by feature;
//!   `tollgate-no-writes`, `tollgate-license-headers`, `tollgate-combined`: as the `native-`
//!   variants of those names, with the collector on.
//! - `tollgate-users`, `tollgate-seats`, `tollgate-sharing`: the warm filter with 100 end users
//!   in turn in an `x-end-user` header (pseudonymised per request, metered per user); with a
//!   floating seat held by each; with sharing detection (the client address read and
//!   pseudonymised per request).
//!
//! `--before <filter.wasm>` adds `<variant>@before` variants (e.g. `tollgate@before`): the same
//! load against an earlier build of the filter, in the same run, for before/after figures.
//!
//! Per variant: requests per second at saturation (wrk, 1 thread, 64 connections) with its
//! p50/p99/p99.9 latency; latency at a fixed moderate rate (an open-loop client: latency counts
//! from when a request was due, so a stall is not hidden); Envoy's CPU time per 1,000
//! requests; Envoy's resident memory after the run. The median of the rounds is reported, and
//! each figure as a ratio to `none`. Raw lines go to `bench/results/`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tollgate_bench::{percentile, rss_kib, INGEST_SECRET};
use tollgate_collector::{open, IngestKeys, Running};
use tollgate_devkit::envoy::{
    filter_wasm_path, native_http_filter, stats_config, wasm_http_filter, workspace_root,
};
use tollgate_devkit::{jwks, Envoy, KeyAlg, LicenseSpec, SigningKey};

const ISSUER: &str = "https://licenses.tollgate.example";
const AUDIENCE: &str = "api.example.com";
const PATH: &str = "/v1/search?q=bench";
const CONNECTIONS: u32 = 64;

/// How variants are compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Each variant beside its own `none`, at the same instant on the same CPU, each under its
    /// own load: CPU per request of the two, as a ratio. On a VM whose speed drifts from run to
    /// run (2x here), only this resolves a few microseconds.
    Paired,
    /// One Envoy at a time, round after round: absolute figures (req/s, latency, memory).
    Sequential,
}

struct Options {
    mode: Mode,
    before: Option<PathBuf>,
    seconds: u64,
    rounds: usize,
    rate: u64,
    variants: Vec<String>,
}

fn options() -> Result<Options> {
    let mut o = Options {
        mode: Mode::Paired,
        before: None,
        seconds: 10,
        rounds: 3,
        rate: 2000,
        variants: ALL.iter().map(|v| v.to_string()).collect(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).context("every option takes a value")?;
        match args[i].as_str() {
            "--seconds" => o.seconds = value.parse()?,
            "--rounds" => o.rounds = value.parse()?,
            "--rate" => o.rate = value.parse()?,
            "--variants" => o.variants = value.split(',').map(String::from).collect(),
            "--before" => o.before = Some(PathBuf::from(value)),
            "--mode" => {
                o.mode = match value.as_str() {
                    "paired" => Mode::Paired,
                    "sequential" => Mode::Sequential,
                    other => bail!("--mode {other}: paired or sequential"),
                }
            }
            other => bail!("unknown option {other}; see the top of bench/src/filter_bench.rs"),
        }
        i += 2;
    }
    for v in &o.variants {
        if !ALL.contains(&v.trim_end_matches("@before")) {
            bail!("unknown variant {v}: one of {}", ALL.join(", "));
        }
    }
    Ok(o)
}

const ALL: &[&str] = &[
    "none",
    "wasm-empty",
    "wasm-calls",
    "wasm-calls-writes",
    "wasm-pairs",
    "wasm-props",
    "cpp",
    "native",
    "native-no-collector",
    "native-no-headers",
    "native-no-writes",
    "native-license-headers",
    "native-combined",
    "native-metadata",
    "native-public",
    "native-100k",
    "native-100k-bare",
    "tollgate",
    "tollgate-no-collector",
    "tollgate-no-rate-limit",
    "tollgate-no-headers",
    "tollgate-bare",
    "tollgate-no-writes",
    "tollgate-license-headers",
    "tollgate-combined",
    "tollgate-users",
    "tollgate-seats",
    "tollgate-sharing",
    "cold-eddsa",
    "native-cold-eddsa",
    "cpp-cold-eddsa",
    "cold-es256",
    "cpp-cold-es256",
    "cold-rs256",
    "cpp-cold-rs256",
    "licenses-1k",
    "licenses-100k",
    "licenses-100k-bare",
    "cpp-licenses-100k",
];

/// Distinct end users the `tollgate-users`, `-seats` and `-sharing` variants send, in turn.
const BENCH_USERS: usize = 100;

/// The signing keys: the demo key (EdDSA, in `envoy/tollgate.json`) and one of each other kind.
struct Keys {
    ed: SigningKey,
    es: SigningKey,
    rs: SigningKey,
}

impl Keys {
    fn jwks(&self) -> Value {
        jwks([&self.ed, &self.es, &self.rs])
    }

    fn key(&self, alg: KeyAlg) -> &SigningKey {
        match alg {
            KeyAlg::EdDSA => &self.ed,
            KeyAlg::ES256 => &self.es,
            KeyAlg::RS256 => &self.rs,
        }
    }
}

/// `count` tokens of distinct licenses signed with `alg`, one per line, in `path`.
fn mint(keys: &Keys, alg: KeyAlg, count: usize, path: &Path) -> Result<()> {
    let key = keys.key(alg);
    let now = tollgate_devkit::unix_now();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..count {
        let mut spec = LicenseSpec::new(
            &format!("acct-{}", i % 1000),
            &format!("lic-{}-{i}", alg.name()),
            "pro",
            &["search"],
        );
        spec.issuer = Some(ISSUER.into());
        spec.audience = Some(AUDIENCE.into());
        spec.ttl_seconds = 24 * 3600;
        writeln!(out, "{}", key.sign(&spec.claims_at(now))?)?;
    }
    out.flush()?;
    Ok(())
}

/// The plugin configuration: `envoy/tollgate.json` with every bench key, a collector, and a
/// token cache of `cache_entries`.
fn tollgate_config(keys: &Keys, cache_entries: usize) -> Result<Value> {
    let mut config: Value = serde_json::from_slice(&std::fs::read(
        workspace_root().join("envoy/tollgate.json"),
    )?)?;
    config["token"]["jwks"] = keys.jwks();
    config["token"]["cache_entries"] = json!(cache_entries);
    // Generous limits: the benchmark measures the checks, not refusals.
    config["plans"]["pro"] =
        json!({"rate_limit": {"requests_per_second": 1_000_000_000, "burst": 1_000_000_000}});
    config["collector"] = json!({
        "key_id": "bench",
        "secret": INGEST_SECRET,
        "flush_interval_ms": 1000,
    });
    Ok(config)
}

/// Envoy's native chain doing the comparable job: JWT checks with the same keys, issuer and
/// audience (its cache on), and a local rate limit that never refuses.
fn cpp_filters(keys: &Keys, cache: bool) -> Vec<Value> {
    cpp_filters_cached(keys, cache.then_some(10_000))
}

/// `jwt_authn` with a token cache of `cache` entries (none: every request verified).
fn cpp_filters_cached(keys: &Keys, cache: Option<usize>) -> Vec<Value> {
    let mut provider = json!({
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "local_jwks": {"inline_string": keys.jwks().to_string()},
        "forward": true,
    });
    if let Some(entries) = cache {
        provider["jwt_cache_config"] = json!({"jwt_cache_size": entries});
    }
    vec![
        json!({
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                "providers": {"tollgate": provider},
                "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "tollgate"}}],
            }
        }),
        json!({
            "name": "envoy.filters.http.local_ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                "stat_prefix": "bench_rl",
                "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"},
                "filter_enabled": {"runtime_key": "rl_enabled", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                "filter_enforced": {"runtime_key": "rl_enforced", "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            }
        }),
    ]
}

/// `upstream_headers` with none of the four license headers.
fn no_license_headers() -> Value {
    json!({"account": null, "license": null, "plan": null, "feature": null})
}

/// The header writes of the `-no-writes`, `-license-headers`, `-combined` and `-metadata`
/// variants: the token left in place and no `RateLimit` headers (as Envoy's C++ chain here), and
/// the license context in no header, in the four, in the one combined header, or in dynamic
/// metadata.
fn context_writes(config: &mut Value, mode: &str) {
    let headers = match mode {
        "no-writes" => Some(no_license_headers()),
        "license-headers" => None,
        "combined" => {
            let mut h = no_license_headers();
            h["combined"] = json!("x-tollgate-context");
            Some(h)
        }
        // Native only: the context in dynamic metadata, no header at all.
        "metadata" => {
            config["license_metadata"] = json!("tollgate");
            Some(no_license_headers())
        }
        _ => return,
    };
    config["token"]["strip_from_upstream"] = json!(false);
    config["rate_limit_headers"] = json!(false);
    if let Some(headers) = headers {
        config["upstream_headers"] = headers;
    }
}

fn tollgate_filter(module: &Path, config: &Value) -> Value {
    wasm_http_filter(module, &config.to_string())
}

/// The floor filter (`bench/wasm-floor`), making the host calls `calls` names per request.
fn floor_filter(calls: &str) -> Value {
    wasm_http_filter(
        &workspace_root().join("target/wasm32-wasip1/release/tollgate_wasm_floor.wasm"),
        calls,
    )
}

/// Envoy answering `200 ok` itself, after `filters`.
fn bootstrap(filters: Vec<Value>, collector_port: Option<u16>) -> Value {
    let mut http_filters = filters;
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    let mut clusters = Vec::new();
    if let Some(port) = collector_port {
        clusters.push(json!({
            "name": "tollgate_collector",
            "connect_timeout": "1s",
            "type": "STATIC",
            "load_assignment": {"cluster_name": "tollgate_collector", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}
            }]}]}
        }));
    }
    json!({
        "node": {"id": "tollgate-bench", "cluster": "tollgate"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "stats_config": stats_config(),
        "static_resources": {
            "listeners": [{
                "name": "api",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "api",
                        "normalize_path": true,
                        "merge_slashes": true,
                        "route_config": {"virtual_hosts": [{
                            "name": "api",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]
                        }]},
                        "http_filters": http_filters,
                    }
                }]}]
            }],
            "clusters": clusters,
        }
    })
}

/// Pin every thread of `pid` to `cpus` (e.g. "0").
fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-c", "-p", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset failed for pid {pid}");
    }
    Ok(())
}

/// User plus system CPU time of a process, in clock ticks (/proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The wrk script: each request carries the next token of the file (round robin), and the
/// latency percentiles are printed as one JSON line at the end.
const WRK_SCRIPT: &str = r#"
local tokens = {}
local path = os.getenv("BENCH_TOKENS")
if path then
  for line in io.lines(path) do tokens[#tokens + 1] = line end
end
local users = tonumber(os.getenv("BENCH_USERS") or "0")
local i = 0
local u = 0
request = function()
  if #tokens == 0 then
    return wrk.format("GET", BENCH_PATH)
  end
  i = i + 1
  if i > #tokens then i = 1 end
  local headers = {["authorization"] = "Bearer " .. tokens[i]}
  if users > 0 then
    u = u % users + 1
    headers["x-end-user"] = "user-" .. u .. "@bench.example"
  end
  return wrk.format("GET", BENCH_PATH, headers)
end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout
  io.write(string.format('BENCH {"requests": %d, "seconds": %f, "errors": %d, "p50_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration / 1e6, errors,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// What one saturation run measured.
#[derive(Debug, Clone, Default)]
struct Saturation {
    rps: f64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn wrk(
    url: &str,
    tokens: Option<&Path>,
    users: usize,
    seconds: u64,
    script: &Path,
) -> Result<(Saturation, String)> {
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{seconds}s"))
        .arg("-s")
        .arg(script)
        .arg(url);
    if let Some(tokens) = tokens {
        command.env("BENCH_TOKENS", tokens);
    }
    command.env("BENCH_USERS", users.to_string());
    let output = command
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .with_context(|| format!("wrk printed no result: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    let get = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok((
        Saturation {
            rps: get("requests") / get("seconds").max(1e-9),
            errors: v["errors"].as_u64().unwrap_or(0),
            p50_us: get("p50_us"),
            p99_us: get("p99_us"),
            p999_us: get("p999_us"),
        },
        text,
    ))
}

/// An open-loop client: `rate` requests per second for `seconds` over `connections`
/// keep-alive connections, each request due at its scheduled time; latency is measured from
/// that time. Returns sorted latencies in microseconds, and the count of non-200 answers.
fn fixed_rate(
    addr: SocketAddr,
    token: Option<&str>,
    user: Option<&str>,
    rate: u64,
    seconds: u64,
    connections: u64,
) -> Result<(Vec<f64>, u64)> {
    let per_connection = Duration::from_secs_f64(connections as f64 / rate as f64);
    let total = rate * seconds / connections;
    let start = Instant::now() + Duration::from_millis(50);
    let user = user
        .map(|u| format!("x-end-user: {u}\r\n"))
        .unwrap_or_default();
    let request = match token {
        Some(t) => {
            format!("GET {PATH} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {t}\r\n{user}\r\n")
        }
        None => format!("GET {PATH} HTTP/1.1\r\nhost: bench\r\n{user}\r\n"),
    };
    let request = Arc::new(request.into_bytes());
    let handles: Vec<_> = (0..connections)
        .map(|c| {
            let request = Arc::clone(&request);
            std::thread::spawn(move || -> Result<(Vec<f64>, u64)> {
                let stream = TcpStream::connect(addr)?;
                stream.set_nodelay(true)?;
                let mut reader = BufReader::new(stream.try_clone()?);
                let mut writer = stream;
                let mut latencies = Vec::with_capacity(total as usize);
                let mut bad = 0;
                // Connections start staggered, so requests are spread evenly.
                let offset = per_connection.mul_f64(c as f64 / connections as f64);
                for i in 0..total {
                    let due = start + offset + per_connection.mul_f64(i as f64);
                    wait_until(due);
                    writer.write_all(&request)?;
                    let status = read_response(&mut reader)?;
                    if status != 200 {
                        bad += 1;
                    }
                    latencies.push(due.elapsed().as_secs_f64() * 1e6);
                }
                Ok((latencies, bad))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut bad = 0;
    for handle in handles {
        let (latencies, b) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        all.extend(latencies);
        bad += b;
    }
    all.sort_by(|a, b| a.total_cmp(b));
    Ok((all, bad))
}

/// Sleep until shortly before `due`, then spin: a sleep alone wakes up tens to hundreds of
/// microseconds late, which would show as latency of the server under test.
fn wait_until(due: Instant) {
    const SPIN: Duration = Duration::from_micros(300);
    let now = Instant::now();
    if due > now + SPIN {
        std::thread::sleep(due - now - SPIN);
    }
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// Read one HTTP/1.1 response with a content-length body; its status.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<u16> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(status)
}

/// One variant's figures in one round.
#[derive(Debug, Clone, Default)]
struct Figures {
    saturation: Saturation,
    fixed_p50_us: f64,
    fixed_p99_us: f64,
    fixed_p999_us: f64,
    fixed_bad: u64,
    cpu_ms_per_1000: f64,
    rss_mib: f64,
}

struct Setup {
    dir: PathBuf,
    /// An earlier build of the filter, for the `@before` variants.
    before: Option<PathBuf>,
    keys: Keys,
    script: PathBuf,
    collector_port: u16,
}

impl Setup {
    fn tokens(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.tokens"))
    }
}

/// What a variant loads into Envoy, and which tokens its clients send.
fn variant(setup: &Setup, name: &str) -> Result<(Value, Option<PathBuf>)> {
    // `<variant>@before`: the same with the `--before` module.
    let (name, module) = match name.strip_suffix("@before") {
        Some(base) => (
            base,
            setup
                .before
                .clone()
                .context("a variant @before needs --before <filter.wasm>")?,
        ),
        None => (name, filter_wasm_path()),
    };
    let module = module.as_path();
    let keys = &setup.keys;
    let collector = Some(setup.collector_port);
    Ok(match name {
        "none" => (bootstrap(vec![], None), None),
        // The same token as the warm variants, so header reads copy the same bytes.
        "wasm-empty" => (
            bootstrap(vec![floor_filter("")], None),
            Some(setup.tokens("warm")),
        ),
        "wasm-calls" => (
            bootstrap(vec![floor_filter("clock=2,reads=3")], None),
            Some(setup.tokens("warm")),
        ),
        "wasm-pairs" => (
            bootstrap(vec![floor_filter("clock=2,pairs=1")], None),
            Some(setup.tokens("warm")),
        ),
        "wasm-props" => (
            bootstrap(vec![floor_filter("props=3")], None),
            Some(setup.tokens("warm")),
        ),
        "wasm-calls-writes" => (
            bootstrap(vec![floor_filter("clock=2,reads=3,writes=4")], None),
            Some(setup.tokens("warm")),
        ),
        "cpp" => (
            bootstrap(cpp_filters(keys, true), None),
            Some(setup.tokens("warm")),
        ),
        "tollgate" => (
            bootstrap(
                vec![tollgate_filter(module, &tollgate_config(keys, 10_000)?)],
                collector,
            ),
            Some(setup.tokens("warm")),
        ),
        ablation if ablation.starts_with("tollgate-") => {
            let mut config = tollgate_config(keys, 10_000)?;
            let bare = ablation == "tollgate-bare";
            if bare || ablation == "tollgate-no-collector" {
                if let Some(c) = config.as_object_mut() {
                    c.remove("collector");
                }
            }
            if bare || ablation == "tollgate-no-rate-limit" {
                config["plans"]["pro"] = json!({});
            }
            if bare || ablation == "tollgate-no-headers" {
                config["upstream_headers"] = no_license_headers();
            }
            context_writes(&mut config, ablation.trim_start_matches("tollgate-"));
            // Users told apart (a header, pseudonymised per request), seats held (every
            // user holds one after the warm-up: a shared-data read per request), and
            // sharing detection (the client address read and pseudonymised per request).
            if matches!(
                ablation,
                "tollgate-users" | "tollgate-seats" | "tollgate-sharing"
            ) {
                config["pseudonyms"] =
                    json!({"key_id": "bench", "secret": "bench-pseudonym-key-0123456789abcdef"});
                config["users"] = json!({"header": "x-end-user"});
            }
            if ablation == "tollgate-seats" {
                config["plans"]["pro"]["seats"] =
                    json!({"floating": 100_000, "window_seconds": 900});
            }
            if ablation == "tollgate-sharing" {
                config["plans"]["pro"]["sharing"] = json!({"max_clients": 100_000});
            }
            let collector = config.get("collector").map(|_| setup.collector_port);
            (
                bootstrap(vec![tollgate_filter(module, &config)], collector),
                Some(setup.tokens("warm")),
            )
        }
        // The dynamic module (`make native`) with the same configuration as `tollgate`,
        // shipping to the same live collector (`native-no-collector`: without it).
        "native"
        | "native-no-collector"
        | "native-no-headers"
        | "native-no-writes"
        | "native-license-headers"
        | "native-combined"
        | "native-metadata"
        | "native-public"
        | "native-100k"
        | "native-100k-bare" => {
            let cache = if name.starts_with("native-100k") {
                200_000
            } else {
                10_000
            };
            let mut config = tollgate_config(keys, cache)?;
            if matches!(name, "native-no-collector" | "native-100k-bare") {
                if let Some(c) = config.as_object_mut() {
                    c.remove("collector");
                }
            }
            // The token cache's share of the memory: no collector, rate limit or headers.
            if name == "native-100k-bare" {
                config["plans"]["pro"] = json!({});
                context_writes(&mut config, "no-writes");
            }
            if name == "native-no-headers" {
                config["upstream_headers"] = no_license_headers();
            }
            context_writes(&mut config, name.trim_start_matches("native-"));
            // The module's own floor in the same run: its hooks, the `:path` read and a route
            // lookup; no token read, nothing decided for a license, nothing written.
            if name == "native-public" {
                config["routes"] = json!([{"prefix": "/", "public": true}]);
                config["upstream_headers"] = no_license_headers();
            }
            let tokens = if name.starts_with("native-100k") {
                "licenses-100k"
            } else {
                "warm"
            };
            let collector = config.get("collector").map(|_| setup.collector_port);
            (
                bootstrap(vec![native_http_filter(&config.to_string())], collector),
                Some(setup.tokens(tokens)),
            )
        }
        "licenses-1k" => (
            bootstrap(
                vec![tollgate_filter(module, &tollgate_config(keys, 10_000)?)],
                collector,
            ),
            Some(setup.tokens("licenses-1k")),
        ),
        "licenses-100k" => (
            bootstrap(
                vec![tollgate_filter(module, &tollgate_config(keys, 200_000)?)],
                collector,
            ),
            Some(setup.tokens("licenses-100k")),
        ),
        // Where the memory of 100k licenses goes: the token cache alone (no rate cells in
        // shared data, no usage records, no headers).
        "licenses-100k-bare" => {
            let mut config = tollgate_config(keys, 200_000)?;
            if let Some(c) = config.as_object_mut() {
                c.remove("collector");
            }
            config["plans"]["pro"] = json!({});
            config["upstream_headers"] = no_license_headers();
            (
                bootstrap(vec![tollgate_filter(module, &config)], None),
                Some(setup.tokens("licenses-100k")),
            )
        }
        // jwt_authn holding 100k tokens in its cache: the native chain's memory per license.
        "cpp-licenses-100k" => (
            bootstrap(cpp_filters_cached(keys, Some(200_000)), None),
            Some(setup.tokens("licenses-100k")),
        ),
        // A cache of one entry and 64 tokens in turn: every request misses the cache and its
        // signature is checked, as if every token were new (verification does not depend on
        // which token it is).
        // The module verifying every request (as `cold-eddsa` for the wasm filter).
        "native-cold-eddsa" => {
            let config = tollgate_config(keys, 1)?;
            (
                bootstrap(vec![native_http_filter(&config.to_string())], collector),
                Some(setup.tokens("cold-eddsa")),
            )
        }
        cold if cold.starts_with("cold-") => (
            bootstrap(
                vec![tollgate_filter(module, &tollgate_config(keys, 1)?)],
                collector,
            ),
            Some(setup.tokens(cold)),
        ),
        // jwt_authn without its cache verifies every request.
        cpp_cold if cpp_cold.starts_with("cpp-cold-") => (
            bootstrap(cpp_filters(keys, false), None),
            Some(setup.tokens(cpp_cold.trim_start_matches("cpp-"))),
        ),
        other => bail!("unknown variant {other}"),
    })
}

/// A variant's warm-up: connections, the VM, and (for the licenses variants) the token cache,
/// every token verified once (cold) before the cache is warm.
fn warm_up_seconds(name: &str) -> u64 {
    match name.trim_end_matches("@before") {
        "licenses-100k" | "licenses-100k-bare" | "cpp-licenses-100k" | "native-100k"
        | "native-100k-bare" => 45,
        "licenses-1k" => 3,
        _ => 2,
    }
}

fn run_variant(setup: &Setup, name: &str, o: &Options, raw: &mut String) -> Result<Figures> {
    let (config, tokens) = variant(setup, name)?;
    let envoy = Envoy::start(&format!("bench-{name}"), &config, 1)?;
    pin(envoy.pid(), "0")?;
    let url = envoy.url(PATH);
    let warm_tokens = tokens.as_deref();
    let users = match name.trim_end_matches("@before") {
        "tollgate-users" | "tollgate-seats" | "tollgate-sharing" => BENCH_USERS,
        _ => 0,
    };
    // Warm up: connections, the VM, and (for the licenses variants) the token cache.
    let warm_seconds = warm_up_seconds(name);
    wrk(&url, warm_tokens, users, warm_seconds, &setup.script)?;
    let ticks = clock_ticks_per_second();
    let cpu_before = cpu_ticks(envoy.pid())?;
    let (saturation, text) = wrk(&url, warm_tokens, users, o.seconds, &setup.script)?;
    let cpu_after = cpu_ticks(envoy.pid())?;
    raw.push_str(&format!("== {name} saturation\n{text}\n"));
    let requests = saturation.rps * o.seconds as f64;
    let cpu_ms = (cpu_after - cpu_before) as f64 * 1000.0 / ticks as f64;
    let rss_mib = rss_kib(envoy.pid()).unwrap_or(0) as f64 / 1024.0;
    // The fixed rate uses one token (cold variants: the cache now holds it; their cold cost
    // shows in the saturation figures).
    let one_token = match warm_tokens {
        Some(path) => Some(
            std::fs::read_to_string(path)?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        ),
        None => None,
    };
    // One connection and one client thread: on the shared CPU 1, more threads would mostly
    // measure each other's scheduling.
    let (latencies, bad) = fixed_rate(
        envoy.listener,
        one_token.as_deref(),
        (users > 0).then_some("user-1@bench.example"),
        o.rate,
        o.seconds.min(5),
        1,
    )?;
    raw.push_str(&format!(
        "== {name} fixed rate {} req/s: {} requests, {bad} not 200, p50 {:.0} us, p99 {:.0} us, p99.9 {:.0} us\n",
        o.rate,
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999)
    ));
    Ok(Figures {
        cpu_ms_per_1000: cpu_ms / requests.max(1.0) * 1000.0,
        rss_mib,
        fixed_p50_us: percentile(&latencies, 0.5),
        fixed_p99_us: percentile(&latencies, 0.99),
        fixed_p999_us: percentile(&latencies, 0.999),
        fixed_bad: bad,
        saturation,
    })
}

/// One same-instant pair: CPU per request of `none` and of the variant, measured over the same
/// seconds while both Envoys share CPU 0, each loaded by its own wrk on CPU 1.
struct Pair {
    none_us: f64,
    variant_us: f64,
}

impl Pair {
    /// `none`'s CPU per request over the variant's: 1.0 is free, 0.5 doubles Envoy's CPU.
    fn ratio(&self) -> f64 {
        self.none_us / self.variant_us.max(1e-9)
    }
}

/// wrk on two URLs at once (one thread each); both results.
fn wrk_both(
    urls: [&str; 2],
    tokens: Option<&Path>,
    users: usize,
    seconds: u64,
    script: &Path,
) -> Result<[(Saturation, String); 2]> {
    std::thread::scope(|scope| {
        let first = scope.spawn(|| wrk(urls[0], tokens, users, seconds, script));
        let second = wrk(urls[1], tokens, users, seconds, script)?;
        let first = first
            .join()
            .map_err(|_| anyhow::anyhow!("a wrk thread panicked"))??;
        Ok([first, second])
    })
}

fn run_pair(setup: &Setup, name: &str, o: &Options, raw: &mut String) -> Result<Pair> {
    let (config, tokens) = variant(setup, name)?;
    let (none_config, _) = variant(setup, "none")?;
    let none = Envoy::start(&format!("pair-none-{name}"), &none_config, 1)?;
    let envoy = Envoy::start(&format!("pair-{name}"), &config, 1)?;
    pin(none.pid(), "0")?;
    pin(envoy.pid(), "0")?;
    let users = match name.trim_end_matches("@before") {
        "tollgate-users" | "tollgate-seats" | "tollgate-sharing" => BENCH_USERS,
        _ => 0,
    };
    let warm_seconds = warm_up_seconds(name);
    // Both get the same requests, tokens included: the pair differs only by the filter.
    let urls = [none.url(PATH), envoy.url(PATH)];
    let urls = [urls[0].as_str(), urls[1].as_str()];
    wrk_both(urls, tokens.as_deref(), users, warm_seconds, &setup.script)?;
    let before = [cpu_ticks(none.pid())?, cpu_ticks(envoy.pid())?];
    let [(none_load, none_text), (load, text)] =
        wrk_both(urls, tokens.as_deref(), users, o.seconds, &setup.script)?;
    let after = [cpu_ticks(none.pid())?, cpu_ticks(envoy.pid())?];
    raw.push_str(&format!(
        "== pair {name}: none\n{none_text}\n== pair {name}: {name}\n{text}\n"
    ));
    let ticks = clock_ticks_per_second() as f64;
    let per_request = |cpu: u64, load: &Saturation| -> f64 {
        cpu as f64 * 1e6 / ticks / (load.rps * o.seconds as f64).max(1.0)
    };
    if none_load.errors + load.errors > 0 {
        bail!(
            "pair {name}: {} errors (none) and {} ({name}): the figures would not compare",
            none_load.errors,
            load.errors
        );
    }
    Ok(Pair {
        none_us: per_request(after[0] - before[0], &none_load),
        variant_us: per_request(after[1] - before[1], &load),
    })
}

/// The paired mode: every variant but `none` in `--rounds` pairs, interleaved; the median
/// ratio with the min-max of its pairs.
fn paired(setup: &Setup, o: &Options, raw: &mut String) -> Result<String> {
    let mut pairs: BTreeMap<String, Vec<Pair>> = BTreeMap::new();
    let variants: Vec<&String> = o.variants.iter().filter(|v| *v != "none").collect();
    for round in 1..=o.rounds {
        for name in &variants {
            eprintln!("pair {round}: none + {name}");
            let pair = run_pair(setup, name, o, raw)?;
            let line = format!(
                "pair {round}: {name}: none {:.2} us/req, {name} {:.2} us/req, ratio {:.3}",
                pair.none_us,
                pair.variant_us,
                pair.ratio()
            );
            eprintln!("  {line}");
            raw.push_str(&format!("== {line}\n"));
            pairs.entry(name.to_string()).or_default().push(pair);
        }
    }
    let mut table = format!(
        "Same-instant pairs: `none` and the variant at once on CPU 0 (1 worker each), each under its own wrk (1 thread, {CONNECTIONS} connections) on CPU 1, {} s per pair, {} pairs per variant. Ratio = CPU per request of none / of the variant (1.00: free).\n\n\
         | variant | ratio to none: median (min-max) | CPU µs per request: none / variant (medians) | added µs per request |\n\
         |---|---|---|---|\n",
        o.seconds, o.rounds
    );
    for name in &variants {
        let Some(runs) = pairs.get(name.as_str()) else {
            continue;
        };
        let ratios: Vec<f64> = runs.iter().map(Pair::ratio).collect();
        let (min, max) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        let none_us = median(runs.iter().map(|p| p.none_us).collect());
        let variant_us = median(runs.iter().map(|p| p.variant_us).collect());
        let added = median(runs.iter().map(|p| p.variant_us - p.none_us).collect());
        table.push_str(&format!(
            "| {name} | {:.3} ({min:.3}-{max:.3}) | {none_us:.2} / {variant_us:.2} | {added:+.2} |\n",
            median(ratios.clone())
        ));
    }
    Ok(table)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let o = options()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!("needs 2 CPUs: Envoy on CPU 0, the load generator on CPU 1");
    }
    // The orchestrator and the collector share CPU 1 with the load generator.
    pin(std::process::id(), "1")?;
    tollgate_collector::telemetry::set_info_logs(false);
    let dir = std::env::temp_dir().join(format!("tollgate-filter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys = Keys {
        ed: SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json"))?,
        es: SigningKey::generate(KeyAlg::ES256, "bench-es")?,
        rs: SigningKey::generate(KeyAlg::RS256, "bench-rs")?,
    };
    let script = dir.join("bench.lua");
    std::fs::write(&script, format!("BENCH_PATH = \"{PATH}\"\n{WRK_SCRIPT}"))?;
    let collector = Running::start(
        0,
        open(&format!("sqlite://{}", dir.join("usage.db").display()))?,
        IngestKeys::parse([format!("bench={INGEST_SECRET}").as_str()])?,
    )?;
    let setup = Setup {
        before: o.before.clone(),
        dir: dir.clone(),
        keys,
        script,
        collector_port: collector.addr.port(),
    };
    eprintln!("minting tokens...");
    mint(&setup.keys, KeyAlg::EdDSA, 1, &setup.tokens("warm"))?;
    mint(
        &setup.keys,
        KeyAlg::EdDSA,
        1000,
        &setup.tokens("licenses-1k"),
    )?;
    if o.variants.iter().any(|v| v.contains("100k")) {
        mint(
            &setup.keys,
            KeyAlg::EdDSA,
            100_000,
            &setup.tokens("licenses-100k"),
        )?;
    }
    mint(&setup.keys, KeyAlg::EdDSA, 64, &setup.tokens("cold-eddsa"))?;
    mint(&setup.keys, KeyAlg::ES256, 64, &setup.tokens("cold-es256"))?;
    mint(&setup.keys, KeyAlg::RS256, 64, &setup.tokens("cold-rs256"))?;

    let mut raw = String::new();
    if o.mode == Mode::Paired {
        let table = paired(&setup, &o, &mut raw)?;
        println!("{table}");
        save(&table, &raw)?;
        drop(collector);
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    let mut results: BTreeMap<String, Vec<Figures>> = BTreeMap::new();
    for round in 1..=o.rounds {
        for name in &o.variants {
            eprintln!("round {round}: {name}");
            let figures = run_variant(&setup, name, &o, &mut raw)?;
            let line = format!(
                "round {round}: {name}: {:.0} req/s, p50 {:.0} us, p99 {:.0} us, fixed-rate p50 {:.0} us, p99 {:.0} us, {:.3} ms CPU per 1000, RSS {:.1} MiB",
                figures.saturation.rps,
                figures.saturation.p50_us,
                figures.saturation.p99_us,
                figures.fixed_p50_us,
                figures.fixed_p99_us,
                figures.cpu_ms_per_1000,
                figures.rss_mib
            );
            eprintln!("  {line}");
            // Every round's figures go to the raw output too, not only the medians.
            raw.push_str(&format!("== {line}\n"));
            results.entry(name.clone()).or_default().push(figures);
        }
    }

    let summary = |name: &str| -> Option<Figures> {
        let runs = results.get(name)?;
        let m = |f: &dyn Fn(&Figures) -> f64| median(runs.iter().map(f).collect());
        Some(Figures {
            saturation: Saturation {
                rps: m(&|f| f.saturation.rps),
                errors: runs.iter().map(|f| f.saturation.errors).sum(),
                p50_us: m(&|f| f.saturation.p50_us),
                p99_us: m(&|f| f.saturation.p99_us),
                p999_us: m(&|f| f.saturation.p999_us),
            },
            fixed_p50_us: m(&|f| f.fixed_p50_us),
            fixed_p99_us: m(&|f| f.fixed_p99_us),
            fixed_p999_us: m(&|f| f.fixed_p999_us),
            fixed_bad: runs.iter().map(|f| f.fixed_bad).sum(),
            cpu_ms_per_1000: m(&|f| f.cpu_ms_per_1000),
            rss_mib: m(&|f| f.rss_mib),
        })
    };
    let base = summary("none");
    let mut table = format!(
        "Median of {} rounds, {} s each; fixed rate {} req/s over 1 connection (sleep, then spin until each request is due); Envoy 1 worker on CPU 0, load on CPU 1.\n\n\
         | variant | req/s | vs none | p50 / p99 / p99.9 at saturation (µs) | fixed-rate p50 / p99 / p99.9 (µs) | p99 added at fixed rate (µs) | CPU ms per 1,000 req | vs none | Envoy RSS (MiB) | errors |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        o.rounds, o.seconds, o.rate
    );
    for name in &o.variants {
        let Some(f) = summary(name) else { continue };
        let ratio = |v: f64, b: Option<f64>| {
            b.filter(|b| *b > 0.0)
                .map_or("-".to_string(), |b| format!("{:.2}", v / b))
        };
        table.push_str(&format!(
            "| {name} | {:.0} | {} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {} | {:.3} | {} | {:.1} | {} |\n",
            f.saturation.rps,
            ratio(f.saturation.rps, base.as_ref().map(|b| b.saturation.rps)),
            f.saturation.p50_us,
            f.saturation.p99_us,
            f.saturation.p999_us,
            f.fixed_p50_us,
            f.fixed_p99_us,
            f.fixed_p999_us,
            base.as_ref()
                .map_or("-".into(), |b| format!("{:.0}", f.fixed_p99_us - b.fixed_p99_us)),
            f.cpu_ms_per_1000,
            ratio(f.cpu_ms_per_1000, base.as_ref().map(|b| b.cpu_ms_per_1000)),
            f.rss_mib,
            f.saturation.errors + f.fixed_bad,
        ));
    }
    println!("{table}");
    save(&table, &raw)?;
    drop(collector);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The table and every raw line, in `bench/results/filter-bench-<time>.txt`.
fn save(table: &str, raw: &str) -> Result<()> {
    let root = workspace_root();
    let results_dir = root.canonicalize().unwrap_or(root).join("bench/results");
    std::fs::create_dir_all(&results_dir)?;
    let stamp = chrono_stamp();
    let raw_path = results_dir.join(format!("filter-bench-{stamp}.txt"));
    std::fs::write(
        &raw_path,
        format!(
            "filter-bench {}\n\n{table}\n{raw}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    )?;
    eprintln!("raw output: {}", raw_path.display());
    Ok(())
}

/// `YYYYMMDD-HHMMSS` (UTC) for file names.
fn chrono_stamp() -> String {
    let secs = tollgate_devkit::unix_now();
    let days = secs / 86_400;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{d:02}-{h:02}{m:02}{s:02}")
}
