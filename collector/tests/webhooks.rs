//! Webhooks against a local receiver that fails the first attempts: every event arrives,
//! signed, retried with backoff, once successfully, and the delivery log tells each attempt.
//! Spend thresholds (50/80/100 %) and invoice finalisation raise their events once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::storage::{Budget, IssuedLicense};
use tollgate_collector::webhooks::{verify_signature, WebhookSettings};
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_wire::sync::Period;
use tollgate_wire::{Meter, Source, UsageBatch, UsageRecord};

use common::{conformance, Backend};

const ADMIN: &str = "webhooks-admin-token-0123456789";
const HOOK_SECRET: &str = "webhook-signing-secret-0123";
/// Each event's first attempts the receiver answers with 500.
const FAILURES: usize = 2;

/// What the receiver saw, per event id: (status answered, signature valid).
type Seen = Arc<Mutex<BTreeMap<String, Vec<(u16, bool, Value)>>>>;

/// A payment system's webhook endpoint on 127.0.0.1: answers 500 to the first `FAILURES`
/// deliveries of each event, then 200.
fn receiver() -> (
    String,
    Seen,
    std::thread::JoinHandle<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let seen: Seen = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/hooks/tollgate", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = Arc::clone(&seen);
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/hooks/tollgate",
                post(move |headers: HeaderMap, body: Bytes| {
                    let seen = Arc::clone(&state);
                    async move {
                        let header = |n: &str| {
                            headers
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string()
                        };
                        let now_s = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs();
                        let valid = verify_signature(
                            HOOK_SECRET.as_bytes(),
                            &header("tollgate-signature"),
                            &body,
                            now_s,
                            300,
                        );
                        let envelope: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        // Checked by the test body (a panic here would only drop the
                        // connection, seen as one more failed delivery).
                        let id = header("idempotency-key");
                        let mut seen = seen.lock().unwrap();
                        let attempts = seen.entry(id).or_default();
                        let status = if attempts.len() < FAILURES { 500 } else { 200 };
                        attempts.push((status, valid, envelope));
                        StatusCode::from_u16(status).unwrap()
                    }
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    (url, seen, thread, stop)
}

fn now_ms() -> u64 {
    u64::try_from(tollgate_collector::clock::now_ms()).unwrap()
}

fn batch(id: &str, calls: u64, at_ms: u64) -> UsageBatch {
    UsageBatch {
        version: 1,
        batch_id: id.into(),
        source: Source {
            instance: "node".into(),
            vm_started_ms: 1,
        },
        sequence: 1,
        created_ms: at_ms,
        records: vec![UsageRecord {
            account: "acme".into(),
            license: "lic-1".into(),
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

fn admin(c: &Running, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let req = ureq::request(method, &c.url(path)).set("authorization", &format!("Bearer {ADMIN}"));
    let result = match body {
        Some(b) => req
            .set("content-type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let r = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    (
        r.status(),
        serde_json::from_str(&r.into_string().unwrap()).unwrap_or(Value::Null),
    )
}

conformance! {
    fn webhooks_are_signed_retried_and_delivered_once_for_thresholds_and_invoices(db, "webhooks") {
        webhooks_on(&db);
    }
}

fn webhooks_on(db: &Backend) {
    let (url, seen, thread, stop) = receiver();
    let dir = std::env::temp_dir().join(format!("tollgate-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    // Monthly budgets and invoices on the real clock: in a zone where it is midday, so that
    // the test never straddles a month's end.
    std::fs::write(
        &plans,
        json!({
            "currency": "EUR",
            "time_zone": tollgate_devkit::periods::midday_time_zone(),
            "plans": {"pro": {"prices": {"calls": "0.01"}}},
        })
        .to_string(),
    )
    .unwrap();

    let store = open(&db.url()).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse(["k1=webhooks-test-secret-0123"]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&plans)).unwrap(),
        ..ControlPlane::default()
    };
    let mut hooks = WebhookSettings::new(&url, HOOK_SECRET).unwrap();
    hooks.retry_base_ms = 100;
    hooks.timeout_ms = 2000;
    state.webhooks = Some(hooks);
    state.billing.interval_ms = 50;
    state.billing.budget_check_ms = 100;
    state.billing.finalize_grace_ms = None;
    let c = Running::start_state(0, state).unwrap();
    let store = &c.state.store;
    let now = now_ms();
    store
        .add_license(&IssuedLicense {
            license: "lic-1".into(),
            account: "acme".into(),
            plan: "pro".into(),
            features: vec![],
            limits: None,
            not_before_ms: 0,
            expires_ms: now + 86_400_000 * 400,
            kid: "k".into(),
            issued_ms: 0,
            revoked_ms: None,
        })
        .unwrap();
    store
        .set_budget(
            "acme",
            Some(&Budget {
                period: Period::Month,
                amount: "10".parse().unwrap(),
            }),
            now,
        )
        .unwrap();

    // €6 of €10: the 50 % threshold; then €9 (80 %), then €11 (100 %).
    let wait_for = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if seen
                .lock()
                .unwrap()
                .get(id)
                .is_some_and(|a| a.iter().any(|(s, _, _)| *s == 200))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} was never delivered: {:?}",
                seen.lock().unwrap().keys()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let month_start = c
        .state
        .control
        .catalog
        .current()
        .period_bounds(Period::Month, now)
        .0;
    store.ingest(&batch("b1", 600, now), now).unwrap();
    wait_for(&format!("spend.threshold:acme:{month_start}:50"));
    store.ingest(&batch("b2", 300, now), now).unwrap();
    wait_for(&format!("spend.threshold:acme:{month_start}:80"));
    store.ingest(&batch("b3", 200, now), now).unwrap();
    wait_for(&format!("spend.threshold:acme:{month_start}:100"));

    // Last month's invoice: finalised once (a second request returns it unchanged).
    let last_month = month_start - 1;
    // Received two minutes ago: before the invoice's cut (finalisation minus a minute).
    store
        .ingest(&batch("b0", 1234, last_month - 5000), now - 120_000)
        .unwrap();
    let (status, invoice) = admin(
        &c,
        "POST",
        "/v1/admin/accounts/acme/invoices",
        Some(json!({})),
    );
    assert_eq!(status, 201, "{invoice}");
    assert_eq!(invoice["total"], "12.34");
    let (status, again) = admin(
        &c,
        "POST",
        "/v1/admin/accounts/acme/invoices",
        Some(json!({"at_ms": last_month})),
    );
    assert_eq!(status, 200);
    assert_eq!(again, invoice);
    // The running period cannot be finalised.
    let (status, _) = admin(
        &c,
        "POST",
        "/v1/admin/accounts/acme/invoices",
        Some(json!({"at_ms": now})),
    );
    assert_eq!(status, 409);
    let invoice_event = format!(
        "invoice.finalized:{}",
        invoice["invoice_id"].as_str().unwrap()
    );
    wait_for(&invoice_event);
    let (_, listed) = admin(&c, "GET", "/v1/admin/accounts/acme/invoices", None);
    assert_eq!(listed["invoices"].as_array().unwrap().len(), 1);

    // A stray duplicate would be sent by a later round of the worker: count after three
    // more rounds have run.
    let rounds = |c: &tollgate_collector::Running| c.state.metrics.worker_rounds.get();
    let after = rounds(&c) + 3;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rounds(&c) < after {
        assert!(
            Instant::now() < deadline,
            "the worker stopped running rounds"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{:?}", seen.keys());
    for (id, attempts) in &seen {
        let statuses: Vec<u16> = attempts.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(statuses, vec![500, 500, 200], "{id}");
        for (_, _, envelope) in attempts {
            assert_eq!(envelope["id"], id.as_str(), "idempotency key and event id");
        }
        assert!(
            attempts.iter().all(|(_, valid, _)| *valid),
            "{id}: bad signature"
        );
    }
    assert_eq!(
        seen[&invoice_event][2].2["data"]["invoice"]["total"],
        "12.34"
    );
    let threshold = &seen[&format!("spend.threshold:acme:{month_start}:80")][2].2;
    assert_eq!(threshold["type"], "spend.threshold_crossed");
    assert_eq!(threshold["data"]["threshold_percent"], 80);

    // The delivery log: three attempts each, the last delivered.
    let (_, events) = admin(&c, "GET", "/v1/admin/webhooks/events", None);
    let events = events["events"].as_array().unwrap();
    assert_eq!(events.len(), 4);
    for e in events {
        assert!(e["delivered_ms"].is_u64(), "{e}");
        let statuses: Vec<u64> = e["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, vec![500, 500, 200], "{e}");
        let at: Vec<u64> = e["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["at_ms"].as_u64().unwrap())
            .collect();
        assert!(
            at[1] - at[0] >= 100 && at[2] - at[1] >= 200,
            "backoff doubles: {at:?}"
        );
    }
    drop(c);
    let _ = stop.send(());
    thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
