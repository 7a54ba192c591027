//! Rating: fixed usage in, an exact invoice out (golden files), the seed's pricing examples, and
//! the same invoice from usage stored in SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use rust_decimal::Decimal;
use tollgate_collector::billing::{self, Invoice, LineKind};
use tollgate_collector::catalog::Catalog;
use tollgate_collector::storage::{BillableUsage, IssuedLicense};
use tollgate_wire::{Meter, Source, UsageBatch, UsageRecord, VERSION};

use common::conformance;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn catalog() -> Catalog {
    Catalog::from_json(&std::fs::read(golden_dir().join("catalog.json")).unwrap()).unwrap()
}

/// November 2026 in Berlin: 2026-10-31T23:00Z to 2026-11-30T23:00Z.
const NOV_START: u64 = 1_793_487_600_000;
const NOV_END: u64 = 1_796_079_600_000;

fn usage(license: &str, plan: &str, feature: &str, meter: Meter, units: u64) -> BillableUsage {
    BillableUsage {
        license: license.into(),
        plan: plan.into(),
        feature: feature.into(),
        meter: meter.as_str().into(),
        units,
    }
}

fn issued(license: &str, account: &str, plan: &str) -> IssuedLicense {
    IssuedLicense {
        license: license.into(),
        account: account.into(),
        plan: plan.into(),
        features: vec![],
        limits: None,
        not_before_ms: NOV_START - 86_400_000,
        expires_ms: NOV_END + 86_400_000,
        kid: "k1".into(),
        issued_ms: NOV_START - 86_400_000,
        revoked_ms: None,
    }
}

/// The invoice must equal its golden file, byte for byte. `UPDATE_GOLDEN=1` rewrites a file
/// that differs (on purpose, and then reviewed like code), and still fails that run: a run
/// that rewrites its golden files compares nothing.
fn assert_golden(name: &str, invoice: &Invoice) {
    let path = golden_dir().join(format!("{name}.invoice.json"));
    let text = serde_json::to_string_pretty(invoice).unwrap() + "\n";
    let golden = std::fs::read_to_string(&path).ok();
    if golden.as_deref() == Some(text.as_str()) {
        return;
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
        panic!(
            "{} rewritten: review the diff, then run again without UPDATE_GOLDEN",
            path.display()
        );
    }
    let Some(golden) = golden else {
        panic!("{} is missing: run with UPDATE_GOLDEN=1", path.display());
    };
    assert_eq!(text, golden, "the invoice for {name} changed");
}

fn dec(text: &str) -> Decimal {
    text.parse().unwrap()
}

#[test]
fn per_call() {
    // 12,345 calls at $0.002.
    let rows = [usage("lic-m", "metered", "search", Meter::Calls, 12_345)];
    let invoice = billing::rate(&catalog(), "acme", (NOV_START, NOV_END), &rows, &[], &[]).unwrap();
    assert_eq!(invoice.total, dec("24.69"));
    assert_eq!(invoice.lines.len(), 1);
    assert_eq!(invoice.period_start, "2026-11-01T00:00:00+01:00");
    assert_golden("per_call", &invoice);
}

#[test]
fn per_hour_of_a_premium_feature() {
    // The seed's $15 per hour of generative design: 1.5 hours of processing time is $22.50.
    // Other features of the plan are not priced for processing time.
    let rows = [
        usage(
            "lic-d",
            "design",
            "generative_design",
            Meter::ProcessingNs,
            5_400_000_000_000,
        ),
        usage(
            "lic-d",
            "design",
            "viewer",
            Meter::ProcessingNs,
            9_000_000_000_000,
        ),
        usage("lic-d", "design", "generative_design", Meter::Calls, 40),
    ];
    let invoice =
        billing::rate(&catalog(), "studio", (NOV_START, NOV_END), &rows, &[], &[]).unwrap();
    assert_eq!(invoice.total, dec("22.50"));
    assert_eq!(invoice.lines.len(), 1);
    assert_eq!(
        invoice.lines[0].feature.as_deref(),
        Some("generative_design")
    );
    assert_golden("per_hour_premium_feature", &invoice);
}

