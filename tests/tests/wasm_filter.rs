//! The real, release-built filter `.wasm` under the wasmtime proxy-wasm host: tokens minted
//! with the devkit, requests run through Envoy's callback sequence, a fake clock.
//!
//! Build the filter first: `cargo build -p tollgate-filter --target wasm32-wasip1 --release`.

// Test code through and through: the helpers below may panic as freely as the tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tollgate_devkit::{jwks, KeyAlg, LicenseSpec, SigningKey};
use tollgate_tests::wasm_host::{
    Exchange, FilterHost, HttpCall, LogLevel, Request, SharedData, Vm,
};
use tollgate_wire::{AckStatus, BatchAck, Meter, UsageBatch, KEY_ID_HEADER, SIGNATURE_HEADER};

const NOW: u64 = 1_780_000_000;
const SECOND: u64 = 1_000_000_000;

const LICENSE_HEADERS: [&str; 4] = [
    "x-tollgate-account",
    "x-tollgate-license",
    "x-tollgate-plan",
    "x-tollgate-feature",
];

type Keys = tollgate_devkit::keys::KeyTrio;

fn keys() -> &'static Keys {
    tollgate_devkit::keys::test_keys().unwrap()
}

fn config() -> Value {
    let k = keys();
    json!({
        "token": {
            "issuers": ["https://licenses.example"],
            "audiences": ["api.example"],
            "jwks": jwks([&k.ed, &k.es, &k.rs]),
        },
        "plans": {
            "starter": {"rate_limit": {"requests_per_second": 5, "burst": 5}},
            "pro": {"feature_rate_limits": {"design": {"requests_per_second": 1, "burst": 1}}},
        },
        "routes": [
            {"path": "/healthz", "public": true},
            {"prefix": "/v1/search", "feature": "search"},
            {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
        ],
    })
}

fn host() -> &'static FilterHost {
    FilterHost::shared().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A worker VM of its own Envoy, its clock at `NOW`.
fn start(config: &Value) -> Vm {
    start_with(config, &SharedData::new())
}

fn start_with(config: &Value, shared: &SharedData) -> Vm {
    let mut vm = host()
        .start(&config.to_string(), shared)
        .unwrap_or_else(|e| panic!("{e:#}"));
    vm.set_time(NOW * SECOND);
    vm
}

fn spec(plan: &str, features: &[&str]) -> LicenseSpec {
    let mut spec = LicenseSpec::new("acct-1", "lic-1", plan, features);
    spec.issuer = Some("https://licenses.example".into());
    spec.audience = Some("api.example".into());
    spec
}

/// A token issued at `NOW`, valid for an hour.
fn token(key: &SigningKey, spec: &LicenseSpec) -> String {
    key.sign(&spec.claims_at(NOW)).unwrap()
}

/// Run a request; the VM must not trap.
fn send(vm: &mut Vm, request: Request) -> Exchange {
    let exchange = vm
        .request(&request)
        .unwrap_or_else(|e| panic!("{} {}: {e:#}", request.method, request.path));
    assert!(!vm.trapped(), "{:?}", vm.trap());
    exchange
}

/// A refusal answered by the filter itself: status, JSON body `{"error", "message"}`.
fn assert_refused(exchange: &Exchange, status: u16, code: &str) -> Value {
    assert_eq!(exchange.status(), status, "{exchange:?}");
    assert!(
        !exchange.reached_upstream(),
        "a refused request reached upstream"
    );
    let local = exchange.local_response.as_ref().expect("a local response");
    assert_eq!(u32::from(status), local.status);
    assert_eq!(
        exchange.header("content-type").as_deref(),
        Some("application/json")
    );
    let body = exchange.json().unwrap();
    let object = body.as_object().expect("a JSON object");
    assert_eq!(object.len(), 2, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// The three segments of a JWT.
fn segments(token: &str) -> [String; 3] {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    [parts[0].into(), parts[1].into(), parts[2].into()]
}

/// `token` with one character of its signature changed.
fn tamper_signature(token: &str) -> String {
    let [header, payload, signature] = segments(token);
    let mut signature = signature.into_bytes();
    let middle = signature.len() / 2;
    signature[middle] = if signature[middle] == b'A' {
        b'B'
    } else {
        b'A'
    };
    format!(
        "{header}.{payload}.{}",
        String::from_utf8(signature).unwrap()
    )
}

#[test]
fn licensed_request_is_forwarded_with_license_headers_replacing_forged_ones() {
    let k = keys();
    let mut vm = start(&config());
    let t = token(&k.ed, &spec("pro", &["search", "design"]));

    let ex = send(
        &mut vm,
        Request::get("/v1/search?q=wasm")
            .bearer(&t)
            .header("x-tollgate-account", "attacker")
            .header("X-Tollgate-Account", "attacker-2")
            .header("x-tollgate-license", "lic-forged")
            .header("x-tollgate-plan", "enterprise")
            .header("X-TOLLGATE-PLAN", "enterprise")
            .header("x-tollgate-feature", "design")
            .header("x-tollgate-feature", "admin")
            .header("x-request-id", "req-1")
            .response_body(["hello ", "world"]),
    );
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert!(ex.local_response.is_none());
    // The license itself stays with the filter (`token.strip_from_upstream`, default on).
    assert_eq!(ex.upstream_headers("authorization"), Vec::<String>::new());
    assert_eq!(ex.upstream_headers("x-tollgate-account"), ["acct-1"]);
    assert_eq!(ex.upstream_headers("x-tollgate-license"), ["lic-1"]);
    assert_eq!(ex.upstream_headers("x-tollgate-plan"), ["pro"]);
    assert_eq!(ex.upstream_headers("x-tollgate-feature"), ["search"]);
    // Everything else is forwarded untouched, and the response comes back untouched.
    assert_eq!(ex.upstream_header("x-request-id").as_deref(), Some("req-1"));
    assert_eq!(
        ex.upstream_header(":path").as_deref(),
        Some("/v1/search?q=wasm")
    );
    assert_eq!(ex.body(), b"hello world");
    assert_eq!(
        ex.header("content-type").as_deref(),
        Some("application/json")
    );

    // The feature header names the route's feature; the request body is forwarded.
    let ex = send(
        &mut vm,
        Request::post("/v1/design/run")
            .bearer(&t)
            .header("x-tollgate-feature", "search")
            .body("{\"shape\":")
            .body("\"cube\"}"),
    );
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert_eq!(ex.upstream_headers("x-tollgate-feature"), ["design"]);
    assert_eq!(ex.upstream.as_ref().unwrap().body, b"{\"shape\":\"cube\"}");

    // ES256 and RS256 licenses verify inside the VM as well.
    for key in [&k.es, &k.rs] {
        let t = token(key, &spec("pro", &["search"]));
        let ex = send(
            &mut vm,
            Request::get("/v1/search")
                .bearer(&t)
                .header("x-tollgate-plan", "enterprise"),
        );
        assert_eq!(ex.status(), 200, "{:?}: {ex:?}", key.file.alg);
        assert_eq!(ex.upstream_headers("x-tollgate-account"), ["acct-1"]);
        assert_eq!(ex.upstream_headers("x-tollgate-plan"), ["pro"]);
    }

    // A public route needs no token, and forged license headers never reach the upstream.
    let mut public = Request::get("/healthz").header("x-other", "kept");
    for name in LICENSE_HEADERS {
        public = public.header(name, "forged").header(name, "forged-again");
    }
    let ex = send(&mut vm, public.clone());
    assert_eq!(ex.status(), 200, "{ex:?}");
    for name in LICENSE_HEADERS {
        assert_eq!(ex.upstream_headers(name), Vec::<String>::new(), "{name}");
    }
    assert_eq!(ex.upstream_header("x-other").as_deref(), Some("kept"));
    // Not even a broken token is looked at on a public route, nor taken away.
    let ex = send(&mut vm, public.header("authorization", "Bearer not-a-jwt"));
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert_eq!(ex.upstream_headers("authorization"), ["Bearer not-a-jwt"]);
    assert_eq!(
        ex.upstream_headers("x-tollgate-account"),
        Vec::<String>::new()
    );

    assert!(
        vm.logs().iter().all(|(level, _)| *level < LogLevel::Warn),
        "{}",
        vm.log_text()
    );
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
}

#[test]
fn refusals_have_their_status_code_and_json_body() {
    let k = keys();
    let mut vm = start(&config());
    let starter = token(&k.ed, &spec("starter", &["search"]));

    // No credential: 401 with a challenge that names no error (RFC 6750 section 3.1).
    let ex = send(&mut vm, Request::get("/v1/search"));
    assert_refused(&ex, 401, "missing_token");
    assert_eq!(
        ex.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"tollgate\"")
    );
    let ex = send(
        &mut vm,
        Request::get("/v1/search").header("authorization", "Bearer   "),
    );
    assert_refused(&ex, 401, "missing_token");

    // A bad signature, and a good signature by a key the filter does not trust.
    let ex = send(
        &mut vm,
        Request::get("/v1/search").bearer(&tamper_signature(&starter)),
    );
    assert_refused(&ex, 401, "invalid_token");
    assert_eq!(
        ex.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"tollgate\", error=\"invalid_token\", error_description=\"invalid_token\"")
    );
    let impostor = SigningKey::generate(KeyAlg::EdDSA, "ed-1").unwrap();
    let ex = send(
        &mut vm,
        Request::get("/v1/search").bearer(&token(&impostor, &spec("starter", &["search"]))),
    );
    assert_refused(&ex, 401, "invalid_token");

    // Issuer and audience.
    let mut other_issuer = spec("starter", &["search"]);
    other_issuer.issuer = Some("https://evil.example".into());
    let ex = send(
        &mut vm,
        Request::get("/v1/search").bearer(&token(&k.ed, &other_issuer)),
    );
    assert_refused(&ex, 401, "invalid_issuer");
    let mut other_audience = spec("starter", &["search"]);
    other_audience.audience = Some("other.example".into());
    let ex = send(
        &mut vm,
        Request::get("/v1/search").bearer(&token(&k.ed, &other_audience)),
    );
    assert_refused(&ex, 401, "invalid_audience");

    // Licensed, but not for this feature: 403 and no challenge.
    let ex = send(&mut vm, Request::post("/v1/design/run").bearer(&starter));
    let body = assert_refused(&ex, 403, "feature_not_licensed");
    assert!(
        body["message"].as_str().unwrap().contains("design"),
        "{body}"
    );
    assert_eq!(ex.header("www-authenticate"), None);

    // A plan this gateway does not offer.
    let ex = send(
        &mut vm,
        Request::get("/v1/search").bearer(&token(&k.ed, &spec("platinum", &["search"]))),
    );
    assert_refused(&ex, 403, "unknown_plan");

    // No route serves it: an unknown path.
    let ex = send(&mut vm, Request::get("/v2/search").bearer(&starter));
    assert_refused(&ex, 403, "route_not_licensed");
    assert_eq!(ex.header("allow"), None);
    // A known path with a method no route takes for it: 405, and what it takes.
    let ex = send(&mut vm, Request::get("/v1/design/run").bearer(&starter));
    assert_refused(&ex, 405, "method_not_allowed");
    assert_eq!(ex.header("allow").as_deref(), Some("POST"));
    assert_eq!(ex.header("www-authenticate"), None);
    vm.tick().unwrap();
    assert_eq!(
        vm.metric("tollgate.requests_refused.reason.method_not_allowed"),
        Some(1)
    );

    // Expiry follows the proxy's (fake) clock: valid for an hour plus 30 s of leeway.
    let pro = token(&k.ed, &spec("pro", &["search"]));
    vm.set_time((NOW + 3600 + 30) * SECOND);
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&pro));
    assert_eq!(ex.status(), 200, "{ex:?}");
    vm.advance(Duration::from_secs(1));
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&pro));
    assert_refused(&ex, 401, "token_expired");
    assert_eq!(
        ex.header("www-authenticate").as_deref(),
        Some("Bearer realm=\"tollgate\", error=\"invalid_token\", error_description=\"token_expired\"")
    );

    // And so does `nbf`: a token issued two hours from now.
    let early =
        k.ed.sign(&spec("pro", &["search"]).claims_at(NOW + 7200))
            .unwrap();
    vm.set_time(NOW * SECOND);
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&early));
    assert_refused(&ex, 401, "token_not_yet_valid");
}

