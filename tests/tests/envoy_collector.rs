//! Usage from a real Envoy to the collector, counted: what the clients and the upstream saw
//! equals what the collector stored, exactly, also across a collector outage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_collector::{open, IngestKeys, Running, UsageQuery};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{Bootstrap, Envoy, LicenseSpec, SigningKey, Upstream};
use tollgate_tests::http::request;

const SECRET: &str = "e2e-ingest-secret-0123456789";

fn demo_key() -> SigningKey {
    SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap()
}

fn config() -> Value {
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap(),
    )
    .unwrap();
    config["plans"]["tight"] = json!({"rate_limit": {"requests_per_second": 5, "burst": 5}});
    config["collector"] = json!({
        "cluster": "tollgate_collector",
        "instance": "e2e/tollgate",
        "key_id": "k1",
        "secret": SECRET,
        "flush_interval_ms": 200,
        "retry_initial_ms": 100,
        "retry_max_ms": 1000,
        "timeout_ms": 1000,
    });
    config
}

fn license(account: &str, id: &str, plan: &str, features: &[&str]) -> String {
    let mut spec = LicenseSpec::new(account, id, plan, features);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    spec.mint(&demo_key()).unwrap()
}

fn collector(db: &std::path::Path, port: u16) -> Running {
    let keys = IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap();
    Running::start(
        port,
        open(&format!("sqlite://{}", db.display())).unwrap(),
        keys,
    )
    .unwrap()
}

/// What the clients saw: calls per (license, outcome), response body bytes per license of
/// allowed calls.
#[derive(Default, Debug, PartialEq)]
struct Seen {
    calls: BTreeMap<(String, String), u64>,
    allowed_bytes: BTreeMap<String, u64>,
}

/// Mixed traffic: allowed calls with bodies of several sizes, rate-limited calls, calls
/// without a token, calls to a feature the license lacks.
fn traffic(envoy: &Envoy, rounds: usize, seen: &mut Seen) {
    let pro = license("acme", "lic-pro", "pro", &["search"]);
    let tight = license("initech", "lic-tight", "tight", &["search"]);
    for i in 0..rounds {
        let cases: [(&str, Option<&str>, String); 4] = [
            (
                "lic-pro",
                Some(&pro),
                format!("/v1/search?bytes={}", (i % 7) * 300),
            ),
            ("lic-tight", Some(&tight), "/v1/search?bytes=50".into()),
            ("", None, "/v1/search".into()),
            ("lic-pro", Some(&pro), "/v1/reports/q3".into()),
        ];
        for (lid, token, path) in cases {
            let auth = token.map(|t| format!("Bearer {t}").into_bytes());
            let headers: Vec<(&str, &[u8])> = auth
                .as_deref()
                .map(|a| vec![("authorization", a)])
                .unwrap_or_default();
            let r = request(envoy.listener, "GET", &path, &headers).unwrap();
            let outcome = if r.status == 200 {
                "allowed".to_string()
            } else {
                r.code()
            };
            *seen
                .calls
                .entry((lid.to_string(), outcome.clone()))
                .or_default() += 1;
            if r.status == 200 {
                *seen.allowed_bytes.entry(lid.to_string()).or_default() += r.body.len() as u64;
            }
        }
    }
}

/// What the collector stored, in the same shape.
fn stored(c: &Running) -> Seen {
    let mut out = Seen::default();
    for row in c.state.store.usage(&UsageQuery::default()).unwrap() {
        match row.meter.as_str() {
            "calls" => *out.calls.entry((row.license, row.outcome)).or_default() += row.units,
            "response_bytes" if row.outcome == "allowed" => {
                *out.allowed_bytes.entry(row.license).or_default() += row.units
            }
            _ => {}
        }
    }
    out
}

fn wait_for(c: &Running, expected: &Seen) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = stored(c);
        if &got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "collector totals never matched:\n got {got:?}\nwant {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tollgate-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn collector_totals_equal_what_envoy_served() {
    let dir = scratch("totals");
    let c = collector(&dir.join("usage.db"), 0);
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(config(), upstream.port());
    bootstrap.collector_port = Some(c.addr.port());
    let envoy = Envoy::start("totals", &bootstrap.to_json(), 2).unwrap();

    let mut seen = Seen::default();
    traffic(&envoy, 60, &mut seen);
    let allowed: u64 = seen
        .calls
        .iter()
        .filter(|((_, o), _)| o == "allowed")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        upstream.requests(),
        allowed,
        "the upstream served exactly the allowed calls"
    );
    assert!(
        seen.calls.keys().any(|(_, o)| o == "rate_limited"),
        "{seen:?}"
    );
    wait_for(&c, &seen);
    eprintln!("stored exactly: {seen:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn usage_served_while_the_collector_is_down_arrives_exactly_once() {
    let dir = scratch("outage");
    let db = dir.join("usage.db");
    let c = collector(&db, 0);
    let port = c.addr.port();
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(config(), upstream.port());
    bootstrap.collector_port = Some(port);
    let envoy = Envoy::start("outage", &bootstrap.to_json(), 2).unwrap();

    let mut seen = Seen::default();
    traffic(&envoy, 20, &mut seen);
    drop(c);
    // The collector is away for a few seconds while traffic goes on.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        traffic(&envoy, 5, &mut seen);
    }
    let c = collector(&db, port);
    traffic(&envoy, 20, &mut seen);
    wait_for(&c, &seen);
    let _ = std::fs::remove_dir_all(&dir);
}
