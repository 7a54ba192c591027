//! Personal data on every storage backend: retention rolls raw usage into aggregates with every
//! unit counted once (billing and queries unchanged, replicas racing, retried batches); an
//! account is exported and erased with nothing of it left anywhere in the database (the SQLite
//! files searched byte by byte); an end user's pseudonym is unlinked from usage that stays
//! billed. Over HTTP: the admin token guards it, a valid license blocks an account's erasure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use rust_decimal::Decimal;
use serde_json::{json, Value};
use tollgate_collector::control::{sync, ControlPlane};
use tollgate_collector::privacy::{self, Retained};
use tollgate_collector::storage::{
    Budget, Delivery, DeliveryOutcome, IssuedLicense, SeatAsk, SharingDetection, StoredInvoice,
};
use tollgate_collector::worker::{BillingSettings, Worker};
use tollgate_collector::{
    open, AppState, Granularity, IngestKeys, Ingested, Running, Store, UsageQuery,
};
use tollgate_wire::sync::{
    ClientsSeen, LeaseRequest, LicenseSeen, Period, SeatRequest, SeatRule, SyncRequest,
};
use tollgate_wire::{Meter, Source, UsageBatch, UsageRecord};

mod common;
use common::{backends, conformance, sqlite, Backend};

// 2026-06-15T10:00:00Z
const NOW: u64 = 1_781_517_600_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;
const ADMIN: &str = "admin-token-0123456789abcdef";

fn user(n: u32) -> String {
    format!("k1.{n:032x}")
}

/// A batch of `records`, each (account, license, user, hours before NOW, units).
fn batch(id: &str, records: &[(&str, &str, String, u64, u64)]) -> UsageBatch {
    UsageBatch {
        version: 1,
        batch_id: id.into(),
        source: Source {
            instance: "node-a".into(),
            vm_started_ms: 1,
        },
        sequence: 1,
        created_ms: NOW,
        records: records
            .iter()
            .map(|(account, license, user, hours_ago, units)| UsageRecord {
                account: (*account).into(),
                license: (*license).into(),
                feature: "search".into(),
                outcome: "allowed".into(),
                user: user.clone(),
                meter: Meter::Calls,
                units: *units,
                window_start_ms: NOW - hours_ago * HOUR,
                window_end_ms: NOW - hours_ago * HOUR + 1000,
            })
            .collect(),
    }
}

/// Old usage (100 and 99 days ago, several records per hour, two users) and recent usage
/// (today) of two accounts, in 40 batches: 480 records in all, 240 of them old.
fn old_and_new_usage(store: &dyn Store) -> Vec<UsageBatch> {
    let mut batches = Vec::new();
    for b in 0..40u64 {
        let mut records = Vec::new();
        for i in 0..12u64 {
            let account = if i % 2 == 0 { "acme" } else { "globex" };
            let license = if i % 2 == 0 { "lic-acme" } else { "lic-globex" };
            let hours_ago = if b < 20 {
                100 * 24 - (i % 3)
            } else {
                1 + (i % 2)
            };
            records.push((
                account,
                license,
                user(u32::try_from(i % 2).unwrap()),
                hours_ago,
                1 + b + i,
            ));
        }
        let batch = batch(&format!("batch-{b}"), &records);
        store
            .ingest(&batch, NOW - if b < 20 { 99 * DAY } else { HOUR })
            .unwrap();
        batches.push(batch);
    }
    batches
}

/// What finance and the usage API see: every account's billable usage over all time, and the
/// usage rows by day.
fn books(store: &dyn Store) -> (Value, Value) {
    let mut billable = serde_json::Map::new();
    for account in ["acme", "globex"] {
        let rows = store.billable_usage(account, 0, NOW + DAY, None).unwrap();
        billable.insert(account.into(), serde_json::to_value(rows).unwrap());
    }
    let rows = store
        .usage(&UsageQuery {
            granularity: Some(Granularity::Day),
            ..UsageQuery::default()
        })
        .unwrap();
    (Value::Object(billable), serde_json::to_value(rows).unwrap())
}

fn raw_records(store: &dyn Store) -> usize {
    store
        .records(0, NOW + DAY, 0, 100_000, u64::MAX / 2)
        .unwrap()
        .len()
}

