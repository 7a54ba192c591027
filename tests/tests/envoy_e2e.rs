//! End to end through a real Envoy (from `make envoy`) running the release .wasm, with a real
//! upstream. Each test starts its own Envoy on free ports and stops it when done. The answers
//! and the shared rate limit run once per adapter (`wasm::…` and `native::…`): the same test
//! body against the wasm filter and the native module (`make native`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tollgate_devkit::envoy::{require_native_module, validate, workspace_root};
use tollgate_devkit::{unix_now, Adapter, Bootstrap, Envoy, LicenseSpec, SigningKey, Upstream};
use tollgate_tests::http::{request, RawResponse};

const ISSUER: &str = "https://licenses.tollgate.example";
const AUDIENCE: &str = "api.example.com";

fn demo_key() -> SigningKey {
    SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap()
}

fn demo_config() -> Value {
    serde_json::from_slice(&std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap())
        .unwrap()
}

fn license(account: &str, id: &str, plan: &str, features: &[&str]) -> LicenseSpec {
    let mut spec = LicenseSpec::new(account, id, plan, features);
    spec.issuer = Some(ISSUER.into());
    spec.audience = Some(AUDIENCE.into());
    spec
}

struct Stack {
    envoy: Envoy,
    upstream: Upstream,
}

fn stack_with(adapter: Adapter, name: &str, config: Value, concurrency: u32) -> Stack {
    if adapter == Adapter::Native {
        require_native_module().unwrap();
    }
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(config, upstream.port());
    bootstrap.adapter = adapter;
    bootstrap.exact_balance = true;
    let envoy = Envoy::start(name, &bootstrap.to_json(), concurrency).unwrap();
    Stack { envoy, upstream }
}

fn get(stack: &Stack, path: &str, headers: &[(&str, &[u8])]) -> RawResponse {
    request(stack.envoy.listener, "GET", path, headers).unwrap()
}

fn bearer(token: &str) -> Vec<u8> {
    format!("Bearer {token}").into_bytes()
}

/// Poll until `check` holds (stats are folded in once a second), at most 15 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM never panicked: Envoy logs a failed wasm call or a Rust panic message otherwise.
fn assert_no_vm_failure(envoy: &Envoy) {
    let log = envoy.log();
    for sign in [
        "panicked at",
        "Function: proxy_on",
        "wasm trap",
        "VM has failed",
        "Plugin configured to fail closed",
        "panic caught in",
    ] {
        assert!(!log.contains(sign), "Envoy log shows `{sign}`:\n{log}");
    }
}

tollgate_tests::with_both_adapters!(
    licensed_request_reaches_upstream_with_context_headers_and_no_forgeries,
    every_refusal_has_its_status_code_and_json_body,
    rate_limit_holds_for_the_whole_envoy_across_two_workers,
    malformed_tokens_all_get_401_and_envoy_keeps_serving,
    usage_is_metered_into_envoy_stats,
    one_combined_header_can_carry_the_license_context,
    a_missing_module_fails_closed_at_start_and_on_an_update,
);