#[test]
fn hybrid_subscription_with_overage() {
    // $49 a month with 10,000 calls included; 150,000 calls: 140,000 billable, the first
    // 100,000 at $0.001 and 40,000 at $0.0005. 800 GB of responses at $0.09/GB = $72, capped at
    // $50. A second license of the same plan without usage pays its fee.
    let rows = [
        usage("lic-p1", "pro", "search", Meter::Calls, 90_000),
        usage("lic-p1", "pro", "export", Meter::Calls, 60_000),
        usage(
            "lic-p1",
            "pro",
            "export",
            Meter::ResponseBytes,
            800_000_000_000,
        ),
    ];
    let licenses = [
        issued("lic-p1", "acme", "pro"),
        issued("lic-p2", "acme", "pro"),
    ];
    let invoice = billing::rate(
        &catalog(),
        "acme",
        (NOV_START, NOV_END),
        &rows,
        &[],
        &licenses,
    )
    .unwrap();
    let amounts: Vec<(LineKind, String, Decimal)> = invoice
        .lines
        .iter()
        .map(|l| (l.kind, l.license.clone(), l.amount))
        .collect();
    assert_eq!(
        amounts,
        vec![
            (LineKind::Subscription, "lic-p1".into(), dec("49.00")),
            (LineKind::Usage, "lic-p1".into(), dec("100.00")),
            (LineKind::Usage, "lic-p1".into(), dec("20.00")),
            (LineKind::Usage, "lic-p1".into(), dec("72.00")),
            (LineKind::Cap, "lic-p1".into(), dec("-22.00")),
            (LineKind::Subscription, "lic-p2".into(), dec("49.00")),
        ]
    );
    assert_eq!(invoice.total, dec("268.00"));
    assert_golden("hybrid_subscription_overage", &invoice);
}

#[test]
fn volume_tiers_and_a_minimum() {
    // Volume pricing: 2,500 calls all at the second tier's $0.008 = $20, topped up to the
    // plan's $25 minimum. 20,000 calls reach the last tier: 20,000 × $0.005 + $2 flat = $102.
    let small = [usage("lic-v", "volume", "api", Meter::Calls, 2_500)];
    let invoice =
        billing::rate(&catalog(), "small", (NOV_START, NOV_END), &small, &[], &[]).unwrap();
    assert_eq!(invoice.total, dec("25.00"));
    assert_eq!(invoice.lines[1].kind, LineKind::Minimum);
    assert_eq!(invoice.lines[1].amount, dec("5.00"));
    assert_golden("volume_minimum", &invoice);
    let big = [usage("lic-v", "volume", "api", Meter::Calls, 20_000)];
    let invoice = billing::rate(&catalog(), "big", (NOV_START, NOV_END), &big, &[], &[]).unwrap();
    assert_eq!(invoice.total, dec("102.00"));
}

#[test]
fn usage_of_a_plan_without_prices_is_listed_not_charged() {
    let rows = [usage("lic-x", "", "api", Meter::Calls, 7)];
    let invoice = billing::rate(&catalog(), "acme", (NOV_START, NOV_END), &rows, &[], &[]).unwrap();
    assert_eq!(invoice.total, Decimal::ZERO);
    assert_eq!(invoice.unpriced.len(), 1);
    assert_eq!(invoice.unpriced[0].units, 7);
}

#[test]
fn a_forecast_extrapolates_usage_and_rates_it() {
    // A third of the way through the period, 20,000 calls: 60,000 forecast. Minus 10,000
    // included, 50,000 at $0.001, plus the fee: $99.
    let rows = [usage("lic-p1", "pro", "search", Meter::Calls, 20_000)];
    let third = NOV_START + (NOV_END - NOV_START) / 3;
    let forecast = billing::forecast(
        &catalog(),
        "acme",
        (NOV_START, NOV_END),
        &rows,
        &[],
        &[],
        &Default::default(),
        &Default::default(),
        third,
    )
    .unwrap()
    .unwrap();
    assert_eq!(forecast.total, dec("99.00"));
    assert!(billing::forecast(
        &catalog(),
        "acme",
        (NOV_START, NOV_END),
        &rows,
        &[],
        &[],
        &Default::default(),
        &Default::default(),
        NOV_START
    )
    .unwrap()
    .is_none());
}

