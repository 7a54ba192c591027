//! Where the filter's per-request time goes in its pure-Rust core, natively: the work of one
//! request (admit, then record its usage), and the work of each flush (drain the meters,
//! seal a batch, sign it; build the sync), over 1 to 100,000 distinct licenses. It runs the
//! core that the .wasm runs, without proxy-wasm: what is left of the filter's cost in Envoy
//! is the ABI (see `wasm-empty` and `wasm-calls` in `filter-bench`).
//!
//! ```sh
//! cargo run --release -p tollgate-bench --bin gate-profile -- [requests] [licenses,...]
//! ```

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tollgate_bench::INGEST_SECRET;
use tollgate_core::shipper::Shipper;
use tollgate_core::{Gate, MemoryCells, Policy, RequestHead, UsageTotals};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{jwks, unix_now, LicenseSpec, SigningKey};
use tollgate_wire::Source;

/// The demo configuration's (`envoy/tollgate.json`) issuer and audience.
const ISSUER: &str = "https://licenses.tollgate.example";
const AUDIENCE: &str = "api.example.com";

/// Requests per simulated flush interval (about one second of one worker at saturation).
const PER_FLUSH: usize = 5_000;

fn head(token: &str) -> RequestHead<'_> {
    RequestHead {
        method: "GET",
        path: "/v1/search?q=bench",
        credential: Some(token),
        user: None,
        client_address: None,
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let requests: usize = args.first().map_or(Ok(200_000), |a| a.parse())?;
    let cardinalities: Vec<usize> = match args.get(1) {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![1, 1_000, 100_000],
    };
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json"))?;
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(
        workspace_root().join("envoy/tollgate.json"),
    )?)?;
    config["token"]["jwks"] = jwks([&key]);
    config["token"]["cache_entries"] = json!(200_000);
    config["plans"]["pro"] =
        json!({"rate_limit": {"requests_per_second": 1_000_000_000, "burst": 1_000_000_000}});
    config["collector"] = json!({"key_id": "bench", "secret": INGEST_SECRET});
    let policy = Arc::new(Policy::from_json(config.to_string().as_bytes())?);
    let collector = policy.collector.clone().context("a collector")?;
    let now = unix_now();

    println!("| licenses | admit (ns/request) | record | flush: drain + seal + sign, per request | sync work, per request | total |");
    println!("|---|---|---|---|---|---|");
    for licenses in cardinalities {
        let tokens: Vec<String> = (0..licenses)
            .map(|i| {
                // As filter-bench mints them: 1,000 accounts.
                let mut spec = LicenseSpec::new(
                    &format!("acct-{}", i % 1000),
                    &format!("lic-EdDSA-{i}"),
                    "pro",
                    &["search"],
                );
                spec.issuer = Some(ISSUER.into());
                spec.audience = Some(AUDIENCE.into());
                spec.ttl_seconds = 24 * 3600;
                Ok(format!("Bearer {}", spec.mint(&key)?))
            })
            .collect::<Result<_>>()?;
        let mut gate = Gate::new(Arc::clone(&policy), Rc::new(MemoryCells::default()));
        let mut shipper = Shipper::new(
            collector.shipper,
            Source {
                instance: "profile".into(),
                vm_started_ms: now * 1000,
            },
            now * 1000,
        );
        // Warm: every token verified once and cached.
        for token in &tokens {
            let _ = gate.admit(&head(token), now * 1_000_000_000);
        }
        let _ = gate.drain_usage();
        let _ = gate.sync_work(now * 1000);
        let (mut admit, mut record, mut flush, mut sync) = (
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        );
        let mut clock_ns = now * 1_000_000_000;
        let (mut drain, mut seal, mut sign, mut bytes) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO, 0usize);
        for (i, token) in tokens.iter().cycle().take(requests).enumerate() {
            clock_ns += 200_000;
            let t0 = Instant::now();
            let admission = gate.admit(&head(token), clock_ns);
            let t1 = Instant::now();
            if admission.verdict != tollgate_core::Verdict::Allow {
                anyhow::bail!("request {i} not allowed: {:?}", admission.verdict);
            }
            gate.record(
                &admission,
                UsageTotals {
                    calls: 1,
                    request_bytes: 0,
                    response_bytes: 2,
                    processing_nanos: 30_000,
                },
            );
            let t2 = Instant::now();
            admit += t1 - t0;
            record += t2 - t1;
            if (i + 1) % PER_FLUSH == 0 {
                let now_ms = clock_ns / 1_000_000;
                let t3 = Instant::now();
                let usage = gate.drain_usage();
                let t_drained = Instant::now();
                shipper.seal(usage, |f| policy.feature_name(f), now_ms);
                let t_sealed = Instant::now();
                drain += t_drained - t3;
                seal += t_sealed - t_drained;
                while let Some(out) = shipper.next_send(now_ms) {
                    let t_sign = Instant::now();
                    bytes += out.body.len();
                    std::hint::black_box(tollgate_wire::sign(&collector.secret, &out.body));
                    sign += t_sign.elapsed();
                    let ack = tollgate_wire::BatchAck {
                        version: tollgate_wire::VERSION,
                        batch_id: out.batch_id.clone(),
                        status: tollgate_wire::AckStatus::Accepted,
                        records: out.records as u64,
                    };
                    shipper.acknowledged(&ack);
                }
                let t4 = Instant::now();
                std::hint::black_box(gate.sync_work(now_ms));
                sync += t4.elapsed();
                flush += t4 - t3;
            }
        }
        let counters = gate.take_counters();
        eprintln!(
            "{licenses} licenses: cache hits {}, misses {}, allowed {:?}",
            counters.token_cache_hits, counters.token_cache_misses, counters
        );
        let per = |d: Duration| d.as_nanos() as f64 / requests as f64;
        eprintln!(
            "  flush per request: drain {:.0} ns, seal (records + JSON) {:.0} ns, sign {:.0} ns; {:.0} bytes of batch per request",
            per(drain),
            per(seal),
            per(sign),
            bytes as f64 / requests as f64
        );
        println!(
            "| {licenses} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            per(admit),
            per(record),
            per(flush),
            per(sync),
            per(admit + record + flush + sync)
        );
    }
    quota_pool_profile(requests)?;
    Ok(())
}

