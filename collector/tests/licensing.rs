//! The license server and billing over real HTTP, on every storage backend: keys and the JWKS,
//! licenses that the filter's own verifier accepts, invoice drafts, and exports whose
//! identifiers do not change when exported again. Every admin route refuses a missing or
//! wrong token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_core::Policy;
use tollgate_wire::{Meter, Source, UsageBatch, UsageRecord};

use common::{backends, conformance, Backend};

const ADMIN: &str = "licensing-admin-token-0123456789";

fn start(db: &Backend, catalog: Option<&std::path::Path>) -> Running {
    let store = open(&db.url()).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse(["k1=licensing-test-secret-0123"]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    state.issuer = tollgate_collector::licensing::Issuer {
        issuer: Some("https://licenses.example".into()),
        audience: Some("api.example".into()),
    };
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(catalog).unwrap(),
        ..ControlPlane::default()
    };
    Running::start_state(0, state).unwrap()
}

fn call(
    c: &Running,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = ureq::request(method, &c.url(path));
    if let Some(token) = token {
        req = req.set("authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => req
            .set("content-type", "application/json")
            .send_string(&body.to_string()),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn admin(c: &Running, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, text) = call(c, method, path, Some(ADMIN), body);
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A filter policy that takes its keys from `jwks`, as the filter would after fetching it.
fn filter_policy(jwks: &Value) -> Policy {
    Policy::from_json(
        json!({
            "token": {"issuers": ["https://licenses.example"], "audiences": ["api.example"], "jwks": jwks},
            "plans": {"pro": {}},
            "routes": [{"prefix": "/v1", "feature": "search"}],
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

conformance! {
    fn keys_licenses_and_the_jwks(db, "licensing") {
        keys_licenses_and_the_jwks_on(&db);
    }
}

fn keys_licenses_and_the_jwks_on(db: &Backend) {
    let c = start(db, None);
    // Import an ES256 key made elsewhere, and generate an Ed25519 one that signs from now.
    let es = tollgate_collector::signing::SigningKey::generate(
        tollgate_collector::signing::KeyAlg::ES256,
        "unused",
    )
    .unwrap();
    let (status, imported) = admin(
        &c,
        "POST",
        "/v1/admin/keys",
        Some(json!({"alg": "ES256", "kid": "idp-es", "private_pem": es.file.private_pem})),
    );
    assert_eq!(status, 201, "{imported}");
    assert!(imported.get("private_pem").is_none(), "never shown");
    let (_, ed) = admin(&c, "POST", "/v1/admin/keys", Some(json!({"kid": "ed-1"})));
    assert_eq!(ed["state"], "active");
    let (status, dup) = admin(&c, "POST", "/v1/admin/keys", Some(json!({"kid": "ed-1"})));
    assert_eq!(status, 409, "{dup}");
    let (status, bad) = admin(
        &c,
        "POST",
        "/v1/admin/keys",
        Some(
            json!({"alg": "RS256", "private_pem": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"}),
        ),
    );
    assert_eq!(status, 400, "{bad}");

    let (status, issued) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(
            json!({"account": "acme", "plan": "pro", "features": ["search"], "valid_days": 30,
                    "limits": {"rate_limit": {"requests_per_second": 50, "burst": 100}}}),
        ),
    );
    assert_eq!(status, 201, "{issued}");
    assert_eq!(
        issued["kid"], "ed-1",
        "the most recently activated key signs"
    );
    assert!(issued["license"].as_str().unwrap().starts_with("lic_"));

    // The filter's own verifier accepts the token with the published keys.
    let (status, jwks) = admin(&c, "GET", "/.well-known/jwks.json", None);
    assert_eq!(status, 200);
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let policy = filter_policy(&jwks);
    let token = issued["token"].as_str().unwrap();
    let license = tollgate_core::token::verify(&policy, None, token, now_s()).unwrap();
    assert_eq!(&*license.account, "acme");
    assert_eq!(&*license.license_id, issued["license"].as_str().unwrap());
    assert_eq!(
        license.expires_at,
        issued["expires_ms"].as_u64().unwrap() / 1000
    );

    // Listing and showing; bad requests are the caller's (400), duplicates conflict (409).
    let (_, listed) = admin(&c, "GET", "/v1/admin/licenses?account=acme", None);
    assert_eq!(listed["licenses"].as_array().unwrap().len(), 1);
    let (_, none) = admin(&c, "GET", "/v1/admin/licenses?account=other", None);
    assert_eq!(none["licenses"], json!([]));
    let (status, _) = admin(&c, "GET", "/v1/admin/licenses/nope", None);
    assert_eq!(status, 404);
    for (body, status) in [
        (json!({"account": "", "plan": "pro"}), 400),
        (json!({"account": "acme", "plan": "pro", "limits": 5}), 400),
        (
            json!({"account": "acme", "plan": "pro", "expires_at": "yesterday"}),
            400,
        ),
        (
            json!({"account": "acme", "plan": "pro", "expires_at": "2001-01-01T00:00:00Z"}),
            400,
        ),
        (json!({"account": "acme", "plan": "pro", "bogus": 1}), 400),
        (
            json!({"account": "acme", "plan": "pro", "license_id": issued["license"]}),
            409,
        ),
    ] {
        let (got, answer) = admin(&c, "POST", "/v1/admin/licenses", Some(body.clone()));
        assert_eq!(got, status, "{body}: {answer}");
    }

    // Retiring the signing key: it leaves the JWKS, so its licenses stop verifying; new
    // licenses need another key.
    let (status, _) = admin(&c, "POST", "/v1/admin/keys/ed-1/retire", None);
    assert_eq!(status, 204);
    let (_, jwks) = admin(&c, "GET", "/.well-known/jwks.json", None);
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec!["idp-es"]);
    assert!(tollgate_core::token::verify(&filter_policy(&jwks), None, token, now_s()).is_err());
    let (_, next) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(json!({"account": "acme", "plan": "pro"})),
    );
    assert_eq!(next["kid"], "idp-es");
    let (status, _) = admin(&c, "POST", "/v1/admin/keys/idp-es/retire", None);
    assert_eq!(status, 204);
    let (status, none_left) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(json!({"account": "acme", "plan": "pro"})),
    );
    assert_eq!(status, 409, "{none_left}");
}

#[test]
fn the_plan_of_a_license_must_be_in_the_catalogue_when_it_lists_plans() {
    let db = backends("lic-plans").remove(0);
    let dir = std::env::temp_dir().join(format!("tollgate-lic-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plans.json");
    std::fs::write(
        &path,
        r#"{"plans": {"pro": {"prices": {"calls": "0.01"}}}}"#,
    )
    .unwrap();
    let c = start(&db, Some(&path));
    let (status, answer) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(json!({"account": "a", "plan": "gold"})),
    );
    assert_eq!(status, 400);
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("not in the plan catalogue"),
        "{answer}"
    );
    let (status, _) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(json!({"account": "a", "plan": "pro"})),
    );
    assert_eq!(status, 201);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_admin_route_refuses_a_missing_or_wrong_token() {
    let db = backends("lic-auth").remove(0);
    let c = start(&db, None);
    for (method, path) in [
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys/k/retire"),
        ("GET", "/v1/admin/licenses"),
        ("POST", "/v1/admin/licenses"),
        ("GET", "/v1/admin/licenses/l"),
        ("POST", "/v1/admin/licenses/l/revoke"),
        ("GET", "/v1/admin/accounts/a"),
        ("GET", "/v1/admin/accounts/a/invoice"),
        ("PUT", "/v1/admin/accounts/a/budget"),
        ("POST", "/v1/admin/accounts/a/suspend"),
        ("GET", "/v1/admin/overview"),
        (
            "GET",
            "/v1/admin/exports/usage?from_ms=0&to_ms=1&format=json",
        ),
    ] {
        for token in [None, Some("wrong-token-0123456789")] {
            let (status, body) = call(&c, method, path, token, Some(json!({})));
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
        }
    }
    // The JWKS is public: filters fetch it without credentials.
    assert_eq!(call(&c, "GET", "/.well-known/jwks.json", None, None).0, 200);
}

fn record(license: &str, outcome: &str, units: u64, at: u64) -> UsageRecord {
    UsageRecord {
        account: "acme".into(),
        license: license.into(),
        feature: "search".into(),
        outcome: outcome.into(),
        user: String::new(),
        meter: Meter::Calls,
        units,
        window_start_ms: at,
        window_end_ms: at + 1000,
    }
}

conformance! {
    fn exports_page_through_usage_and_a_re_export_has_the_same_identifiers(db, "exports") {
        exports_on(&db);
    }
}

fn exports_on(db: &Backend) {
    let c = start(db, None);
    let t0 = 1_793_487_600_000u64;
    for (i, batch_id) in ["b1", "b2", "b3"].iter().enumerate() {
        let batch = UsageBatch {
            version: 1,
            batch_id: batch_id.to_string(),
            source: Source {
                instance: "node".into(),
                vm_started_ms: 1,
            },
            sequence: i as u64 + 1,
            created_ms: t0,
            records: vec![
                record("lic-1", "allowed", 10 + i as u64, t0 + i as u64 * 1000),
                record("lic-1", "rate_limited", 1, t0 + i as u64 * 1000),
            ],
        };
        c.state.store.ingest(&batch, t0).unwrap();
    }
    let query = format!("/v1/admin/exports/usage?from_ms={t0}&to_ms={}", t0 + 60_000);
    // Paging by two: three pages, six records, each once.
    let mut after = 0;
    let mut ids = Vec::new();
    loop {
        let (status, page) = admin(
            &c,
            "GET",
            &format!("{query}&format=json&limit=2&after_id={after}"),
            None,
        );
        assert_eq!(status, 200, "{page}");
        for r in page["records"].as_array().unwrap() {
            ids.push(r["identifier"].as_str().unwrap().to_string());
        }
        match page["next_after_id"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(ids.len(), 6);
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), 6);

    // Stripe: allowed usage only, and the same identifiers on every export.
    let (_, stripe) = admin(&c, "GET", &format!("{query}&format=stripe"), None);
    let events = stripe["events"].as_array().unwrap();
    assert_eq!(events.len(), 3);
    let total: u64 = events
        .iter()
        .map(|e| {
            e["payload"]["value"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 10 + 11 + 12);
    let (_, again) = admin(&c, "GET", &format!("{query}&format=stripe"), None);
    assert_eq!(stripe, again);
    for e in events {
        assert!(ids.contains(&e["identifier"].as_str().unwrap().to_string()));
    }
    let (_, cloud) = admin(&c, "GET", &format!("{query}&format=cloudevents"), None);
    assert_eq!(cloud.as_array().unwrap().len(), 6);
    assert_eq!(cloud[0]["specversion"], "1.0");
    let (status, csv) = call(&c, "GET", &format!("{query}&format=csv"), Some(ADMIN), None);
    assert_eq!(status, 200);
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(csv.starts_with("identifier,batch_id,"));
    let (status, _) = admin(&c, "GET", &format!("{query}&format=xml"), None);
    assert_eq!(status, 400);
}

#[test]
fn an_account_token_reads_its_own_account_only() {
    let db = backends("account-tokens").remove(0);
    let c = start(&db, None);
    let (status, minted) = admin(
        &c,
        "POST",
        "/v1/admin/accounts/acme/tokens",
        Some(json!({"valid_days": 7})),
    );
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().unwrap();
    let (_, license) = admin(
        &c,
        "POST",
        "/v1/admin/licenses",
        Some(json!({"account": "acme", "plan": "pro"})),
    );
    let license_token = license["token"].as_str().unwrap();
    for path in [
        "/v1/accounts/acme/usage",
        "/v1/accounts/acme/cost",
        "/v1/accounts/acme/quotas",
        "/v1/accounts/acme/licenses",
        "/v1/usage?account=acme",
    ] {
        let (status, body) = call(&c, "GET", path, Some(token), None);
        assert_eq!(status, 200, "{path}: {body}");
        // The admin reads every account.
        assert_eq!(call(&c, "GET", path, Some(ADMIN), None).0, 200, "{path}");
        // A license is not an account token, and nothing passes without a token.
        assert_eq!(
            call(&c, "GET", path, Some(license_token), None).0,
            401,
            "{path}"
        );
        assert_eq!(call(&c, "GET", path, None, None).0, 401, "{path}");
    }
    // The same claims signed by the same key, with a critical header extension the collector
    // does not understand or a malformed `crit` (RFC 7515 section 4.1.11): refused, as the
    // filter refuses such licenses.
    {
        use base64::Engine as _;
        let now = u64::try_from(tollgate_collector::clock::now_ms()).unwrap();
        let signer = tollgate_collector::licensing::signer(c.state.store.as_ref(), now).unwrap();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap();
        let claims = String::from_utf8(claims).unwrap();
        let alg = signer.file.alg.name();
        let kid = signer.file.kid.clone();
        let plain = json!({"alg": alg, "kid": kid}).to_string();
        let resigned = signer.sign_raw(&plain, &claims).unwrap();
        assert_eq!(
            call(&c, "GET", "/v1/accounts/acme/usage", Some(&resigned), None).0,
            200,
            "the same token re-signed without crit"
        );
        for header in [
            json!({"alg": alg, "kid": kid, "crit": ["exp"], "exp": 1}),
            json!({"alg": alg, "kid": kid, "crit": []}),
        ] {
            let forged = signer.sign_raw(&header.to_string(), &claims).unwrap();
            assert_eq!(
                call(&c, "GET", "/v1/accounts/acme/usage", Some(&forged), None).0,
                401,
                "{header}"
            );
        }
    }
    for path in [
        "/v1/accounts/other/usage",
        "/v1/accounts/other/cost",
        "/v1/accounts/other/licenses",
        "/v1/admin/overview",
        "/v1/usage?account=other",
        "/v1/usage",
        "/v1/admin/accounts/acme",
        "/v1/admin/licenses",
    ] {
        let (status, body) = call(&c, "GET", path, Some(token), None);
        assert_eq!(status, 401, "{path}: {body}");
    }
    // Retiring the key that signed it ends the token.
    let kid = license["kid"].as_str().unwrap();
    admin(&c, "POST", "/v1/admin/keys", Some(json!({"kid": "next"})));
    admin(&c, "POST", &format!("/v1/admin/keys/{kid}/retire"), None);
    assert_eq!(
        call(&c, "GET", "/v1/accounts/acme/cost", Some(token), None).0,
        401
    );
}

/// What the dashboards read beyond usage and the draft: an account's licenses with plan,
/// features, limits and headroom and their standing; the refusal codes in words; and the
/// operator's overview of every account (admin token only).
#[test]
fn the_dashboards_read_licenses_refusal_words_and_the_operator_overview() {
    let db = common::sqlite("dashboards-json");
    let dir = std::env::temp_dir().join(format!("tollgate-dashboards-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    std::fs::write(
        &plans,
        json!({
            "currency": "EUR",
            "time_zone": tollgate_devkit::periods::midday_time_zone(),
            "plans": {"pro": {
                "subscription": {"fee": "10"},
                "prices": {"calls": "0.01"},
                "quotas": {"calls": {"per": "day", "limit": 100}},
            }},
        })
        .to_string(),
    )
    .unwrap();
    let c = start(&db, Some(&plans));
    for (account, license) in [("acme", "lic-a"), ("beta", "lic-b")] {
        let (status, body) = admin(
            &c,
            "POST",
            "/v1/admin/licenses",
            Some(
                json!({"account": account, "plan": "pro", "license_id": license, "features": ["search"], "limits": {"rate": {"per_second": 5}}}),
            ),
        );
        assert_eq!(status, 201, "{body}");
    }
    let now = u64::try_from(tollgate_collector::clock::now_ms()).unwrap();
    let rec = |account: &str, license: &str, outcome: &str, units: u64| UsageRecord {
        account: account.into(),
        license: license.into(),
        feature: "search".into(),
        outcome: outcome.into(),
        user: String::new(),
        meter: Meter::Calls,
        units,
        window_start_ms: now - 1000,
        window_end_ms: now,
    };
    c.state
        .store
        .ingest(
            &UsageBatch {
                version: 1,
                batch_id: "dash-json".into(),
                source: Source {
                    instance: "node".into(),
                    vm_started_ms: 1,
                },
                sequence: 1,
                created_ms: now,
                records: vec![
                    rec("acme", "lic-a", "allowed", 300),
                    rec("acme", "lic-a", "rate_limited", 4),
                    rec("beta", "lic-b", "allowed", 100),
                ],
            },
            now,
        )
        .unwrap();
    // acme's filter leases 90 of its 100 calls a day: near the limit.
    tollgate_collector::control::sync(
        c.state.store.as_ref(),
        &c.state.control,
        &tollgate_wire::sync::SyncRequest {
            version: 1,
            instance: "node".into(),
            leases: vec![tollgate_wire::sync::LeaseRequest {
                lease_id: "lease-a".into(),
                account: "acme".into(),
                license: "lic-a".into(),
                plan: "pro".into(),
                meter: Meter::Calls,
                period: tollgate_wire::sync::Period::Day,
                limit: 100,
                want: 90,
            }],
            returns: vec![],
            licenses: vec![],
            seats: vec![],
            clients: vec![],
        },
        now,
    )
    .unwrap();
    c.state
        .store
        .set_revoked("lic-b", Some("payment failed"), now)
        .unwrap();

    let (status, report) = admin(&c, "GET", "/v1/accounts/acme/licenses", None);
    assert_eq!(status, 200, "{report}");
    let lic = &report["licenses"][0];
    assert_eq!(lic["license"], "lic-a");
    assert_eq!(lic["plan"], "pro");
    assert_eq!(lic["features"], json!(["search"]));
    assert_eq!(lic["standing"], "active");
    assert_eq!(lic["limit_overrides"], json!({"rate": {"per_second": 5}}));
    assert_eq!(
        lic["limits"],
        json!([{"meter": "calls", "per": "day", "limit": 100, "used": 90, "headroom": 10, "percent": 90, "period_end_ms": lic["limits"][0]["period_end_ms"]}]),
        "{report}"
    );
    let (_, beta) = admin(&c, "GET", "/v1/accounts/beta/licenses", None);
    assert_eq!(beta["licenses"][0]["standing"], "revoked", "{beta}");
    assert_eq!(beta["licenses"][0]["reason"], "payment failed");
    // Nothing used yet of beta's daily quota: all of it is headroom.
    assert_eq!(beta["licenses"][0]["limits"][0]["headroom"], 100, "{beta}");

    // beta's license is revoked: its forecast is what it costs so far.
    let (_, cost) = admin(&c, "GET", "/v1/accounts/beta/cost", None);
    assert_eq!(cost["invoice"]["total"], "11.00", "{cost}");
    assert_eq!(cost["invoice"]["forecast_total"], "11.00", "{cost}");
    assert_eq!(
        cost["invoice"]["not_forecast"],
        json!([{"license": "lic-b", "standing": "revoked", "reason": "payment failed"}])
    );
    // Each line in human units, beside the line.
    assert_eq!(
        cost["invoice"]["display"][1],
        json!({"quantity": "100", "unit": "calls", "unit_price": "0.01", "per": "call"}),
        "{cost}"
    );

    // The refusal codes in the filter's words, public.
    let (status, codes) = call(&c, "GET", "/v1/refusal-codes", None, None);
    assert_eq!(status, 200);
    let codes: Value = serde_json::from_str(&codes).unwrap();
    let codes = codes["codes"].as_array().unwrap();
    assert_eq!(codes.len(), tollgate_core::refusal::Code::ALL.len());
    assert!(codes.contains(&json!({
        "code": "rate_limited",
        "status": 429,
        "meaning": tollgate_core::refusal::Code::RateLimited.meaning(),
    })));

    // The operator's overview: the admin token only.
    assert_eq!(call(&c, "GET", "/v1/admin/overview", None, None).0, 401);
    let (status, o) = admin(&c, "GET", "/v1/admin/overview", None);
    assert_eq!(status, 200, "{o}");
    // acme: 10 + 300 × 0.01 = 13; beta: 11.
    assert_eq!(o["revenue_so_far"], "24.00", "{o}");
    let acme = o["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["account"] == "acme")
        .unwrap();
    assert_eq!(acme["so_far"], "13.00");
    assert_eq!(acme["allowed_calls"], 300);
    assert_eq!(acme["refused_calls"], 4);
    let forecast: rust_decimal::Decimal = o["revenue_forecast"].as_str().unwrap().parse().unwrap();
    let acme_forecast: rust_decimal::Decimal = acme["forecast"].as_str().unwrap().parse().unwrap();
    assert_eq!(forecast, acme_forecast + rust_decimal::Decimal::from(11));
    assert_eq!(
        o["top_consumers"],
        json!([
            {"account": "acme", "license": "lic-a", "allowed_calls": 300},
            {"account": "beta", "license": "lic-b", "allowed_calls": 100},
        ])
    );
    assert_eq!(
        o["refusals"],
        json!([{"account": "acme", "code": "rate_limited", "meaning": tollgate_core::refusal::Code::RateLimited.meaning(), "calls": 4}])
    );
    assert_eq!(o["near_limits"].as_array().unwrap().len(), 1, "{o}");
    assert_eq!(o["near_limits"][0]["license"], "lic-a");
    assert_eq!(o["near_limits"][0]["headroom"], 10);
    // A suspended account: every license of it is refused, so none is forecast further.
    c.state
        .store
        .set_suspended("acme", Some("unpaid"), now)
        .unwrap();
    let (_, cost) = admin(&c, "GET", "/v1/accounts/acme/cost", None);
    assert_eq!(cost["invoice"]["total"], "13.00", "{cost}");
    assert_eq!(cost["invoice"]["forecast_total"], "13.00", "{cost}");
    assert_eq!(
        cost["invoice"]["not_forecast"],
        json!([{"license": "lic-a", "standing": "suspended", "reason": "unpaid"}])
    );
    let (_, report) = admin(&c, "GET", "/v1/accounts/acme/licenses", None);
    assert_eq!(report["licenses"][0]["standing"], "suspended", "{report}");
    let (_, o) = admin(&c, "GET", "/v1/admin/overview", None);
    assert_eq!(o["revenue_forecast"], "24.00", "{o}");
    // The page itself holds no data: it is served to anyone and reads the overview with the
    // token from its URL fragment.
    let (status, page) = call(&c, "GET", "/admin/dashboard", None, None);
    assert_eq!(status, 200);
    assert!(page.contains("/v1/admin/overview"));
    let _ = std::fs::remove_dir_all(&dir);
}