#[test]
fn a_stopped_license_is_forecast_at_its_usage_so_far() {
    // The same 20,000 calls a third of the way through, but the license is revoked (or its
    // account suspended): no more calls will be served, so 10,000 billable calls at $0.001
    // plus the fee: $59, not $99.
    let rows = [usage("lic-p1", "pro", "search", Meter::Calls, 20_000)];
    let third = NOV_START + (NOV_END - NOV_START) / 3;
    let stopped = ["lic-p1".to_string()].into_iter().collect();
    let forecast = billing::forecast(
        &catalog(),
        "acme",
        (NOV_START, NOV_END),
        &rows,
        &[],
        &[],
        &Default::default(),
        &stopped,
        third,
    )
    .unwrap()
    .unwrap();
    assert_eq!(forecast.total, dec("59.00"));
}

fn line(meter: Meter, quantity: u64, unit_price: &str, per: u64) -> billing::Line {
    billing::Line {
        kind: LineKind::Usage,
        license: "lic".into(),
        plan: "pro".into(),
        feature: None,
        meter: Some(meter.as_str().into()),
        tier: None,
        late: false,
        description: meter.as_str().into(),
        quantity,
        unit_price: dec(unit_price),
        per,
        amount: dec("0"),
    }
}

#[test]
fn lines_are_shown_in_hours_and_gigabytes_at_the_invoice_s_prices() {
    let show = |l: &billing::Line| {
        let d = billing::line_display(l);
        (
            d.quantity.to_string(),
            d.unit,
            d.unit_price.to_string(),
            d.per,
        )
    };
    // 1.5 hours at 15 per hour (the catalogue's 15 per 3.6e12 ns).
    assert_eq!(
        show(&line(
            Meter::ProcessingNs,
            5_400_000_000_000,
            "15",
            3_600_000_000_000
        )),
        ("1.5".into(), "hours", "15".into(), "hour".into())
    );
    // 2.5 GB at 0.0000000002 per byte = 0.2 per GB.
    assert_eq!(
        show(&line(
            Meter::ResponseBytes,
            2_500_000_000,
            "0.0000000002",
            1
        )),
        ("2.5".into(), "GB", "0.2".into(), "GB".into())
    );
    // Calls keep the catalogue's `per`.
    assert_eq!(
        show(&line(Meter::Calls, 2_000, "1", 1000)),
        ("2000".into(), "calls", "1".into(), "1000 calls".into())
    );
    assert_eq!(
        show(&line(Meter::Calls, 100, "0.01", 1)),
        ("100".into(), "calls", "0.01".into(), "call".into())
    );
}

fn batch(id: &str, records: Vec<UsageRecord>) -> UsageBatch {
    UsageBatch {
        version: VERSION,
        batch_id: id.into(),
        source: Source {
            instance: "test".into(),
            vm_started_ms: 1,
        },
        sequence: 1,
        created_ms: NOV_START + 1000,
        records,
    }
}

fn record(
    license: &str,
    feature: &str,
    outcome: &str,
    meter: Meter,
    units: u64,
    at: u64,
) -> UsageRecord {
    UsageRecord {
        account: "acme".into(),
        license: license.into(),
        feature: feature.into(),
        outcome: outcome.into(),
        user: String::new(),
        meter,
        units,
        window_start_ms: at,
        window_end_ms: at + 1000,
    }
}