/// A request on a route with a quota reads and writes its pool in shared data twice (reserve
/// when it starts, commit when it ends). This times that pair on a pool holding two leases and
/// a lease request in flight, with the pool's binary layout and with the JSON it replaced.
fn quota_pool_profile(requests: usize) -> Result<()> {
    use tollgate_core::quota::{update_blob, MemoryBlobs, Pool, Reservation};
    use tollgate_wire::sync::{LeaseGrant, Period};
    let now_ms = unix_now() * 1000;
    let key = tollgate_core::quota::pool_key("lic-bench", tollgate_wire::Meter::Calls, Period::Day);
    type Codec = (fn(&[u8]) -> Pool, fn(&Pool) -> Vec<u8>);
    let fresh = |(decode, encode): Codec| -> Result<MemoryBlobs> {
        let blobs = MemoryBlobs::default();
        update_blob(&blobs, &key, decode, encode, |pool| {
            for n in 0..3 {
                let id = pool.begin_fetch(|| format!("envoy-1/w{n}/q{n}"), now_ms);
                if n < 2 {
                    pool.apply_grant(
                        &LeaseGrant {
                            lease_id: id,
                            granted: u64::MAX / 4,
                            period_start_ms: now_ms - 1000,
                            period_end_ms: now_ms + 3_600_000,
                            expires_ms: now_ms + 3_600_000,
                            allocated: 0,
                        },
                        now_ms,
                    );
                }
            }
        })
        .map_err(|_| anyhow::anyhow!("pool"))?;
        Ok(blobs)
    };
    println!();
    println!("| quota pool, reserve + commit | ns/request | bytes in shared data |");
    println!("|---|---|---|");
    let json: Codec = (
        |b| serde_json::from_slice(b).unwrap_or_default(),
        |p| serde_json::to_vec(p).unwrap_or_default(),
    );
    let layout: Codec = (Pool::decode, Pool::encode);
    for (name, (decode, encode)) in [("binary layout", layout), ("JSON (before)", json)] {
        let blobs = fresh((decode, encode))?;
        let started = Instant::now();
        for _ in 0..requests {
            let r = update_blob(&blobs, &key, decode, encode, |p| p.reserve(1, now_ms))
                .map_err(|_| anyhow::anyhow!("reserve"))?;
            let Reservation::Taken { lease_id, units } = r else {
                anyhow::bail!("not taken: {r:?}");
            };
            update_blob(&blobs, &key, decode, encode, |p| {
                p.commit(&lease_id, units, 1)
            })
            .map_err(|_| anyhow::anyhow!("commit"))?;
        }
        let per = started.elapsed().as_nanos() as f64 / requests as f64;
        let size = update_blob(&blobs, &key, decode, encode, |p| encode(p).len()).unwrap_or(0);
        println!("| {name} | {per:.0} | {size} |");
    }
    Ok(())
}
