//! The collector's clock stepped forward and back by an hour (as NTP stepping the system
//! clock would; here its offset is stepped, the machine's clock is left alone), over real
//! HTTP, on every storage backend:
//! - usage is stored exactly once across the steps (batch ids, not receipt times, decide), and
//!   bucketed by the filter's windows, so the steps move nothing;
//! - a daily quota never grants more than its limit in a period, whichever way the clock
//!   steps; a step across midnight grants from the next day's quota, a step back from what the
//!   previous day has left;
//! - a finalised invoice stays as it is when the clock steps back;
//! - a webhook retry scheduled before a step back is sent at once, not an hour late.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::webhooks::WebhookSettings;
use tollgate_collector::{open, AppState, IngestKeys, Running, UsageQuery};
use tollgate_wire::sync::{LeaseRequest, Period, SyncRequest, SyncResponse};
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER,
};

mod common;
use common::conformance;

const SECRET: &str = "clock-test-secret-0123456789";
const ADMIN: &str = "clock-test-admin-token-0123456789";
const HOUR: i64 = 3_600_000;

/// When each delivery of each event (by idempotency key) came.
type Deliveries = Arc<Mutex<BTreeMap<String, Vec<Instant>>>>;

/// A receiver that answers 500 to an event's first delivery and 200 after.
fn receiver() -> (String, Deliveries) {
    let seen: Deliveries = Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                use std::io::{BufRead as _, Read as _, Write as _};
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let (mut id, mut length) = (String::new(), 0usize);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        match name.to_ascii_lowercase().as_str() {
                            "idempotency-key" => id = value.trim().to_string(),
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let attempts = {
                    let mut log = log.lock().unwrap();
                    let entry = log.entry(id).or_default();
                    entry.push(Instant::now());
                    entry.len()
                };
                let status = if attempts == 1 { "500 No" } else { "200 OK" };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            });
        }
    });
    (url, seen)
}

fn start(url: &str, dir: &std::path::Path, hook: &str) -> Running {
    let mut state = AppState::new(
        Arc::from(open(url).unwrap()),
        IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    let plans = dir.join("plans.json");
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
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&plans)).unwrap(),
        ..ControlPlane::default()
    };
    let mut hooks = WebhookSettings::new(hook, "clock-test-hook-secret-0123").unwrap();
    // A minute's backoff: a retry the step back left an hour away would not come in time.
    hooks.retry_base_ms = 60_000;
    hooks.timeout_ms = 2_000;
    state.webhooks = Some(hooks);
    state.billing.interval_ms = 50;
    state.billing.finalize_grace_ms = None;
    Running::start_state(0, state).unwrap()
}

fn json_of(r: ureq::Response) -> Value {
    serde_json::from_str(&r.into_string().unwrap_or_default()).unwrap_or(Value::Null)
}

fn post(c: &Running, path: &str, body: &[u8]) -> (u16, Value) {
    let r = ureq::post(&c.url(path))
        .set(KEY_ID_HEADER, "k1")
        .set(SIGNATURE_HEADER, &sign(SECRET.as_bytes(), body))
        .send_bytes(body);
    match r {
        Ok(r) => (r.status(), json_of(r)),
        Err(ureq::Error::Status(status, r)) => (status, json_of(r)),
        Err(e) => panic!("{e}"),
    }
}

fn admin(c: &Running, method: &str, path: &str, body: Value) -> (u16, Value) {
    let r = ureq::request(method, &c.url(path))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .send_string(&body.to_string());
    match r {
        Ok(r) => (r.status(), json_of(r)),
        Err(ureq::Error::Status(status, r)) => (status, json_of(r)),
        Err(e) => panic!("{e}"),
    }
}

/// A batch of `calls` allowed calls in the hour window starting at `window_ms`.
fn batch(sequence: u64, calls: u64, window_ms: u64) -> Vec<u8> {
    let source = Source {
        instance: "clock-test".into(),
        vm_started_ms: 1,
    };
    UsageBatch {
        version: 1,
        batch_id: UsageBatch::id_for(&source, sequence),
        source,
        sequence,
        created_ms: window_ms + 1000,
        records: vec![UsageRecord {
            account: "acme".into(),
            license: "lic-1".into(),
            feature: "search".into(),
            outcome: "allowed".into(),
            user: String::new(),
            meter: Meter::Calls,
            units: calls,
            window_start_ms: window_ms,
            window_end_ms: window_ms + 1000,
        }],
    }
    .encode()
}

fn lease(id: &str, want: u64) -> Vec<u8> {
    SyncRequest {
        version: 1,
        instance: "clock-test".into(),
        leases: vec![LeaseRequest {
            lease_id: id.into(),
            account: "acme".into(),
            license: "lic-1".into(),
            plan: "pro".into(),
            meter: Meter::Calls,
            period: Period::Day,
            limit: 100,
            want,
        }],
        returns: vec![],
        licenses: vec![],
        seats: vec![],
        clients: vec![],
    }
    .encode()
}

