//! The license server end to end: the collector signs licenses and publishes its keys; a real
//! Envoy fetches the keys through its `tollgate_collector` cluster, accepts the licenses, and
//! refuses them once revoked or once their key is retired. Key rotation without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{Adapter, Bootstrap, Envoy, Upstream};
use tollgate_tests::http::request;

const SECRET: &str = "licensing-e2e-secret-0123456789";
const ADMIN: &str = "licensing-e2e-admin-token-0123456789";
const ISSUER: &str = "https://licenses.tollgate.example";
const AUDIENCE: &str = "api.example.com";

/// The shipped plugin configuration, with keys from the collector's JWKS instead of inline.
fn plugin() -> Value {
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap(),
    )
    .unwrap();
    let token = config["token"].as_object_mut().unwrap();
    token.remove("jwks");
    token.insert(
        "jwks_source".into(),
        json!({"cluster": "tollgate_collector", "refresh_seconds": 1, "min_refetch_seconds": 1}),
    );
    config["collector"] = json!({
        "key_id": "k1",
        "secret": SECRET,
        "flush_interval_ms": 200,
        "timeout_ms": 2000,
    });
    config
}

struct Stack {
    collector: Running,
    _upstream: Upstream,
    envoy: Envoy,
    dir: std::path::PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stack(adapter: Adapter, name: &str) -> Stack {
    if adapter == Adapter::Native {
        tollgate_devkit::envoy::require_native_module().unwrap();
    }
    let name = format!("{name}-{}", adapter.name());
    let name = name.as_str();
    let dir = std::env::temp_dir().join(format!("tollgate-lic-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    state.issuer = tollgate_collector::licensing::Issuer {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
    };
    let collector = Running::start_state(0, state).unwrap();
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(plugin(), upstream.port());
    bootstrap.adapter = adapter;
    bootstrap.collector_ports = vec![collector.addr.port()];
    let envoy = Envoy::start(&format!("lic-{name}"), &bootstrap.to_json(), 2).unwrap();
    Stack {
        collector,
        _upstream: upstream,
        envoy,
        dir,
    }
}

fn admin(c: &Running, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let request =
        ureq::request(method, &c.url(path)).set("authorization", &format!("Bearer {ADMIN}"));
    let result = match body {
        Some(body) => request
            .set("content-type", "application/json")
            .send_string(&body.to_string()),
        None => request.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn issue(c: &Running, license_id: &str) -> Value {
    let (status, issued) = admin(
        c,
        "POST",
        "/v1/admin/licenses",
        Some(
            json!({"account": "acme", "plan": "starter", "features": ["search"], "license_id": license_id, "valid_days": 30}),
        ),
    );
    assert_eq!(status, 201, "{issued}");
    issued
}

/// The answer code for `token`: `allowed` for 200.
fn call(envoy: &Envoy, token: &str) -> String {
    let auth = format!("Bearer {token}");
    let r = request(
        envoy.listener,
        "GET",
        "/v1/search?q=x",
        &[("authorization", auth.as_bytes())],
    )
    .unwrap();
    if r.status == 200 {
        "allowed".into()
    } else {
        r.code()
    }
}

/// Call until the answer is `want`, within 10 s; every answer seen on the way.
fn until(envoy: &Envoy, token: &str, want: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let code = call(envoy, token);
        let done = code == want;
        seen.push(code);
        if done {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "never {want}: {seen:?}\n{}",
            envoy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

tollgate_tests::with_both_adapters!(
    a_license_issued_by_the_collector_is_served_through_envoy_until_revoked,
    signing_keys_rotate_without_a_restart_and_a_retired_key_stops_verifying,
);

fn a_license_issued_by_the_collector_is_served_through_envoy_until_revoked(adapter: Adapter) {
    let s = stack(adapter, "revoke");
    let issued = issue(&s.collector, "lic-e2e-1");
    let token = issued["token"].as_str().unwrap();
    // The first key was generated on the first issue; Envoy fetches it within a tick.
    let seen = until(&s.envoy, token, "allowed");
    assert!(
        seen.iter()
            .all(|c| c == "allowed" || c == "keys_unavailable"),
        "{seen:?}"
    );
    // The license is listed with its key, and not revoked.
    let (_, listed) = admin(&s.collector, "GET", "/v1/admin/licenses?account=acme", None);
    assert_eq!(listed["licenses"][0]["license"], "lic-e2e-1");
    assert_eq!(listed["licenses"][0]["kid"], issued["kid"]);
    assert_eq!(listed["licenses"][0]["revoked"], Value::Null);

    let (status, _) = admin(
        &s.collector,
        "POST",
        "/v1/admin/licenses/lic-e2e-1/revoke",
        Some(json!({"reason": "contract ended"})),
    );
    assert_eq!(status, 204);
    let seen = until(&s.envoy, token, "license_revoked");
    assert!(seen.len() < 60, "revocation took too long: {seen:?}");
    let (_, shown) = admin(&s.collector, "GET", "/v1/admin/licenses/lic-e2e-1", None);
    assert_eq!(shown["revoked"], "contract ended");
}

fn signing_keys_rotate_without_a_restart_and_a_retired_key_stops_verifying(adapter: Adapter) {
    let s = stack(adapter, "rotate");
    let (status, first) = admin(
        &s.collector,
        "POST",
        "/v1/admin/keys",
        Some(json!({"kid": "key-2026-a"})),
    );
    assert_eq!(status, 201, "{first}");
    let old = issue(&s.collector, "lic-old");
    assert_eq!(old["kid"], "key-2026-a");
    let old = old["token"].as_str().unwrap().to_string();
    until(&s.envoy, &old, "allowed");

    // A key published ahead signs nothing until it activates.
    let (_, pending) = admin(
        &s.collector,
        "POST",
        "/v1/admin/keys",
        Some(json!({"kid": "key-later", "activate_in_seconds": 3600})),
    );
    assert_eq!(pending["state"], "pending");
    assert_eq!(issue(&s.collector, "lic-still-a")["kid"], "key-2026-a");

    // Rotation: a new key signs from now; Envoy learns it from the refetch its first token
    // triggers (or the next refresh), without a restart.
    admin(
        &s.collector,
        "POST",
        "/v1/admin/keys",
        Some(json!({"kid": "key-2026-b"})),
    );
    let new = issue(&s.collector, "lic-new");
    assert_eq!(new["kid"], "key-2026-b");
    let new = new["token"].as_str().unwrap().to_string();
    let seen = until(&s.envoy, &new, "allowed");
    assert!(
        seen.iter().all(|c| c == "allowed" || c == "invalid_token"),
        "{seen:?}"
    );
    // Licenses signed with the old key keep working while it is published.
    assert_eq!(call(&s.envoy, &old), "allowed");

    // The JWKS serves every key not retired.
    let jwks: Value = serde_json::from_str(
        &ureq::get(&s.collector.url("/.well-known/jwks.json"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec!["key-2026-a", "key-later", "key-2026-b"]);

    // Retiring the old key: Envoy drops it at its next refresh, and its cached licenses go.
    let (status, _) = admin(
        &s.collector,
        "POST",
        "/v1/admin/keys/key-2026-a/retire",
        None,
    );
    assert_eq!(status, 204);
    until(&s.envoy, &old, "invalid_token");
    assert_eq!(call(&s.envoy, &new), "allowed");
}