conformance! {
    fn retention_rolls_old_usage_into_aggregates_and_every_unit_stays_counted_once(db, "privacy-retention") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let batches = old_and_new_usage(store);
        let before = books(store);
        assert_eq!(raw_records(store), 480);
        let old_units: u64 = batches[..20]
            .iter()
            .flat_map(|b| &b.records)
            .map(|r| r.units)
            .sum();
        assert!(
            store
                .active_users("acme", NOW - 101 * DAY, NOW - 98 * DAY, None)
                .unwrap()
                .users
                > 0
        );

        // Small chunks: many transactions, each rolling up and deleting the same records.
        let cut = NOW - 62 * DAY;
        let mut total = Retained::default();
        loop {
            let done = store.apply_retention(cut, 7).unwrap();
            total.add(done);
            if done.records == 0 {
                break;
            }
        }
        assert_eq!(total.records, 240, "{db:?}");
        assert_eq!(total.units, old_units);
        assert_eq!(raw_records(store), 240, "only today's records stay raw");
        assert_eq!(
            books(store),
            before,
            "billing and usage queries read the aggregates"
        );
        assert_eq!(
            store
                .active_users("acme", NOW - 101 * DAY, NOW - 98 * DAY, None)
                .unwrap()
                .users,
            0,
            "aggregates carry no end user"
        );
        assert_eq!(
            store
                .active_users("acme", NOW - DAY, NOW, None)
                .unwrap()
                .users,
            1,
            "recent usage keeps its users"
        );

        // Again: nothing to do. A filter retrying an old batch: still a duplicate.
        assert_eq!(
            privacy::apply_retention(store, cut, 10).unwrap(),
            Retained::default()
        );
        assert!(matches!(
            store.ingest(&batches[3], NOW).unwrap(),
            Ingested::Duplicate { .. }
        ));
        assert_eq!(books(store), before);
    }
}

conformance! {
    fn replicas_running_retention_at_once_count_every_unit_once(db, "privacy-retention-race") {
        let store = open(&db.url()).unwrap();
        old_and_new_usage(store.as_ref());
        let before = books(store.as_ref());
        let url = db.url();
        let rolled: u64 = std::thread::scope(|scope| {
            let replicas: Vec<_> = (0..4)
                .map(|_| {
                    let url = url.clone();
                    scope.spawn(move || {
                        let replica = open(&url).unwrap();
                        let mut records = 0;
                        loop {
                            let done = replica.apply_retention(NOW - 62 * DAY, 5).unwrap();
                            records += done.records;
                            if done.records == 0 {
                                break records;
                            }
                        }
                    })
                })
                .collect();
            replicas.into_iter().map(|r| r.join().unwrap()).sum()
        });
        assert_eq!(rolled, 240, "{db:?}");
        assert_eq!(books(store.as_ref()), before, "{db:?}");
    }
}

#[test]
fn the_worker_applies_retention_on_its_schedule() {
    for (db, db_off) in backends("privacy-worker")
        .into_iter()
        .zip(backends("privacy-worker-off"))
    {
        let store: Arc<dyn Store> = Arc::from(open(&db.url()).unwrap());
        old_and_new_usage(store.as_ref());
        let mut state = AppState::new(Arc::clone(&store), IngestKeys::default());
        state.billing = BillingSettings {
            finalize_grace_ms: None,
            raw_usage_retention_ms: Some(62 * DAY),
            ..BillingSettings::default()
        };
        let mut worker = Worker::default();
        worker.step(&state, NOW).unwrap();
        assert_eq!(raw_records(store.as_ref()), 240, "{db:?}");
        // Off: nothing happens.
        let store_off: Arc<dyn Store> = Arc::from(open(&db_off.url()).unwrap());
        old_and_new_usage(store_off.as_ref());
        let off = AppState::new(Arc::clone(&store_off), IngestKeys::default());
        Worker::default().step(&off, NOW).unwrap();
        assert_eq!(raw_records(store_off.as_ref()), 480, "{db_off:?}");
    }
}