#[test]
fn rate_limit_answers_429_with_retry_headers_and_recovers_after_one_period() {
    let k = keys();
    let mut vm = start(&config());
    let t = token(&k.ed, &spec("starter", &["search"]));
    let search = || Request::get("/v1/search").bearer(&t);

    // starter: 5 requests per second, burst 5. Allowed answers say how much is left.
    for i in 0..5 {
        let ok = send(&mut vm, search());
        assert_eq!(ok.status(), 200, "request {i}");
        assert_eq!(
            ok.header("ratelimit-policy").as_deref(),
            Some("\"license\";q=5;w=1")
        );
        // t: the whole burst is back one emission period (200 ms) per request taken.
        let taken: u64 = i + 1;
        assert_eq!(
            ok.header("ratelimit").as_deref(),
            Some(
                format!(
                    "\"license\";r={};t={}",
                    5 - taken,
                    (taken * 200).div_ceil(1000)
                )
                .as_str()
            )
        );
    }
    let ex = send(&mut vm, search());
    assert_refused(&ex, 429, "rate_limited");
    assert_eq!(ex.header("retry-after").as_deref(), Some("1"));
    assert_eq!(
        ex.header("ratelimit-policy").as_deref(),
        Some("\"license\";q=5;w=1")
    );
    assert_eq!(
        ex.header("ratelimit").as_deref(),
        Some("\"license\";r=0;t=1")
    );
    assert_eq!(ex.header("www-authenticate"), None);

    // One emission period (200 ms) later exactly one request conforms again.
    vm.advance(Duration::from_millis(199));
    assert_eq!(send(&mut vm, search()).status(), 429);
    vm.advance(Duration::from_millis(1));
    assert_eq!(send(&mut vm, search()).status(), 200);
    assert_eq!(send(&mut vm, search()).status(), 429);

    // A whole second refills the whole burst, and no more.
    vm.advance(Duration::from_secs(1));
    for i in 0..5 {
        assert_eq!(send(&mut vm, search()).status(), 200, "request {i}");
    }
    assert_eq!(send(&mut vm, search()).status(), 429);

    // pro: design is limited to 1 per second, burst 1; search is not limited at all.
    let mut pro_spec = spec("pro", &["search", "design"]);
    pro_spec.license_id = "lic-pro".into();
    let pro = token(&k.ed, &pro_spec);
    let ok = send(&mut vm, Request::post("/v1/design").bearer(&pro));
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.header("ratelimit-policy").as_deref(),
        Some("\"feature\";q=1;w=1")
    );
    assert_eq!(
        ok.header("ratelimit").as_deref(),
        Some("\"feature\";r=0;t=1")
    );
    let ex = send(&mut vm, Request::post("/v1/design").bearer(&pro));
    let body = assert_refused(&ex, 429, "rate_limited");
    assert!(
        body["message"].as_str().unwrap().contains("design"),
        "{body}"
    );
    assert_eq!(
        ex.header("ratelimit-policy").as_deref(),
        Some("\"feature\";q=1;w=1")
    );
    for i in 0..20 {
        let ex = send(&mut vm, Request::get("/v1/search").bearer(&pro));
        assert_eq!(ex.status(), 200, "search request {i}");
        assert_eq!(ex.header("ratelimit"), None);
    }
}

#[test]
fn rate_limit_headers_can_be_turned_off_and_the_token_kept_upstream() {
    let k = keys();
    let mut c = config();
    c["rate_limit_headers"] = json!(false);
    c["token"]["strip_from_upstream"] = json!(false);
    let mut vm = start(&c);
    let t = token(&k.ed, &spec("starter", &["search"]));
    for i in 0..5 {
        let ok = send(&mut vm, Request::get("/v1/search").bearer(&t));
        assert_eq!(ok.status(), 200, "request {i}");
        assert_eq!(ok.header("ratelimit-policy"), None);
        assert_eq!(ok.header("ratelimit"), None);
        assert_eq!(
            ok.upstream_headers("authorization"),
            [format!("Bearer {t}")]
        );
    }
    // The limit holds all the same, and its refusal still explains itself.
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&t));
    assert_refused(&ex, 429, "rate_limited");
    assert_eq!(
        ex.header("ratelimit-policy").as_deref(),
        Some("\"license\";q=5;w=1")
    );

    // A custom token header is the one removed.
    let mut c = config();
    c["token"]["header"] = json!("X-License-Token");
    c["token"]["prefix"] = json!("");
    let mut vm = start(&c);
    let ex = send(
        &mut vm,
        Request::get("/v1/search")
            .header("x-license-token", t.as_str())
            .header("authorization", "Basic dXNlcjpwdw=="),
    );
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert_eq!(ex.upstream_headers("x-license-token"), Vec::<String>::new());
    assert_eq!(ex.upstream_headers("authorization"), ["Basic dXNlcjpwdw=="]);
}

