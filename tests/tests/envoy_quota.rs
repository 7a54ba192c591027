//! Period quotas, revocation and spend caps through real Envoys and a real collector: two
//! Envoy processes with two workers each hammer one license; what they admit together is
//! counted against the quota and the bound documented in docs/filter.md ("Quotas").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::{open, AppState, IngestKeys, Running, UsageQuery};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{Adapter, Bootstrap, Envoy, LicenseSpec, SigningKey, Upstream};
use tollgate_tests::collector::stored_allowed_calls;
use tollgate_tests::http::request;

const SECRET: &str = "quota-e2e-secret-0123456789";
const ADMIN: &str = "quota-e2e-admin-token-0123456789";

fn plugin(quotas: Value) -> Value {
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap(),
    )
    .unwrap();
    config["plans"]["metered"] = json!({"quotas": quotas});
    config["collector"] = json!({
        "key_id": "k1",
        "secret": SECRET,
        "flush_interval_ms": 200,
        "retry_initial_ms": 100,
        "retry_max_ms": 1000,
        "timeout_ms": 2000,
    });
    config
}

fn license(id: &str, plan: &str) -> String {
    license_of("acme", id, plan)
}

fn license_of(account: &str, id: &str, plan: &str) -> String {
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap();
    let mut spec = LicenseSpec::new(account, id, plan, &["search"]);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    spec.mint(&key).unwrap()
}

struct Stack {
    collector: Running,
    upstream: Upstream,
    envoys: Vec<Envoy>,
    dir: std::path::PathBuf,
}

fn stack(name: &str, plugin: &Value, envoys: usize, catalog: Option<Value>) -> Stack {
    stack_on(Adapter::Wasm, name, plugin, envoys, catalog)
}

fn stack_on(
    adapter: Adapter,
    name: &str,
    plugin: &Value,
    envoys: usize,
    catalog: Option<Value>,
) -> Stack {
    if adapter == Adapter::Native {
        tollgate_devkit::envoy::require_native_module().unwrap();
    }
    let name = format!("{name}-{}", adapter.name());
    let name = name.as_str();
    let dir = std::env::temp_dir().join(format!("tollgate-quota-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    // Daily and monthly quotas and budgets on the real clock: in a zone where it is midday,
    // so that no test straddles a period's end.
    let mut catalog = catalog.unwrap_or_else(|| json!({}));
    catalog["time_zone"] = json!(tollgate_devkit::periods::midday_time_zone());
    let catalog_path = dir.join("plans.json");
    std::fs::write(&catalog_path, catalog.to_string()).unwrap();
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&catalog_path)).unwrap(),
        // Short leases, so that units left in one Envoy's leases go back to the quota soon.
        lease_ttl_ms: 2_000,
        ..ControlPlane::default()
    };
    let collector = Running::start_state(0, state).unwrap();
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(plugin.clone(), upstream.port());
    bootstrap.adapter = adapter;
    bootstrap.collector_ports = vec![collector.addr.port()];
    let envoys = (0..envoys)
        .map(|i| Envoy::start(&format!("{name}-{i}"), &bootstrap.to_json(), 2).unwrap())
        .collect();
    Stack {
        collector,
        upstream,
        envoys,
        dir,
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the clients got: answers by code (`allowed` for 200), and response bytes of the
/// allowed ones.
#[derive(Default, Debug)]
struct Tally {
    codes: BTreeMap<String, u64>,
    allowed_bytes: u64,
}

impl Tally {
    fn count(&self, code: &str) -> u64 {
        self.codes.get(code).copied().unwrap_or(0)
    }
}

/// `clients` threads per Envoy send `path` with `token` until `done` says stop (it sees the
/// tally every 100 ms) or 90 s pass.
fn hammer(
    envoys: &[Envoy],
    clients: usize,
    token: &str,
    path: &str,
    done: impl Fn(&Tally) -> bool,
) -> Tally {
    let tally = Mutex::new(Tally::default());
    let stop = AtomicBool::new(false);
    let auth = format!("Bearer {token}");
    std::thread::scope(|scope| {
        for envoy in envoys {
            for _ in 0..clients {
                let (tally, stop, auth, addr) = (&tally, &stop, &auth, envoy.listener);
                scope.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let r = request(addr, "GET", path, &[("authorization", auth.as_bytes())]);
                        let mut t = tally.lock().unwrap();
                        match r {
                            Ok(r) if r.status == 200 => {
                                *t.codes.entry("allowed".into()).or_default() += 1;
                                t.allowed_bytes += r.body.len() as u64;
                            }
                            Ok(r) => *t.codes.entry(r.code()).or_default() += 1,
                            Err(e) => *t.codes.entry(format!("error: {e}")).or_default() += 1,
                        }
                    }
                });
            }
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(90) {
            std::thread::sleep(Duration::from_millis(100));
            if done(&tally.lock().unwrap()) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    tally.into_inner().unwrap()
}

/// Stop once the quota is spent, by the collector's count and the clients': every unit of
/// `license`'s `meter` quota is allocated (in open leases or used by closed ones), the clients
/// were admitted at least that many units (`units` of the tally), and refusals have begun.
/// Then no Envoy holds a unit it has not admitted, so nothing more can be admitted; no wall
/// time is involved.
fn spent<'a>(
    collector: &'a Running,
    license: &'a str,
    meter: &'a str,
    units: impl Fn(&Tally) -> u64 + 'a,
) -> impl Fn(&Tally) -> bool + 'a {
    move |t: &Tally| {
        let now = u64::try_from(tollgate_collector::clock::now_ms()).unwrap();
        let quota = collector
            .state
            .store
            .quotas("acme", now)
            .unwrap()
            .into_iter()
            .find(|q| q.license == license && q.meter == meter)
            .map(|q| (q.allocated, q.limit));
        t.count("quota_exhausted") > 0
            && quota.is_some_and(|(allocated, limit)| allocated >= limit && units(t) >= limit)
    }
}

