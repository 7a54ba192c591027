//! Fan-in: how many filters one collector (SQLite) or two replicas on one PostgreSQL serve.
//! Each simulated sidecar holds its own HTTP/1.1 connection, as an Envoy's collector cluster
//! does, and for the whole run syncs every 200 ms (naming the license it served) and sends a
//! signed batch of 10 records every second, starting at a random point of its first period.
//! For each number of sidecars it reports sustained batches/s and syncs/s, p50/p99 of the
//! answers, the collector's CPU per batch and per sync, and whether every acknowledged record
//! is stored exactly once. The largest count with a p99 under 250 ms is what one collector
//! holds.
//!
//! ```sh
//! cargo run --release -p tollgate-bench --bin fan-in -- [sidecars,...] [seconds] [sqlite|postgres]
//! ```
//!
//! The collector runs in this process on its own runtime (2 threads, as `tollgate-collector
//! serve` has); the sidecars run on a runtime of one thread named `fan-in-client`, whose CPU
//! is taken out of the process's to give the collector's. Both share this machine's cores.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tollgate_collector::{open, IngestKeys, Running};
use tollgate_devkit::TestPostgres;
use tollgate_wire::sync::{LicenseSeen, SyncRequest};
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER, VERSION,
};

const SECRET: &str = "bench-secret-0123456789abcdef";
const SYNC_EVERY: Duration = Duration::from_millis(200);
/// A batch every fifth sync: one a second.
const SYNCS_PER_BATCH: u64 = 5;
const RECORDS_PER_BATCH: usize = 10;
const CLIENT_THREAD: &str = "fan-in-client";