#[test]
fn a_route_that_can_never_match_is_logged_once_per_configuration() {
    let k = keys();
    let mut c = config();
    c["routes"] = json!([
        {"path": "/healthz", "public": true},
        {"prefix": "/v1/", "feature": "search"},
        {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
    ]);
    let mut vm = start(&c);
    let t = token(&k.ed, &spec("pro", &["search", "design"]));
    for _ in 0..5 {
        let ex = send(&mut vm, Request::post("/v1/design").bearer(&t));
        assert_eq!(ex.status(), 200, "{ex:?}");
        // The earlier, broader route takes it.
        assert_eq!(ex.upstream_headers("x-tollgate-feature"), ["search"]);
    }
    vm.tick().unwrap();
    let warnings: Vec<String> = vm
        .logs()
        .into_iter()
        .filter(|(level, _)| *level == LogLevel::Warn)
        .map(|(_, message)| message)
        .collect();
    assert_eq!(warnings.len(), 1, "{}", vm.log_text());
    assert!(
        warnings[0].contains("configuration warning at `routes[2]`: can never match: routes[1]"),
        "{}",
        warnings[0]
    );
    // A configuration without one warns of nothing.
    let vm = start(&config());
    assert!(
        vm.logs().iter().all(|(level, _)| *level < LogLevel::Warn),
        "{}",
        vm.log_text()
    );
}

#[test]
fn workers_sharing_one_shared_data_admit_one_limit_between_them() {
    let k = keys();
    let shared = SharedData::new();
    let mut a = start_with(&config(), &shared);
    let mut b = start_with(&config(), &shared);
    let t = token(&k.ed, &spec("starter", &["search"]));
    let search = || Request::get("/v1/search").bearer(&t);

    let alternate = |a: &mut Vm, b: &mut Vm, n: usize| -> usize {
        (0..n)
            .filter(|i| {
                let vm = if i % 2 == 0 { &mut *a } else { &mut *b };
                let status = send(vm, search()).status();
                assert!(status == 200 || status == 429, "{status}");
                status == 200
            })
            .count()
    };

    // Ten requests at one instant over two workers: the burst of 5, not 5 per worker.
    assert_eq!(alternate(&mut a, &mut b, 10), 5);
    // 600 ms later, on both workers' clocks: 5 per second × 0.6 s = 3 more, in total.
    a.advance(Duration::from_millis(600));
    b.advance(Duration::from_millis(600));
    assert_eq!(alternate(&mut a, &mut b, 10), 3);

    // The license's state is one cell of this Envoy's shared data.
    let (value, cas) = shared
        .get("tollgate/rl/5:lic-1")
        .expect("the license's rate cell");
    assert_eq!(value.len(), 8);
    assert_ne!(cas, 0);

    // A VM started later (a plugin reload) finds the bucket as drained as it is.
    let mut reloaded = start_with(&config(), &shared);
    reloaded.set_time(a.now());
    assert_refused(&send(&mut reloaded, search()), 429, "rate_limited");
    // Another Envoy, with shared data of its own, has a full bucket.
    let mut elsewhere = start(&config());
    elsewhere.set_time(a.now());
    assert_eq!(send(&mut elsewhere, search()).status(), 200);

    // Each worker's stats count its own requests; together, the limit.
    a.tick().unwrap();
    b.tick().unwrap();
    let sum = |name: &str| a.metric(name).unwrap() + b.metric(name).unwrap();
    assert_eq!(sum("tollgate.requests_allowed"), 8);
    assert_eq!(sum("tollgate.requests_refused.reason.rate_limited"), 12);
    assert_eq!(sum("tollgate.ratelimit_store_errors"), 0);
}

#[test]
fn usage_is_folded_into_metrics_on_tick() {
    let k = keys();
    let mut vm = start(&config());
    assert_eq!(vm.tick_period(), Some(Duration::from_secs(1)));
    let t = token(&k.ed, &spec("pro", &["search"]));

    // Three allowed requests: 12 request bytes, 23 response bytes, 2 ms upstream each.
    for _ in 0..3 {
        let ex = send(
            &mut vm,
            Request::post("/v1/search")
                .bearer(&t)
                .body("hello")
                .body(", world")
                .response_body(["0123456789", "abcdefghij", "xyz"])
                .upstream_latency(Duration::from_millis(2)),
        );
        assert_eq!(ex.status(), 200, "{ex:?}");
        assert_eq!(ex.upstream.as_ref().unwrap().body, b"hello, world");
        assert_eq!(ex.body(), b"0123456789abcdefghijxyz");
    }
    // Refusals. Like Envoy, the host passes a local reply through the filter's own response
    // callbacks, so refusal bodies are metered as response bytes.
    let (mut refused_search_bytes, mut refused_other_bytes) = (0, 0);
    for _ in 0..2 {
        let ex = send(&mut vm, Request::post("/v1/search").body("unlicensed"));
        assert_refused(&ex, 401, "missing_token");
        refused_search_bytes += ex.body().len() as u64;
    }
    let ex = send(&mut vm, Request::get("/v2/nothing").bearer(&t));
    assert_refused(&ex, 403, "route_not_licensed");
    refused_other_bytes += ex.body().len() as u64;
    let ex = send(&mut vm, Request::post("/v1/design").bearer(&t));
    assert_refused(&ex, 403, "feature_not_licensed");
    let refused_design_bytes = ex.body().len() as u64;
    refused_other_bytes += refused_design_bytes;

    // Nothing is folded into stats before a tick.
    assert_eq!(vm.metric("tollgate.requests_allowed"), Some(0));
    assert_eq!(vm.metric("tollgate.token_cache_misses"), Some(0));
    vm.tick().unwrap();

    let m = |name: &str| {
        vm.metric(name)
            .unwrap_or_else(|| panic!("metric {name} is not defined"))
    };
    assert_eq!(m("tollgate.requests_allowed"), 3);
    assert_eq!(m("tollgate.requests_refused.reason.missing_token"), 2);
    assert_eq!(m("tollgate.requests_refused.reason.route_not_licensed"), 1);
    assert_eq!(
        m("tollgate.requests_refused.reason.feature_not_licensed"),
        1
    );
    assert_eq!(m("tollgate.requests_refused.reason.rate_limited"), 0);
    assert_eq!(m("tollgate.requests_refused.reason.invalid_token"), 0);
    // Refused requests' bodies never reach the filter: it answered at the headers.
    assert_eq!(m("tollgate.request_bytes"), 36);
    assert_eq!(
        m("tollgate.response_bytes"),
        69 + refused_search_bytes + refused_other_bytes
    );
    assert_eq!(m("tollgate.processing_time_us"), 6000);
    assert_eq!(m("tollgate.feature.search.requests_allowed"), 3);
    assert_eq!(m("tollgate.feature.search.requests_refused"), 2);
    assert_eq!(m("tollgate.feature.search.request_bytes"), 36);
    assert_eq!(
        m("tollgate.feature.search.response_bytes"),
        69 + refused_search_bytes
    );
    assert_eq!(m("tollgate.feature.search.processing_time_us"), 6000);
    assert_eq!(m("tollgate.feature.design.requests_allowed"), 0);
    assert_eq!(m("tollgate.feature.design.requests_refused"), 1);
    assert_eq!(
        m("tollgate.feature.design.response_bytes"),
        refused_design_bytes
    );
    // The token was verified once; the three later requests that carried it were cache hits.
    assert_eq!(m("tollgate.token_cache_misses"), 1);
    assert_eq!(m("tollgate.token_cache_hits"), 3);
    assert_eq!(m("tollgate.ratelimit_store_conflicts"), 0);
    assert_eq!(m("tollgate.ratelimit_store_errors"), 0);

    // A second tick adds nothing.
    let before = vm.metrics();
    vm.tick().unwrap();
    assert_eq!(vm.metrics(), before);

    // Counters not folded yet go out when the VM is shut down.
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&t));
    assert_eq!(ex.status(), 200);
    assert!(vm.shutdown().unwrap());
    assert_eq!(vm.metric("tollgate.requests_allowed"), Some(4));
    assert_eq!(vm.metric("tollgate.token_cache_hits"), Some(4));
    assert!(!vm.trapped());
}