/// Fail closed: a filter whose module is not there lets no request through unchecked. At
/// start Envoy refuses the configuration (`--mode validate` names the module; Envoy exits
/// rather than serve). As an update (ECDS, as a control plane or Istio sends it), Envoy
/// refuses the update and the running filter keeps deciding every request.
fn a_missing_module_fails_closed_at_start_and_on_an_update(adapter: Adapter) {
    if adapter == Adapter::Native {
        require_native_module().unwrap();
    }
    let name = format!("missing-module-{}-{}", adapter.name(), std::process::id());
    let dir = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let without_module = |bootstrap: &mut Bootstrap| match adapter {
        Adapter::Wasm => bootstrap.wasm_path = dir.join("tollgate_missing.wasm"),
        Adapter::Native => bootstrap.native_module = "tollgate_missing".into(),
    };
    let upstream = Upstream::start(0).unwrap();
    let config = demo_config();

    // At start.
    let mut bootstrap = Bootstrap::new(config.clone(), upstream.port());
    bootstrap.adapter = adapter;
    without_module(&mut bootstrap);
    let path = dir.join("envoy.json");
    std::fs::write(&path, bootstrap.to_json().to_string()).unwrap();
    let err = validate(&path).unwrap_err().to_string();
    assert!(err.contains("tollgate_missing"), "{err}");
    let err = match Envoy::start(&format!("{name}-start"), &bootstrap.to_json(), 1) {
        Ok(_) => panic!("Envoy started with its filter's module missing"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("exited"), "{err}");

    // As an update of a running filter.
    let mut bootstrap = Bootstrap::new(config.clone(), upstream.port());
    bootstrap.adapter = adapter;
    bootstrap.ecds_dir = Some(dir.join("ecds"));
    bootstrap.write_plugin_config(&config).unwrap();
    let envoy = Envoy::start(&format!("{name}-update"), &bootstrap.to_json(), 2).unwrap();
    let stat = |name: &str| {
        envoy
            .stat(&format!(
                "extension_config_discovery.http_filter.tollgate.{name}"
            ))
            .unwrap()
    };
    let failures = stat("config_fail");
    let token = bearer(
        &license("acme", "lic-missing-module", "pro", &["search"])
            .mint(&demo_key())
            .unwrap(),
    );
    let decided = || {
        let unlicensed = request(envoy.listener, "GET", "/v1/search", &[]).unwrap();
        assert_eq!(
            (unlicensed.status, unlicensed.code().as_str()),
            (401, "missing_token")
        );
        let licensed = request(
            envoy.listener,
            "GET",
            "/v1/search",
            &[("authorization", token.as_slice())],
        )
        .unwrap();
        assert_eq!(licensed.status, 200);
    };
    decided();
    without_module(&mut bootstrap);
    bootstrap.write_plugin_config(&config).unwrap();
    eventually("Envoy to refuse the update", || {
        stat("config_fail") > failures
    });
    // (Envoy's file watch may also reload the unchanged file once while the new one is
    // written, so `config_reload` can move; what matters is that the filter still decides.)
    decided();
    assert_eq!(
        upstream.requests(),
        2,
        "only the licensed requests went upstream"
    );
    drop(envoy);
    let _ = std::fs::remove_dir_all(&dir);
}

fn one_combined_header_can_carry_the_license_context(adapter: Adapter) {
    let mut config = demo_config();
    config["upstream_headers"] = json!({
        "account": null, "license": null, "plan": null, "feature": null,
        "combined": "x-tollgate-context",
    });
    let s = stack_with(adapter, "combined", config, 1);
    let token = license("acme", "lic-1", "starter", &["search"])
        .mint(&demo_key())
        .unwrap();
    let auth = bearer(&token);
    let forged: &[u8] = b"account=\"someone-else\"";
    let r = get(
        &s,
        "/v1/search?q=x",
        &[("authorization", &auth), ("x-tollgate-context", forged)],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json().unwrap();
    assert_eq!(
        seen["headers"]["x-tollgate-context"],
        json!([r#"account="acme", license="lic-1", plan="starter", feature="search""#])
    );
    assert!(
        seen["headers"].get("x-tollgate-account").is_none(),
        "{seen}"
    );
    // A public route strips a forged one.
    let r = get(&s, "/healthz", &[("x-tollgate-context", forged)]);
    assert_eq!(r.status, 200);
    assert!(r.json().unwrap()["headers"]
        .get("x-tollgate-context")
        .is_none());
}

fn licensed_request_reaches_upstream_with_context_headers_and_no_forgeries(adapter: Adapter) {
    let s = stack_with(adapter, "forward", demo_config(), 2);
    let token = license("acme", "lic-1", "starter", &["search"])
        .mint(&demo_key())
        .unwrap();
    let auth = bearer(&token);
    let r = get(
        &s,
        "/v1/search?q=x",
        &[
            ("authorization", &auth),
            ("x-tollgate-account", b"someone-else"),
            ("x-tollgate-account", b"and-another"),
            ("X-Tollgate-Plan", b"enterprise"),
        ],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json().unwrap();
    assert_eq!(seen["headers"]["x-tollgate-account"], json!(["acme"]));
    assert_eq!(seen["headers"]["x-tollgate-license"], json!(["lic-1"]));
    assert_eq!(seen["headers"]["x-tollgate-plan"], json!(["starter"]));
    assert_eq!(seen["headers"]["x-tollgate-feature"], json!(["search"]));
    // The license stays at the gate (`token.strip_from_upstream`, on by default).
    assert!(seen["headers"].get("authorization").is_none(), "{seen}");
    // starter: 5 per second, burst 10; this was the first request of the license.
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"license\";q=10;w=2"),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("ratelimit"), Some("\"license\";r=9;t=1"));

    // A public route needs no token and forwards no forged license headers either.
    let r = get(
        &s,
        "/healthz",
        &[
            ("x-tollgate-account", b"forged"),
            ("x-tollgate-feature", b"forged"),
        ],
    );
    assert_eq!(r.status, 200);
    let seen = r.json().unwrap();
    assert!(
        seen["headers"].get("x-tollgate-account").is_none(),
        "{seen}"
    );
    assert!(
        seen["headers"].get("x-tollgate-feature").is_none(),
        "{seen}"
    );
    assert_eq!(s.upstream.requests(), 2);
}

fn every_refusal_has_its_status_code_and_json_body(adapter: Adapter) {
    let mut config = demo_config();
    // A second issuer's key, which the filter does not trust.
    let key = demo_key();
    config["plans"]["legacy"] = json!({});
    let s = stack_with(adapter, "refusals", config, 1);
    let now = unix_now();
    let acme = license("acme", "lic-1", "starter", &["search"]);
    let sign = |spec: &LicenseSpec, at: u64| key.sign(&spec.claims_at(at)).unwrap();
    let mut wrong_iss = acme.clone();
    wrong_iss.issuer = Some("https://elsewhere.example".into());
    let mut wrong_aud = acme.clone();
    wrong_aud.audience = Some("other-api".into());
    let unknown_plan = license("acme", "lic-1", "platinum", &["search"]);
    let mut no_lid = acme.claims_at(now);
    no_lid.as_object_mut().unwrap().remove("lid");
    let stranger = SigningKey::generate(tollgate_devkit::KeyAlg::EdDSA, "demo-2026").unwrap();

    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("/v1/search", None, 401, "missing_token"),
        (
            "/v1/search",
            Some("Bearer not.a.jwt".into()),
            401,
            "invalid_token",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&acme, now).replace('.', ".x"))),
            401,
            "invalid_token",
        ),
        (
            "/v1/search",
            Some(format!(
                "Bearer {}",
                stranger.sign(&acme.claims_at(now)).unwrap()
            )),
            401,
            "invalid_token",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&acme, now - 7200))),
            401,
            "token_expired",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&acme, now + 3600))),
            401,
            "token_not_yet_valid",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&wrong_iss, now))),
            401,
            "invalid_issuer",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&wrong_aud, now))),
            401,
            "invalid_audience",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", key.sign(&no_lid).unwrap())),
            401,
            "invalid_license",
        ),
        (
            "/v1/search",
            Some(format!("Bearer {}", sign(&unknown_plan, now))),
            403,
            "unknown_plan",
        ),
        (
            "/v1/reports/q3",
            Some(format!("Bearer {}", sign(&acme, now))),
            403,
            "feature_not_licensed",
        ),
        (
            "/internal/admin",
            Some(format!("Bearer {}", sign(&acme, now))),
            403,
            "route_not_licensed",
        ),
        (
            "/v1/design/run",
            Some(format!("Bearer {}", sign(&acme, now))),
            405,
            "method_not_allowed",
        ),
    ];
    for (path, credential, status, code) in cases {
        let headers: Vec<(&str, &[u8])> = credential
            .as_deref()
            .map(|c| vec![("authorization", c.as_bytes())])
            .unwrap_or_default();
        let r = get(&s, path, &headers);
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{path} {credential:?}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.header("allow"),
            (status == 405).then_some("POST"),
            "{path}"
        );
        assert!(r.json().unwrap()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        if status == 401 {
            let challenge = r.header("www-authenticate").unwrap();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            assert_eq!(
                challenge.contains("error=\"invalid_token\""),
                code != "missing_token",
                "{challenge}"
            );
        }
    }
    assert_eq!(
        s.upstream.requests(),
        0,
        "no refused request may reach the upstream"
    );
    assert_no_vm_failure(&s.envoy);
}

