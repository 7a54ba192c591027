//! The module's safe parts against a fake host: configuration refusals, the shared cells, and
//! requests decided as the wasm filter decides them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use serde_json::{json, Value};
use tollgate_core::quota::SharedBlobs;
use tollgate_core::SharedCells;
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{LicenseSpec, SigningKey};

use super::*;

#[derive(Default)]
struct FakeConfig {
    names: Vec<String>,
}

impl ConfigHost for FakeConfig {
    fn define_counter(&mut self, name: &str) -> Option<usize> {
        self.names.push(name.to_string());
        Some(self.names.len() - 1)
    }
}

/// A local reply: status, headers, body.
type Sent = (u32, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
struct FakeHttp {
    request: HashMap<String, Vec<u8>>,
    response: HashMap<String, String>,
    sent: Option<Sent>,
    counters: HashMap<usize, u64>,
}

impl Http for FakeHttp {
    fn request_header(&self, name: &str) -> Option<&[u8]> {
        self.request.get(name).map(Vec::as_slice)
    }
    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.request.insert(name.into(), v.as_bytes().to_vec()),
            None => self.request.remove(name),
        };
    }
    fn set_response_header(&mut self, name: &str, value: &str) {
        self.response.insert(name.into(), value.into());
    }
    fn received_body_bytes(&self, _request: bool) -> u64 {
        // As in Envoy: a filter's own local reply does not pass its body hook.
        0
    }
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.sent = Some((status, headers, body.to_vec()));
    }
    fn increment(&mut self, counter: usize, value: u64) {
        *self.counters.entry(counter).or_default() += value;
    }
}

fn demo_config() -> Value {
    serde_json::from_slice(&std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap())
        .unwrap()
}

fn demo_token(plan: &str) -> String {
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap();
    let mut spec = LicenseSpec::new("acme", "lic-1", plan, &["search"]);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    spec.mint(&key).unwrap()
}

fn config(json: &Value) -> (Config, FakeConfig) {
    let mut host = FakeConfig::default();
    // A store per test: tests run in parallel and reuse license ids.
    let config = Config::with_cells(
        &mut host,
        b"tollgate",
        json.to_string().as_bytes(),
        NativeCells::default(),
    )
    .unwrap();
    (config, host)
}

fn request(config: &Config, path: &str, token: Option<&str>) -> (bool, FakeHttp) {
    let mut http = FakeHttp::default();
    http.request
        .insert(":path".into(), path.as_bytes().to_vec());
    http.request.insert(":method".into(), b"GET".to_vec());
    if let Some(token) = token {
        http.request.insert(
            "authorization".into(),
            format!("Bearer {token}").into_bytes(),
        );
    }
    let mut stream = Stream::default();
    let go_on = stream.request_headers(config, &mut http);
    stream.response_headers(&mut http);
    stream.response_body(&http);
    stream.complete(config, &mut http);
    (go_on, http)
}

fn counter(host: &FakeConfig, http: &FakeHttp, name: &str) -> u64 {
    let id = host.names.iter().position(|n| n == name).unwrap();
    http.counters.get(&id).copied().unwrap_or(0)
}

fn collector() -> Value {
    json!({"cluster": "tollgate_collector", "instance": "t/1", "key_id": "k1", "secret": "0123456789abcdef0123456789abcdef"})
}

#[test]
fn what_the_module_does_not_run_yet_is_refused_at_load() {
    let mut with_collector = demo_config();
    with_collector["collector"] = collector();
    let mut with_source = with_collector.clone();
    with_source["token"].as_object_mut().unwrap().remove("jwks");
    with_source["token"]["jwks_source"] = json!({"cluster": "tollgate_collector"});
    for (config, what) in [
        (with_collector, "`collector`"),
        (with_source, "`token.jwks_source`"),
    ] {
        let error = compile(config.to_string().as_bytes()).unwrap_err();
        assert!(
            error.contains(&format!(
                "the native module does not support {what} yet; use the wasm filter"
            )),
            "{error}"
        );
        let mut host = FakeConfig::default();
        assert!(Config::new(&mut host, b"tollgate", config.to_string().as_bytes()).is_none());
    }
    assert!(compile(b"").unwrap_err().contains("empty"));
    assert!(compile(b"{not json").is_err());
    let mut host = FakeConfig::default();
    assert!(Config::new(&mut host, b"tollgate", b"{}").is_none());
}