#[test]
fn bad_configurations_fail_to_start_and_name_the_field() {
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = config();
        edit(&mut c);
        c.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (with(&|c| c["bogus"] = json!(1)), "unknown field `bogus`"),
        (
            with(&|c| {
                c.as_object_mut().unwrap().remove("plans");
            }),
            "missing field `plans`",
        ),
        (with(&|c| c["plans"] = json!({})), "`plans`"),
        (
            with(&|c| {
                c["plans"]["pro"]["feature_rate_limits"]["teleport"] =
                    json!({"requests_per_second": 1})
            }),
            "plans.pro.feature_rate_limits.teleport",
        ),
        (
            with(&|c| c["plans"]["starter"]["rate_limit"]["burst"] = json!(0)),
            "plans.starter.rate_limit.burst",
        ),
        (
            with(&|c| c["token"]["jwks"]["keys"][0]["x"] = json!("AAAA")),
            "token.jwks.keys[0].x",
        ),
        (
            with(&|c| c["token"]["jwks"]["keys"][1]["kty"] = json!("oct")),
            "token.jwks.keys[1].kty",
        ),
        (
            with(&|c| c["token"]["jwks"]["keys"][2]["n"] = json!("AQAB")),
            "token.jwks.keys[2].n",
        ),
        (
            with(&|c| c["routes"][1] = json!({"prefix": "/x"})),
            "routes[1]",
        ),
        (
            with(&|c| c["license_metadata"] = json!("tollgate")),
            "invalid configuration at `license_metadata`: proxy-wasm cannot write dynamic metadata",
        ),
        (
            with(&|c| c["rate_limit_lease"] = json!(0)),
            "invalid configuration at `rate_limit_lease`: must be between 1 and 1000",
        ),
        (
            with(&|c| c["routes"][2]["methods"] = json!(["GTE"])),
            "invalid configuration at `routes[2].methods[0]`: `GTE` is not an HTTP method; use one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
        ),
        (
            with(&|c| c["routes"][1] = json!({"prefix": "v1", "feature": "search"})),
            "invalid configuration at `routes[1].prefix`: must start with `/`",
        ),
        (
            "{\"token\": {}\n,}".into(),
            "invalid configuration: not valid JSON at line 2, column 2",
        ),
        ("{\"token\": ".into(), "EOF"),
        (String::new(), "the plugin configuration is empty"),
    ];
    for (config, expected) in cases {
        let error = format!(
            "{:#}",
            host().start(&config, &SharedData::new()).unwrap_err()
        );
        assert!(
            error.contains(expected),
            "expected `{expected}` in: {error}"
        );

        let mut vm = host().start_unchecked(&config, &SharedData::new()).unwrap();
        assert!(!vm.configured(), "{config}");
        assert!(!vm.trapped(), "{:?}", vm.trap());
        let critical: Vec<String> = vm
            .logs()
            .into_iter()
            .filter(|(level, _)| *level == LogLevel::Critical)
            .map(|(_, message)| message)
            .collect();
        assert_eq!(critical.len(), 1, "{}", vm.log_text());
        assert!(critical[0].contains(expected), "{}", critical[0]);
        // Were it asked to serve anyway, it fails closed.
        let ex = send(&mut vm, Request::get("/v1/search").bearer("x.y.z"));
        assert_refused(&ex, 503, "not_configured");
    }

    // Bytes that are not even UTF-8.
    let vm = host()
        .start_bytes(b"\xff\xfe{", &SharedData::new())
        .unwrap();
    assert!(!vm.configured());
    assert!(!vm.trapped(), "{:?}", vm.trap());
}

#[test]
fn malformed_credentials_are_refused_without_ever_trapping() {
    let k = keys();
    let mut vm = start(&config());
    let mut rng = StdRng::seed_from_u64(0x7011_6a7e);
    let spec = spec("starter", &["search"]);
    let claims = spec.claims_at(NOW);
    let good = token(&k.ed, &spec);
    let [good_header, good_payload, good_signature] = segments(&good);
    let [_, _, es_signature] = segments(&token(&k.es, &spec));
    let payload = b64(claims.to_string().as_bytes());
    let mut richer = claims.clone();
    richer["features"] = json!(["search", "design"]);
    richer["plan"] = json!("pro");
    let header = |h: Value| b64(h.to_string().as_bytes());

    let mut fixed: Vec<Vec<u8>> = [
        format!(
            "{}.{payload}.",
            header(json!({"alg": "none", "kid": "ed-1"}))
        ),
        format!("{}.{payload}.", header(json!({"alg": "none"}))),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "NONE", "kid": "ed-1"}))
        ),
        format!(
            "{}.{payload}.",
            header(json!({"alg": "None", "typ": "JWT"}))
        ),
        format!(
            "{}.{payload}.{es_signature}",
            header(json!({"alg": "ES256", "kid": "ed-1"}))
        ),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "EdDSA", "kid": "es-1"}))
        ),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "RS256", "kid": "rs-1"}))
        ),
        format!(
            "{}.{payload}.{}",
            header(json!({"alg": "HS256", "kid": "ed-1"})),
            b64(&[7; 32])
        ),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "EdDSA"}))
        ),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "EdDSA", "kid": 1}))
        ),
        format!(
            "{}.{payload}.{good_signature}",
            header(json!({"alg": "EdDSA", "kid": "../../etc/passwd"}))
        ),
        format!("{}.{payload}.{good_signature}", header(json!(["EdDSA"]))),
        format!(
            "{}.{payload}.{good_signature}",
            b64("[".repeat(100_000).as_bytes())
        ),
        format!(
            "{good_header}.{}.{good_signature}",
            b64(richer.to_string().as_bytes())
        ),
        format!("{good_header}.{}.{good_signature}", b64(b"not json")),
        format!("{good_header}.{good_payload}"),
        format!("{good_header}.{good_payload}.{good_signature}.extra"),
        format!("{good_header}..{good_signature}"),
        format!("{good}=="),
        "x".into(),
        "a.b.c".into(),
        "....".into(),
        "é.é.é".into(),
        ".".repeat(10_000),
        "A".repeat(100_000),
        format!("{good}.{}", "A".repeat(100_000)),
        // Signed by configured keys, with a `crit` the filter must refuse (RFC 7515 4.1.11).
        k.ed.sign_raw(
            &json!({"alg": "EdDSA", "kid": "ed-1", "crit": ["x"], "x": 1}).to_string(),
            &claims.to_string(),
        )
        .unwrap(),
        k.es.sign_raw(
            &json!({"alg": "ES256", "kid": "es-1", "crit": ["b64"], "b64": false}).to_string(),
            &claims.to_string(),
        )
        .unwrap(),
        k.rs.sign_raw(
            &json!({"alg": "RS256", "kid": "rs-1", "crit": []}).to_string(),
            &claims.to_string(),
        )
        .unwrap(),
    ]
    .into_iter()
    .map(|t| format!("Bearer {t}").into_bytes())
    .collect();
    fixed.extend([
        b"Bearer".to_vec(),
        b"Basic dXNlcjpwYXNz".to_vec(),
        format!("Bearer{good}").into_bytes(),
        format!("Token {good}").into_bytes(),
        b"Bearer \xff\xfe\xfd".to_vec(),
        [b"Bearer ".as_slice(), good.as_bytes(), b"\xff"].concat(),
        [b"\xc3(".as_slice(), good.as_bytes()].concat(),
        b"Bearer \0\0\0".to_vec(),
        b"\r\n\t ".to_vec(),
        vec![0xff; 100_000],
    ]);

    assert!(fixed.len() < 200);
    let mut next_fixed = fixed.iter().peekable();
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..1000 {
        let credential: Vec<u8> = match i % 10 {
            // The fixed cases first, each once.
            0 | 1 if next_fixed.peek().is_some() => next_fixed.next().unwrap().clone(),
            // Random bytes, with and without the scheme.
            0..=2 => {
                let len = rng.gen_range(0..300);
                let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if i % 2 == 0 {
                    [b"Bearer ".as_slice(), &bytes].concat()
                } else {
                    bytes
                }
            }
            // A real token cut short.
            3 => format!("Bearer {}", &good[..rng.gen_range(0..good.len())]).into_bytes(),
            // A real token with one byte changed (possibly to a non-UTF-8 byte).
            4 | 5 => {
                let mut bytes = good.clone().into_bytes();
                let at = rng.gen_range(0..bytes.len());
                let mut replacement = rng.gen::<u8>();
                while replacement == bytes[at] {
                    replacement = rng.gen();
                }
                bytes[at] = replacement;
                [b"Bearer ".as_slice(), &bytes].concat()
            }
            // A forged payload under the real header and signature.
            6 => {
                let mut forged = claims.clone();
                forged["sub"] = json!(format!("acct-{}", rng.gen::<u32>()));
                format!(
                    "Bearer {good_header}.{}.{good_signature}",
                    b64(forged.to_string().as_bytes())
                )
                .into_bytes()
            }
            // Huge values.
            7 => {
                let mut bytes = b"Bearer ".to_vec();
                bytes.extend((0..100_000).map(|_| rng.gen_range(b'A'..=b'z')));
                bytes
            }
            // Segments of random base64url.
            8 => {
                let mut part = |n: usize| {
                    let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                    b64(&bytes)
                };
                format!("Bearer {}.{}.{}", part(30), part(120), part(64)).into_bytes()
            }
            // The real token, but a second, broken credential header comes first.
            _ => {
                let ex = send(
                    &mut vm,
                    Request::get("/v1/search")
                        .header("authorization", "Bearer broken")
                        .bearer(&good),
                );
                assert_refused(&ex, 401, "invalid_token");
                continue;
            }
        };
        let request = Request::get("/v1/search").header("authorization", credential.clone());
        let ex = vm.request(&request).unwrap_or_else(|e| {
            panic!(
                "request {i} ({:?}): {e:#}",
                String::from_utf8_lossy(&credential[..credential.len().min(80)])
            )
        });
        assert!(!vm.trapped(), "{:?}", vm.trap());
        assert_eq!(
            ex.status(),
            401,
            "request {i} ({:?}): {ex:?}",
            String::from_utf8_lossy(&credential[..credential.len().min(80)])
        );
        let code = ex.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(
            code == "invalid_token" || code == "missing_token",
            "request {i}: {code}"
        );
        *codes.entry(code).or_default() += 1;
    }
    assert!(codes["invalid_token"] > 800, "{codes:?}");

    // The same VM still serves a valid license, and never logged an error.
    let ex = send(&mut vm, Request::get("/v1/search").bearer(&good));
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert_eq!(ex.upstream_headers("x-tollgate-license"), ["lic-1"]);
    assert!(
        vm.logs().iter().all(|(level, _)| *level < LogLevel::Error),
        "{}",
        vm.log_text()
    );
    assert!(
        vm.memory_bytes() < 64 << 20,
        "the filter holds {} bytes",
        vm.memory_bytes()
    );
}