fn rate_limit_holds_for_the_whole_envoy_across_two_workers(adapter: Adapter) {
    let rps = 20.0;
    let burst = 20.0;
    let (rps_json, burst_json) = (20, 20);
    let mut config = demo_config();
    config["plans"]["metered"] =
        json!({"rate_limit": {"requests_per_second": rps_json, "burst": burst_json}});
    // Each worker takes min(lease, burst / 8) = 2 requests at once from the shared bucket.
    let lease = 16;
    config["rate_limit_lease"] = json!(lease);
    let leased = lease.min(burst_json / 8).max(1);
    let s = stack_with(adapter, "ratelimit", config, 2);
    let token = license("acme", "lic-rl", "metered", &["search"])
        .mint(&demo_key())
        .unwrap();

    // 8 client connections, spread evenly over both workers, as fast as they can for ~3 s.
    let admitted = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let url = s.envoy.url("/v1/search");
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (admitted, limited, url, token) = (
                admitted.clone(),
                limited.clone(),
                url.clone(),
                token.clone(),
            );
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .max_idle_connections_per_host(1)
                    .build();
                let mut retry_after_seen = false;
                // When this client got its first answer and sent its last request: between
                // the latest first answer and the earliest last send, every client had a
                // request at Envoy or on its way, so the limiter had no idle time to lose.
                let (mut first_answer, mut last_send) = (None, Duration::ZERO);
                while started.elapsed() < run_for {
                    last_send = started.elapsed();
                    match agent
                        .get(&url)
                        .set("authorization", &format!("Bearer {token}"))
                        .call()
                    {
                        Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                        Err(ureq::Error::Status(429, r)) => {
                            retry_after_seen |= r.header("retry-after").is_some()
                                && r.header("ratelimit-policy") == Some("\"license\";q=20;w=1");
                            limited.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => panic!("{e}"),
                    };
                    first_answer.get_or_insert_with(|| started.elapsed());
                }
                (retry_after_seen, first_answer.unwrap_or(run_for), last_send)
            })
        })
        .collect();
    let ends: Vec<(bool, Duration, Duration)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let headers_ok = ends.iter().all(|(ok, _, _)| *ok);
    // The whole run, for the upper bound: the limiter cannot have refilled for longer.
    let elapsed = started.elapsed().as_secs_f64();
    // The span every client was busy, for the lower bound: a loaded machine that delays a
    // client (or the joins) shortens it instead of failing the test.
    let busy_from = ends.iter().map(|(_, first, _)| *first).max().unwrap();
    let busy_to = ends.iter().map(|(_, _, last)| *last).min().unwrap();
    let busy = busy_to.saturating_sub(busy_from).as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed);
    let limited = limited.load(Ordering::Relaxed);

    // Both workers served requests, so the limit was shared, not per worker.
    let stats = s.envoy.stats().unwrap();
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            stats
                .iter()
                .filter(|(name, _)| {
                    name.ends_with(&format!(".worker_{w}.downstream_cx_total"))
                        && name.starts_with("listener.127")
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .collect();
    assert!(
        per_worker.iter().all(|&n| n >= 2),
        "connections per worker: {per_worker:?}"
    );

    // Every answer was metered, and the workers really contended for the shared cell.
    eventually("metered calls to match the client's count", || {
        s.envoy.stat(&adapter.stat("requests_allowed")).unwrap() == admitted
            && s.envoy
                .stat(&adapter.stat("requests_refused.reason.rate_limited"))
                .unwrap()
                == limited
    });
    let conflicts = s
        .envoy
        .stat(&adapter.stat("ratelimit_store_conflicts"))
        .unwrap();

    let ideal = burst + rps * elapsed;
    eprintln!(
        "{}: rate limit {rps}/s burst {burst}, 2 workers, 8 connections, {elapsed:.2} s: admitted {admitted} \
         (ideal {ideal:.1}, over by {:.1}), refused {limited}, CAS conflicts retried {conflicts}",
        adapter.name(),
        admitted as f64 - ideal
    );
    assert!(
        limited > 0 && headers_ok,
        "429s with Retry-After and RateLimit-Policy expected"
    );
    // The documented bound: one request per worker from the first-write race of a new key,
    // and the leased requests a worker took from the bucket before the run's window:
    // workers x (lease - 1).
    let slack = 2.0 + 2.0 * f64::from(leased - 1);
    assert!(
        admitted as f64 <= ideal + slack,
        "admitted {admitted} > {ideal:.1} + {slack}"
    );
    // Per-worker limits would admit about twice the ideal (the upper bound above catches
    // that); a limiter that refuses what it should admit falls under the refill of the span
    // every client was busy.
    let floor = burst + rps * busy;
    assert!(
        admitted as f64 >= floor * 0.8,
        "admitted {admitted}, far under {floor:.1} (clients all busy for {busy:.2} s)"
    );
    assert_no_vm_failure(&s.envoy);
}

fn malformed_tokens_all_get_401_and_envoy_keeps_serving(adapter: Adapter) {
    let s = stack_with(adapter, "malformed", demo_config(), 2);
    let key = demo_key();
    let good = license("acme", "lic-1", "starter", &["search"])
        .mint(&key)
        .unwrap();
    let es = SigningKey::generate(tollgate_devkit::KeyAlg::ES256, "demo-2026").unwrap();
    let wrong_alg = es
        .sign(&license("acme", "lic-1", "starter", &["search"]).claims_at(unix_now()))
        .unwrap();
    let none = {
        use base64::Engine as _;
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let claims = license("acme", "lic-1", "starter", &["search"]).claims_at(unix_now());
        format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "kid": "demo-2026"})),
            b64(&claims)
        )
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut credentials: Vec<Vec<u8>> = Vec::new();
    for i in 0..1000 {
        let credential: Vec<u8> = match i % 8 {
            // Random header-legal bytes, including obs-text (not UTF-8).
            0 | 1 => {
                let len = rng.gen_range(1..300);
                let mut v = b"Bearer ".to_vec();
                v.extend((0..len).map(|_| {
                    let b: u8 = rng.gen_range(0x21..=0xff);
                    if b == 0x7f {
                        b'a'
                    } else {
                        b
                    }
                }));
                v
            }
            2 => bearer(&good[..rng.gen_range(1..good.len() - 1)]),
            3 => bearer(&format!("{good}{}", "A".repeat(rng.gen_range(1..20)))),
            4 => {
                // One character of the payload or signature changed.
                let mut t = good.clone().into_bytes();
                let at = rng.gen_range(40..t.len());
                t[at] = if t[at] == b'A' { b'B' } else { b'A' };
                bearer(&String::from_utf8(t).unwrap())
            }
            5 => bearer(&wrong_alg),
            6 => bearer(&none),
            _ => bearer(&"eyJ".repeat(rng.gen_range(3000..15000))),
        };
        credentials.push(credential);
    }
    let mut statuses = std::collections::BTreeMap::new();
    for credential in &credentials {
        let r = get(&s, "/v1/search", &[("authorization", credential)]);
        *statuses.entry((r.status, r.code())).or_insert(0) += 1;
        if r.status != 401 {
            panic!(
                "{} {:?} for {:.80}",
                r.status,
                r.code(),
                String::from_utf8_lossy(credential)
            );
        }
    }
    eprintln!("malformed credentials: {statuses:?}");
    // Correctly signed by the configured key, with a critical header extension the filter
    // does not understand, or a malformed `crit` (RFC 7515 section 4.1.11): refused, and never
    // upstream.
    let claims = license("acme", "lic-1", "starter", &["search"])
        .claims_at(unix_now())
        .to_string();
    let alg = key.file.alg.name();
    for header in [
        json!({"alg": alg, "kid": "demo-2026", "crit": ["anything"], "anything": true}),
        json!({"alg": alg, "kid": "demo-2026", "crit": ["b64"], "b64": false}),
        json!({"alg": alg, "kid": "demo-2026", "crit": []}),
        json!({"alg": alg, "kid": "demo-2026", "crit": ["kid"]}),
    ] {
        let token = key.sign_raw(&header.to_string(), &claims).unwrap();
        let r = get(&s, "/v1/search", &[("authorization", &bearer(&token))]);
        assert_eq!(
            (r.status, r.code()),
            (401, "invalid_token".into()),
            "{header}"
        );
    }
    assert_eq!(
        get(&s, "/v1/search", &[("authorization", &bearer(&good))]).status,
        200
    );
    assert_eq!(s.upstream.requests(), 1);
    assert_no_vm_failure(&s.envoy);
}