#[test]
fn cells_compare_and_swap_checks_first_writes_too() {
    let cells = NativeCells::default();
    assert_eq!(SharedCells::load(&cells, "k").unwrap(), None);
    assert!(SharedCells::compare_and_swap(&cells, "k", 7, None).unwrap());
    // A second first write loses: the key exists now.
    assert!(!SharedCells::compare_and_swap(&cells, "k", 8, None).unwrap());
    let (value, version) = SharedCells::load(&cells, "k").unwrap().unwrap();
    assert_eq!(value, 7);
    assert!(!SharedCells::compare_and_swap(&cells, "k", 9, Some(version + 1)).unwrap());
    assert!(SharedCells::compare_and_swap(&cells, "k", 9, Some(version)).unwrap());
    assert_eq!(SharedCells::load(&cells, "k").unwrap().unwrap().0, 9);
    // Clones share the store, as Envoy's workers do.
    let other = cells.clone();
    assert!(SharedBlobs::compare_and_swap(&other, "b", b"x", None).unwrap());
    assert_eq!(
        SharedBlobs::load(&cells, "b").unwrap().unwrap().0,
        b"x".to_vec()
    );
}

#[test]
fn configurations_share_the_process_store() {
    let mut host = FakeConfig::default();
    let bytes = demo_config().to_string();
    let first = Config::new(&mut host, b"tollgate", bytes.as_bytes()).unwrap();
    let second = Config::new(&mut host, b"tollgate", bytes.as_bytes()).unwrap();
    // A license id no other test uses: the process store is shared by the whole binary.
    let mut spec = LicenseSpec::new("acme", "lic-process-store", "starter", &["search"]);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap();
    let token = spec.mint(&key).unwrap();
    let (_, http) = request(&first, "/v1/search", Some(&token));
    assert_eq!(
        http.response.get("ratelimit").map(String::as_str),
        Some("\"license\";r=9;t=1")
    );
    // A new configuration (an Envoy config update) sees the bucket the first one drew from.
    let (_, http) = request(&second, "/v1/search", Some(&token));
    assert_eq!(
        http.response.get("ratelimit").map(String::as_str),
        Some("\"license\";r=8;t=1")
    );
}

#[test]
fn missing_token_is_refused_with_the_wasm_filters_answer() {
    let (config, host) = config(&demo_config());
    let (go_on, http) = request(&config, "/v1/search", None);
    assert!(!go_on);
    let (status, headers, body) = http.sent.clone().unwrap();
    assert_eq!(status, 401);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "application/json"));
    assert!(headers.iter().any(|(k, _)| k == "www-authenticate"));
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "missing_token");
    assert_eq!(
        counter(
            &host,
            &http,
            "tollgate.requests_refused.reason.missing_token"
        ),
        1
    );
    // The refusal's own body is metered (Envoy does not show it to the body hook).
    assert_eq!(
        counter(&host, &http, "tollgate.response_bytes"),
        http.sent.as_ref().unwrap().2.len() as u64
    );
}

#[test]
fn licensed_request_goes_on_with_license_headers_and_no_token() {
    let (config, host) = config(&demo_config());
    let token = demo_token("starter");
    let (go_on, http) = request(&config, "/v1/search?q=1", Some(&token));
    assert!(go_on);
    assert!(http.sent.is_none());
    let header = |name: &str| http.request.get(name).cloned().map(String::from_utf8);
    assert_eq!(header("x-tollgate-account"), Some(Ok("acme".into())));
    assert_eq!(header("x-tollgate-plan"), Some(Ok("starter".into())));
    assert_eq!(header("x-tollgate-feature"), Some(Ok("search".into())));
    assert_eq!(header("authorization"), None);
    assert_eq!(
        http.response.get("ratelimit").map(String::as_str),
        Some("\"license\";r=9;t=1")
    );
    assert_eq!(counter(&host, &http, "tollgate.requests_allowed"), 1);
    assert_eq!(counter(&host, &http, "tollgate.token_cache_misses"), 1);
    // The second request of the token is a cache hit of the one shared gate.
    let (_, http) = request(&config, "/v1/search?q=2", Some(&token));
    assert_eq!(counter(&host, &http, "tollgate.token_cache_hits"), 1);
}

#[test]
fn the_gate_is_shared_by_threads_and_so_is_the_rate_limit() {
    let mut json = demo_config();
    json["plans"]["tiny"] = json!({"rate_limit": {"requests_per_second": 1, "burst": 4}});
    let (config, _) = config(&json);
    let config = std::sync::Arc::new(config);
    let token = demo_token("tiny");
    let admitted: u32 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (config, token) = (&config, &token);
                scope.spawn(move || {
                    (0..6)
                        .filter(|_| request(config, "/v1/search", Some(token)).0)
                        .count() as u32
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    // 12 requests at once from two threads: the burst of 4 (plus at most one refill).
    assert!((4..=5).contains(&admitted), "admitted {admitted}");
}