/// What one sidecar saw.
#[derive(Default)]
struct Seen {
    batch_micros: Vec<u32>,
    sync_micros: Vec<u32>,
    records_acknowledged: u64,
    errors: u64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counts: Vec<usize> = args
        .first()
        .map_or("250,500,1000,2000", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("usage: fan-in [sidecars,...] [seconds] [sqlite|postgres]")?;
    let seconds: u64 = args.get(1).map_or(Ok(60), |s| s.parse())?;
    let backend = args.get(2).map_or("sqlite", String::as_str).to_string();
    tollgate_collector::telemetry::set_info_logs(false);
    println!(
        "fan-in, {backend}{}, {seconds} s per step: each sidecar syncs every 200 ms and sends a batch of {RECORDS_PER_BATCH} records a second",
        if backend == "postgres" { ", two replicas" } else { "" }
    );
    println!();
    println!("| sidecars | batches/s | syncs/s | batch p50 / p99 (ms) | sync p50 / p99 (ms) | collector CPU | sidecars' CPU | errors | stored exactly |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut held = None;
    for n in counts {
        let step = run_step(n, seconds, &backend)?;
        println!("{}", step.row);
        if step.p99_ms < 250.0 && step.exact && step.errors == 0 {
            held = Some(n);
        }
    }
    match held {
        Some(n) => println!("\nlargest count with p99 under 250 ms, no error, stored exactly: {n}"),
        None => println!("\nno count held a p99 under 250 ms"),
    }
    Ok(())
}

struct Step {
    row: String,
    p99_ms: f64,
    exact: bool,
    errors: u64,
}

fn run_step(sidecars: usize, seconds: u64, backend: &str) -> Result<Step> {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-bench-fan-in-{}-{sidecars}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (url, postgres) = if backend == "postgres" {
        let pg = TestPostgres::start_durable(&format!("fan-in-{sidecars}"))?;
        (pg.url(), Some(pg))
    } else {
        (format!("sqlite://{}", dir.join("usage.db").display()), None)
    };
    let replicas = if postgres.is_some() { 2 } else { 1 };
    let collectors = (0..replicas)
        .map(|_| {
            let keys = IngestKeys::parse([format!("bench={SECRET}").as_str()])?;
            Running::start(0, open(&url)?, keys)
        })
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<std::net::SocketAddr> = collectors.iter().map(|c| c.addr).collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = (process_cpu()?, client_cpu()?);
    let started = Instant::now();
    let seen: Vec<Seen> = runtime.block_on(async {
        let tasks: Vec<_> = (0..sidecars)
            .map(|i| {
                let addr = addrs[i % addrs.len()];
                let stop = Arc::clone(&stop);
                tokio::spawn(sidecar(i, sidecars, addr, stop))
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::with_capacity(tasks.len());
        for task in tasks {
            seen.push(task.await.unwrap_or_default());
        }
        seen
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (process, client) = (process_cpu()? - cpu_before.0, client_cpu()? - cpu_before.1);
    drop(runtime);

    let mut batch: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.batch_micros.iter().copied())
        .collect();
    let mut sync: Vec<u32> = seen
        .iter()
        .flat_map(|s| s.sync_micros.iter().copied())
        .collect();
    batch.sort_unstable();
    sync.sort_unstable();
    let errors: u64 = seen.iter().map(|s| s.errors).sum();
    let acknowledged: u64 = seen.iter().map(|s| s.records_acknowledged).sum();
    let stored: u64 = collectors[0]
        .state
        .store
        .usage(&Default::default())?
        .iter()
        .map(|row| row.units)
        .sum();
    // The collector's CPU is not split by what it did: it is given per request answered
    // (batches and syncs together) and as cores busy.
    let collector_cpu = (process - client).max(0.0);
    let requests = (batch.len() + sync.len()).max(1) as f64;
    let pct = |v: &[u32], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |m| f64::from(*m) / 1000.0)
    };
    let p99_ms = pct(&batch, 0.99).max(pct(&sync, 0.99));
    let exact = stored == acknowledged;
    let row = format!(
        "| {sidecars} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} cores, {:.0} µs per request | {:.2} cores | {errors} | {} ({stored} of {acknowledged} records) |",
        batch.len() as f64 / elapsed,
        sync.len() as f64 / elapsed,
        pct(&batch, 0.5),
        pct(&batch, 0.99),
        pct(&sync, 0.5),
        pct(&sync, 0.99),
        collector_cpu / elapsed,
        collector_cpu * 1e6 / requests,
        client / elapsed,
        if exact { "yes" } else { "NO" },
    );
    drop(collectors);
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Step {
        row,
        p99_ms,
        exact,
        errors,
    })
}

/// One sidecar: its own connection; a sync every 200 ms, a batch every second.
async fn sidecar(
    index: usize,
    of: usize,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    let source = Source {
        instance: format!("sidecar-{index}"),
        vm_started_ms: 1_780_000_000_000,
    };
    // Spread the sidecars over the first period.
    let offset = SYNC_EVERY.as_micros() as u64 * index as u64 / of.max(1) as u64;
    tokio::time::sleep(Duration::from_micros(offset)).await;
    let mut connection: Option<BufStream<TcpStream>> = None;
    let mut tick = tokio::time::interval(SYNC_EVERY);
    let mut n = 0u64;
    let (account, license) = (format!("acct-{}", index % 1000), format!("lic-{index}"));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let sync = SyncRequest {
            version: VERSION,
            instance: source.instance.clone(),
            leases: Vec::new(),
            returns: Vec::new(),
            licenses: vec![LicenseSeen {
                account: account.clone(),
                license: license.clone(),
                plan: "pro".into(),
            }],
            seats: Vec::new(),
            clients: Vec::new(),
        };
        match post(&mut connection, addr, "/v1/sync", &sync.encode()).await {
            Ok((200, micros)) => seen.sync_micros.push(micros),
            _ => seen.errors += 1,
        }
        if n.is_multiple_of(SYNCS_PER_BATCH) {
            let sequence = n / SYNCS_PER_BATCH;
            let batch = UsageBatch {
                version: VERSION,
                batch_id: UsageBatch::id_for(&source, sequence),
                source: source.clone(),
                sequence,
                created_ms: 1_780_000_000_000 + sequence * 1000,
                records: (0..RECORDS_PER_BATCH)
                    .map(|i| UsageRecord {
                        account: account.clone(),
                        license: license.clone(),
                        feature: format!("feature-{i}"),
                        outcome: "allowed".into(),
                        user: String::new(),
                        meter: Meter::Calls,
                        units: 1,
                        window_start_ms: 1_780_000_000_000 + sequence * 1000,
                        window_end_ms: 1_780_000_001_000 + sequence * 1000,
                    })
                    .collect(),
            };
            match post(&mut connection, addr, "/v1/usage", &batch.encode()).await {
                Ok((200, micros)) => {
                    seen.batch_micros.push(micros);
                    seen.records_acknowledged += RECORDS_PER_BATCH as u64;
                }
                _ => seen.errors += 1,
            }
        }
    }
    seen
}

/// A signed POST on the sidecar's keep-alive connection (opened again after an error); the
/// status and the microseconds to the whole answer.
async fn post(
    connection: &mut Option<BufStream<TcpStream>>,
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<(u16, u32)> {
    let started = Instant::now();
    let result = exchange(connection, addr, path, body).await;
    if result.is_err() {
        *connection = None;
    }
    let status = result?;
    Ok((
        status,
        u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX),
    ))
}

async fn exchange(
    connection: &mut Option<BufStream<TcpStream>>,
    addr: std::net::SocketAddr,
    path: &str,
    body: &[u8],
) -> Result<u16> {
    if connection.is_none() {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        *connection = Some(BufStream::new(stream));
    }
    let Some(stream) = connection.as_mut() else {
        bail!("no connection");
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: collector\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{KEY_ID_HEADER}: bench\r\n{SIGNATURE_HEADER}: {}\r\n\r\n",
        body.len(),
        sign(SECRET.as_bytes(), body)
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let mut length = 0usize;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
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
    let mut answer = vec![0u8; length];
    stream.read_exact(&mut answer).await?;
    Ok(status)
}

/// CPU seconds of this process (every thread, also those that ended).
fn process_cpu() -> Result<f64> {
    cpu_of(&std::fs::read_to_string("/proc/self/stat")?)
}

/// CPU seconds of the sidecars' threads.
fn client_cpu() -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() == CLIENT_THREAD {
            total += cpu_of(&std::fs::read_to_string(path.join("stat")).unwrap_or_default())
                .unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// utime + stime of a `/proc/.../stat` line, in seconds.
fn cpu_of(stat: &str) -> Result<f64> {
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')').context("no command in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> Result<f64> { Ok(fields.get(i).context("short stat")?.parse::<f64>()?) };
    // After the name: state is field 0, utime field 11, stime field 12.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}
