//! The control plane against every storage backend, with a fixed clock: quota leases (grants
//! within the limit, returns, retries, overshoot, period rollover, replicas racing), and the
//! refusals filters are told about (revocation, suspension, spend caps), over the store and
//! over HTTP with the admin API.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use rust_decimal::Decimal;
use serde_json::{json, Value};
use tollgate_collector::catalog::{Catalog, CatalogFileWatch};
use tollgate_collector::control::{account_status, sync, ControlPlane};
use tollgate_collector::storage::Budget;
use tollgate_collector::{open, AppState, IngestKeys, Running, Store};
use tollgate_wire::sync::{
    ClientsSeen, DenialCode, LeaseRequest, LeaseReturn, LicenseSeen, Period, SeatRequest, SeatRule,
    SyncRequest, SyncResponse,
};
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER,
};

mod common;
use common::{conformance, Backend};

const SECRET: &str = "control-test-secret-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";
// 2026-06-15T10:00:00Z
const NOON_ISH: u64 = 1_781_517_600_000;
const DAY: u64 = 86_400_000;

fn control() -> ControlPlane {
    ControlPlane::default()
}

fn ask(lease_id: &str, license: &str, limit: u64, want: u64) -> LeaseRequest {
    LeaseRequest {
        lease_id: lease_id.into(),
        account: "acme".into(),
        license: license.into(),
        plan: "pro".into(),
        meter: Meter::Calls,
        period: Period::Day,
        limit,
        want,
    }
}

fn request(leases: Vec<LeaseRequest>, returns: Vec<LeaseReturn>) -> SyncRequest {
    SyncRequest {
        version: 1,
        instance: "node-a/1".into(),
        leases,
        returns,
        licenses: Vec::new(),
        seats: Vec::new(),
        clients: Vec::new(),
    }
}

fn granted(store: &dyn Store, control: &ControlPlane, lease: LeaseRequest, now: u64) -> u64 {
    sync(store, control, &request(vec![lease], vec![]), now)
        .unwrap()
        .grants[0]
        .granted
}

conformance! {
    fn leases_hand_out_the_quota_once_and_returns_give_back_the_unused_part(db, "leases") {
        leases_on(&db);
    }
}

fn leases_on(db: &Backend) {
    let store = open(&db.url()).unwrap();
    let store = store.as_ref();
    let c = control();
    let now = NOON_ISH;
    // A quota of 100 calls a day, asked for 30 at a time: 30, 30, 30, 10, then nothing.
    let grants: Vec<u64> = (1..=5)
        .map(|i| granted(store, &c, ask(&format!("a/{i}"), "lic-1", 100, 30), now))
        .collect();
    assert_eq!(grants, vec![30, 30, 30, 10, 0]);
    // The same lease id again (a retry after a lost answer): the same grant, nothing more.
    let again = sync(
        store,
        &c,
        &request(vec![ask("a/1", "lic-1", 100, 30)], vec![]),
        now,
    )
    .unwrap();
    assert_eq!(again.grants[0].granted, 30);
    assert_eq!(again.grants[0].allocated, 30);
    // The grant carries the period (UTC day) and expires with the TTL.
    let g = &again.grants[0];
    assert_eq!(
        (g.period_start_ms, g.period_end_ms),
        (1_781_481_600_000, 1_781_481_600_000 + DAY)
    );
    assert_eq!(g.expires_ms, now + c.lease_ttl_ms);

    // Lease a/1 used 12 of its 30: 18 come back, once, however often the return is sent.
    let back = request(
        vec![],
        vec![LeaseReturn {
            lease_id: "a/1".into(),
            used: 12,
        }],
    );
    assert_eq!(
        sync(store, &c, &back, now).unwrap().closed,
        vec!["a/1".to_string()]
    );
    assert_eq!(
        sync(store, &c, &back, now).unwrap().closed,
        vec!["a/1".to_string()]
    );
    assert_eq!(granted(store, &c, ask("a/6", "lic-1", 100, 30), now), 18);
    // Lease a/1 asked for again after it was returned: nothing (its units went back).
    assert_eq!(granted(store, &c, ask("a/1", "lic-1", 100, 30), now), 0);
    // A lease that used more than its grant (a response larger than its reservation) takes
    // the excess from what is left.
    let over = request(
        vec![],
        vec![LeaseReturn {
            lease_id: "a/2".into(),
            used: 35,
        }],
    );
    sync(store, &c, &over, now).unwrap();
    assert_eq!(granted(store, &c, ask("a/7", "lic-1", 100, 30), now), 0);
    // Unknown leases are not "closed".
    let unknown = request(
        vec![],
        vec![LeaseReturn {
            lease_id: "zz".into(),
            used: 1,
        }],
    );
    assert!(sync(store, &c, &unknown, now).unwrap().closed.is_empty());
    // An operator raises the limit: the new limit applies to the next grant.
    assert_eq!(granted(store, &c, ask("a/8", "lic-1", 120, 30), now), 15);
    // Other licenses, and the next day, have their own quota.
    assert_eq!(granted(store, &c, ask("b/1", "lic-2", 100, 30), now), 30);
    assert_eq!(
        granted(store, &c, ask("a/9", "lic-1", 100, 30), now + DAY),
        30
    );
    // Near the end of the day, a lease expires with the period.
    let late = 1_781_481_600_000 + DAY - 1000;
    let r = sync(
        store,
        &c,
        &request(vec![ask("a/10", "lic-1", 100, 30)], vec![]),
        late,
    )
    .unwrap();
    assert_eq!(r.grants[0].expires_ms, 1_781_481_600_000 + DAY);
}