fn usage_is_metered_into_envoy_stats(adapter: Adapter) {
    let s = stack_with(adapter, "metering", demo_config(), 2);
    let key = demo_key();
    let token = license("acme", "lic-m", "pro", &["search", "generative-design"])
        .mint(&key)
        .unwrap();
    let auth = bearer(&token);
    for _ in 0..7 {
        let r = get(&s, "/v1/search?bytes=1000", &[("authorization", &auth)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 1000);
    }
    for _ in 0..3 {
        assert_eq!(get(&s, "/v1/search", &[]).status, 401);
    }
    eventually("7 allowed requests in stats", || {
        s.envoy.stat(&adapter.stat("requests_allowed")).unwrap() == 7
    });
    let stats = s.envoy.stats().unwrap();
    let stat = |name: &str| stats.get(&adapter.stat(name)).copied().unwrap_or(0);
    assert_eq!(stat("requests_refused.reason.missing_token"), 3);
    assert_eq!(stat("feature.search.requests_allowed"), 7);
    assert_eq!(stat("feature.search.requests_refused"), 3);
    // 7 upstream bodies of 1000 bytes plus the three JSON refusals.
    let refusal_bytes = stat("response_bytes") - 7000;
    assert!(
        refusal_bytes > 0 && refusal_bytes < 3 * 200,
        "response bytes {}",
        stat("response_bytes")
    );
    assert_eq!(stat("token_cache_hits") + stat("token_cache_misses"), 7);
    assert!(
        stat("token_cache_misses") <= 2,
        "at most one verification per worker"
    );
    if adapter == Adapter::Native {
        // One token cache for the whole Envoy.
        assert_eq!(stat("token_cache_misses"), 1);
    }
    assert!(stat("processing_time_us") > 0);

    let prometheus = s.envoy.admin_get("/stats/prometheus").unwrap();
    assert!(
        prometheus.contains("tollgate_requests_refused{tollgate_reason=\"missing_token\"} 3"),
        "{}",
        prometheus
            .lines()
            .filter(|l| l.contains("tollgate"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(prometheus.contains("tollgate_requests_allowed{} 7"));
    assert!(prometheus.contains("tollgate_feature_requests_allowed{tollgate_feature=\"search\"} 7"));
}

#[test]
fn shipped_envoy_configs_validate() {
    // envoy-native.yaml loads the native module (validation loads it too).
    require_native_module().unwrap();
    let dir = workspace_root().join("envoy");
    let mut validated = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            validate(&path).unwrap();
            validated += 1;
        }
    }
    assert!(validated >= 1);

    // envoy.yaml embeds envoy/tollgate.json, plus a collector section, as its plugin
    // configuration.
    let yaml = std::fs::read_to_string(dir.join("envoy.yaml")).unwrap();
    let embedded = yaml
        .split("value: |\n")
        .nth(1)
        .unwrap()
        .split("\n          - name:")
        .next()
        .unwrap();
    let mut embedded: Value = serde_json::from_str(embedded).unwrap();
    let collector = embedded
        .as_object_mut()
        .unwrap()
        .remove("collector")
        .unwrap();
    assert_eq!(collector["cluster"], "tollgate_collector");
    assert!(yaml.contains("- name: tollgate_collector"));
    assert_eq!(embedded, demo_config());

    // The ECDS example delivers the same filter from a watched file.
    // The YAML block scalar after `value: |`: the lines indented deeper than that key.
    let plugin_config = |text: &str| -> Value {
        let indent = |line: &str| line.len() - line.trim_start().len();
        let mut lines = text
            .lines()
            .skip_while(|l| !l.trim_end().ends_with("value: |"));
        let key = indent(lines.next().unwrap());
        let block: Vec<&str> = lines
            .take_while(|l| l.trim().is_empty() || indent(l) > key)
            .collect();
        serde_json::from_str(&block.join("\n")).unwrap()
    };
    let ecds = std::fs::read_to_string(dir.join("ecds/tollgate.yaml")).unwrap();
    assert_eq!(plugin_config(&ecds), plugin_config(&yaml));
    // The native module's example runs the wasm filter's plugin configuration as it is.
    let native = std::fs::read_to_string(dir.join("envoy-native.yaml")).unwrap();
    assert_eq!(plugin_config(&native), plugin_config(&yaml));
    assert!(native.contains("- name: tollgate_collector"));
    assert!(native.contains("DynamicModuleFilter"));
    let ecds_bootstrap = std::fs::read_to_string(dir.join("envoy-ecds.yaml")).unwrap();
    assert!(ecds_bootstrap.contains("path: envoy/ecds/tollgate.yaml"));
    assert!(
        !ecds_bootstrap.contains("value: |"),
        "no inline plugin configuration"
    );
}

#[test]
fn invalid_plugin_configuration_is_refused_with_the_field_named() {
    let mut config = demo_config();
    config["plans"]["starter"]["rate_limit"]["burst"] = json!(0);
    let bootstrap = Bootstrap::new(config, 1).to_json();
    let path =
        std::env::temp_dir().join(format!("tollgate-bad-config-{}.json", std::process::id()));
    std::fs::write(&path, bootstrap.to_string()).unwrap();
    let err = validate(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).unwrap();
    assert!(err.contains("plans.starter.rate_limit.burst"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn native_module_refuses_an_invalid_configuration_at_load() {
    require_native_module().unwrap();
    let refused = |config: Value| -> String {
        let mut bootstrap = Bootstrap::new(config, 1);
        bootstrap.adapter = Adapter::Native;
        let path = std::env::temp_dir().join(format!(
            "tollgate-native-refused-{}-{:?}.json",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, bootstrap.to_json().to_string()).unwrap();
        let err = validate(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(!err.contains("panic"), "{err}");
        err
    };
    // Fail closed: a configuration the module refuses makes Envoy refuse to start.
    // The core's own checks, with the field named, as in the wasm filter.
    let mut config = demo_config();
    config["plans"]["starter"]["rate_limit"]["burst"] = json!(0);
    let err = refused(config);
    assert!(err.contains("plans.starter.rate_limit.burst"), "{err}");
}

/// One gate for the whole Envoy: a burst sent over both workers at once admits the burst in
/// total (plus what the rate refills meanwhile), not a burst per worker.
#[test]
fn native_burst_is_shared_by_two_workers() {
    let mut config = demo_config();
    config["plans"]["bursty"] = json!({"rate_limit": {"requests_per_second": 1, "burst": 10}});
    let s = stack_with(Adapter::Native, "native-burst", config, 2);
    let token = license("acme", "lic-burst", "bursty", &["search"])
        .mint(&demo_key())
        .unwrap();
    let url = s.envoy.url("/v1/search");
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .max_idle_connections_per_host(1)
                    .build();
                let mut admitted = 0u64;
                for _ in 0..10 {
                    match agent
                        .get(&url)
                        .set("authorization", &format!("Bearer {token}"))
                        .call()
                    {
                        Ok(_) => admitted += 1,
                        Err(ureq::Error::Status(429, r)) => {
                            assert!(r.header("retry-after").is_some());
                            assert_eq!(r.header("content-type"), Some("application/json"));
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let elapsed = started.elapsed().as_secs_f64();
    let stats = s.envoy.stats().unwrap();
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            stats
                .iter()
                .filter(|(name, _)| {
                    name.ends_with(&format!(".worker_{w}.downstream_cx_total"))
                        && name.starts_with("listener.127")
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .collect();
    assert!(
        per_worker.iter().all(|&n| n >= 2),
        "connections per worker: {per_worker:?}"
    );
    eprintln!("native: 80 requests over 2 workers in {elapsed:.2} s, burst 10 at 1/s: admitted {admitted}");
    // No first-write race in native memory: at most the burst plus one refill per second.
    assert!(
        admitted >= 10 && admitted as f64 <= 10.0 + elapsed.ceil(),
        "admitted {admitted} in {elapsed:.2} s"
    );
    eventually("the refusals counted", || {
        s.envoy
            .stat(&Adapter::Native.stat("requests_refused.reason.rate_limited"))
            .unwrap()
            == 80 - admitted
    });
    assert_no_vm_failure(&s.envoy);
}

/// A panic inside the module answers that request 500 and Envoy keeps serving (the module of
/// `make native-probe` panics on a request carrying `x-tollgate-panic-probe`).
#[test]
fn native_license_context_in_dynamic_metadata_reaches_the_route_with_no_header_written() {
    require_native_module().unwrap();
    let mut config = demo_config();
    config["upstream_headers"] =
        json!({"account": null, "license": null, "plan": null, "feature": null});
    config["license_metadata"] = json!("tollgate");
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(config, upstream.port());
    bootstrap.adapter = Adapter::Native;
    let mut bootstrap = bootstrap.to_json();
    // What an operator does with the metadata: here the route turns it into a header (an
    // access log would read it the same way, `%DYNAMIC_METADATA(tollgate:account)%`).
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["request_headers_to_add"] = json!([
        {"header": {"key": "x-seen-account", "value": "%DYNAMIC_METADATA(tollgate:account)%"}},
        {"header": {"key": "x-seen-plan", "value": "%DYNAMIC_METADATA(tollgate:plan)%"}},
        {"header": {"key": "x-seen-feature", "value": "%DYNAMIC_METADATA(tollgate:feature)%"}},
    ]);
    let envoy = Envoy::start("metadata", &bootstrap, 1).unwrap();
    let s = Stack { envoy, upstream };
    let token = license("acme", "lic-1", "starter", &["search"])
        .mint(&demo_key())
        .unwrap();
    let r = get(&s, "/v1/search?q=x", &[("authorization", &bearer(&token))]);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = r.json().unwrap();
    assert_eq!(seen["headers"]["x-seen-account"], json!(["acme"]), "{seen}");
    assert_eq!(seen["headers"]["x-seen-plan"], json!(["starter"]));
    assert_eq!(seen["headers"]["x-seen-feature"], json!(["search"]));
    assert!(
        seen["headers"].get("x-tollgate-account").is_none(),
        "{seen}"
    );
}

#[test]
fn native_panic_answers_500_and_envoy_keeps_serving() {
    let probe = workspace_root().join("target/native-probe/libtollgate.so");
    assert!(
        probe.is_file(),
        "{} is missing: run `make native-probe`",
        probe.display()
    );
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(demo_config(), upstream.port());
    bootstrap.adapter = Adapter::Native;
    let mut envoy =
        Envoy::start_with_module("native-panic", &bootstrap.to_json(), 2, &probe).unwrap();
    let listener = envoy.listener;
    let token = license("acme", "lic-1", "starter", &["search"])
        .mint(&demo_key())
        .unwrap();
    let auth = bearer(&token);
    for _ in 0..3 {
        let r = request(
            listener,
            "GET",
            "/v1/search",
            &[("authorization", &auth), ("x-tollgate-panic-probe", b"1")],
        )
        .unwrap();
        assert_eq!(r.status, 500, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "internal_error");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert!(envoy.is_running(), "Envoy died:\n{}", envoy.log_tail(40));
    // The same Envoy still decides requests.
    let r = request(listener, "GET", "/v1/search", &[("authorization", &auth)]).unwrap();
    assert_eq!(r.status, 200);
    let r = request(listener, "GET", "/v1/search", &[]).unwrap();
    assert_eq!((r.status, r.code().as_str()), (401, "missing_token"));
    assert!(envoy.log().contains("panic caught in request_headers"));
    assert_eq!(
        upstream.requests(),
        1,
        "no panicking request reached the upstream"
    );
}
