//! Envoy's health checks of the collector, as the shipped configuration makes them (every
//! second, `no_traffic_interval` 1 s, one failure takes a replica out): under full ingest load
//! on every storage backend, every check succeeds and the cluster never enters panic mode; a
//! PostgreSQL that stops makes `/readyz` fail within the collector's next store checks and
//! Envoy take the replicas out; when it is back they return by themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_devkit::{Bootstrap, Envoy, TestPostgres, Upstream};
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER,
};

const SECRET: &str = "health-e2e-secret-0123456789";
/// Consecutive checks of each replica that must all succeed under load.
const CHECKS: u64 = 10;

fn replica(url: &str) -> Running {
    let keys = IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap();
    Running::start_state(0, AppState::new(Arc::from(open(url).unwrap()), keys)).unwrap()
}

fn plugin() -> serde_json::Value {
    json!({
        "token": {"jwks": tollgate_devkit::jwks([&tollgate_devkit::SigningKey::generate(
            tollgate_devkit::KeyAlg::EdDSA, "k").unwrap()])},
        "plans": {"p": {}},
        "routes": [{"prefix": "/", "public": true}],
        "collector": {"cluster": "tollgate_collector", "key_id": "k1", "secret": SECRET},
    })
}

/// A batch of 400 records, as large as a busy filter sends.
fn big_batch(thread: u64, sequence: u64) -> Vec<u8> {
    let source = Source {
        instance: format!("load-{thread}"),
        vm_started_ms: 1,
    };
    let records = (0..400)
        .map(|i| UsageRecord {
            account: format!("acct-{}", i % 50),
            license: format!("lic-{}", i % 100),
            feature: "search".into(),
            outcome: "allowed".into(),
            user: String::new(),
            meter: Meter::Calls,
            units: 1,
            window_start_ms: 1_780_000_000_000 + sequence * 1000,
            window_end_ms: 1_780_000_001_000 + sequence * 1000 + i,
        })
        .collect();
    UsageBatch {
        version: 1,
        batch_id: UsageBatch::id_for(&source, sequence),
        source,
        sequence,
        created_ms: 1_780_000_001_000 + sequence * 1000,
        records,
    }
    .encode()
}

/// Ingest as fast as `threads` clients can send, to every replica, until `stop`.
fn load(
    replicas: &[String],
    threads: u64,
    stop: &Arc<AtomicBool>,
    stored: &Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (stop, stored) = (Arc::clone(stop), Arc::clone(stored));
            let urls = replicas.to_vec();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(30))
                    .build();
                let mut sequence = 0;
                while !stop.load(Ordering::Relaxed) {
                    sequence += 1;
                    let body = big_batch(t, sequence);
                    let url = &urls[usize::try_from(sequence).unwrap() % urls.len()];
                    let sent = agent
                        .post(&format!("{url}/v1/usage"))
                        .set(KEY_ID_HEADER, "k1")
                        .set(SIGNATURE_HEADER, &sign(SECRET.as_bytes(), &body))
                        .send_bytes(&body);
                    if sent.is_ok() {
                        stored.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

struct Checks {
    success: u64,
    failure: u64,
    healthy: u64,
}

fn checks(envoy: &Envoy) -> Checks {
    let stats = envoy.stats().unwrap();
    let get = |name: &str| {
        stats
            .get(&format!("cluster.tollgate_collector.{name}"))
            .copied()
            .unwrap_or(0)
    };
    Checks {
        success: get("health_check.success"),
        failure: get("health_check.failure"),
        healthy: get("membership_healthy"),
    }
}

/// Poll Envoy until `done` holds for its health-check figures; `during` sees every sample.
fn until(envoy: &Envoy, limit: Duration, what: &str, mut done: impl FnMut(&Checks) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let now = checks(envoy);
        if done(&now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: success {} failure {} healthy {}\n{}",
            now.success,
            now.failure,
            now.healthy,
            envoy.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn under_load(name: &str, url: &str, pg: Option<&TestPostgres>) {
    let replicas = [replica(url), replica(url)];
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(plugin(), upstream.port());
    bootstrap.collector_ports = replicas.iter().map(|r| r.addr.port()).collect();
    let envoy = Envoy::start(&format!("health-{name}"), &bootstrap.to_json(), 2).unwrap();

    // Both replicas are in after at most two rounds of checks. The first round may time out
    // (NETWORK_TIMEOUT in Envoy's health-check event log) while Envoy's main thread is still
    // creating the filter's VMs; without the wasm filter it never does. With
    // `no_traffic_interval` at its 60 s default the second round would come a minute later.
    until(&envoy, Duration::from_secs(30), "replicas healthy", |c| {
        c.healthy == 2
    });
    let start = checks(&envoy);
    assert!(
        start.success + start.failure <= 4,
        "healthy only after {} checks",
        start.success + start.failure
    );

    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let urls: Vec<String> = replicas.iter().map(|r| r.url("")).collect();
    let loaders = load(&urls, 4, &stop, &stored);
    let stored_at_start = {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stored.load(Ordering::Relaxed) < 8 {
            assert!(Instant::now() < deadline, "the load never got going");
            std::thread::sleep(Duration::from_millis(20));
        }
        stored.load(Ordering::Relaxed)
    };
    // CHECKS consecutive successful checks of each replica while ingest runs flat out; a
    // single failure (a timeout behind ingest) fails the test, and so does panic mode.
    let from = checks(&envoy).success;
    until(&envoy, Duration::from_secs(120), "checks under load", |c| {
        assert_eq!(
            c.failure, start.failure,
            "a health check failed under ingest load"
        );
        assert_eq!(c.healthy, 2, "a replica left the cluster under load");
        c.success >= from + 2 * CHECKS
    });
    let during = stored.load(Ordering::Relaxed) - stored_at_start;
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().unwrap();
    }
    assert!(during >= 2 * CHECKS, "the load stalled: {during} batches");
    eprintln!(
        "health [{name}]: {} consecutive checks passed while {during} batches of 400 records were stored",
        2 * CHECKS
    );

    let Some(pg) = pg else { return };
    // The store stops: each replica's /readyz fails within its next two store checks, and
    // Envoy takes both out.
    let before: Vec<u64> = replicas
        .iter()
        .map(|r| r.state.readiness.checks())
        .collect();
    pg.stop().unwrap();
    for (r, before) in replicas.iter().zip(&before) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let seen = r.state.readiness.checks();
            let answer = ureq::get(&r.url("/readyz")).call();
            if let Err(ureq::Error::Status(503, response)) = answer {
                let body = response.into_string().unwrap();
                assert!(body.contains("the store fails its check"), "{body}");
                assert!(
                    seen <= before + 2,
                    "not ready only after {} checks",
                    seen - before
                );
                break;
            }
            assert!(Instant::now() < deadline, "/readyz stayed ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    until(&envoy, Duration::from_secs(30), "replicas out", |c| {
        c.healthy == 0
    });
    pg.start_again().unwrap();
    until(&envoy, Duration::from_secs(30), "replicas back", |c| {
        c.healthy == 2
    });
}

#[test]
fn health_checks_pass_under_full_ingest_load_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("tollgate-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    under_load(
        "sqlite",
        &format!("sqlite://{}", dir.join("usage.db").display()),
        None,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn health_checks_pass_under_load_and_a_stopped_postgres_fails_readiness() {
    let pg = TestPostgres::start("health").unwrap();
    under_load("postgres", &pg.url(), Some(&pg));
}