/// A transaction that lost to a concurrent one: SQLite's busy database, PostgreSQL's
/// serialization failure or deadlock. Anything else is a real failure.
fn lost_race(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_lowercase();
    [
        "database is locked",
        "busy",
        "could not serialize",
        "deadlock",
        "40001",
        "40p01",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

conformance! {
    fn replicas_granting_from_one_quota_at_once_never_hand_out_more_than_the_limit(db, "race") {
        let url = db.url();
        let stores: Vec<Arc<dyn Store>> = (0..4).map(|_| Arc::from(open(&url).unwrap())).collect();
        let total: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(replica, store)| {
                    scope.spawn(move || {
                        let c = control();
                        let mut sum = 0;
                        for i in 0..40 {
                            let lease = ask(&format!("r{replica}/{i}"), "lic-race", 500, 7);
                            // A replica may lose a race on a row and answer an error: the
                            // filter retries with the same lease id. Twenty lost races in a
                            // row, or any other error, fail the test with the error.
                            let mut attempts = 0;
                            let granted = loop {
                                attempts += 1;
                                match sync(
                                    store.as_ref(),
                                    &c,
                                    &request(vec![lease.clone()], vec![]),
                                    NOON_ISH,
                                ) {
                                    Ok(r) => break r.grants[0].granted,
                                    Err(e) if attempts < 20 && lost_race(&e) => {}
                                    Err(e) => panic!(
                                        "lease {i} of replica {replica}, attempt {attempts}: {e:#}"
                                    ),
                                }
                            };
                            sum += granted;
                        }
                        sum
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        // 4 replicas x 40 leases x 7 = 1,120 wanted, 500 exist.
        assert_eq!(total, 500, "{}", db.url());
    }
}

conformance! {
    fn revoked_suspended_and_capped_licenses_are_denied_and_get_no_lease(db, "denials") {
        denials_on(&db);
    }
}

fn usage_batch(id: &str, account: &str, license: &str, calls: u64, at_ms: u64) -> UsageBatch {
    UsageBatch {
        version: 1,
        batch_id: id.into(),
        source: Source {
            instance: "node-a".into(),
            vm_started_ms: 1,
        },
        sequence: 1,
        created_ms: at_ms,
        records: vec![UsageRecord {
            account: account.into(),
            license: license.into(),
            feature: "search".into(),
            outcome: "allowed".into(),
            user: String::new(),
            meter: Meter::Calls,
            units: calls,
            window_start_ms: at_ms,
            window_end_ms: at_ms + 1000,
        }],
    }
}

fn denials_on(db: &Backend) {
    let store = open(&db.url()).unwrap();
    let store = store.as_ref();
    let c = ControlPlane {
        catalog: CatalogFileWatch::empty(),
        lease_ttl_ms: 10_000,
        ..ControlPlane::default()
    };
    let now = NOON_ISH;
    let seen = |account: &str, license: &str| LicenseSeen {
        account: account.into(),
        license: license.into(),
        plan: "pro".into(),
    };
    let mut req = request(vec![ask("x/1", "lic-1", 100, 10)], vec![]);
    req.licenses = vec![seen("acme", "lic-1"), seen("globex", "lic-9")];
    let r = sync(store, &c, &req, now).unwrap();
    assert!(r.denials.is_empty());
    assert_eq!(r.grants[0].granted, 10);

    store
        .set_revoked("lic-1", Some("contract ended"), now)
        .unwrap();
    store
        .set_suspended("globex", Some("unpaid invoice"), now)
        .unwrap();
    req.leases = vec![ask("x/2", "lic-1", 100, 10)];
    let r = sync(store, &c, &req, now).unwrap();
    let codes: Vec<(String, DenialCode)> = r
        .denials
        .iter()
        .map(|d| (d.license.clone(), d.code))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("lic-1".to_string(), DenialCode::LicenseRevoked),
            ("lic-9".to_string(), DenialCode::AccountSuspended)
        ]
    );
    assert!(r.denials[0].message.contains("contract ended"));
    assert!(
        r.grants.is_empty(),
        "a revoked license gets no lease: {:?}",
        r.grants
    );
    store.set_revoked("lic-1", None, now).unwrap();
    store.set_suspended("globex", None, now).unwrap();
    assert!(sync(store, &c, &req, now).unwrap().denials.is_empty());

    // Spend cap: 0.01 EUR per call, a budget of 1.00 EUR a month; 99 calls stored, then 1 more.
    let c = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&write_catalog())).unwrap(),
        lease_ttl_ms: 10_000,
        ..ControlPlane::default()
    };
    store
        .set_budget(
            "acme",
            Some(&Budget {
                period: Period::Month,
                amount: Decimal::new(100, 2),
            }),
            now,
        )
        .unwrap();
    store
        .ingest(&usage_batch("b1", "acme", "lic-1", 99, now - 1000), now)
        .unwrap();
    // Refused calls and other accounts cost acme nothing.
    let mut refused = usage_batch("b2", "acme", "lic-1", 500, now - 1000);
    refused.records[0].outcome = "rate_limited".into();
    store.ingest(&refused, now).unwrap();
    store
        .ingest(&usage_batch("b3", "globex", "lic-9", 500, now - 1000), now)
        .unwrap();
    assert!(sync(store, &c, &req, now).unwrap().denials.is_empty());
    let status = account_status(store, &c, "acme", now).unwrap();
    assert_eq!(status.spend, Decimal::new(99, 2));
    assert!(!status.spend_cap_reached);
    store
        .ingest(&usage_batch("b4", "acme", "lic-1", 1, now - 500), now)
        .unwrap();
    let r = sync(store, &c, &req, now).unwrap();
    assert_eq!(r.denials.len(), 1, "{:?}", r.denials);
    let d = &r.denials[0];
    assert_eq!(
        (d.license.as_str(), d.code),
        ("lic-1", DenialCode::SpendCapReached)
    );
    // 2026-07-01T00:00:00Z: the cap lifts with the month.
    assert_eq!(d.until_ms, Some(1_782_864_000_000));
    assert!(d.message.contains("1.00 EUR"), "{}", d.message);
    assert!(
        account_status(store, &c, "acme", now)
            .unwrap()
            .spend_cap_reached
    );
    // Next month, the spend starts over.
    assert!(sync(store, &c, &req, 1_782_864_000_000 + 1)
        .unwrap()
        .denials
        .is_empty());
}

