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
    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        self.define_counter(name)
    }
}

/// A local reply: status, headers, body.
type Sent = (u32, Vec<(String, String)>, Vec<u8>);

#[derive(Default)]
struct FakeHttp {
    request: HashMap<String, Vec<u8>>,
    response: HashMap<String, String>,
    /// Dynamic metadata: (namespace, key) → value.
    metadata: HashMap<(String, String), String>,
    sent: Option<Sent>,
    /// Times the stream was woken, shared with its waker.
    woken: Arc<std::sync::atomic::AtomicU32>,
    continued: bool,
}

struct FakeWaker(Arc<std::sync::atomic::AtomicU32>);

impl Wake for FakeWaker {
    fn wake(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
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
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str) {
        self.metadata
            .insert((namespace.into(), key.into()), value.into());
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
    fn waker(&mut self) -> Option<Box<dyn Wake>> {
        Some(Box::new(FakeWaker(Arc::clone(&self.woken))))
    }
    fn continue_request(&mut self) {
        self.continued = true;
    }
    fn client_address(&self) -> Option<String> {
        Some("127.0.0.1:40000".into())
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
    stream.complete(config);
    (go_on, http)
}

/// A stat as Envoy would show it after the main thread's next tick.
fn counter(config: &Config, host: &FakeConfig, main: &mut FakeMain, name: &str) -> u64 {
    config.tick(main);
    let id = host.names.iter().position(|n| n == name).unwrap();
    main.counters.get(&id).copied().unwrap_or(0)
}

fn collector() -> Value {
    json!({"cluster": "tollgate_collector", "instance": "t/1", "key_id": "k1", "secret": "0123456789abcdef0123456789abcdef"})
}

#[test]
fn every_configuration_the_wasm_filter_runs_loads_and_a_bad_one_is_refused() {
    let mut with_collector = demo_config();
    with_collector["collector"] = collector();
    let pseudonyms = json!({"key_id": "t", "secret": "0123456789abcdef0123456789abcdef"});
    let mut with_quotas = with_collector.clone();
    with_quotas["plans"]["pro"]["quotas"] = json!({"calls": {"per": "day", "limit": 1000}});
    let mut with_seats = with_collector.clone();
    with_seats["users"] = json!({"header": "x-user"});
    with_seats["pseudonyms"] = pseudonyms.clone();
    let mut with_sharing = with_collector.clone();
    with_sharing["plans"]["pro"]["sharing"] =
        json!({"max_clients": 3, "window_seconds": 600, "block": true});
    with_sharing["pseudonyms"] = pseudonyms;
    let mut with_source = demo_config();
    with_source["token"].as_object_mut().unwrap().remove("jwks");
    with_source["token"]["jwks_source"] = json!({"cluster": "keys"});
    for config in [
        with_collector,
        with_quotas,
        with_seats,
        with_sharing,
        with_source,
    ] {
        let mut host = FakeConfig::default();
        assert!(Config::new(&mut host, b"tollgate", config.to_string().as_bytes()).is_some());
    }
    assert!(compile(b"").unwrap_err().contains("empty"));
    assert!(compile(b"{not json").is_err());
    let mut bad = demo_config();
    bad["plans"]["starter"]["rate_limit"]["burst"] = json!(0);
    assert!(compile(bad.to_string().as_bytes())
        .unwrap_err()
        .contains("plans.starter.rate_limit.burst"));
    let mut host = FakeConfig::default();
    assert!(Config::new(&mut host, b"tollgate", b"{}").is_none());
}

/// The main thread's side of a test: the calls made (callout id, path, body), counters and
/// gauges, and whether the next call is refused at once.
#[derive(Default)]
struct FakeMain {
    calls: Vec<(u64, String, Vec<u8>)>,
    counters: HashMap<usize, u64>,
    gauges: HashMap<usize, i64>,
    refuse: bool,
}

impl CollectorHost for FakeMain {
    fn http_call(
        &mut self,
        _cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        _timeout_ms: u64,
    ) -> Result<u64, &'static str> {
        if self.refuse {
            return Err("no healthy host");
        }
        let path = headers.iter().find(|(k, _)| *k == ":path").unwrap().1;
        // Calls to the collector are signed; a key fetch is a plain GET.
        let method = headers.iter().find(|(k, _)| *k == ":method").unwrap().1;
        let signed = headers
            .iter()
            .any(|(k, _)| *k == tollgate_wire::SIGNATURE_HEADER);
        assert_eq!(signed, method == "POST", "{headers:?}");
        let id = self.calls.len() as u64 + 1;
        self.calls.push((id, path.to_string(), body.to_vec()));
        Ok(id)
    }
    fn increment(&mut self, counter: usize, value: u64) {
        *self.counters.entry(counter).or_default() += value;
    }
    fn move_gauge(&mut self, gauge: usize, delta: i64) {
        *self.gauges.entry(gauge).or_default() += delta;
    }
}

fn batch_of(call: &(u64, String, Vec<u8>)) -> tollgate_wire::UsageBatch {
    assert_eq!(call.1, "/v1/usage");
    tollgate_wire::UsageBatch::decode(&call.2).unwrap()
}

fn ack(batch: &tollgate_wire::UsageBatch) -> Vec<u8> {
    tollgate_wire::BatchAck {
        version: tollgate_wire::VERSION,
        batch_id: batch.batch_id.clone(),
        status: tollgate_wire::AckStatus::Accepted,
        records: batch.records.len() as u64,
    }
    .encode()
}

fn calls_in(batch: &tollgate_wire::UsageBatch) -> u64 {
    batch
        .records
        .iter()
        .filter(|r| r.meter == tollgate_wire::Meter::Calls)
        .map(|r| r.units)
        .sum()
}

#[test]
fn usage_is_shipped_from_the_main_thread_and_kept_until_acknowledged() {
    let mut json = demo_config();
    json["collector"] = collector();
    let (config, host) = config(&json);
    let token = demo_token("pro");
    for _ in 0..3 {
        assert!(request(&config, "/v1/search", Some(&token)).0);
    }
    assert!(!request(&config, "/v1/search", None).0);
    let mut main = FakeMain::default();
    let later = now_ms() + 10_000;
    config.tick_at(&mut main, later);
    let usage: Vec<_> = main
        .calls
        .iter()
        .filter(|c| c.1 == "/v1/usage")
        .cloned()
        .collect();
    assert_eq!(usage.len(), 1, "one batch in flight");
    let first = batch_of(&usage[0]);
    assert_eq!(calls_in(&first), 4);
    // The sync carries the license served.
    assert!(main.calls.iter().any(|c| c.1 == "/v1/sync"));

    // A failed call: the same batch, under the same id, after the backoff.
    config.callout_done_at(&mut main, usage[0].0, None, later);
    config.tick_at(&mut main, later + 60_000);
    let retry = main
        .calls
        .iter()
        .rev()
        .find(|c| c.1 == "/v1/usage")
        .unwrap()
        .clone();
    assert_eq!(batch_of(&retry).batch_id, first.batch_id);
    // A 500 is no ack either.
    config.callout_done_at(
        &mut main,
        retry.0,
        Some(CalloutAnswer {
            status: b"500",
            body: &ack(&first),
        }),
        later + 60_000,
    );
    config.tick_at(&mut main, later + 120_000);
    let again = main
        .calls
        .iter()
        .rev()
        .find(|c| c.1 == "/v1/usage")
        .unwrap()
        .clone();
    assert_eq!(batch_of(&again).batch_id, first.batch_id);
    config.callout_done_at(
        &mut main,
        again.0,
        Some(CalloutAnswer {
            status: b"200",
            body: &ack(&first),
        }),
        later + 120_000,
    );
    let acked = host
        .names
        .iter()
        .position(|n| n == "tollgate.usage_records_acked")
        .unwrap();
    assert_eq!(
        main.counters.get(&acked).copied(),
        Some(first.records.len() as u64)
    );
    let buffered = host
        .names
        .iter()
        .position(|n| n == "tollgate.usage_buffered_records")
        .unwrap();
    assert_eq!(main.gauges.get(&buffered).copied().unwrap_or(0), 0);
    // Nothing more to send.
    let sent = main.calls.len();
    config.tick_at(&mut main, later + 180_000);
    assert!(main.calls.iter().skip(sent).all(|c| c.1 != "/v1/usage"));
}

#[test]
fn a_destroyed_configuration_hands_its_unacknowledged_batches_to_the_next() {
    let mut json = demo_config();
    json["collector"] = collector();
    // Its own collector path: the handover list is the process's, shared with other tests.
    json["collector"]["path"] = json!("/v1/usage-handover-test");
    let (old, _) = config(&json);
    let token = demo_token("pro");
    for _ in 0..5 {
        assert!(request(&old, "/v1/search", Some(&token)).0);
    }
    let mut main = FakeMain::default();
    let later = now_ms() + 10_000;
    old.tick_at(&mut main, later);
    let in_flight = main
        .calls
        .iter()
        .find(|c| c.1 == "/v1/usage-handover-test")
        .unwrap()
        .clone();
    let in_flight: tollgate_wire::UsageBatch =
        tollgate_wire::UsageBatch::decode(&in_flight.2).unwrap();
    // Served after the last tick: still open when the configuration goes.
    assert!(request(&old, "/v1/search", Some(&token)).0);
    old.close(&mut main);
    drop(old);

    let (new, _) = config(&json);
    let mut main = FakeMain::default();
    let mut shipped = 0;
    let mut ids = Vec::new();
    let mut at = now_ms() + 20_000;
    for _ in 0..10 {
        new.tick_at(&mut main, at);
        while let Some(call) = main
            .calls
            .iter()
            .rev()
            .find(|c| c.1 == "/v1/usage-handover-test" && !ids.contains(&c.0))
            .cloned()
        {
            ids.push(call.0);
            let batch = tollgate_wire::UsageBatch::decode(&call.2).unwrap();
            shipped += calls_in(&batch);
            new.callout_done_at(
                &mut main,
                call.0,
                Some(CalloutAnswer {
                    status: b"200",
                    body: &ack(&batch),
                }),
                at,
            );
        }
        at += 2_000;
    }
    assert_eq!(
        shipped, 6,
        "the in-flight batch ({}) and the open usage, once each",
        in_flight.batch_id
    );
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
    let mut main = FakeMain::default();
    assert_eq!(
        counter(
            &config,
            &host,
            &mut main,
            "tollgate.requests_refused.reason.missing_token"
        ),
        1
    );
    // The refusal's own body is metered (Envoy does not show it to the body hook).
    assert_eq!(
        counter(&config, &host, &mut main, "tollgate.response_bytes"),
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
    let mut main = FakeMain::default();
    assert_eq!(
        counter(&config, &host, &mut main, "tollgate.requests_allowed"),
        1
    );
    assert_eq!(
        counter(&config, &host, &mut main, "tollgate.token_cache_misses"),
        1
    );
    // The second request of the token is a cache hit of the one shared gate.
    let _ = request(&config, "/v1/search?q=2", Some(&token));
    assert_eq!(
        counter(&config, &host, &mut main, "tollgate.token_cache_hits"),
        1
    );
}

#[test]
fn the_license_context_goes_to_dynamic_metadata_with_no_header_written() {
    let mut json = demo_config();
    json["upstream_headers"] =
        json!({"account": null, "license": null, "plan": null, "feature": null});
    json["token"]["strip_from_upstream"] = json!(false);
    json["rate_limit_headers"] = json!(false);
    json["license_metadata"] = json!("tollgate");
    let (config, _host) = config(&json);
    let token = demo_token("starter");
    let (go_on, http) = request(&config, "/v1/search?q=1", Some(&token));
    assert!(go_on);
    let meta = |key: &str| {
        http.metadata
            .get(&("tollgate".to_string(), key.to_string()))
            .cloned()
    };
    assert_eq!(meta("account").as_deref(), Some("acme"));
    assert_eq!(meta("license").as_deref(), Some("lic-1"));
    assert_eq!(meta("plan").as_deref(), Some("starter"));
    assert_eq!(meta("feature").as_deref(), Some("search"));
    // Nothing but what the client sent: no header written.
    let mut names: Vec<&str> = http.request.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, [":method", ":path", "authorization"]);
    assert!(http.response.is_empty());
    // A refused request writes none.
    let (go_on, http) = request(&config, "/v1/search", None);
    assert!(!go_on);
    assert!(http.metadata.is_empty());
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

#[test]
fn license_keys_come_from_the_jwks_source_on_the_main_thread() {
    let mut json = demo_config();
    let jwks = json["token"]
        .as_object_mut()
        .unwrap()
        .remove("jwks")
        .unwrap();
    json["token"]["jwks_source"] = json!({"cluster": "keys", "path": "/.well-known/jwks.json"});
    let (config, _) = config(&json);
    let token = demo_token("pro");
    // No keys yet: nothing verifies.
    assert!(!request(&config, "/v1/search", Some(&token)).0);
    let mut main = FakeMain::default();
    let now = now_ms();
    config.tick_at(&mut main, now);
    let (id, path, _) = main.calls.last().cloned().unwrap();
    assert_eq!(path, "/.well-known/jwks.json");
    // One fetch at a time.
    config.tick_at(&mut main, now + 100);
    assert_eq!(main.calls.len(), 1);
    let body = serde_json::to_vec(&jwks).unwrap();
    config.callout_done_at(
        &mut main,
        id,
        Some(CalloutAnswer {
            status: b"200",
            body: &body,
        }),
        now + 200,
    );
    assert!(request(&config, "/v1/search", Some(&token)).0);
}

fn held_request(config: &Config, token: &str) -> (Stream, FakeHttp) {
    let mut http = FakeHttp::default();
    http.request.insert(":path".into(), b"/v1/search".to_vec());
    http.request.insert(":method".into(), b"GET".to_vec());
    http.request.insert(
        "authorization".into(),
        format!("Bearer {token}").into_bytes(),
    );
    let mut stream = Stream::default();
    assert!(
        !stream.request_headers(config, &mut http),
        "held, not continued"
    );
    assert!(http.sent.is_none(), "nothing answered yet");
    assert!(stream.holding());
    (stream, http)
}

fn sync_of(main: &FakeMain) -> (u64, tollgate_wire::sync::SyncRequest) {
    let (id, _, body) = main.calls.iter().rev().find(|c| c.1 == "/v1/sync").unwrap();
    (*id, tollgate_wire::sync::SyncRequest::decode(body).unwrap())
}

#[test]
fn a_request_held_for_a_lease_goes_on_once_the_sync_brings_one_and_a_leaver_is_not_billed() {
    let mut json = demo_config();
    json["collector"] = collector();
    json["plans"]["pro"]["quotas"] = json!({"calls": {"per": "day", "limit": 1000}});
    let (config, _) = config(&json);
    let token = demo_token("pro");
    let (mut stream, mut http) = held_request(&config, &token);
    let (mut gone, gone_http) = held_request(&config, &token);
    // The second client leaves while it waits.
    gone.complete(&config);

    let mut main = FakeMain::default();
    let now = now_ms();
    config.tick_at(&mut main, now);
    let (id, sync) = sync_of(&main);
    assert_eq!(sync.leases.len(), 1, "{sync:?}");
    let lease = &sync.leases[0];
    let response = json!({
        "version": tollgate_wire::VERSION,
        "grants": [{
            "lease_id": lease.lease_id, "granted": 100, "period_start_ms": 0,
            "period_end_ms": now + 86_400_000, "expires_ms": now + 60_000, "allocated": 100,
        }],
        "closed": [], "denials": [], "seats": [],
    });
    let body = serde_json::to_vec(&response).unwrap();
    config.callout_done_at(
        &mut main,
        id,
        Some(CalloutAnswer {
            status: b"200",
            body: &body,
        }),
        now,
    );
    assert_eq!(http.woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        gone_http.woken.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a gone stream is not woken"
    );
    stream.resume(&config).unwrap().answer(&mut http);
    assert!(http.continued && http.sent.is_none());
    assert!(
        http.request.contains_key("x-tollgate-license"),
        "{:?}",
        http.request.keys()
    );
    assert!(!stream.holding());
    stream.complete(&config);

    // What reaches the collector: one allowed call, one that left while waiting.
    config.tick_at(&mut main, now + 10_000);
    let (_, _, body) = main
        .calls
        .iter()
        .rev()
        .find(|c| c.1 == "/v1/usage")
        .unwrap();
    let batch = tollgate_wire::UsageBatch::decode(body).unwrap();
    let calls = |outcome: &str| -> u64 {
        batch
            .records
            .iter()
            .filter(|r| r.meter == tollgate_wire::Meter::Calls && r.outcome == outcome)
            .map(|r| r.units)
            .sum()
    };
    assert_eq!(calls("allowed"), 1, "{batch:?}");
    assert_eq!(calls("quota_unavailable"), 1, "{batch:?}");
}

#[test]
fn a_held_request_is_refused_once_it_waited_lease_wait_ms() {
    let mut json = demo_config();
    json["collector"] = collector();
    json["plans"]["pro"]["quotas"] = json!({"calls": {"per": "day", "limit": 1000}});
    let (config, _) = config(&json);
    let (mut stream, mut http) = held_request(&config, &demo_token("pro"));
    let mut main = FakeMain::default();
    // The collector never answers.
    config.tick_at(&mut main, now_ms() + 60_000);
    assert_eq!(http.woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    stream.resume(&config).unwrap().answer(&mut http);
    assert!(!http.continued);
    let (status, _, body) = http.sent.clone().unwrap();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
}