// ---------------------------------------------------------------------------------------------
// Shipping usage to the collector
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "collector-secret-0123456789";

/// The test configuration with a collector; ticks every 50 ms, seals every second.
fn collector_config(extra: Value) -> Value {
    let mut c = config();
    c["stats_flush_interval_ms"] = json!(50);
    let mut collector = json!({
        "instance": "node-a/tollgate",
        "key_id": "k1",
        "secret": SECRET,
        "retry_initial_ms": 100,
        "retry_max_ms": 400,
    });
    for (k, v) in extra.as_object().unwrap() {
        collector[k] = v.clone();
    }
    c["collector"] = collector;
    c
}

/// The usage batches in flight (syncs, which carry leases and licenses, are left aside: the
/// tests of quotas look at those).
fn usage_calls(vm: &Vm) -> Vec<HttpCall> {
    vm.pending_calls()
        .into_iter()
        .filter(|c| c.header(":path").as_deref() == Some("/v1/usage"))
        .collect()
}

/// The syncs in flight.
fn sync_calls(vm: &Vm) -> Vec<HttpCall> {
    vm.pending_calls()
        .into_iter()
        .filter(|c| c.header(":path").as_deref() == Some("/v1/sync"))
        .collect()
}

fn tick(vm: &mut Vm) {
    vm.tick().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!vm.trapped(), "{:?}", vm.trap());
}

/// The one call in flight: checks the collector's contract and decodes the batch.
fn pending_batch(vm: &Vm) -> (HttpCall, UsageBatch) {
    let calls = usage_calls(vm);
    assert_eq!(calls.len(), 1, "one batch in flight at a time: {calls:?}");
    let call = calls.into_iter().next().unwrap();
    assert_eq!(call.upstream, "tollgate_collector");
    assert_eq!(call.header(":method").as_deref(), Some("POST"));
    assert_eq!(call.header(":path").as_deref(), Some("/v1/usage"));
    assert_eq!(
        call.header(":authority").as_deref(),
        Some("tollgate-collector")
    );
    assert_eq!(
        call.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(call.header(KEY_ID_HEADER).as_deref(), Some("k1"));
    let signature = call.header(SIGNATURE_HEADER).unwrap();
    assert!(
        tollgate_wire::verify(SECRET.as_bytes(), &call.body, &signature),
        "bad signature {signature}"
    );
    assert!(!tollgate_wire::verify(
        b"another secret!!",
        &call.body,
        &signature
    ));
    assert_eq!(call.timeout, Duration::from_secs(5));
    let batch = UsageBatch::decode(&call.body).unwrap();
    assert!(
        batch.batch_id.starts_with("node-a/tollgate/"),
        "{}",
        batch.batch_id
    );
    (call, batch)
}

fn ack(batch_id: &str, status: AckStatus, records: usize) -> Vec<u8> {
    BatchAck {
        version: 1,
        batch_id: batch_id.into(),
        status,
        records: records as u64,
    }
    .encode()
}

/// A collector that stores each batch id once, as the real one does.
#[derive(Default)]
struct Collector {
    stored: std::collections::BTreeMap<String, UsageBatch>,
}

impl Collector {
    /// Store the pending batch; answer with its ack (`deliver: false`: the answer is lost).
    fn take(&mut self, vm: &mut Vm, deliver: bool) -> UsageBatch {
        let (call, batch) = pending_batch(vm);
        let status = if self.stored.contains_key(&batch.batch_id) {
            AckStatus::Duplicate
        } else {
            self.stored.insert(batch.batch_id.clone(), batch.clone());
            AckStatus::Accepted
        };
        if deliver {
            let body = ack(&batch.batch_id, status, batch.records.len());
            vm.respond_call(
                call.token,
                200,
                &[("content-type", b"application/json")],
                &body,
            )
            .unwrap();
        } else {
            vm.fail_call(call.token).unwrap();
        }
        assert!(!vm.trapped(), "{:?}", vm.trap());
        batch
    }

    fn units(&self, meter: Meter) -> u64 {
        self.stored.values().map(|b| b.units(meter)).sum()
    }
}

/// What the client side saw: calls, request bytes, response bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Served {
    calls: u64,
    request_bytes: u64,
    response_bytes: u64,
}

impl Served {
    fn add(&mut self, ex: &Exchange) {
        self.calls += 1;
        self.request_bytes += ex.upstream.as_ref().map_or(0, |u| u.body.len() as u64);
        self.response_bytes += ex.body().len() as u64;
    }
}

fn mixed_requests(vm: &mut Vm, t: &str, served: &mut Served) {
    for _ in 0..3 {
        let ex = send(
            vm,
            Request::post("/v1/search")
                .bearer(t)
                .body("hello")
                .body(", world")
                .response_body(["0123456789", "abc"])
                .upstream_latency(Duration::from_millis(2)),
        );
        assert_eq!(ex.status(), 200, "{ex:?}");
        served.add(&ex);
    }
    for request in [
        Request::get("/v1/search"),
        Request::get("/v2/nothing").bearer(t),
        Request::post("/v1/design").bearer(t),
        Request::get("/healthz"),
    ] {
        let ex = send(vm, request);
        assert_ne!(ex.status(), 0);
        served.add(&ex);
    }
}

#[test]
fn batches_carry_exactly_the_usage_served_signed() {
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    assert_eq!(vm.tick_period(), Some(Duration::from_millis(50)));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    let mut collector = Collector::default();

    mixed_requests(&mut vm, &t, &mut served);
    // Not sealed before the flush interval; folded into stats all the same.
    vm.advance(Duration::from_millis(500));
    tick(&mut vm);
    assert!(usage_calls(&vm).is_empty());
    // Allowed: three licensed calls and one public.
    assert_eq!(vm.metric("tollgate.requests_allowed"), Some(4));
    vm.advance(Duration::from_millis(500));
    // (The upstream latency moved the fake clock too.)
    let sealed_at = vm.now() / 1_000_000;
    tick(&mut vm);
    let first = collector.take(&mut vm, true);
    assert_eq!(first.sequence, 1);
    assert_eq!(first.source.vm_started_ms, NOW * 1000);
    assert!(first
        .records
        .iter()
        .all(|r| r.window_start_ms == NOW * 1000 && r.window_end_ms == sealed_at));
    let allowed_calls: u64 = first
        .records
        .iter()
        .filter(|r| r.meter == Meter::Calls && r.outcome == "allowed" && r.feature == "search")
        .map(|r| r.units)
        .sum();
    assert_eq!(allowed_calls, 3);
    assert!(first
        .records
        .iter()
        .any(|r| r.outcome == "missing_token" && r.account.is_empty()));
    assert!(first
        .records
        .iter()
        .any(|r| r.outcome == "allowed" && r.account == "acct-1" && r.license == "lic-1"));

    // A second window.
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    let second = collector.take(&mut vm, true);
    assert_eq!(second.sequence, 2);
    assert_eq!(second.records[0].window_start_ms, sealed_at);

    // Nothing more to send.
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert!(usage_calls(&vm).is_empty());
    assert_eq!(
        Served {
            calls: collector.units(Meter::Calls),
            request_bytes: collector.units(Meter::RequestBytes),
            response_bytes: collector.units(Meter::ResponseBytes),
        },
        served
    );
    assert_eq!(served.calls, 14);
    assert_eq!(collector.units(Meter::ProcessingNs), 6 * 2_000_000);
    let records = (first.records.len() + second.records.len()) as u64;
    let m = |name: &str| {
        vm.metric(name)
            .unwrap_or_else(|| panic!("{name} undefined"))
    };
    assert_eq!(m("tollgate.usage_batches_sent"), 2);
    assert_eq!(m("tollgate.usage_batches_acked"), 2);
    assert_eq!(m("tollgate.usage_batches_failed"), 0);
    assert_eq!(m("tollgate.usage_records_acked"), records);
    assert_eq!(m("tollgate.usage_buffered_records"), 0);
    assert_eq!(m("tollgate.usage_buffered_batches"), 0);
    assert_eq!(m("tollgate.usage_dropped_calls"), 0);
    // The stats still see everything too.
    assert_eq!(m("tollgate.requests_allowed"), 8);
    assert_eq!(m("tollgate.request_bytes"), served.request_bytes);
    assert_eq!(m("tollgate.response_bytes"), served.response_bytes);
    assert!(
        vm.logs().iter().all(|(level, _)| *level < LogLevel::Warn),
        "{}",
        vm.log_text()
    );
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
}