tollgate_tests::with_both_adapters!(
    two_envoys_with_two_workers_each_admit_a_daily_quota_of_1000_calls_once,
    a_bytes_quota_holds_with_large_responses,
    a_held_request_with_a_body_reaches_the_upstream_only_when_admitted,
);

fn two_envoys_with_two_workers_each_admit_a_daily_quota_of_1000_calls_once(adapter: Adapter) {
    let plugin = plugin(json!({"calls": {"per": "day", "limit": 1000}}));
    let s = stack_on(adapter, "calls", &plugin, 2, None);
    let token = license("lic-quota", "metered");
    let tally = hammer(
        &s.envoys,
        2,
        &token,
        "/v1/search",
        spent(&s.collector, "lic-quota", "calls", |t| t.count("allowed")),
    );
    eprintln!("calls quota 1000, 2 Envoys x 2 workers: {tally:?}");
    let allowed = tally.count("allowed");
    // Bound (docs/filter.md, "Quotas"): calls are only admitted out of grants, so exactly the
    // quota; a grant whose request a second worker's first write of the pool overwrote is held
    // all the same, so the hammer reaches the quota rather than stranding a lease.
    assert_eq!(allowed, 1000, "admitted {allowed}, quota 1000: {tally:?}");
    assert!(
        tally
            .codes
            .keys()
            .all(|c| c == "allowed" || c == "quota_exhausted"),
        "{tally:?}"
    );
    // Every admitted call is also billed exactly once.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored_allowed_calls(&s.collector, "lic-quota").unwrap() != allowed {
        assert!(
            Instant::now() < deadline,
            "stored {} of {allowed}",
            stored_allowed_calls(&s.collector, "lic-quota").unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The refusal says when the quota comes back, and how large it is.
    let r = request(
        s.envoys[0].listener,
        "GET",
        "/v1/search",
        &[("authorization", format!("Bearer {token}").as_bytes())],
    )
    .unwrap();
    assert_eq!(r.status, 429);
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"quota_calls_day\";q=1000;w=86400")
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
}

fn a_bytes_quota_holds_with_large_responses(adapter: Adapter) {
    let limit = 200_000u64;
    let plugin = plugin(json!({"response_bytes": {"per": "month", "limit": limit}}));
    let s = stack_on(adapter, "bytes", &plugin, 2, None);
    let token = license("lic-bytes", "metered");
    let tally = hammer(
        &s.envoys,
        2,
        &token,
        "/v1/search?bytes=5000",
        spent(&s.collector, "lic-bytes", "response_bytes", |t| {
            t.allowed_bytes
        }),
    );
    eprintln!("response_bytes quota {limit}, responses of 5,000 bytes: {tally:?}");
    // A response is reserved before it is known (64 KiB, or what the lease has left) and
    // committed at its end: one larger than its reservation goes past the grant. At most
    // each client's request in flight can do so: 4 x 5,000 bytes.
    let bound = 4 * 5_000;
    assert!(
        (limit..=limit + bound).contains(&tally.allowed_bytes),
        "{} bytes admitted, quota {limit}, bound {bound}: {tally:?}",
        tally.allowed_bytes
    );
}

