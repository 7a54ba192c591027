//! Ingest throughput of one collector: signed batches posted over HTTP by several clients,
//! each batch stored once, on SQLite (a fresh file) or PostgreSQL (a throwaway server started
//! from the system's binaries). Prints batches/s, records/s and latency percentiles.
//!
//! ```text
//! cargo run --release -p tollgate-bench --bin collector-ingest -- [batches] [records-per-batch] [clients] [sqlite|postgres]
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tollgate_collector::{open, IngestKeys, Running};
use tollgate_devkit::TestPostgres;
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER,
};

const SECRET: &str = "bench-secret-0123456789abcdef";

fn batch(client: usize, sequence: u64, records: usize) -> UsageBatch {
    let source = Source {
        instance: format!("bench-{client}"),
        vm_started_ms: 1_780_000_000_000,
    };
    let meters = Meter::ALL;
    UsageBatch {
        version: 1,
        batch_id: UsageBatch::id_for(&source, sequence),
        source,
        sequence,
        created_ms: 1_780_000_001_000,
        records: (0..records)
            .map(|i| UsageRecord {
                account: format!("acct-{}", i % 1000),
                license: format!("lic-{}", i % 1000),
                feature: "search".into(),
                outcome: "allowed".into(),
                user: String::new(),
                meter: meters[i % meters.len()],
                units: 1 + i as u64,
                window_start_ms: 1_780_000_000_000,
                window_end_ms: 1_780_000_001_000,
            })
            .collect(),
    }
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let backend = match args.last().map(String::as_str) {
        Some("sqlite") | Some("postgres") => args.pop().unwrap_or_default(),
        _ => "sqlite".to_string(),
    };
    let args: Vec<usize> = args
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .context(
            "usage: collector-ingest [batches] [records-per-batch] [clients] [sqlite|postgres]",
        )?;
    let batches = args.first().copied().unwrap_or(2000);
    let per_batch = args.get(1).copied().unwrap_or(500);
    let clients = args.get(2).copied().unwrap_or(4).max(1);

    let dir = std::env::temp_dir().join(format!("tollgate-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let keys = IngestKeys::parse([format!("bench={SECRET}").as_str()])?;
    tollgate_collector::telemetry::set_info_logs(false);
    let (url, label, postgres) = if backend == "postgres" {
        let pg = TestPostgres::start_durable("bench-ingest")?;
        (
            pg.url(),
            "PostgreSQL (fsync, synchronous_commit on)".to_string(),
            Some(pg),
        )
    } else {
        let db = dir.join("usage.db");
        (
            format!("sqlite://{}", db.display()),
            "SQLite (WAL, synchronous=FULL)".to_string(),
            None,
        )
    };
    let collector = Running::start(0, open(&url)?, keys)?;
    let url = collector.url("/v1/usage");

    // Encode and sign up front: the clock measures the collector, not the client.
    let prepared: Vec<Vec<(Vec<u8>, String)>> = (0..clients)
        .map(|c| {
            (0..batches / clients)
                .map(|s| {
                    let body = batch(c, s as u64 + 1, per_batch).encode();
                    let signature = sign(SECRET.as_bytes(), &body);
                    (body, signature)
                })
                .collect()
        })
        .collect();

    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = prepared
            .iter()
            .map(|work| {
                let url = url.clone();
                scope.spawn(move || -> Result<Vec<Duration>> {
                    let agent = ureq::AgentBuilder::new().build();
                    let mut out = Vec::with_capacity(work.len());
                    for (body, signature) in work {
                        let t = Instant::now();
                        agent
                            .post(&url)
                            .set(KEY_ID_HEADER, "bench")
                            .set(SIGNATURE_HEADER, signature)
                            .send_bytes(body)?;
                        out.push(t.elapsed());
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    let elapsed = started.elapsed().as_secs_f64();

    let sent = latencies.len();
    let stored: u64 = collector.state.store.usage(&Default::default())?.len() as u64;
    let mut sorted = latencies.clone();
    sorted.sort();
    let pct = |p: f64| {
        sorted
            .get(((sent as f64 * p) as usize).min(sent.saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!("collector ingest, {label}, {clients} clients, {sent} batches x {per_batch} records");
    println!(
        "  {:.0} batches/s, {:.0} records/s over {elapsed:.2} s",
        sent as f64 / elapsed,
        (sent * per_batch) as f64 / elapsed
    );
    println!(
        "  latency per batch: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!("  (usage rows after grouping: {stored})");
    drop(collector);
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