/// Something of every kind the collector keeps about `account`, with `license`, used by the end
/// user `subject` from the client `client`; the batch of its recent usage.
fn everything_about(
    store: &dyn Store,
    account: &str,
    license: &str,
    subject: &str,
    client: &str,
) -> UsageBatch {
    // Batch ids name a filter instance and a sequence, never an account.
    static BATCHES: AtomicU32 = AtomicU32::new(0);
    let next = || format!("node-b/{}", BATCHES.fetch_add(1, Ordering::Relaxed));
    let recent = batch(&next(), &[(account, license, subject.to_string(), 2, 5)]);
    store.ingest(&recent, NOW).unwrap();
    let old = [(account, license, subject.to_string(), 24 * 100, 3)];
    store.ingest(&batch(&next(), &old), NOW - 99 * DAY).unwrap();
    store.apply_retention(NOW - 62 * DAY, 100).unwrap();
    store
        .record_licenses(
            &[LicenseSeen {
                account: account.into(),
                license: license.into(),
                plan: "pro".into(),
            }],
            NOW,
        )
        .unwrap();
    store
        .add_license(&IssuedLicense {
            license: license.into(),
            account: account.into(),
            plan: "pro".into(),
            features: vec!["search".into()],
            limits: None,
            not_before_ms: NOW - 30 * DAY,
            expires_ms: NOW + DAY,
            kid: "kid-1".into(),
            issued_ms: NOW - 30 * DAY,
            revoked_ms: None,
        })
        .unwrap();
    let request = SyncRequest {
        version: 1,
        instance: "node-a/1".into(),
        leases: vec![LeaseRequest {
            lease_id: format!("lease-{account}"),
            account: account.into(),
            license: license.into(),
            plan: "pro".into(),
            meter: Meter::Calls,
            period: Period::Day,
            limit: 100,
            want: 10,
        }],
        returns: Vec::new(),
        licenses: Vec::new(),
        seats: Vec::new(),
        clients: Vec::new(),
    };
    sync(store, &ControlPlane::default(), &request, NOW).unwrap();
    store.set_revoked(license, Some("chargeback"), NOW).unwrap();
    store.set_suspended(account, Some("unpaid"), NOW).unwrap();
    let budget = Budget {
        period: Period::Month,
        amount: Decimal::new(100, 0),
    };
    store.set_budget(account, Some(&budget), NOW).unwrap();
    let seat = SeatRequest {
        account: account.into(),
        license: license.into(),
        user: subject.into(),
        rule: SeatRule::Named {
            limit: 3,
            per: Period::Month,
        },
    };
    store
        .take_seat(
            &SeatAsk {
                request: &seat,
                period_start_ms: NOW - DAY,
                period_end_ms: NOW + 20 * DAY,
                ttl_ms: 30_000,
            },
            NOW,
        )
        .unwrap();
    let seen = ClientsSeen {
        account: account.into(),
        license: license.into(),
        clients: vec![client.into()],
        max_clients: 5,
        window_ms: 60_000,
        block: false,
    };
    store.note_clients(&seen, NOW).unwrap();
    store
        .detect_sharing(&SharingDetection {
            license: license.into(),
            account: account.into(),
            clients: 9,
            max_clients: 5,
            window_ms: 60_000,
            detected_ms: NOW,
            blocked_until_ms: None,
        })
        .unwrap();
    let event = tollgate_collector::webhooks::event(
        format!("invoice.finalized:inv-{account}"),
        "invoice.finalized",
        json!({"invoice": {"account": account, "total": "12.00"}}),
        NOW,
    );
    store
        .finalize_invoice(
            &StoredInvoice {
                invoice_id: format!("inv-{account}"),
                account: account.into(),
                period_start_ms: NOW - 20 * DAY,
                period_end_ms: NOW - DAY,
                currency: "EUR".into(),
                total: "12.00".into(),
                body: json!({"account": account, "lines": []}),
                finalized_ms: NOW,
                cut_ms: NOW,
            },
            Some(&event),
        )
        .unwrap();
    store
        .record_delivery(
            &Delivery {
                event_id: event.event_id.clone(),
                attempt: 1,
                at_ms: NOW,
                status: Some(200),
                error: None,
                duration_ms: 3,
            },
            DeliveryOutcome::Delivered,
        )
        .unwrap();
    let sharing = tollgate_collector::webhooks::event(
        format!("license.sharing_detected:{license}:{NOW}"),
        "license.sharing_detected",
        json!({"license": license, "clients": 9}),
        NOW,
    );
    store.enqueue_event(&sharing).unwrap();
    recent
}

