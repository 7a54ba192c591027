//! The collector over real HTTP, against every storage backend (a SQLite file and a throwaway
//! PostgreSQL server): exactly once, by counting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use tollgate_collector::{open, IngestKeys, Running};
use tollgate_devkit::postgres::TestPostgres;

mod common;
use common::{conformance, Backend};
use tollgate_wire::{
    sign, Meter, Source, UsageBatch, UsageRecord, KEY_ID_HEADER, SIGNATURE_HEADER,
};

const SECRET: &str = "collector-test-secret-0123456789";
// 2026-06-01T10:00:00Z
const T0: u64 = 1_780_308_000_000;

fn start(backend: &Backend) -> Running {
    let keys = IngestKeys::parse([
        format!("k1={SECRET}").as_str(),
        "k2=another-secret-for-rotation",
    ])
    .unwrap();
    let mut state = tollgate_collector::AppState::new(
        std::sync::Arc::from(open(&backend.url()).unwrap()),
        keys,
    );
    state.admin_token = Some(ADMIN.into());
    Running::start_state(0, state).unwrap()
}

/// Usage queries need the admin token (or an account's own token).
const ADMIN: &str = "ingest-test-admin-token-0123";

fn batch(sequence: u64, calls: u64, at_ms: u64) -> UsageBatch {
    let source = Source {
        instance: "node-a/tollgate".into(),
        vm_started_ms: T0,
    };
    let record = |license: &str, meter, units| UsageRecord {
        account: "acme".into(),
        license: license.into(),
        feature: "search".into(),
        outcome: "allowed".into(),
        user: String::new(),
        meter,
        units,
        window_start_ms: at_ms,
        window_end_ms: at_ms + 1000,
    };
    UsageBatch {
        version: 1,
        batch_id: UsageBatch::id_for(&source, sequence),
        source,
        sequence,
        created_ms: at_ms + 1000,
        records: vec![
            record("lic-1", Meter::Calls, calls),
            record("lic-1", Meter::ResponseBytes, calls * 100),
        ],
    }
}

fn post(c: &Running, key: &str, secret: &str, body: &[u8]) -> (u16, Value) {
    let result = ureq::post(&c.url("/v1/usage"))
        .set("content-type", "application/json")
        .set(KEY_ID_HEADER, key)
        .set(SIGNATURE_HEADER, &sign(secret.as_bytes(), body))
        .send_bytes(body);
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{e}"),
    };
    (
        response.status(),
        serde_json::from_str(&response.into_string().unwrap()).unwrap(),
    )
}

/// The rows of `GET /v1/usage?<query>`.
fn usage_rows(c: &Running, query: &str) -> Vec<Value> {
    let body = ureq::get(&c.url(&format!("/v1/usage?{query}")))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    body["rows"].as_array().unwrap().clone()
}

fn total(c: &Running, meter: &str) -> u64 {
    usage_rows(c, &format!("meter={meter}&granularity=month"))
        .iter()
        .map(|r| r["units"].as_u64().unwrap())
        .sum()
}

conformance! {
    fn a_batch_is_counted_once_however_often_it_is_sent(db, "once") {
        a_batch_is_counted_once_however_often_it_is_sent_on(&db);
    }
}

fn a_batch_is_counted_once_however_often_it_is_sent_on(db: &Backend) {
    let c = start(db);
    let body = batch(1, 7, T0).encode();
    let (status, ack) = post(&c, "k1", SECRET, &body);
    assert_eq!((status, ack["status"].as_str()), (200, Some("accepted")));
    assert_eq!(ack["records"], 2);
    for _ in 0..3 {
        let (status, ack) = post(&c, "k1", SECRET, &body);
        assert_eq!(
            (status, ack["status"].as_str(), ack["records"].as_u64()),
            (200, Some("duplicate"), Some(2))
        );
    }
    assert_eq!(total(&c, "calls"), 7);
    assert_eq!(total(&c, "response_bytes"), 700);

    // Retries racing each other from many connections: still once.
    let body = batch(2, 5, T0).encode();
    let statuses: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    post(&c, "k2", "another-secret-for-rotation", &body).1["status"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| *s == "accepted").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(total(&c, "calls"), 12);

    // After a restart on the same file, the batch ids are still known.
    drop(c);
    let c = start(db);
    let (_, ack) = post(&c, "k1", SECRET, &batch(1, 7, T0).encode());
    assert_eq!(ack["status"], "duplicate");
    assert_eq!(total(&c, "calls"), 12);
    let metrics = ureq::get(&c.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("tollgate_collector_batches_total{result=\"duplicate\"} 1"),
        "{metrics}"
    );
}

conformance! {
    fn a_group_of_batches_is_stored_in_one_transaction_or_not_at_all(db, "group") {
        a_group_of_batches_is_stored_in_one_transaction_or_not_at_all_on(&db);
    }
}

/// Group commit (`Store::ingest_group`), the same on every backend: a batch seen earlier in
/// the same group is a duplicate; a group that fails stores nothing of itself.
fn a_group_of_batches_is_stored_in_one_transaction_or_not_at_all_on(db: &Backend) {
    use tollgate_collector::storage::Ingested;
    let store = open(&db.url()).unwrap();
    let (one, two) = (batch(1, 3, T0), batch(2, 4, T0));
    let outcomes = store
        .ingest_group(&[(&one, T0), (&two, T0), (&one, T0)])
        .unwrap();
    assert_eq!(
        outcomes,
        [
            Ingested::Accepted { records: 2 },
            Ingested::Accepted { records: 2 },
            Ingested::Duplicate { records: 2 },
        ],
        "{db:?}"
    );
    // A batch the store cannot take (a count beyond a signed 64-bit integer) fails its whole
    // group: the good batch before it is not stored either, and is taken when sent again.
    let three = batch(3, 5, T0);
    let mut bad = batch(4, 1, T0);
    bad.records[0].units = u64::MAX;
    assert!(
        store.ingest_group(&[(&three, T0), (&bad, T0)]).is_err(),
        "{db:?}"
    );
    assert_eq!(
        store.ingest(&three, T0).unwrap(),
        Ingested::Accepted { records: 2 },
        "{db:?}"
    );
    drop(store);
    let c = start(db);
    assert_eq!(total(&c, "calls"), 3 + 4 + 5, "{db:?}");
}