/// A way for a call to the collector to fail.
type Failure = dyn Fn(&mut Vm, u32);

#[test]
fn failed_sends_are_retried_with_the_same_batch_after_backoff_and_counted_once() {
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    let mut collector = Collector::default();
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    let (first, batch) = pending_batch(&vm);

    // Retries: after a 503, after a transport failure, after an ack for another batch, after
    // a 200 that is no ack. Each is the same batch, byte for byte, after the backoff.
    let failures: Vec<Box<Failure>> = vec![
        Box::new(|vm, token| {
            vm.respond_call(token, 503, &[], b"{\"error\":\"unavailable\"}")
                .unwrap()
        }),
        Box::new(|vm, token| vm.fail_call(token).unwrap()),
        Box::new(|vm, token| {
            let other = ack("node-a/tollgate/1/99", AckStatus::Accepted, 4);
            vm.respond_call(token, 200, &[], &other).unwrap()
        }),
        Box::new(|vm, token| {
            vm.respond_call(token, 200, &[], b"\xff\xfe not json")
                .unwrap()
        }),
    ];
    let mut token = first.token;
    // Backoff with equal jitter: 100 ms doubling up to 400 ms, each in [exp/2, exp].
    for (failure, exp) in failures.iter().zip([100u64, 200, 400, 400]) {
        failure(&mut vm, token);
        assert!(!vm.trapped(), "{:?}", vm.trap());
        assert!(usage_calls(&vm).is_empty(), "not before the backoff");
        // Ticks every 50 ms until the retry goes out.
        let mut waited = 0;
        while usage_calls(&vm).is_empty() {
            vm.advance(Duration::from_millis(50));
            waited += 50;
            tick(&mut vm);
            assert!(waited <= exp + 50, "no retry after {waited} ms");
        }
        assert!(
            waited >= exp / 2,
            "retried after {waited} ms (backoff {exp})"
        );
        let (retry, again) = pending_batch(&vm);
        assert_eq!(retry.body, first.body);
        assert_eq!(again.batch_id, batch.batch_id);
        token = retry.token;
    }
    // Meanwhile more usage was sealed into a second batch, which waits its turn.
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert_eq!(usage_calls(&vm).len(), 1);
    assert_eq!(vm.metric("tollgate.usage_buffered_batches"), Some(2));

    // The collector stores the batch but the answer is lost; the retry is a duplicate.
    let stored = collector.take(&mut vm, false);
    assert_eq!(stored.batch_id, batch.batch_id);
    while usage_calls(&vm).is_empty() {
        vm.advance(Duration::from_millis(50));
        tick(&mut vm);
    }
    let again = collector.take(&mut vm, true);
    assert_eq!(again.batch_id, batch.batch_id);
    // The ack sends the next batch at once.
    let (_, next) = pending_batch(&vm);
    assert_eq!(next.sequence, 2);
    collector.take(&mut vm, true);
    assert!(usage_calls(&vm).is_empty());

    assert_eq!(collector.stored.len(), 2);
    assert_eq!(collector.units(Meter::Calls), served.calls);
    assert_eq!(collector.units(Meter::ResponseBytes), served.response_bytes);
    assert_eq!(collector.units(Meter::RequestBytes), served.request_bytes);
    let m = |name: &str| vm.metric(name).unwrap();
    assert_eq!(m("tollgate.usage_batches_failed"), 5);
    assert_eq!(m("tollgate.usage_batches_acked"), 2);
    assert_eq!(m("tollgate.usage_batches_sent"), 7);
    assert_eq!(m("tollgate.usage_buffered_records"), 0);
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
}

#[test]
fn an_unknown_cluster_is_a_failed_send_and_retried() {
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    vm.set_known_clusters(&["some_other_cluster"]);
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert!(usage_calls(&vm).is_empty());
    assert_eq!(vm.metric("tollgate.usage_batches_failed"), Some(1));
    assert!(
        vm.log_text().contains("tollgate_collector"),
        "{}",
        vm.log_text()
    );
    vm.set_known_clusters(&["tollgate_collector"]);
    vm.advance(Duration::from_millis(150));
    tick(&mut vm);
    let mut collector = Collector::default();
    collector.take(&mut vm, true);
    assert_eq!(collector.units(Meter::Calls), served.calls);
}

#[test]
fn fail_closed_refuses_with_503_while_the_buffer_is_full_and_recovers_on_acks() {
    let k = keys();
    let mut vm = start(&collector_config(json!({"max_buffered_records": 2})));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let search = || Request::get("/v1/search").bearer(&t);
    let mut collector = Collector::default();
    let mut served = Served::default();

    // Two records (calls and response bytes of one aggregate) fill the buffer.
    for _ in 0..2 {
        let ex = send(&mut vm, search());
        assert_eq!(ex.status(), 200);
        served.add(&ex);
    }
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert_eq!(usage_calls(&vm).len(), 1);
    assert_eq!(vm.metric("tollgate.usage_buffered_records"), Some(2));

    // The collector does not answer: every request is refused, public routes too.
    for request in [
        search(),
        Request::get("/healthz"),
        Request::get("/v1/search"),
    ] {
        let ex = send(&mut vm, request);
        assert_refused(&ex, 503, "metering_unavailable");
        assert_eq!(ex.header("retry-after").as_deref(), Some("1"));
        assert!(ex.upstream.is_none());
        served.add(&ex);
    }
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert_eq!(
        vm.metric("tollgate.requests_refused.reason.metering_unavailable"),
        Some(3)
    );
    let ex = send(&mut vm, search());
    assert_refused(&ex, 503, "metering_unavailable");
    served.add(&ex);

    // The ack of the first batch sends the second (the refusals), still too much.
    collector.take(&mut vm, true);
    let ex = send(&mut vm, search());
    assert_refused(&ex, 503, "metering_unavailable");
    served.add(&ex);
    // Its ack empties the buffer: served again.
    collector.take(&mut vm, true);
    let ex = send(&mut vm, search());
    assert_eq!(ex.status(), 200, "{ex:?}");
    served.add(&ex);
    assert!(
        vm.log_text().contains("metering_unavailable"),
        "{}",
        vm.log_text()
    );

    // Everything, refusals included, reaches the collector in the end.
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    collector.take(&mut vm, true);
    assert_eq!(collector.units(Meter::Calls), served.calls);
    assert_eq!(collector.units(Meter::ResponseBytes), served.response_bytes);
    assert_eq!(vm.metric("tollgate.usage_dropped_calls"), Some(0));
}

#[test]
fn fail_open_serves_and_counts_exactly_the_calls_it_could_not_keep() {
    let k = keys();
    let mut vm = start(&collector_config(
        json!({"max_buffered_records": 2, "on_buffer_full": "fail_open"}),
    ));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let search = || Request::get("/v1/search").bearer(&t);
    let mut collector = Collector::default();

    for _ in 0..2 {
        assert_eq!(send(&mut vm, search()).status(), 200);
    }
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    // Full, unanswered: still served; three calls' usage does not fit.
    for _ in 0..3 {
        assert_eq!(send(&mut vm, search()).status(), 200);
    }
    assert_eq!(send(&mut vm, Request::get("/healthz")).status(), 200);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    assert_eq!(vm.metric("tollgate.usage_dropped_calls"), Some(4));
    let warnings: Vec<String> = vm
        .logs()
        .into_iter()
        .filter(|(level, _)| *level == LogLevel::Warn)
        .map(|(_, m)| m)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("4 calls"), "{}", warnings[0]);

    collector.take(&mut vm, true);
    assert_eq!(send(&mut vm, search()).status(), 200);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    collector.take(&mut vm, true);
    // 7 served, 4 dropped.
    assert_eq!(collector.units(Meter::Calls), 3);
    assert_eq!(vm.metric("tollgate.usage_dropped_calls"), Some(4));
    // 6 licensed calls and 1 public one.
    assert_eq!(vm.metric("tollgate.requests_allowed"), Some(7));
}

#[test]
fn shutdown_sends_what_is_left_and_waits_for_the_answer() {
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    let mut collector = Collector::default();
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    // The first batch fails and is in backoff; more usage is still open.
    let (call, _) = pending_batch(&vm);
    vm.fail_call(call.token).unwrap();
    mixed_requests(&mut vm, &t, &mut served);

    assert!(!vm.shutdown().unwrap(), "on_done waits for the last sends");
    assert!(!vm.finished());
    collector.take(&mut vm, true);
    assert!(!vm.finished(), "the second batch goes next");
    collector.take(&mut vm, true);
    assert!(vm.finished(), "proxy_done after the last answer");
    assert!(!vm.trapped(), "{:?}", vm.trap());
    assert_eq!(collector.units(Meter::Calls), served.calls);
    assert_eq!(vm.metric("tollgate.usage_buffered_records"), Some(0));
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());

    // A failure while shutting down ends the wait (and says what is lost).
    let mut vm = start(&collector_config(json!({})));
    mixed_requests(&mut vm, &t, &mut Served::default());
    assert!(!vm.shutdown().unwrap());
    let (call, _) = pending_batch(&vm);
    vm.fail_call(call.token).unwrap();
    assert!(vm.finished());
    assert!(vm.log_text().contains("are lost"), "{}", vm.log_text());
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
}