/// Every cell of every table, as text: what is left in the database.
fn every_cell(db: &Backend) -> Vec<String> {
    let mut cells = Vec::new();
    match db {
        Backend::Sqlite(path) => {
            let conn = rusqlite::Connection::open(path).unwrap();
            let tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for table in tables {
                let mut statement = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
                let columns = statement.column_count();
                let mut rows = statement.query([]).unwrap();
                while let Some(row) = rows.next().unwrap() {
                    for i in 0..columns {
                        if let rusqlite::types::ValueRef::Text(t) = row.get_ref(i).unwrap() {
                            cells.push(format!("{table}: {}", String::from_utf8_lossy(t)));
                        }
                    }
                }
            }
        }
        _ => {
            let mut client = postgres::Client::connect(&db.url(), postgres::NoTls).unwrap();
            let tables: Vec<String> = client
                .query(
                    "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            for table in tables {
                for row in client
                    .query(&format!("SELECT t::TEXT FROM \"{table}\" t"), &[])
                    .unwrap()
                {
                    cells.push(format!("{table}: {}", row.get::<_, String>(0)));
                }
            }
        }
    }
    cells
}

/// The SQLite database's files, byte by byte: deleted rows must not linger in free pages or in
/// the write-ahead log.
fn in_sqlite_files(db: &Backend, needle: &str) -> Vec<String> {
    let Backend::Sqlite(path) = db else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(bytes) = std::fs::read(&file) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(file.display().to_string());
            }
        }
    }
    found
}

/// `needle` is in no cell of any table, nor anywhere in the SQLite files.
fn assert_gone(db: &Backend, needle: &str) {
    let left: Vec<String> = every_cell(db)
        .into_iter()
        .filter(|c| c.contains(needle))
        .collect();
    assert!(left.is_empty(), "{db:?}: `{needle}` is still in {left:?}");
    assert!(
        in_sqlite_files(db, needle).is_empty(),
        "`{needle}` is still in the SQLite files"
    );
}

conformance! {
    fn an_account_is_exported_then_erased_and_nothing_of_it_remains(db, "privacy-erase") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let acme_recent = everything_about(
            store,
            "acme-gdpr",
            "lic-gdpr-7",
            &user(7),
            "k1.c0ffee00c0ffee00c0ffee00c0ffee00",
        );
        everything_about(
            store,
            "globex",
            "lic-globex-1",
            &user(8),
            "k1.beef0000beef0000beef0000beef0000",
        );
        let globex_before = store.export_account("globex").unwrap();

        let export = store.export_account("acme-gdpr").unwrap();
        for (table, rows) in [
            ("usage_records", 1),
            ("usage_rollups", 1),
            ("leases", 1),
            ("quota_allocations", 1),
            ("seats", 1),
            ("license_clients", 1),
            ("sharing_detections", 1),
            ("licenses", 1),
            ("issued_licenses", 1),
            ("revoked_licenses", 1),
            ("invoices", 1),
            ("budgets", 1),
            ("suspended_accounts", 1),
            ("webhook_events", 2),
            ("webhook_deliveries", 1),
        ] {
            assert_eq!(
                export[table].len(),
                rows,
                "{db:?} {table}: {:?}",
                export[table]
            );
        }
        assert_eq!(export["usage_records"][0]["units"], json!(5));
        assert_eq!(export["usage_rollups"][0]["units"], json!(3));
        assert!(export
            .values()
            .flatten()
            .all(|row| !row.values().any(|v| v == "globex")));

        // The license is valid until NOW + DAY: erasing now would leave it usable.
        let refused = privacy::erase_account(store, "acme-gdpr", NOW).unwrap_err();
        assert!(format!("{refused:#}").contains("lic-gdpr-7"), "{refused:#}");
        assert_eq!(store.export_account("acme-gdpr").unwrap(), export);

        let erased = privacy::erase_account(store, "acme-gdpr", NOW + DAY).unwrap();
        let exported: u64 = export.values().map(|rows| rows.len() as u64).sum();
        assert_eq!(erased.values().sum::<u64>(), exported, "{erased:?}");

        for needle in [
            "acme-gdpr",
            "lic-gdpr-7",
            user(7).as_str(),
            "c0ffee00c0ffee00",
        ] {
            assert_gone(&db, needle);
        }
        assert_eq!(
            store.export_account("globex").unwrap(),
            globex_before,
            "other accounts are untouched"
        );
        assert!(store
            .export_account("acme-gdpr")
            .unwrap()
            .values()
            .all(Vec::is_empty));

        // A filter retrying the erased account's batch: its id is known, nothing comes back.
        assert!(matches!(
            store.ingest(&acme_recent, NOW).unwrap(),
            Ingested::Duplicate { .. }
        ));
        assert!(every_cell(&db).iter().all(|c| !c.contains("acme-gdpr")));
    }
}