conformance! {
    fn unsigned_forged_malformed_and_oversized_batches_change_nothing(db, "refused") {
        unsigned_forged_malformed_and_oversized_batches_change_nothing_on(&db);
    }
}

fn unsigned_forged_malformed_and_oversized_batches_change_nothing_on(db: &Backend) {
    let c = start(db);
    let body = batch(1, 3, T0).encode();
    // Wrong secret, unknown key id, altered body.
    assert_eq!(post(&c, "k1", "not-the-secret-at-all-000", &body).0, 401);
    assert_eq!(post(&c, "k9", SECRET, &body).0, 401);
    let signature = sign(SECRET.as_bytes(), &body);
    let mut altered = body.clone();
    let at = altered.iter().position(|b| *b == b'3').unwrap();
    altered[at] = b'9';
    let r = ureq::post(&c.url("/v1/usage"))
        .set(KEY_ID_HEADER, "k1")
        .set(SIGNATURE_HEADER, &signature)
        .send_bytes(&altered);
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));

    let (status, err) = post(&c, "k1", SECRET, b"{\"version\": 1}");
    assert_eq!(
        (status, err["error"].as_str()),
        (400, Some("malformed_batch"))
    );
    assert!(
        err["message"].as_str().unwrap().contains("missing field"),
        "{err}"
    );
    let mut bad = batch(2, 1, T0);
    bad.version = 9;
    let (status, err) = post(&c, "k1", SECRET, &bad.encode());
    assert_eq!(status, 400);
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("unsupported version 9"));
    let huge = vec![b' '; tollgate_wire::MAX_BATCH_BYTES + 10];
    let r = ureq::post(&c.url("/v1/usage"))
        .set(KEY_ID_HEADER, "k1")
        .set(SIGNATURE_HEADER, &sign(SECRET.as_bytes(), &huge))
        .send_bytes(&huge);
    assert!(matches!(r, Err(ureq::Error::Status(413, _))), "{r:?}");

    assert_eq!(total(&c, "calls"), 0);
    // The batch refused for its signature is accepted once signed properly.
    assert_eq!(post(&c, "k1", SECRET, &body).1["status"], "accepted");
    assert_eq!(total(&c, "calls"), 3);
}

conformance! {
    fn usage_is_summed_by_calendar_period(db, "periods") {
        usage_is_summed_by_calendar_period_on(&db);
    }
}

fn usage_is_summed_by_calendar_period_on(db: &Backend) {
    let c = start(db);
    let hour = 3_600_000;
    post(&c, "k1", SECRET, &batch(1, 1, T0).encode());
    post(&c, "k1", SECRET, &batch(2, 2, T0 + hour).encode());
    post(&c, "k1", SECRET, &batch(3, 4, T0 + 30 * 24 * hour).encode());
    let rows = |granularity: &str| -> Vec<(String, u64)> {
        usage_rows(&c, &format!("meter=calls&granularity={granularity}"))
            .iter()
            .map(|r| {
                (
                    r["period"].as_str().unwrap().to_string(),
                    r["units"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        rows("hour"),
        vec![
            ("2026-06-01T10:00:00Z".into(), 1),
            ("2026-06-01T11:00:00Z".into(), 2),
            ("2026-07-01T10:00:00Z".into(), 4)
        ]
    );
    assert_eq!(
        rows("day"),
        vec![
            ("2026-06-01T00:00:00Z".into(), 3),
            ("2026-07-01T00:00:00Z".into(), 4)
        ]
    );
    assert_eq!(
        rows("month"),
        vec![
            ("2026-06-01T00:00:00Z".into(), 3),
            ("2026-07-01T00:00:00Z".into(), 4)
        ]
    );
    let bad = ureq::get(&c.url("/v1/usage?granularity=fortnight"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .call();
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))));
    assert_eq!(ureq::get(&c.url("/readyz")).call().unwrap().status(), 200);
    assert_eq!(ureq::get(&c.url("/healthz")).call().unwrap().status(), 200);
}

/// PostgreSQL crashes and restarts (every connection cut): the batch that meets the broken
/// connection gets a 503 (nothing stored, the filter retries it), and the collector reconnects
/// by itself. The server is durable (fsync, synchronous commit): with asynchronous commit a
/// crash loses acknowledged batches, which is why the collector must not run that way.
#[test]
fn the_collector_reconnects_after_postgres_restarts() {
    let pg = TestPostgres::start_durable("restart").unwrap();
    let c = start(&Backend::Url(pg.url()));
    let first = batch(1, 3, T0).encode();
    assert_eq!(post(&c, "k1", SECRET, &first).0, 200);
    pg.restart().unwrap();

    let second = batch(2, 4, T0).encode();
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let (status, _) = post(&c, "k1", SECRET, &second);
        statuses.push(status);
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "only a retryable refusal while reconnecting");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(
        statuses.len() <= 2,
        "reconnected on the next batch: {statuses:?}"
    );
    assert_eq!(post(&c, "k1", SECRET, &second).1["status"], "duplicate");
    assert_eq!(total(&c, "calls"), 7);
}