/// (granted, period start) of one lease request.
fn grant(c: &Running, id: &str, want: u64) -> (u64, u64) {
    let r = ureq::post(&c.url("/v1/sync"))
        .set(KEY_ID_HEADER, "k1")
        .set(SIGNATURE_HEADER, &sign(SECRET.as_bytes(), &lease(id, want)))
        .send_bytes(&lease(id, want))
        .unwrap();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    let answer = SyncResponse::decode(&body).unwrap();
    let g = &answer.grants[0];
    (g.granted, g.period_start_ms)
}

conformance! {
    fn a_clock_stepped_an_hour_forward_and_back_changes_no_count_and_no_limit(db, "clock") {
        let dir = std::env::temp_dir().join(format!("tollgate-clock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (hook, deliveries) = receiver();
        let c = start(&db.url(), &dir, &hook);
        let clock = Arc::clone(&c.state.clock);
        let hour_start = |ms: u64| ms - ms % 3_600_000;
        let t0 = hour_start(clock.now_ms()) - 3 * 3_600_000;

        // Usage: three batches and two retries across a step forward and a step back.
        assert_eq!(post(&c, "/v1/usage", &batch(1, 5, t0)).0, 200);
        clock.step(HOUR);
        assert_eq!(post(&c, "/v1/usage", &batch(2, 7, t0 + 3_600_000)).0, 200);
        assert_eq!(
            post(&c, "/v1/usage", &batch(1, 5, t0)).1["status"],
            "duplicate"
        );
        clock.step(-2 * HOUR);
        assert_eq!(post(&c, "/v1/usage", &batch(3, 11, t0)).0, 200);
        assert_eq!(
            post(&c, "/v1/usage", &batch(2, 7, t0 + 3_600_000)).1["status"],
            "duplicate"
        );
        clock.step(HOUR);
        let rows = c
            .state
            .store
            .usage(&UsageQuery {
                meter: Some(Meter::Calls.as_str().into()),
                granularity: Some(tollgate_collector::Granularity::Hour),
                ..UsageQuery::default()
            })
            .unwrap();
        // Hourly buckets (RFC 3339, in order): the two windows' hours, whatever the clock did.
        let by_hour: BTreeMap<String, u64> = rows.iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.period.clone()).or_default() += r.units;
            m
        });
        assert_eq!(
            by_hour.values().copied().collect::<Vec<_>>(),
            vec![16, 7],
            "{db:?}: {by_hour:?}"
        );

        // A daily quota of 100 (in a zone where it is midday: the next midnight is 12 h away).
        let (first, today) = grant(&c, "l1", 60);
        assert_eq!(first, 60);
        clock.step(HOUR);
        assert_eq!(grant(&c, "l2", 60), (40, today), "{db:?}");
        clock.step(-2 * HOUR);
        assert_eq!(grant(&c, "l3", 10), (0, today), "{db:?}: the limit holds");
        // Past midnight: the next day's quota.
        clock.step(13 * HOUR);
        let (granted, tomorrow) = grant(&c, "l4", 60);
        assert_eq!(granted, 60, "{db:?}");
        assert!(tomorrow > today, "{db:?}");
        // Back before midnight: what today has left, which is nothing.
        clock.step(-13 * HOUR);
        assert_eq!(grant(&c, "l5", 10), (0, today), "{db:?}");
        clock.step(HOUR);

        // Last month's invoice, finalised, then the clock steps back: asked again, the same.
        let month_start = c
            .state
            .control
            .catalog
            .current()
            .period_bounds(tollgate_wire::sync::Period::Month, clock.now_ms())
            .0;
        assert_eq!(
            post(
                &c,
                "/v1/usage",
                &batch(4, 3, hour_start(month_start - 5_000_000))
            )
            .0,
            200
        );
        let (status, invoice) = admin(
            &c,
            "POST",
            "/v1/admin/accounts/acme/invoices",
            json!({"at_ms": month_start - 1}),
        );
        assert_eq!(status, 201, "{db:?}: {invoice}");
        clock.step(-HOUR);
        let (status, again) = admin(
            &c,
            "POST",
            "/v1/admin/accounts/acme/invoices",
            json!({"at_ms": month_start - 1}),
        );
        assert_eq!((status, &again), (200, &invoice), "{db:?}");
        clock.step(HOUR);

        // A webhook event: its first delivery fails (500) and the retry is a minute away;
        // then the clock steps back an hour. The worker notices and sends it at once.
        let now = clock.now_ms();
        c.state
            .store
            .enqueue_event(&tollgate_collector::webhooks::event(
                "clock.test:1".into(),
                "clock.test",
                json!({"account": "acme"}),
                now,
            ))
            .unwrap();
        let attempts = |id: &str| {
            deliveries
                .lock()
                .unwrap()
                .get(id)
                .map_or(0, std::vec::Vec::len)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while attempts("clock.test:1") < 1 {
            assert!(Instant::now() < deadline, "{db:?}: never attempted");
            std::thread::sleep(Duration::from_millis(20));
        }
        let failed_at = Instant::now();
        clock.step(-HOUR);
        while attempts("clock.test:1") < 2 {
            assert!(
                Instant::now() < deadline,
                "{db:?}: the retry waited out the step back"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "clock [{db:?}]: usage exact across steps; quota 100 granted 60+40, then 0, 60 the next day, 0 back; invoice unchanged; the webhook retry came {:.1} s after the step back (backoff 60 s)",
            failed_at.elapsed().as_secs_f64()
        );
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