conformance! {
    fn an_end_user_is_unlinked_from_usage_that_stays_billed(db, "privacy-subject") {
        let store = open(&db.url()).unwrap();
        let store = store.as_ref();
        let alice = user(0xa11ce);
        let client = "k1.a11ce000a11ce000a11ce000a11ce000";
        let _ = everything_about(store, "acme", "lic-acme", &alice, client);
        store
            .ingest(
                &batch(
                    "b-2",
                    &[
                        ("globex", "lic-globex", alice.clone(), 1, 4),
                        ("globex", "lic-globex", user(2), 1, 6),
                    ],
                ),
                NOW,
            )
            .unwrap();
        let billed = books(store);

        let export = privacy::export_subject(store, &alice).unwrap();
        assert_eq!(export["usage_records"].len(), 2, "{export:?}");
        assert_eq!(export["seats"].len(), 1);
        assert_eq!(
            privacy::export_subject(store, client).unwrap()["license_clients"].len(),
            1
        );
        assert!(
            privacy::export_subject(store, "alice").is_err(),
            "a raw id is not a pseudonym"
        );

        let erased = privacy::erase_subject(store, &alice).unwrap();
        assert_eq!(erased["usage_records"], 2);
        assert_eq!(erased["seats"], 1);
        assert_eq!(
            privacy::erase_subject(store, client).unwrap()["license_clients"],
            1
        );

        assert_eq!(
            books(store),
            billed,
            "{db:?}: the calls stay billed to their accounts"
        );
        assert_eq!(
            store
                .active_users("globex", NOW - DAY, NOW, None)
                .unwrap()
                .users,
            1,
            "the other user still counts"
        );
        for needle in [alice.as_str(), client] {
            assert_gone(&db, needle);
        }
    }
}