#[test]
fn workers_starting_in_the_same_millisecond_get_distinct_batch_ids() {
    let k = keys();
    let shared = SharedData::new();
    let mut a = start_with(&collector_config(json!({})), &shared);
    let mut b = start_with(&collector_config(json!({})), &shared);
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut ids = Vec::new();
    for vm in [&mut a, &mut b] {
        assert_eq!(
            send(vm, Request::get("/v1/search").bearer(&t)).status(),
            200
        );
        vm.advance(Duration::from_secs(1));
        tick(vm);
        ids.push(pending_batch(vm).1.batch_id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn a_replaced_vm_hands_unacknowledged_batches_to_its_successor() {
    let k = keys();
    let shared = SharedData::new();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    let mut collector = Collector::default();

    // The old VM serves while the collector is down, then is replaced; its last send fails too.
    let mut old = start_with(&collector_config(json!({})), &shared);
    mixed_requests(&mut old, &t, &mut served);
    old.advance(Duration::from_secs(1));
    tick(&mut old);
    let (call, first) = pending_batch(&old);
    old.fail_call(call.token).unwrap();
    mixed_requests(&mut old, &t, &mut served);
    assert!(!old.shutdown().unwrap());
    let (call, _) = pending_batch(&old);
    old.fail_call(call.token).unwrap();
    assert!(old.finished());
    assert!(!old.trapped(), "{:?}", old.trap());
    assert_eq!(old.metric("tollgate.usage_batches_handed_over"), Some(2));
    assert!(
        old.log_text().contains("the next VM sends them"),
        "{}",
        old.log_text()
    );

    // The new VM (same Envoy, so same shared data) takes them over on its first tick and
    // sends them under their original ids before its own usage.
    let mut new = start_with(&collector_config(json!({})), &shared);
    mixed_requests(&mut new, &t, &mut served);
    new.advance(Duration::from_secs(1));
    tick(&mut new);
    assert_eq!(new.metric("tollgate.usage_batches_adopted"), Some(2));
    let adopted = collector.take(&mut new, true);
    assert_eq!(adopted.batch_id, first.batch_id);
    collector.take(&mut new, true);
    let own = collector.take(&mut new, true);
    assert_ne!(own.source.vm_started_ms, first.source.vm_started_ms);
    assert!(usage_calls(&new).is_empty());
    assert_eq!(collector.stored.len(), 3);
    assert_eq!(collector.units(Meter::Calls), served.calls);
    assert_eq!(collector.units(Meter::ResponseBytes), served.response_bytes);

    // Nothing is left to hand over twice: a third VM finds an empty list.
    let mut third = start_with(&collector_config(json!({})), &shared);
    third.advance(Duration::from_secs(1));
    tick(&mut third);
    assert!(usage_calls(&third).is_empty());
    assert_eq!(third.metric("tollgate.usage_batches_adopted"), Some(0));
    for vm in [&old, &new, &third] {
        assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
    }
}

#[test]
fn a_batch_the_old_vm_delivered_at_last_is_not_sent_again_by_the_successor() {
    let k = keys();
    let shared = SharedData::new();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut served = Served::default();
    let mut collector = Collector::default();
    let mut old = start_with(&collector_config(json!({})), &shared);
    mixed_requests(&mut old, &t, &mut served);
    assert!(!old.shutdown().unwrap());
    collector.take(&mut old, true);
    assert!(old.finished());

    let mut new = start_with(&collector_config(json!({})), &shared);
    new.advance(Duration::from_secs(1));
    tick(&mut new);
    assert!(
        usage_calls(&new).is_empty(),
        "the acknowledged batch was withdrawn from the handover list"
    );
    assert_eq!(collector.units(Meter::Calls), served.calls);
}

#[test]
fn a_batch_the_collector_refuses_for_good_is_dead_lettered_and_the_rest_flows() {
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut collector = Collector::default();
    mixed_requests(&mut vm, &t, &mut Served::default());
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    let (poison, poison_batch) = pending_batch(&vm);
    let mut served = Served::default();
    mixed_requests(&mut vm, &t, &mut served);
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);

    // A 400 that is not the collector's refusal (a proxy's error page) is retried.
    vm.respond_call(poison.token, 400, &[], b"<html>Bad Request</html>")
        .unwrap();
    while usage_calls(&vm).is_empty() {
        vm.advance(Duration::from_millis(50));
        tick(&mut vm);
    }
    let (retry, again) = pending_batch(&vm);
    assert_eq!(again.batch_id, poison_batch.batch_id);

    // The collector's own "malformed_batch" is final: the batch leaves the buffer, is logged
    // whole, and the next batch goes at once.
    let refusal = tollgate_wire::Refusal::new(
        tollgate_wire::Refusal::MALFORMED_BATCH,
        "invalid batch: testing",
    );
    vm.respond_call(
        retry.token,
        400,
        &[("content-type", b"application/json")],
        &refusal.encode(),
    )
    .unwrap();
    assert!(!vm.trapped(), "{:?}", vm.trap());
    let next = collector.take(&mut vm, true);
    assert_ne!(next.batch_id, poison_batch.batch_id);
    assert_eq!(collector.units(Meter::Calls), served.calls);
    assert_eq!(vm.metric("tollgate.usage_batches_rejected"), Some(1));
    assert_eq!(
        vm.metric("tollgate.usage_records_rejected"),
        Some(poison_batch.records.len() as u64)
    );
    assert_eq!(vm.metric("tollgate.usage_buffered_records"), Some(0));
    let log = vm.log_text();
    assert!(log.contains("dead letter"), "{log}");
    assert!(log.contains(&poison_batch.batch_id), "{log}");
    assert!(
        log.contains(std::str::from_utf8(&poison.body).unwrap()),
        "the dead letter carries the whole batch"
    );
}

#[test]
fn without_a_configured_instance_batches_are_named_after_the_node_and_a_random_part() {
    let k = keys();
    let mut config = collector_config(json!({}));
    config["collector"]
        .as_object_mut()
        .unwrap()
        .remove("instance");
    let shared = SharedData::new();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut vm = start_with(&config, &shared);
        assert_eq!(
            send(&mut vm, Request::get("/v1/search").bearer(&t)).status(),
            200
        );
        vm.advance(Duration::from_secs(1));
        tick(&mut vm);
        let call = usage_calls(&vm).pop().unwrap();
        let batch = UsageBatch::decode(&call.body).unwrap();
        let (node, random) = batch.source.instance.rsplit_once('/').unwrap();
        assert_eq!(
            node,
            "sidecar_10.1.2.3_api-7d9f.shop_shop.svc.cluster.local"
        );
        assert_eq!(random.len(), 16);
        assert!(batch.batch_id.starts_with(&batch.source.instance));
        instances.push(batch.source.instance);
    }
    assert_ne!(
        instances[0], instances[1],
        "each VM draws its own random part"
    );
}

#[test]
fn the_istio_plugin_configuration_is_accepted_by_the_filter() {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../envoy/istio/wasmplugin.yaml"),
    )
    .unwrap();
    let json = yaml.split("  pluginConfig:\n").nth(1).unwrap();
    let config: Value = serde_json::from_str(json).unwrap();
    assert!(
        config["collector"].get("instance").is_none(),
        "one configuration for every sidecar: no fixed instance"
    );
    assert_eq!(
        config["token"]["jwks_source"]["cluster"], config["collector"]["cluster"],
        "keys come from the collector the usage goes to"
    );
    let vm = start(&config);
    assert!(vm.configured());
}

// ---------------------------------------------------------------------------------------------
// Period quotas, leases and denials
// ---------------------------------------------------------------------------------------------

/// A collector configuration whose `pro` plan has a quota of 100 calls a day (leases of 5).
fn quota_config() -> Value {
    let mut c = collector_config(json!({}));
    c["plans"]["pro"]["quotas"] = json!({"calls": {"per": "day", "limit": 100}});
    c
}

