//! Envoy's memory while the collector is down, under load: a real Envoy (2 workers) with the
//! filter, its collector cluster pointing at a port where nothing listens, clients cycling
//! through many licenses. Every 5 s: Envoy's RSS, the records the filter holds, what was
//! served. Then the collector starts, and the buffered usage drains: the time it takes and
//! whether every served call is stored.
//!
//! ```text
//! cargo run --release -p tollgate-bench --bin outage-memory -- [seconds] [licenses] [clients]
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tollgate_bench::{free_port, license, plugin_config, rss_kib, INGEST_SECRET};
use tollgate_collector::{open, IngestKeys, Running, UsageQuery};
use tollgate_devkit::{Bootstrap, Envoy, Upstream};

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    metering_unavailable: AtomicU64,
    other: AtomicU64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
            + self.metering_unavailable.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

fn main() -> Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context("usage: outage-memory [seconds] [licenses] [clients]")?;
    let seconds = args.first().copied().unwrap_or(60);
    let licenses = args.get(1).copied().unwrap_or(1000).max(1);
    let clients = args.get(2).copied().unwrap_or(4).max(1);

    let port = free_port()?;
    let upstream = Upstream::start(0)?;
    let mut bootstrap = Bootstrap::new(plugin_config(1000)?, upstream.port());
    bootstrap.collector_ports = vec![port];
    let envoy = Envoy::start("bench-outage", &bootstrap.to_json(), 2)?;
    let pid = envoy.pid();
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..licenses)
            .map(|i| {
                license(&format!("acct-{i}"), &format!("lic-{i}")).map(|t| format!("Bearer {t}"))
            })
            .collect::<Result<_>>()?,
    );
    let stat = |name: &str| {
        envoy
            .stat(&format!("wasmcustom.tollgate.{name}"))
            .unwrap_or(0)
    };
    let rss_mib = || rss_kib(pid).map_or(0.0, |k| k as f64 / 1024.0);
    println!(
        "collector down for {seconds} s, {licenses} licenses, {clients} keep-alive clients, Envoy 2 workers (on_buffer_full: fail_closed, max_buffered_records 200000 per worker)"
    );
    println!("Envoy RSS before load: {:.1} MiB", rss_mib());

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let url = envoy.url("/v1/search");
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let (tokens, counts, stop, url) = (
                Arc::clone(&tokens),
                Arc::clone(&counts),
                Arc::clone(&stop),
                url.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(10))
                    .build();
                let mut i = c as usize;
                while !stop.load(Ordering::Relaxed) {
                    let token = tokens.get(i % tokens.len()).map_or("", String::as_str);
                    i += clients as usize;
                    let status = match agent.get(&url).set("authorization", token).call() {
                        Ok(r) => {
                            let _ = r.into_string();
                            200
                        }
                        Err(ureq::Error::Status(code, r)) => {
                            let _ = r.into_string();
                            code
                        }
                        Err(_) => 0,
                    };
                    let counter = match status {
                        200 => &counts.ok,
                        503 => &counts.metering_unavailable,
                        _ => &counts.other,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    println!(
        "{:>6} {:>10} {:>16} {:>10} {:>10} {:>10}",
        "t (s)", "RSS MiB", "records held", "batches", "served", "503s"
    );
    let started = Instant::now();
    let mut peak = 0.0f64;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(
            Duration::from_secs(5)
                .min(Duration::from_secs(seconds).saturating_sub(started.elapsed())),
        );
        let rss = rss_mib();
        peak = peak.max(rss);
        println!(
            "{:>6.0} {:>10.1} {:>16} {:>10} {:>10} {:>10}",
            started.elapsed().as_secs_f64(),
            rss,
            stat("usage_buffered_records"),
            stat("usage_buffered_batches"),
            counts.ok.load(Ordering::Relaxed),
            counts.metering_unavailable.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    println!(
        "peak RSS {peak:.1} MiB; other answers (not 200/503): {}",
        counts.other.load(Ordering::Relaxed)
    );

    // The collector comes back: everything held drains, and every call served is stored.
    let dir = std::env::temp_dir().join(format!("tollgate-bench-outage-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    tollgate_collector::telemetry::set_info_logs(false);
    let keys = IngestKeys::parse([format!("bench={INGEST_SECRET}").as_str()])?;
    let collector = Running::start(
        port,
        open(&format!("sqlite://{}", dir.join("usage.db").display()))?,
        keys,
    )?;
    let back = Instant::now();
    let served = counts.total();
    loop {
        let stored: u64 = collector
            .state
            .store
            .usage(&UsageQuery {
                meter: Some("calls".into()),
                ..Default::default()
            })?
            .iter()
            .map(|r| r.units)
            .sum();
        if stored == served && stat("usage_buffered_records") == 0 {
            println!(
                "collector back: drained in {:.1} s; stored {stored} calls for {served} answered; Envoy RSS now {:.1} MiB",
                back.elapsed().as_secs_f64(),
                rss_mib()
            );
            break;
        }
        if back.elapsed() > Duration::from_secs(300) {
            bail!("not drained after 300 s: stored {stored} of {served}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(envoy);
    drop(collector);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