fn call(method: &str, url: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = ureq::request(method, url);
    if let Some(token) = token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let (status, text) = match request.call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn over_http_export_and_erase_need_the_admin_token_and_a_valid_license_blocks_erasure() {
    let db = &sqlite("privacy-http");
    let store = open(&db.url()).unwrap();
    let now = u64::try_from(tollgate_collector::clock::now_ms()).unwrap();
    // The license expires a day after NOW, long before the real now: erasable.
    let _ = everything_about(
        store.as_ref(),
        "acme",
        "lic-acme",
        &user(1),
        "k1.0000000000000000000000000000c11e",
    );
    store
        .add_license(&IssuedLicense {
            license: "lic-live".into(),
            account: "initech".into(),
            plan: "pro".into(),
            features: vec!["search".into()],
            limits: None,
            not_before_ms: now - DAY,
            expires_ms: now + DAY,
            kid: "kid-1".into(),
            issued_ms: now - DAY,
            revoked_ms: None,
        })
        .unwrap();
    let mut state = AppState::new(Arc::from(store), IngestKeys::default());
    state.admin_token = Some(ADMIN.into());
    let c = Running::start_state(0, state).unwrap();

    let subject = format!("/v1/admin/subjects/{}/data", user(1));
    for path in ["/v1/admin/accounts/acme/data", subject.as_str()] {
        for method in ["GET", "DELETE"] {
            assert_eq!(call(method, &c.url(path), None).0, 401, "{method} {path}");
            assert_eq!(
                call(method, &c.url(path), Some("wrong-token-0123456789")).0,
                401
            );
        }
    }
    let (status, export) = call("GET", &c.url("/v1/admin/accounts/acme/data"), Some(ADMIN));
    assert_eq!(status, 200);
    assert_eq!(export["tables"]["usage_records"][0]["account"], "acme");
    let (status, export) = call("GET", &c.url(&subject), Some(ADMIN));
    assert_eq!(status, 200);
    assert_eq!(export["tables"]["seats"].as_array().unwrap().len(), 1);
    assert_eq!(
        call("GET", &c.url("/v1/admin/subjects/alice/data"), Some(ADMIN)).0,
        400
    );

    let (status, body) = call(
        "DELETE",
        &c.url("/v1/admin/accounts/initech/data"),
        Some(ADMIN),
    );
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("lic-live"),
        "{body}"
    );

    let (status, body) = call("DELETE", &c.url(&subject), Some(ADMIN));
    assert_eq!(
        (status, body["erased"]["seats"].clone()),
        (200, json!(1)),
        "{body}"
    );
    let (status, body) = call(
        "DELETE",
        &c.url("/v1/admin/accounts/acme/data"),
        Some(ADMIN),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["erased"]["usage_records"], 1);
    let (_, export) = call("GET", &c.url("/v1/admin/accounts/acme/data"), Some(ADMIN));
    assert!(export["tables"]
        .as_object()
        .unwrap()
        .values()
        .all(|rows| rows.as_array().unwrap().is_empty()));
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-collector"))
        .args(args)
        .env_remove("TOLLGATE_DATABASE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_command_line_finds_a_person_by_pseudonym_exports_and_erases() {
    let db = &sqlite("privacy-cli");
    let secret = "pseudonym-secret-0123456789abcdef0123";
    let pseudonyms =
        tollgate_core::pseudonym::Pseudonymizer::new("pseudonyms", "k1", secret).unwrap();
    let bob = pseudonyms.pseudonym(tollgate_core::pseudonym::Subject::User, "bob@example.com");
    {
        let store = open(&db.url()).unwrap();
        let _ = everything_about(store.as_ref(), "acme", "lic-acme", &bob, &user(3));
    }
    let url = db.url();
    let (ok, made) = cli(&[
        "pseudonym",
        "--key-id",
        "k1",
        "--secret",
        secret,
        "--user",
        "bob@example.com",
    ]);
    assert!(ok, "{made}");
    assert_eq!(
        made.trim(),
        bob,
        "the collector computes the filter's pseudonym"
    );

    let (ok, text) = cli(&["export-data", "--database", &url, "--subject", &bob]);
    assert!(ok, "{text}");
    let export: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(export["usage_records"].as_array().unwrap().len(), 1);

    let (ok, text) = cli(&["erase", "--database", &url, "--subject", &bob]);
    assert!(!ok && text.contains("--yes"), "{text}");
    let (ok, text) = cli(&["erase", "--database", &url, "--subject", &bob, "--yes"]);
    assert!(ok, "{text}");
    let (_, text) = cli(&["export-data", "--database", &url, "--subject", &bob]);
    let export: Value = serde_json::from_str(&text).unwrap();
    assert!(export
        .as_object()
        .unwrap()
        .values()
        .all(|rows| rows.as_array().unwrap().is_empty()));

    let (ok, text) = cli(&["retention", "--database", &url, "--older-than-days", "30"]);
    assert!(!ok && text.contains("at least 62"), "{text}");
    let (ok, text) = cli(&["retention", "--database", &url, "--older-than-days", "62"]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&["erase", "--database", &url, "--account", "acme", "--yes"]);
    assert!(ok, "{text}");
    let (_, text) = cli(&["export-data", "--database", &url, "--account", "acme"]);
    let export: Value = serde_json::from_str(&text).unwrap();
    assert!(export
        .as_object()
        .unwrap()
        .values()
        .all(|rows| rows.as_array().unwrap().is_empty()));
}