#[test]
fn revocation_and_spend_caps_stop_traffic_within_one_sync() {
    // 0.01 EUR per call and a budget of 1.00 EUR a month: 100 calls.
    let catalog = json!({"currency": "EUR", "plans": {"pro": {"prices": {"calls": "0.01"}}}});
    let plugin = plugin(json!({"calls": {"per": "day", "limit": 1_000_000}}));
    let s = stack("deny", &plugin, 0, Some(catalog));
    let admin = |method: &str, path: &str, body: Option<Value>| {
        let req = ureq::request(method, &s.collector.url(path))
            .set("authorization", &format!("Bearer {ADMIN}"));
        let r = match body {
            Some(b) => req.send_string(&b.to_string()),
            None => req.call(),
        };
        r.unwrap().status()
    };

    // Revocation, through an Envoy with one worker (the only VM that syncs with this
    // collector: the stack's Envoy has no traffic yet, and a VM with nothing to sync sends
    // nothing), so the collector's count of syncs answered is that worker's. A request is
    // sent after each sync the collector answers, so every sync names the license. The
    // documented bound (one sync interval plus the collector's answer) in syncs: the one in
    // flight at the revocation may miss it, the next brings it, and once the collector has
    // answered the one after that, the worker has applied it (it sends a sync only after
    // applying the last answer). So the request sent after the third sync must be refused;
    // one more is allowed for a request a loaded machine delays past the next sync.
    let mut bootstrap = Bootstrap::new(plugin.clone(), s.upstream.port());
    bootstrap.collector_ports = vec![s.collector.addr.port()];
    let single = Envoy::start("deny-revoke", &bootstrap.to_json(), 1).unwrap();
    let auth = format!("Bearer {}", license("lic-revoke", "pro"));
    let call = |auth: &str| {
        let r = request(
            single.listener,
            "GET",
            "/v1/search",
            &[("authorization", auth.as_bytes())],
        )
        .unwrap();
        if r.status == 200 {
            "allowed".to_string()
        } else {
            r.code()
        }
    };
    let syncs = || collector_syncs(&s.collector);
    let next_sync = |after: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = syncs();
            if now > after {
                return now;
            }
            assert!(Instant::now() < deadline, "no sync after {after}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for _ in 0..20 {
        assert_eq!(call(&auth), "allowed");
    }
    assert_eq!(
        admin(
            "POST",
            // Minted by the test, not issued here, and maybe not named by a sync yet.
            "/v1/admin/licenses/lic-revoke/revoke?force=true",
            Some(json!({"reason": "chargeback"}))
        ),
        204
    );
    let revoked_at = syncs();
    let mut seen = syncs();
    let mut outcomes = Vec::new();
    let refused_after = loop {
        seen = next_sync(seen);
        let outcome = call(&auth);
        outcomes.push(outcome.clone());
        if outcome != "allowed" {
            assert_eq!(outcome, "license_revoked", "{outcomes:?}");
            break seen - revoked_at;
        }
        assert!(
            seen - revoked_at < 4,
            "still admitted after {} syncs: {outcomes:?}",
            seen - revoked_at
        );
    };
    eprintln!("revocation refused the request sent after sync {refused_after} of the collector: {outcomes:?}");

    // Spend cap: an account with a budget of 1.00 EUR (and no spend yet) gets 100 calls,
    // then 402.
    assert_eq!(
        admin(
            "PUT",
            // Before globex's first call: nothing here has heard of it yet.
            "/v1/admin/accounts/globex/budget?force=true",
            Some(json!({"period": "month", "amount": "1.00"}))
        ),
        204
    );
    // Calls one after the other, each after reading what the collector has stored and how
    // many syncs it has answered. Spend is priced from stored usage: the calls served before
    // the 100th is stored go over the cap (the flush interval's worth, and what is in flight),
    // and once it is stored the bound is the revocation's, in syncs.
    let token = license_of("globex", "lic-spend", "pro");
    let auth = format!("Bearer {token}");
    let (mut allowed, mut crossed_at, mut past_cap) = (0u64, None::<u64>, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "never capped: {allowed} allowed");
        let stored = stored_allowed_calls(&s.collector, "lic-spend").unwrap();
        let syncs_now = syncs();
        if crossed_at.is_none() && stored >= 100 {
            crossed_at = Some(syncs_now);
        }
        match call(&auth).as_str() {
            "allowed" => {
                allowed += 1;
                if let Some(crossed) = crossed_at {
                    past_cap += 1;
                    assert!(
                        syncs_now - crossed < 4,
                        "admitted {} syncs after 100 calls were stored",
                        syncs_now - crossed
                    );
                }
            }
            "spend_cap_reached" => break,
            // The plan's rate limit (a fast client meets it): not served, not billed.
            "rate_limited" => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("{other} after {allowed} allowed"),
        }
    }
    assert!(allowed >= 100, "capped after {allowed} calls");
    eprintln!(
        "spend cap 1.00 EUR at 0.01 EUR a call: {allowed} admitted, {} past the budget, {past_cap} of them after the 100th was stored",
        allowed - 100
    );
    let r = request(
        single.listener,
        "GET",
        "/v1/search",
        &[("authorization", auth.as_bytes())],
    )
    .unwrap();
    assert_eq!(r.status, 402);
    assert_eq!(r.code(), "spend_cap_reached");
    assert!(r.header("retry-after").is_some());
}