/// Answer the sync in flight with `grants` (lease id → units) and `denials`; returns the
/// request it carried.
fn answer_sync(
    vm: &mut Vm,
    grant: impl Fn(&tollgate_wire::sync::LeaseRequest) -> u64,
    denials: Vec<tollgate_wire::sync::Denial>,
) -> tollgate_wire::sync::SyncRequest {
    use tollgate_wire::sync::{LeaseGrant, SyncRequest, SyncResponse};
    let calls = sync_calls(vm);
    assert_eq!(
        calls.len(),
        1,
        "one sync in flight: {:?}\n{}",
        vm.pending_calls()
            .iter()
            .map(|c| c.header(":path"))
            .collect::<Vec<_>>(),
        vm.log_text()
    );
    let call = calls.into_iter().next().unwrap();
    let signature = call.header(SIGNATURE_HEADER).unwrap();
    assert!(tollgate_wire::verify(
        SECRET.as_bytes(),
        &call.body,
        &signature
    ));
    let request = SyncRequest::decode(&call.body).unwrap();
    let now_ms = vm.now() / 1_000_000;
    let response = SyncResponse {
        seats: Vec::new(),
        version: 1,
        grants: request
            .leases
            .iter()
            .map(|l| LeaseGrant {
                lease_id: l.lease_id.clone(),
                granted: grant(l),
                period_start_ms: now_ms - 1000,
                period_end_ms: now_ms + 3_600_000,
                expires_ms: now_ms + 10_000,
                allocated: grant(l),
            })
            .collect(),
        closed: request.returns.iter().map(|r| r.lease_id.clone()).collect(),
        denials,
    };
    vm.respond_call(
        call.token,
        200,
        &[("content-type", b"application/json")],
        &response.encode(),
    )
    .unwrap();
    assert!(!vm.trapped(), "{:?}", vm.trap());
    request
}

#[test]
fn a_quota_is_enforced_out_of_leases_the_collector_grants() {
    use tollgate_wire::sync::Period;
    let k = keys();
    let mut vm = start(&quota_config());
    let t = token(&k.ed, &spec("pro", &["search"]));
    let search = || Request::get("/v1/search").bearer(&t);

    // No lease yet: the request is held (paused), and the next tick asks for one.
    let held = send(&mut vm, search());
    assert!(held.stalled, "{held:?}");
    vm.advance(Duration::from_millis(50));
    tick(&mut vm);
    let request = answer_sync(&mut vm, |_| 5, Vec::new());
    assert_eq!(request.leases.len(), 1);
    let lease = &request.leases[0];
    assert_eq!(
        (
            lease.license.as_str(),
            lease.meter,
            lease.period,
            lease.limit,
            lease.want
        ),
        ("lic-1", Meter::Calls, Period::Day, 100, 5)
    );
    assert!(
        lease.lease_id.starts_with("node-a/tollgate/"),
        "{}",
        lease.lease_id
    );
    assert_eq!(request.licenses[0].plan, "pro");

    // Five calls out of the grant (the held request's stream is gone in this host, so its
    // unit went back), then the pool is empty: the sixth waits for the next lease.
    for i in 0..5 {
        let ok = send(&mut vm, search());
        assert_eq!(ok.status(), 200, "call {i}");
        // The quota left as this Envoy sees it: 100 - 5 granted + what its lease has left.
        assert_eq!(
            ok.header("ratelimit").as_deref(),
            Some(format!("\"quota_calls_day\";r={};t=3600", 95 + 4 - i).as_str())
        );
        assert_eq!(
            ok.header("ratelimit-policy").as_deref(),
            Some("\"quota_calls_day\";q=100;w=86400")
        );
    }
    assert!(send(&mut vm, search()).stalled);
    // (In this host a held stream ends at once; the regular sync carries the lease request.)
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    // The used-up lease goes back with what it used; the collector has nothing more.
    let request = answer_sync(&mut vm, |_| 0, Vec::new());
    assert_eq!(request.returns.len(), 1);
    assert_eq!(request.returns[0].used, 5);
    let refused = send(&mut vm, search());
    assert_refused(&refused, 429, "quota_exhausted");
    assert_eq!(refused.header("retry-after").as_deref(), Some("3600"));
    assert_eq!(
        refused.header("ratelimit-policy").as_deref(),
        Some("\"quota_calls_day\";q=100;w=86400")
    );
    // Public routes and other licenses' quotas are not touched.
    assert_eq!(send(&mut vm, Request::get("/healthz")).status(), 200);
    assert!(vm.host_notes().is_empty(), "{:?}", vm.host_notes());
}

#[test]
fn the_collectors_denials_refuse_a_license_until_it_says_otherwise() {
    use tollgate_wire::sync::{Denial, DenialCode};
    let k = keys();
    let mut vm = start(&collector_config(json!({})));
    let t = token(&k.ed, &spec("pro", &["search"]));
    assert_eq!(
        send(&mut vm, Request::get("/v1/search").bearer(&t)).status(),
        200
    );
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    let revoked = Denial {
        account: "acct-1".into(),
        license: "lic-1".into(),
        code: DenialCode::LicenseRevoked,
        message: "license lic-1 was revoked: chargeback".into(),
        until_ms: None,
    };
    let request = answer_sync(&mut vm, |_| 0, vec![revoked]);
    assert_eq!(request.licenses.len(), 1, "the license served is named");
    let refused = send(&mut vm, Request::get("/v1/search").bearer(&t));
    let body = assert_refused(&refused, 403, "license_revoked");
    assert!(body["message"].as_str().unwrap().contains("chargeback"));

    // A spend cap lifts at its time.
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    let until_ms = vm.now() / 1_000_000 + 5_000;
    answer_sync(
        &mut vm,
        |_| 0,
        vec![Denial {
            account: "acct-1".into(),
            license: "lic-1".into(),
            code: DenialCode::SpendCapReached,
            message: "budget spent".into(),
            until_ms: Some(until_ms),
        }],
    );
    let capped = send(&mut vm, Request::get("/v1/search").bearer(&t));
    assert_refused(&capped, 402, "spend_cap_reached");
    assert_eq!(capped.header("retry-after").as_deref(), Some("5"));
    vm.advance(Duration::from_secs(5));
    assert_eq!(
        send(&mut vm, Request::get("/v1/search").bearer(&t)).status(),
        200
    );

    // The collector no longer names a denial: lifted.
    vm.advance(Duration::from_secs(1));
    tick(&mut vm);
    answer_sync(&mut vm, |_| 0, vec![]);
    assert_eq!(
        send(&mut vm, Request::get("/v1/search").bearer(&t)).status(),
        200
    );
}

/// The JWKS fetch the VM has in flight.
fn jwks_call(vm: &Vm) -> HttpCall {
    let calls: Vec<HttpCall> = vm
        .pending_calls()
        .into_iter()
        .filter(|c| c.header(":path").as_deref() == Some("/.well-known/jwks.json"))
        .collect();
    assert_eq!(calls.len(), 1, "one JWKS fetch in flight: {calls:?}");
    calls.into_iter().next().unwrap()
}

#[test]
fn keys_from_a_jwks_endpoint_survive_bad_answers_and_reach_the_next_vm() {
    let k = keys();
    let mut c = config();
    c["token"].as_object_mut().unwrap().remove("jwks");
    c["token"]["jwks_source"] = json!({"cluster": "collector", "refresh_seconds": 60});
    let shared = SharedData::new();
    let mut vm = start_with(&c, &shared);
    let ed = token(&k.ed, &spec("starter", &["search"]));
    let request = || Request::get("/v1/search").header("authorization", format!("Bearer {ed}"));

    // Before any fetch: 503 with Retry-After, never a 401.
    let ex = send(&mut vm, request());
    assert_refused(&ex, 503, "keys_unavailable");
    assert_eq!(ex.header("retry-after").as_deref(), Some("1"));
    tick(&mut vm);
    let mut call = jwks_call(&vm);
    assert_eq!(call.upstream, "collector");
    assert_eq!(call.header(":method").as_deref(), Some("GET"));
    // Garbage of every kind, and failed calls, are taken without harm; keys stay unavailable.
    let garbage: [&[u8]; 4] = [
        b"\xff\xfe not json",
        b"{\"keys\": 5}",
        b"{\"keys\": []}",
        &[b'['; 5000],
    ];
    for body in garbage {
        vm.respond_call(call.token, 200, &[], body).unwrap();
        assert!(!vm.trapped(), "{:?}", vm.trap());
        assert_refused(&send(&mut vm, request()), 503, "keys_unavailable");
        tick(&mut vm);
        assert!(vm.pending_calls().is_empty(), "backs off after a failure");
        vm.advance(Duration::from_secs(61));
        tick(&mut vm);
        let failing = jwks_call(&vm);
        vm.fail_call(failing.token).unwrap();
        vm.advance(Duration::from_secs(61));
        tick(&mut vm);
        call = jwks_call(&vm);
    }
    let set = jwks([&k.ed]).to_string();
    vm.respond_call(call.token, 200, &[], set.as_bytes())
        .unwrap();
    let ex = send(&mut vm, request());
    assert_eq!(ex.status(), 200, "{ex:?}");
    assert!(ex.reached_upstream());

    // A reload (a new VM on the same Envoy) starts with the stored set: no 503, no fetch.
    let mut next = start_with(&c, &shared);
    next.set_time(vm.now());
    let ex = send(&mut next, request());
    assert_eq!(ex.status(), 200, "{ex:?}");
}