fn write_catalog() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("tollgate-plans-{}.json", std::process::id()));
    std::fs::write(
        &path,
        json!({"currency": "EUR", "plans": {"pro": {"prices": {"calls": "0.01"}}}}).to_string(),
    )
    .unwrap();
    assert!(Catalog::from_json(&std::fs::read(&path).unwrap()).is_ok());
    path
}

fn call(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, String) {
    let mut req = ureq::request(method, url);
    if let Some(token) = token {
        req = req.set("authorization", &format!("Bearer {token}"));
    }
    let result = match body {
        Some(body) => req.send_string(&body.to_string()),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn over_http_the_sync_is_signed_and_the_admin_api_needs_its_token() {
    let dir = std::env::temp_dir().join(format!("tollgate-control-http-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    let c = Running::start_state(0, state).unwrap();

    let mut req = request(vec![ask("h/1", "lic-1", 100, 10)], vec![]);
    req.licenses = vec![LicenseSeen {
        account: "acme".into(),
        license: "lic-1".into(),
        plan: "pro".into(),
    }];
    let body = req.encode();
    let post_sync = |body: &[u8], secret: &str| match ureq::post(&c.url("/v1/sync"))
        .set(KEY_ID_HEADER, "k1")
        .set(SIGNATURE_HEADER, &sign(secret.as_bytes(), body))
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(post_sync(&body, "not-the-secret-at-all").0, 401);
    assert_eq!(post_sync(b"{\"version\":1}", SECRET).0, 400);
    let (status, text) = post_sync(&body, SECRET);
    assert_eq!(status, 200, "{text}");
    let answer = SyncResponse::decode(text.as_bytes()).unwrap();
    assert_eq!(answer.grants[0].granted, 10);

    // Every admin route refuses without the token and with a wrong one.
    let routes = [
        ("POST", "/v1/admin/licenses/lic-1/revoke"),
        ("DELETE", "/v1/admin/licenses/lic-1/revoke"),
        ("POST", "/v1/admin/accounts/acme/suspend"),
        ("DELETE", "/v1/admin/accounts/acme/suspend"),
        ("PUT", "/v1/admin/accounts/acme/budget"),
        ("DELETE", "/v1/admin/accounts/acme/budget"),
        ("GET", "/v1/admin/accounts/acme"),
        ("GET", "/v1/admin/accounts/acme/data"),
        ("DELETE", "/v1/admin/accounts/acme/data"),
        (
            "GET",
            "/v1/admin/subjects/k1.0123456789abcdef0123456789abcdef/data",
        ),
        (
            "DELETE",
            "/v1/admin/subjects/k1.0123456789abcdef0123456789abcdef/data",
        ),
    ];
    for (method, path) in routes {
        assert_eq!(
            call(method, &c.url(path), None, None).0,
            401,
            "{method} {path}"
        );
        assert_eq!(
            call(method, &c.url(path), Some("wrong-token-0123456789"), None).0,
            401,
            "{method} {path}"
        );
    }
    // A name nothing here knows is a 404, not a silent success; ?force=true names it anyway.
    for (method, path, code) in [
        (
            "POST",
            "/v1/admin/licenses/lic-typo/revoke",
            "unknown_license",
        ),
        (
            "DELETE",
            "/v1/admin/licenses/lic-typo/revoke",
            "unknown_license",
        ),
        (
            "POST",
            "/v1/admin/accounts/nobody/suspend",
            "unknown_account",
        ),
        (
            "DELETE",
            "/v1/admin/accounts/nobody/suspend",
            "unknown_account",
        ),
        ("PUT", "/v1/admin/accounts/nobody/budget", "unknown_account"),
        (
            "DELETE",
            "/v1/admin/accounts/nobody/budget",
            "unknown_account",
        ),
    ] {
        let budget = (method == "PUT").then(|| json!({"period": "month", "amount": "5"}));
        let (status, text) = call(method, &c.url(path), Some(ADMIN), budget.as_ref());
        assert_eq!(status, 404, "{method} {path}: {text}");
        assert!(
            text.contains(code) && text.contains("?force=true"),
            "{text}"
        );
    }
    let (status, text) = call(
        "POST",
        &c.url("/v1/admin/licenses/lic-elsewhere/revoke?force=true"),
        Some(ADMIN),
        None,
    );
    assert_eq!(status, 204, "{text}");
    let (status, _) = call(
        "POST",
        &c.url("/v1/admin/licenses/lic-1/revoke"),
        Some(ADMIN),
        Some(&json!({"reason": "chargeback"})),
    );
    assert_eq!(status, 204);
    let (_, text) = post_sync(&body, SECRET);
    let answer = SyncResponse::decode(text.as_bytes()).unwrap();
    assert_eq!(answer.denials[0].code, DenialCode::LicenseRevoked);
    assert!(answer.denials[0].message.contains("chargeback"));
    assert_eq!(
        call(
            "DELETE",
            &c.url("/v1/admin/licenses/lic-1/revoke"),
            Some(ADMIN),
            None
        )
        .0,
        204
    );

    assert_eq!(
        call(
            "PUT",
            &c.url("/v1/admin/accounts/acme/budget"),
            Some(ADMIN),
            Some(&json!({"period": "month", "amount": "-1"}))
        )
        .0,
        400
    );
    assert_eq!(
        call(
            "PUT",
            &c.url("/v1/admin/accounts/acme/budget"),
            Some(ADMIN),
            Some(&json!({"period": "month", "amount": "250.00"}))
        )
        .0,
        204
    );
    assert_eq!(
        call(
            "POST",
            &c.url("/v1/admin/accounts/acme/suspend"),
            Some(ADMIN),
            None
        )
        .0,
        204
    );
    let (status, text) = call("GET", &c.url("/v1/admin/accounts/acme"), Some(ADMIN), None);
    assert_eq!(status, 200);
    let account: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        account["budget"],
        json!({"period": "month", "amount": "250.00"})
    );
    assert_eq!(account["suspended"], "suspended by an operator");
    assert_eq!(account["spend"], "0");

    // Without an admin token configured, the admin API is off.
    let store = open(&format!("sqlite://{}", dir.join("d.db").display())).unwrap();
    let off = Running::start(0, store, IngestKeys::default()).unwrap();
    assert_eq!(
        call(
            "GET",
            &off.url("/v1/admin/accounts/acme"),
            Some(ADMIN),
            None
        )
        .0,
        403
    );
    drop(c);
    drop(off);
    let _ = std::fs::remove_dir_all(&dir);
}

conformance! {
    fn the_catalogue_sets_quota_limits_and_a_change_applies_to_the_next_grant(db, "catalogue") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let path = std::env::temp_dir().join(format!(
            "tollgate-plans-quota-{}-{}.json",
            std::process::id(),
            matches!(db, Backend::Postgres(_))
        ));
        let write = |limit: u64| {
            std::fs::write(
                &path,
                json!({"plans": {"pro": {"quotas": {"calls": {"per": "day", "limit": limit}}}}})
                    .to_string(),
            )
            .unwrap()
        };
        write(50);
        let c = ControlPlane {
            catalog: CatalogFileWatch::open(Some(&path)).unwrap(),
            lease_ttl_ms: 10_000,
            ..ControlPlane::default()
        };
        // The filter says 100; the operator's catalogue says 50 for the plan.
        let grants: Vec<u64> = (1..=3)
            .map(|i| {
                granted(
                    store,
                    &c,
                    ask(&format!("k/{i}"), "lic-1", 100, 30),
                    NOON_ISH,
                )
            })
            .collect();
        assert_eq!(grants, vec![30, 20, 0]);
        // Raised to 80 in the file: the next grant has the new limit, no restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(80);
        assert_eq!(
            granted(store, &c, ask("k/4", "lic-1", 100, 50), NOON_ISH),
            30
        );
        let _ = std::fs::remove_file(&path);
    }
}

fn seat(user: &str, rule: SeatRule) -> SeatRequest {
    SeatRequest {
        account: "acme".into(),
        license: "lic-seats".into(),
        user: format!("k1.{user}"),
        rule,
    }
}

fn seat_sync(store: &dyn Store, c: &ControlPlane, seats: Vec<SeatRequest>, now: u64) -> Vec<bool> {
    let mut r = request(vec![], vec![]);
    r.seats = seats;
    sync(store, c, &r, now)
        .unwrap()
        .seats
        .iter()
        .map(|a| a.granted)
        .collect()
}

conformance! {
    fn seats_are_decided_by_the_store_on_every_backend(db, "seats") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let c = control();
        let now = NOON_ISH;
        let named = SeatRule::Named {
            limit: 2,
            per: Period::Month,
        };
        let asks = ["a", "b", "c"].iter().map(|u| seat(u, named)).collect();
        assert_eq!(seat_sync(store, &c, asks, now), [true, true, false]);
        // Holders renew; the third stays out all month; another key's users count apart.
        assert_eq!(
            seat_sync(store, &c, vec![seat("a", named)], now + 86_400_000),
            [true]
        );
        assert_eq!(
            seat_sync(store, &c, vec![seat("c", named)], now + 86_400_000),
            [false]
        );
        let mut rotated = seat("c", named);
        rotated.user = "k2.c".into();
        assert_eq!(
            seat_sync(store, &c, vec![rotated], now + 86_400_000),
            [true]
        );
        let taken = store.seat_use("acme", now + 86_400_000).unwrap();
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].in_use, taken[0].limit),
            (2, 2),
            "seats in use under the busiest key"
        );

        // Floating seats: free again a window after the last grant.
        let floating = SeatRule::Floating {
            limit: 1,
            window_ms: 60_000,
        };
        let f = |user: &str, at: u64| {
            let mut s = seat(user, floating);
            s.license = "lic-float".into();
            seat_sync(store, &c, vec![s], at)[0]
        };
        assert!(f("x", now));
        assert!(!f("y", now + 59_999));
        assert!(f("y", now + 60_000));
        assert!(!f("x", now + 60_001));

        // A revoked license gets no seat answer (its denial refuses it).
        store.set_revoked("lic-seats", Some("fraud"), now).unwrap();
        assert!(seat_sync(store, &c, vec![seat("a", named)], now).is_empty());
    }
}

