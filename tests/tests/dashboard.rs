//! The dashboard in a real headless Chromium: the page loads from the collector, reads real
//! collector data with an account token, draws its charts from it, and a screenshot is taken.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use base64::Engine;

use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::storage::Budget;
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_devkit::envoy::workspace_root;
use tollgate_wire::sync::{LeaseRequest, Period, SyncRequest};
use tollgate_wire::{Meter, Source, UsageBatch, UsageRecord};

const ADMIN: &str = "dashboard-admin-token-0123456789";

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in ["/usr/bin", "/usr/local/bin", "/snap/bin"] {
            let path = Path::new(dir).join(name);
            if path.exists() {
                return path;
            }
        }
    }
    panic!("no Chromium: `make test` installs it (apt-get install chromium)");
}

/// Run headless Chromium on `url` with `extra` arguments; its stdout.
fn headless(url: &str, extra: &[&str], profile: &Path) -> String {
    let mut command = Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Let the page's fetches and scripts finish before the DOM is dumped.
            "--virtual-time-budget=15000",
            "--window-size=1400,1200",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
    let output = command.output().expect("running chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of `attribute` on the element with `id` in `dom`.
fn attribute(dom: &str, id: &str, attribute: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    let tag = &dom[start..end];
    let key = format!("{attribute}=\"");
    let from = tag.find(&key)? + key.len();
    let to = from + tag[from..].find('"')?;
    Some(tag[from..to].to_string())
}

fn record(feature: &str, outcome: &str, units: u64, at: u64) -> UsageRecord {
    UsageRecord {
        account: "acme".into(),
        license: "lic-dash".into(),
        feature: feature.into(),
        outcome: outcome.into(),
        user: String::new(),
        meter: Meter::Calls,
        units,
        window_start_ms: at,
        window_end_ms: at + 1000,
    }
}

/// The ticks of a chart's axis, if they start at 0 and go up in one step of 1, 2 or 5 times a
/// power of ten.
fn even_ticks(ticks: &str) -> Option<Vec<u64>> {
    let values: Vec<u64> = ticks
        .split(',')
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let step = *values.get(1)?;
    let mut mantissa = step;
    while mantissa >= 10 && mantissa % 10 == 0 {
        mantissa /= 10;
    }
    let even = values.first() == Some(&0)
        && matches!(mantissa, 1 | 2 | 5)
        && values.windows(2).all(|w| w[1] - w[0] == step);
    even.then_some(values)
}

/// The CSV the page offers for download (a `data:` link), decoded.
fn offered_csv(dom: &str) -> String {
    let href = attribute(dom, "csv", "href").expect("a CSV link");
    let data = href
        .strip_prefix("data:text/csv;charset=utf-8;base64,")
        .unwrap_or_else(|| panic!("not a CSV data link: {href}"));
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn the_dashboard_draws_real_collector_data_in_chromium() {
    let dir = std::env::temp_dir().join(format!("tollgate-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let plans = dir.join("plans.json");
    // Usage of this hour and two hours ago, a monthly budget and a daily quota, on the real
    // clock: in a zone where it is midday, so that none of it straddles a day's or month's end.
    std::fs::write(
        &plans,
        json!({
            "currency": "EUR",
            "time_zone": tollgate_devkit::periods::midday_time_zone(),
            "plans": {"pro": {
                "subscription": {"fee": "49", "included": {"calls": 100}},
                "prices": {"calls": "0.01", "processing_ns": {"amount": "15", "per": 3_600_000_000_000_u64}},
                "quotas": {"calls": {"per": "day", "limit": 1000}},
            }},
        })
        .to_string(),
    )
    .unwrap();
    let store = open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = AppState::new(Arc::from(store), IngestKeys::default());
    state.admin_token = Some(ADMIN.into());
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&plans)).unwrap(),
        ..ControlPlane::default()
    };
    let c = Running::start_state(0, state).unwrap();

    let admin = |method: &str, path: &str, body: Value| -> Value {
        let r = ureq::request(method, &c.url(path))
            .set("authorization", &format!("Bearer {ADMIN}"))
            .set("content-type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        serde_json::from_str(&r.into_string().unwrap()).unwrap_or(Value::Null)
    };
    admin(
        "POST",
        "/v1/admin/licenses",
        json!({"account": "acme", "plan": "pro", "license_id": "lic-dash", "features": ["search", "design"], "limits": {"rate": {"per_second": 20}}}),
    );
    admin(
        "POST",
        "/v1/admin/licenses",
        json!({"account": "beta", "plan": "pro", "license_id": "lic-beta", "features": ["search"]}),
    );
    let now = u64::try_from(tollgate_collector::clock::now_ms()).unwrap();
    // Two hours of usage: this hour and two hours ago, two features, two refusal reasons.
    let batch = UsageBatch {
        version: 1,
        batch_id: "dash-1".into(),
        source: Source {
            instance: "node".into(),
            vm_started_ms: 1,
        },
        sequence: 1,
        created_ms: now,
        records: vec![
            record("search", "allowed", 120, now - 1000),
            record("design", "allowed", 30, now - 1000),
            record("search", "allowed", 50, now - 2 * 3_600_000),
            record("search", "rate_limited", 7, now - 1000),
            record("design", "quota_exhausted", 3, now - 1000),
            // Half an hour of processing: 0.5 hours at 15 per hour.
            UsageRecord {
                meter: Meter::ProcessingNs,
                units: 1_800_000_000_000,
                ..record("search", "allowed", 0, now - 1000)
            },
            // A second account, whose license is revoked below.
            UsageRecord {
                account: "beta".into(),
                license: "lic-beta".into(),
                ..record("search", "allowed", 150, now - 1000)
            },
        ],
    };
    c.state.store.ingest(&batch, now).unwrap();
    c.state
        .store
        .set_budget(
            "acme",
            Some(&Budget {
                period: Period::Month,
                amount: "50".parse().unwrap(),
            }),
            now,
        )
        .unwrap();
    // A quota lease, as a filter's sync would take it.
    tollgate_collector::control::sync(
        c.state.store.as_ref(),
        &c.state.control,
        &SyncRequest {
            version: 1,
            instance: "node".into(),
            leases: vec![LeaseRequest {
                lease_id: "lease-1".into(),
                account: "acme".into(),
                license: "lic-dash".into(),
                plan: "pro".into(),
                meter: Meter::Calls,
                period: Period::Day,
                limit: 1000,
                want: 250,
            }],
            returns: vec![],
            licenses: vec![],
            // Two users take named seats of the license.
            seats: ["k1.0a", "k1.0b"]
                .iter()
                .map(|user| tollgate_wire::sync::SeatRequest {
                    account: "acme".into(),
                    license: "lic-dash".into(),
                    user: (*user).into(),
                    rule: tollgate_wire::sync::SeatRule::Named {
                        limit: 5,
                        per: Period::Month,
                    },
                })
                .collect(),
            clients: vec![],
        },
        now,
    )
    .unwrap();
    c.state
        .store
        .set_revoked("lic-beta", Some("payment failed"), now)
        .unwrap();
    let token = admin("POST", "/v1/admin/accounts/acme/tokens", json!({}))["token"]
        .as_str()
        .unwrap()
        .to_string();
    let cost: Value = serde_json::from_str(
        &ureq::get(&c.url("/v1/accounts/acme/cost"))
            .set("authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();

    let url = c.url(&format!("/dashboard?account=acme#token={token}"));
    let profile = dir.join("chromium-profile");
    let dom = headless(&url, &["--dump-dom"], &profile);
    assert!(
        dom.contains("data-ready=\"true\""),
        "the page did not finish: {dom}"
    );
    // The usage chart: 200 allowed calls in three bars (two features this hour, one earlier).
    assert_eq!(
        attribute(&dom, "usage-chart", "data-total").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(&dom, "usage-chart", "data-bars").as_deref(),
        Some("3")
    );
    assert_eq!(
        attribute(&dom, "usage-chart", "data-features").as_deref(),
        Some("2")
    );
    assert_eq!(dom.matches("data-feature=\"").count(), 3);
    // Refusals by reason.
    assert_eq!(
        attribute(&dom, "refusals-chart", "data-total").as_deref(),
        Some("10")
    );
    assert_eq!(
        attribute(&dom, "refusals-chart", "data-reasons").as_deref(),
        Some("2")
    );
    assert!(
        dom.contains("data-reason=\"rate_limited\" data-units=\"7\""),
        "{dom}"
    );
    // Even axis ticks: the highest hour has 150 calls, so 0, 50, 100, 150 (not 0, 38, 75, 113).
    let ticks = attribute(&dom, "usage-chart", "data-ticks").unwrap_or_default();
    assert_eq!(even_ticks(&ticks), Some(vec![0, 50, 100, 150]), "{ticks}");
    // Refusal reasons in words, with the code beside (the words are the filter's).
    let words = tollgate_core::refusal::Code::RateLimited.meaning();
    assert!(dom.contains(&words[1..]), "no `{words}` in {dom}");
    assert!(
        dom.contains("<tspan class=\"code\">rate_limited</tspan>"),
        "{dom}"
    );
    // The license: its plan, features, standing, and the daily quota with its headroom.
    assert!(
        dom.contains("data-license=\"lic-dash\" data-plan=\"pro\" data-standing=\"active\""),
        "{dom}"
    );
    assert!(
        dom.contains("<span class=\"feature\">design</span>"),
        "{dom}"
    );
    assert!(
        dom.contains(
            "data-meter=\"calls\" data-used=\"250\" data-limit=\"1000\" data-headroom=\"750\""
        ),
        "{dom}"
    );
    assert!(
        dom.contains(r#"the license overrides its plan's limits: {"rate":{"per_second":20}}"#),
        "{dom}"
    );
    // Price lines with unit prices and human units.
    assert!(dom.contains(">0.5 hours<"), "{dom}");
    assert!(dom.contains(">€15.00 / hour<"), "{dom}");
    assert!(dom.contains(">€0.01 / call<"), "{dom}");
    // The invoice draft as the API has it: €49 + 100 billable calls at €0.01 + 0.5 hours at
    // €15 = €57.50.
    let total = cost["invoice"]["total"].as_str().unwrap();
    assert_eq!(total, "57.50");
    assert_eq!(
        attribute(&dom, "invoice-total", "data-amount").as_deref(),
        Some(total)
    );
    // Budget (€8.50 of usage charges of a €50 budget) and the quota lease (250 of 1,000).
    assert_eq!(
        attribute(&dom, "budget-bar", "data-percent").as_deref(),
        Some("17.0")
    );
    assert!(
        dom.contains("data-allocated=\"250\" data-limit=\"1000\""),
        "{dom}"
    );
    // Seats: 2 of 5 taken.
    assert!(
        dom.contains("data-license=\"lic-dash\" data-in-use=\"2\" data-limit=\"5\""),
        "{dom}"
    );

    // The seats table is there for a license with seats.
    assert_eq!(attribute(&dom, "seats", "hidden"), None);
    // The CSV download holds what is shown: the invoice lines (in human units), the license
    // and its limits, the refusals.
    assert_eq!(attribute(&dom, "csv", "hidden"), None);
    let csv = offered_csv(&dom);
    assert!(
        csv.starts_with("section,license,item,detail,quantity,unit,amount EUR\r\n"),
        "{csv}"
    );
    for row in [
        "invoice,lic-dash,processing_ns,€15.00 / hour,0.5,hours,7.50\r\n",
        "invoice,,total so far,,,,57.50\r\n",
        "license,lic-dash,pro,active,,,\r\n",
        "limit,lic-dash,calls per day,headroom 750,250,of 1000,\r\n",
        "refusals,,rate_limited,",
    ] {
        assert!(csv.contains(row), "no `{row}` in {csv}");
    }
    assert_eq!(
        attribute(&dom, "csv", "data-rows").map(|n| n.parse::<usize>().unwrap()),
        Some(csv.lines().count() - 1)
    );

    // The revoked license of the second account: marked, its usage not forecast (the
    // forecast is what it costs so far: €49 + 50 billable calls), and no seats table for a
    // plan without seats.
    let beta_token = admin("POST", "/v1/admin/accounts/beta/tokens", json!({}))["token"]
        .as_str()
        .unwrap()
        .to_string();
    let beta_cost: Value = serde_json::from_str(
        &ureq::get(&c.url("/v1/accounts/beta/cost"))
            .set("authorization", &format!("Bearer {beta_token}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(beta_cost["invoice"]["total"], "49.50", "{beta_cost}");
    assert_eq!(
        beta_cost["invoice"]["forecast_total"], "49.50",
        "{beta_cost}"
    );
    let beta = headless(
        &c.url(&format!("/dashboard?account=beta#token={beta_token}")),
        &["--dump-dom"],
        &dir.join("chromium-profile-beta"),
    );
    assert!(beta.contains("data-ready=\"true\""), "{beta}");
    assert!(
        beta.contains("data-license=\"lic-beta\" data-plan=\"pro\" data-standing=\"revoked\""),
        "{beta}"
    );
    assert_eq!(
        attribute(&beta, "standing-banner", "data-stopped").as_deref(),
        Some("lic-beta")
    );
    assert_eq!(
        attribute(&beta, "not-forecast", "data-licenses").as_deref(),
        Some("lic-beta")
    );
    assert_eq!(
        attribute(&beta, "invoice-forecast", "data-amount").as_deref(),
        Some("49.50")
    );
    assert_eq!(attribute(&beta, "seats", "hidden").as_deref(), Some(""));

    // The operator's view, with the admin token: both accounts' revenue (€57.50 + €49.50),
    // top consumers, refusals in words with the code.
    let operator_url = c.url(&format!("/admin/dashboard#token={ADMIN}"));
    let operator = headless(
        &operator_url,
        &["--dump-dom"],
        &dir.join("chromium-profile-operator"),
    );
    assert!(operator.contains("data-ready=\"true\""), "{operator}");
    assert_eq!(
        attribute(&operator, "revenue", "data-amount").as_deref(),
        Some("107.00")
    );
    assert!(
        operator.contains("data-account=\"beta\" data-so-far=\"49.50\" data-forecast=\"49.50\""),
        "{operator}"
    );
    assert!(
        operator.contains("data-license=\"lic-dash\" data-calls=\"200\""),
        "{operator}"
    );
    assert!(
        operator.contains("data-account=\"acme\" data-code=\"rate_limited\" data-calls=\"7\""),
        "{operator}"
    );
    assert!(operator.contains(&words[1..]), "{operator}");
    // Without the admin token the page shows the refusal, not data.
    let refused = headless(
        &c.url("/admin/dashboard#token=not-the-admin-token"),
        &["--dump-dom"],
        &dir.join("chromium-profile-operator-refused"),
    );
    assert!(refused.contains("data-ready=\"error\""), "{refused}");
    assert!(!refused.contains("lic-dash"), "{refused}");

    let shot = workspace_root().join("target/dashboard.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &url,
        &[&format!("--screenshot={}", shot.display())],
        &profile,
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    let operator_shot = workspace_root().join("target/operator-dashboard.png");
    let _ = std::fs::remove_file(&operator_shot);
    headless(
        &operator_url,
        &[&format!("--screenshot={}", operator_shot.display())],
        &dir.join("chromium-profile-operator"),
    );
    assert!(std::fs::read(&operator_shot)
        .expect("a screenshot")
        .starts_with(b"\x89PNG\r\n\x1a\n"));
    // `TOLLGATE_UPDATE_SCREENSHOT=1` refreshes the screenshots shown in README.md and
    // docs/licenses-and-billing.md.
    if std::env::var_os("TOLLGATE_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, workspace_root().join("docs/dashboard.png")).unwrap();
        std::fs::copy(
            &operator_shot,
            workspace_root().join("docs/operator-dashboard.png"),
        )
        .unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