/// Syncs the collector has answered (`tollgate_collector_syncs_total`).
fn collector_syncs(c: &Running) -> u64 {
    let metrics = ureq::get(&c.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_collector_syncs_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The collector is unreachable from the start: `deny` answers 503 `quota_unavailable` after
/// the lease wait; `allow` admits the fixed allowance, then 503.
#[test]
fn without_a_collector_quotas_deny_or_allow_the_allowance() {
    let free_port = tollgate_devkit::ports::unused_port().unwrap();
    let upstream = Upstream::start(0).unwrap();
    let token = license("lic-offline", "metered");
    let auth = format!("Bearer {token}");
    for (behaviour, expected_allowed) in [("deny", 0u64), ("allow", 3)] {
        let mut config = plugin(json!({"calls": {"per": "day", "limit": 1000}}));
        config["quota"] = json!({
            "without_collector": behaviour,
            "allowance": 3,
            "lease_wait_ms": 300,
        });
        let mut bootstrap = Bootstrap::new(config, upstream.port());
        bootstrap.collector_ports = vec![free_port];
        let envoy = Envoy::start(&format!("offline-{behaviour}"), &bootstrap.to_json(), 1).unwrap();
        let mut tally = Tally::default();
        let started = Instant::now();
        for _ in 0..8 {
            let r = request(
                envoy.listener,
                "GET",
                "/v1/search",
                &[("authorization", auth.as_bytes())],
            )
            .unwrap();
            let code = if r.status == 200 {
                "allowed".to_string()
            } else {
                r.code()
            };
            if r.status != 200 {
                assert_eq!(r.status, 503, "{behaviour}: {:?}", r.body);
            }
            *tally.codes.entry(code).or_default() += 1;
        }
        eprintln!(
            "without_collector {behaviour}: {tally:?} in {:?}",
            started.elapsed()
        );
        assert_eq!(
            tally.count("allowed"),
            expected_allowed,
            "{behaviour}: {tally:?}"
        );
        assert_eq!(
            tally.count("quota_unavailable"),
            8 - expected_allowed,
            "{behaviour}: {tally:?}"
        );
        // A request with a body, held and then refused, never reaches the upstream.
        if behaviour == "deny" {
            let before = upstream.requests();
            let r = ureq::post(&envoy.url("/v1/search"))
                .set("authorization", &auth)
                .send_string(&"y".repeat(50_000));
            match r {
                Err(ureq::Error::Status(503, _)) => {}
                other => panic!("expected 503: {:?}", other.map(|r| r.status())),
            }
            // The 503 is Envoy's local reply: the stream ended without an upstream request,
            // so the counts are final once the client has it (no waiting for one to show up).
            assert_eq!(
                upstream.requests(),
                before,
                "a refused request went upstream"
            );
        }
    }
}

/// A request with a body that has to wait for its license's first lease is held whole: the
/// upstream gets it only once it is admitted, with the license headers and not the forged ones.
fn a_held_request_with_a_body_reaches_the_upstream_only_when_admitted(adapter: Adapter) {
    let plugin = plugin(json!({"calls": {"per": "day", "limit": 2}}));
    let s = stack_on(adapter, "held-post", &plugin, 1, None);
    let token = license("lic-post", "metered");
    let post = |n: usize| {
        let body = "x".repeat(n);
        match ureq::post(&s.envoys[0].url("/v1/search"))
            .set("authorization", &format!("Bearer {token}"))
            .set("x-tollgate-account", "forged-account")
            .send_string(&body)
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    // The first request of the license waits for a lease, then goes through whole.
    let (status, body) = post(100_000);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["x-tollgate-account"], json!(["acme"]));
    assert_eq!(seen["headers"]["x-tollgate-license"], json!(["lic-post"]));
    assert_eq!(seen["body_bytes"], 100_000);
    assert_eq!(post(10).0, 200);
    // Over the quota: refused, and the upstream never saw it.
    let upstream_before = s.upstream.requests();
    let (status, body) = post(50_000);
    assert_eq!(
        (status, body.contains("quota_exhausted")),
        (429, true),
        "{body}"
    );
    assert_eq!(s.upstream.requests(), upstream_before);
    // Request bytes are metered for the calls served, waiting or not.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let bytes: u64 = s
            .collector
            .state
            .store
            .usage(&UsageQuery {
                license: Some("lic-post".into()),
                meter: Some("request_bytes".into()),
                outcome: Some("allowed".into()),
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|r| r.units)
            .sum();
        if bytes == 100_010 {
            break;
        }
        assert!(Instant::now() < deadline, "request bytes stored: {bytes}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