conformance! {
    fn replicas_deciding_seats_at_once_never_hand_out_more_than_the_limit(db, "seat-race") {
        let url = db.url();
        let stores: Vec<Arc<dyn Store>> = (0..4).map(|_| Arc::from(open(&url).unwrap())).collect();
        let rule = SeatRule::Named {
            limit: 5,
            per: Period::Month,
        };
        let granted: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = stores
                .iter()
                .enumerate()
                .map(|(replica, store)| {
                    scope.spawn(move || {
                        let c = control();
                        (0..10)
                            .filter_map(|i| {
                                let ask = seat(&format!("r{replica}-{i}"), rule);
                                let user = ask.user.clone();
                                let answer = seat_sync(store.as_ref(), &c, vec![ask], NOON_ISH);
                                answer[0].then_some(user)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(granted.len(), 5, "{granted:?} ({})", db.url());
        assert_eq!(stores[0].seat_use("acme", NOON_ISH).unwrap()[0].in_use, 5);
    }
}

conformance! {
    /// The busiest pseudonym key's clients, the same on every backend: refs are `key.pseudonym`;
    /// one without a `.` (not from a Tollgate filter) belongs to the key '', so such refs count
    /// together rather than one each (PostgreSQL's `split_part` once counted each apart).
    fn clients_are_counted_per_key_alike_on_every_backend(db, "clients-per-key") {
        let store = open(&db.url()).unwrap();
        let note = |license: &str, clients: &[&str]| {
            store
                .note_clients(
                    &ClientsSeen {
                        account: "acme".into(),
                        license: license.into(),
                        clients: clients.iter().map(|c| (*c).to_string()).collect(),
                        max_clients: 100,
                        window_ms: 60_000,
                        block: false,
                    },
                    NOON_ISH,
                )
                .unwrap()
        };
        assert_eq!(note("lic-keyed", &["k1.a", "k1.b", "k2.a"]), 2, "{db:?}");
        assert_eq!(note("lic-bare", &["a", "b", "c"]), 3, "{db:?}");
        assert_eq!(note("lic-mixed", &["a", ".b", "k1.c"]), 2, "{db:?}");
        assert_eq!(note("lic-dots", &["k1.a.b", "k1.c"]), 2, "{db:?}");
    }
}

conformance! {
    fn sharing_is_detected_once_per_window_alerted_and_blocks_when_asked(db, "sharing") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let c = control();
        let now = NOON_ISH;
        let seen = |clients: &[&str], block: bool| ClientsSeen {
            account: "acme".into(),
            license: "lic-shared".into(),
            clients: clients.iter().map(|c| format!("k1.{c}")).collect(),
            max_clients: 2,
            window_ms: 60_000,
            block,
        };
        let run = |clients: Vec<ClientsSeen>, at: u64| {
            let mut r = request(vec![], vec![]);
            r.clients = clients;
            r.licenses = vec![LicenseSeen {
                account: "acme".into(),
                license: "lic-shared".into(),
                plan: "pro".into(),
            }];
            sync(store, &c, &r, at).unwrap()
        };
        // Two clients: fine. A third within the window: detected, blocked for the window.
        assert!(run(vec![seen(&["a", "b"], true)], now).denials.is_empty());
        let answer = run(vec![seen(&["c"], true)], now + 1_000);
        assert_eq!(answer.denials.len(), 1);
        assert_eq!(answer.denials[0].code, DenialCode::LicenseSharingDetected);
        assert_eq!(answer.denials[0].until_ms, Some(now + 61_000));
        // More clients in the same episode: no second alert.
        run(vec![seen(&["d", "e"], true)], now + 2_000);
        let alerts = store
            .webhook_events(100)
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "license.sharing_detected")
            .count();
        assert_eq!(alerts, 1);
        assert_eq!(
            c.sharing_alerts.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let detections = store.sharing_detections(Some("acme")).unwrap();
        assert_eq!(detections.len(), 1);
        assert_eq!(detections[0].clients, 5);
        // The block lifts after the window; old clients are forgotten.
        assert!(run(vec![], now + 61_000).denials.is_empty());
        assert!(run(vec![seen(&["z"], true)], now + 200_000)
            .denials
            .is_empty());
        // A pseudonym key rotation: the same clients under two keys are not twice as many.
        let mut rotated = seen(&[], true);
        rotated.clients = vec!["k2.y".into(), "k2.z".into()];
        assert!(run(vec![rotated], now + 200_001).denials.is_empty());
    }
}

conformance! {
    fn active_users_are_counted_distinct_per_account_license_and_feature(db, "active-users") {
        let store = open(&db.url()).unwrap();
        let record = |license: &str, feature: &str, user: &str, outcome: &str| UsageRecord {
            account: "acme".into(),
            license: license.into(),
            feature: feature.into(),
            outcome: outcome.into(),
            user: user.into(),
            meter: Meter::Calls,
            units: 1,
            window_start_ms: NOON_ISH,
            window_end_ms: NOON_ISH + 1000,
        };
        let batch = UsageBatch {
            version: 1,
            batch_id: "users-1".into(),
            source: Source {
                instance: "node".into(),
                vm_started_ms: 1,
            },
            sequence: 1,
            created_ms: NOON_ISH,
            records: vec![
                record("lic-1", "search", "k1.u1", "allowed"),
                record("lic-1", "search", "k1.u2", "allowed"),
                record("lic-1", "design", "k1.u1", "allowed"),
                record("lic-2", "search", "k1.u1", "allowed"),
                record("lic-2", "search", "k1.u3", "rate_limited"),
                record("lic-2", "search", "", "allowed"),
            ],
        };
        store.ingest(&batch, NOON_ISH).unwrap();
        let users = store
            .active_users("acme", NOON_ISH - 1000, NOON_ISH + 1000, None)
            .unwrap();
        assert_eq!(
            users.users, 2,
            "u3 was refused, not active; the empty user is no user"
        );
        assert_eq!(users.by_license["lic-1"], 2);
        assert_eq!(users.by_license["lic-2"], 1);
        assert_eq!(users.by_feature["design"], 1);
        assert_eq!(
            store
                .active_users("acme", NOON_ISH + 1000, NOON_ISH + 2000, None)
                .unwrap()
                .users,
            0
        );
    }
}