conformance! {
    fn the_invoice_drafted_from_stored_usage_is_the_golden_one_on_every_backend(db, "billing") {
        let store = tollgate_collector::open(&db.url()).unwrap();
        store.add_license(&issued("lic-p1", "acme", "pro")).unwrap();
        store.add_license(&issued("lic-p2", "acme", "pro")).unwrap();
        let mid = NOV_START + 86_400_000;
        // The usage of the hybrid example, split over batches and windows; refused calls
        // and usage outside the period are not billed; a batch sent twice counts once.
        let first = batch(
            "b1",
            vec![
                record("lic-p1", "search", "allowed", Meter::Calls, 50_000, mid),
                record("lic-p1", "export", "allowed", Meter::Calls, 60_000, mid),
                record("lic-p1", "search", "rate_limited", Meter::Calls, 999, mid),
            ],
        );
        store.ingest(&first, mid).unwrap();
        store.ingest(&first, mid).unwrap();
        store
            .ingest(
                &batch(
                    "b2",
                    vec![
                        record(
                            "lic-p1",
                            "search",
                            "allowed",
                            Meter::Calls,
                            40_000,
                            mid + 5000,
                        ),
                        record(
                            "lic-p1",
                            "export",
                            "allowed",
                            Meter::ResponseBytes,
                            800_000_000_000,
                            mid + 5000,
                        ),
                        record(
                            "lic-p1",
                            "search",
                            "allowed",
                            Meter::Calls,
                            1_000_000,
                            NOV_END,
                        ),
                        record(
                            "lic-p1",
                            "search",
                            "allowed",
                            Meter::Calls,
                            1_000_000,
                            NOV_START - 1000,
                        ),
                    ],
                ),
                mid,
            )
            .unwrap();
        let draft = billing::draft(store.as_ref(), &catalog(), "acme", mid, NOV_END + 1).unwrap();
        assert_eq!(draft.status, "complete");
        assert_eq!(draft.invoice.total, dec("268.00"));
        assert_golden("hybrid_subscription_overage", &draft.invoice);
    }
}

#[test]
fn distinct_active_users_are_priced_per_license_with_tiers_and_a_cap() {
    let users = |n: u64| std::collections::BTreeMap::from([("lic-t1".to_string(), n)]);
    let rows = [usage("lic-t1", "team", "search", Meter::Calls, 1_000)];
    let rate = |n| {
        billing::rate_with_users(
            &catalog(),
            "acme",
            (NOV_START, NOV_END),
            &rows,
            &[],
            &[],
            &users(n),
        )
        .unwrap()
    };
    // 5 users are included (a first tier at 0), the 3 others cost 8.00 each.
    let invoice = rate(8);
    let lines: Vec<_> = invoice
        .lines
        .iter()
        .filter(|l| l.kind == LineKind::ActiveUsers)
        .map(|l| (l.quantity, l.amount))
        .collect();
    assert_eq!(lines, [(5, dec("0.00")), (3, dec("24.00"))]);
    assert_eq!(invoice.total, dec("44.00"));
    // 20 users would be 120.00: the cap takes it back to 100.00.
    assert_eq!(rate(20).total, dec("120.00"));
    assert_eq!(rate(0).total, dec("20.00"));
}

conformance! {
    fn active_users_drafted_from_stored_usage_are_the_golden_ones_on_every_backend(db, "billing-users") {
        let store = tollgate_collector::open(&db.url()).unwrap();
        store
            .add_license(&issued("lic-t1", "acme", "team"))
            .unwrap();
        let mid = NOV_START + 86_400_000;
        let user = |name: &str, outcome: &str, at: u64| UsageRecord {
            user: format!("k1.{name}"),
            ..record("lic-t1", "search", outcome, Meter::Calls, 3, at)
        };
        // Seven users served (one of them twice, in two batches), one only refused, one only
        // outside the period: seven active users, five included, two at 8.00.
        let mut records: Vec<UsageRecord> = (1..=7)
            .map(|i| user(&format!("u{i}"), "allowed", mid))
            .collect();
        records.push(user("refused", "seat_limit_reached", mid));
        records.push(user("earlier", "allowed", NOV_START - 1000));
        store.ingest(&batch("u1", records), mid).unwrap();
        store
            .ingest(&batch("u2", vec![user("u1", "allowed", mid + 5000)]), mid)
            .unwrap();
        let draft = billing::draft(store.as_ref(), &catalog(), "acme", mid, NOV_END + 1).unwrap();
        assert_eq!(draft.invoice.total, dec("36.00"), "{}", db.url());
        assert_golden("active_users", &draft.invoice);
    }
}

#[test]
fn the_worker_finalises_the_last_period_once_its_grace_has_passed() {
    let dir = std::env::temp_dir().join(format!("tollgate-finalize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    std::fs::copy(golden_dir().join("catalog.json"), &plans).unwrap();
    let store =
        tollgate_collector::open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = tollgate_collector::AppState::new(
        std::sync::Arc::from(store),
        tollgate_collector::IngestKeys::default(),
    );
    state.control.catalog =
        tollgate_collector::catalog::CatalogFileWatch::open(Some(&plans)).unwrap();
    state.billing.finalize_grace_ms = Some(3_600_000);
    state
        .store
        .add_license(&issued("lic-p1", "acme", "pro"))
        .unwrap();
    state
        .store
        .ingest(
            &batch(
                "b1",
                vec![record(
                    "lic-p1",
                    "search",
                    "allowed",
                    Meter::Calls,
                    150_000,
                    NOV_START + 5000,
                )],
            ),
            NOV_START,
        )
        .unwrap();
    let mut worker = tollgate_collector::worker::Worker::default();
    let november = |store: &dyn tollgate_collector::Store| {
        store
            .invoices(Some("acme"))
            .unwrap()
            .into_iter()
            .find(|i| i.period_start_ms == NOV_START)
    };
    // Within the hour after November ended: not yet (late usage may still come in). October
    // is finalised: the license was valid on its last day, so it pays October's fee.
    worker.step(&state, NOV_END + 1000).unwrap();
    assert!(november(state.store.as_ref()).is_none());
    let invoices = state.store.invoices(Some("acme")).unwrap();
    assert_eq!(invoices.len(), 1);
    assert_eq!(invoices[0].total, "49.00");
    worker.step(&state, NOV_END + 3_600_000).unwrap();
    let finalized = november(state.store.as_ref()).expect("November finalised");
    assert_eq!(finalized.total, "169.00");
    assert_eq!(finalized.cut_ms, NOV_END + 3_600_000 - 60_000);
    // Frozen: usage of November arriving after the cut does not change it...
    state
        .store
        .ingest(
            &batch(
                "b2",
                vec![record(
                    "lic-p1",
                    "search",
                    "allowed",
                    Meter::Calls,
                    1000,
                    NOV_START + 9000,
                )],
            ),
            NOV_END + 3_700_000,
        )
        .unwrap();
    let mut fresh = tollgate_collector::worker::Worker::default();
    fresh.step(&state, NOV_END + 7_200_000).unwrap();
    assert_eq!(november(state.store.as_ref()).unwrap().total, "169.00");
    // ...it is billed once, as late usage, by December's invoice: 1,000 calls at the first
    // tier's $0.001, no included calls (those were November's), and the fee.
    let december = billing::draft(
        state.store.as_ref(),
        &state.control.catalog.current(),
        "acme",
        NOV_END + 86_400_000,
        NOV_END + 86_400_000,
    )
    .unwrap();
    let late: Vec<_> = december.invoice.lines.iter().filter(|l| l.late).collect();
    assert_eq!(late.len(), 1, "{:?}", december.invoice.lines);
    assert_eq!((late[0].quantity, late[0].amount), (1000, dec("1.00")));
    assert_eq!(december.invoice.total, dec("50.00"));
    // A period cannot be finalised while it runs, nor out of order.
    let catalog = state.control.catalog.current();
    let running = billing::finalize(
        state.store.as_ref(),
        &catalog,
        "acme",
        NOV_END + 1,
        NOV_END + 2,
    );
    assert!(format!("{:#}", running.unwrap_err()).contains("has not ended"));
    let _ = std::fs::remove_dir_all(&dir);
}

conformance! {
    /// The invoice id names the period's start in the catalogue's zone, as the period does; an
    /// invoice finalised when ids named the UTC instant is the same invoice, not a second one.
    fn an_invoice_is_found_by_its_period_whatever_its_id_says(db, "invoice-id") {
        let store = tollgate_collector::open(&db.url()).unwrap();
        store.add_license(&issued("lic-p1", "acme", "pro")).unwrap();
        let old = tollgate_collector::storage::StoredInvoice {
            invoice_id: "acme/2026-10-31T23:00:00Z".into(),
            account: "acme".into(),
            period_start_ms: NOV_START,
            period_end_ms: NOV_END,
            currency: "USD".into(),
            total: "49.00".into(),
            body: serde_json::json!({"invoice_id": "acme/2026-10-31T23:00:00Z"}),
            finalized_ms: NOV_END + 3_600_000,
            cut_ms: NOV_END + 3_540_000,
        };
        store.finalize_invoice(&old, None).unwrap();
        // A replica of the newer version finalising the same period at that instant (past the
        // check above the store) stores nothing: one invoice per account and period.
        let racing = tollgate_collector::storage::StoredInvoice {
            invoice_id: "acme/2026-11-01T00:00:00+01:00".into(),
            total: "50.00".into(),
            ..old.clone()
        };
        let (kept, new) = store.finalize_invoice(&racing, None).unwrap();
        assert!(!new);
        assert_eq!(
            (kept.invoice_id.as_str(), kept.total.as_str()),
            ("acme/2026-10-31T23:00:00Z", "49.00")
        );
        let (found, new) = billing::finalize(
            store.as_ref(),
            &catalog(),
            "acme",
            NOV_START + 1,
            NOV_END + 7_200_000,
        )
        .unwrap();
        assert!(!new);
        assert_eq!(found.invoice_id, "acme/2026-10-31T23:00:00Z");
        assert_eq!(store.invoices(Some("acme")).unwrap().len(), 1);
        // December's, new, is named in Berlin's time.
        let (december, new) = billing::finalize(
            store.as_ref(),
            &catalog(),
            "acme",
            NOV_END + 1,
            NOV_END + 40 * 86_400_000,
        )
        .unwrap();
        assert!(new);
        assert_eq!(december.invoice_id, "acme/2026-12-01T00:00:00+01:00");
    }
}

#[test]
fn a_daily_budget_counts_what_the_days_usage_adds_to_the_monthly_invoice() {
    let dir = std::env::temp_dir().join(format!("tollgate-spend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store =
        tollgate_collector::open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    store.add_license(&issued("lic-p1", "acme", "pro")).unwrap();
    let now = NOV_START + 10 * 86_400_000 + 12 * 3_600_000;
    store
        .ingest(
            &batch(
                "b1",
                vec![
                    // Yesterday: 9,000 of the month's 10,000 included calls.
                    record(
                        "lic-p1",
                        "search",
                        "allowed",
                        Meter::Calls,
                        9_000,
                        now - 86_400_000,
                    ),
                    // Today: 2,000 calls, of which 1,000 are beyond the included ones.
                    record(
                        "lic-p1",
                        "search",
                        "allowed",
                        Meter::Calls,
                        2_000,
                        now - 1000,
                    ),
                ],
            ),
            now,
        )
        .unwrap();
    let catalog = catalog();
    let (today, _) = tollgate_collector::control::spend(
        store.as_ref(),
        &catalog,
        "acme",
        tollgate_wire::sync::Period::Day,
        now,
    )
    .unwrap();
    assert_eq!(today, dec("1.00"));
    let (yesterday, _) = tollgate_collector::control::spend(
        store.as_ref(),
        &catalog,
        "acme",
        tollgate_wire::sync::Period::Day,
        now - 86_400_000,
    )
    .unwrap();
    assert_eq!(yesterday, Decimal::ZERO);
    let (month, _) = tollgate_collector::control::spend(
        store.as_ref(),
        &catalog,
        "acme",
        tollgate_wire::sync::Period::Month,
        now,
    )
    .unwrap();
    assert_eq!(month, dec("1.00"), "usage charges only, not the fee");
    let _ = std::fs::remove_dir_all(&dir);
}
