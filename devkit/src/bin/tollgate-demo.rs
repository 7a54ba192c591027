//! The demo behind `make run`: an upstream API, the collector (usage store, license server,
//! billing), a real Envoy with the Tollgate filter fetching the license keys from the
//! collector, licenses issued by the collector, traffic that is allowed, refused and metered,
//! the usage the collector stored and the invoice drafts it rates from it.
//!
//! `tollgate-demo` runs the script and exits; `tollgate-demo --keep-running` then keeps the
//! stack up and prints curl commands to try. Ctrl-C (SIGINT), SIGTERM or SIGHUP stop it at any
//! point: Envoy is stopped and waited for, and the temporary folders are removed unless
//! `--keep` is given.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::cli::show::Table;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::licensing::{Issuer, LicenseRequest};
use tollgate_collector::signing::KeyAlg;
use tollgate_collector::{open, AppState, IngestKeys, Running, UsageQuery};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{unix_now, Bootstrap, Envoy, LicenseSpec, SigningKey, Upstream};

const ISSUER: &str = "https://licenses.tollgate.example";
const AUDIENCE: &str = "api.example.com";
/// The demo's batch signing secret (demo only).
const INGEST_SECRET: &str = "demo-ingest-secret-0123456789";
/// The demo collector's admin token (demo only).
const ADMIN_TOKEN: &str = "demo-admin-token-0123456789";

struct Answer {
    status: u16,
    code: String,
    retry_after: Option<String>,
    /// The methods a 405 names.
    allow: Option<String>,
    body: String,
}

fn send(agent: &ureq::Agent, method: &str, url: &str, token: Option<&str>) -> Result<Answer> {
    let mut request = agent.request(method, url);
    if let Some(token) = token {
        request = request.set("authorization", &format!("Bearer {token}"));
    }
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => return Err(e).context(format!("{method} {url}")),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(String::from);
    let allow = response.header("allow").map(String::from);
    let body = response.into_string()?;
    let code = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_default();
    Ok(Answer {
        status,
        code,
        retry_after,
        allow,
        body,
    })
}

fn license(account: &str, id: &str, plan: &str, features: &[&str]) -> LicenseSpec {
    let mut spec = LicenseSpec::new(account, id, plan, features);
    spec.issuer = Some(ISSUER.into());
    spec.audience = Some(AUDIENCE.into());
    spec
}

/// The demo's plugin configuration: `envoy/tollgate.json` with a collector, the keys from its
/// JWKS, a trial plan with a quota, a team plan with seats, and end users.
const CONFIG: &str = "envoy/demo.json";

/// What must not outlive the demo: Envoy (a child process) and the temporary folders. Whoever
/// ends the demo, the script or a signal, takes it and drops it.
#[derive(Default)]
struct Leftovers {
    envoy: Option<Envoy>,
    scratch: Option<PathBuf>,
    keep: bool,
}

impl Leftovers {
    fn clean_up(&mut self) {
        // Envoy's drop kills it, waits for it and removes its folder (unless TOLLGATE_KEEP_TMP).
        drop(self.envoy.take());
        if let Some(dir) = self.scratch.take() {
            if self.keep {
                println!("kept {} (--keep)", dir.display());
            } else {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: clean up and exit 130 (what a shell reports for Ctrl-C).
fn stop_on_signals(leftovers: Arc<Mutex<Leftovers>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        runtime.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
        });
        println!("\nstopping: Envoy and the temporary folders go");
        if let Ok(mut leftovers) = leftovers.lock() {
            leftovers.clean_up();
        }
        std::process::exit(130);
    });
    Ok(())
}

fn main() -> Result<()> {
    let keep_running = std::env::args().any(|a| a == "--keep-running");
    let keep = std::env::args().any(|a| a == "--keep");
    if keep {
        // Envoy's folder (its configuration and log) stays too.
        std::env::set_var("TOLLGATE_KEEP_TMP", "1");
    }
    let leftovers = Arc::new(Mutex::new(Leftovers {
        keep,
        ..Leftovers::default()
    }));
    stop_on_signals(leftovers.clone())?;
    let done = run(keep_running, &leftovers);
    if let Ok(mut leftovers) = leftovers.lock() {
        leftovers.clean_up();
    }
    done
}

fn run(keep_running: bool, leftovers: &Mutex<Leftovers>) -> Result<()> {
    let root = workspace_root();
    let key = SigningKey::load(&root.join("envoy/demo-signing-key.json"))?;
    let config: Value = serde_json::from_slice(
        &std::fs::read(root.join(CONFIG)).with_context(|| format!("reading {CONFIG}"))?,
    )?;

    println!("== Tollgate demo ==");
    let upstream = Upstream::start(0)?;
    println!("upstream API     http://{}", upstream.addr);
    let scratch = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    if let Ok(mut leftovers) = leftovers.lock() {
        leftovers.scratch = Some(scratch.clone());
    }
    println!(
        "temporary files  {}   (removed on exit; --keep keeps them)",
        scratch.display()
    );
    let database = format!("sqlite://{}", scratch.join("usage.db").display());
    let keys = IngestKeys::parse([format!("demo={INGEST_SECRET}").as_str()])?;
    tollgate_collector::telemetry::set_info_logs(false);
    let mut state = AppState::new(std::sync::Arc::from(open(&database)?), keys);
    state.admin_token = Some(ADMIN_TOKEN.into());
    state.issuer = Issuer {
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
    };
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&root.join("envoy/plans.json")))?,
        ..ControlPlane::default()
    };
    let collector = Running::start_state(0, state)?;
    println!(
        "collector        http://{}   ({database}, prices envoy/plans.json)",
        collector.addr
    );
    let store = collector.state.store.as_ref();
    let now_ms = || u64::try_from(tollgate_collector::clock::now_ms()).unwrap_or(0);
    // The license server signs with the demo key (kid demo-2026), and publishes it in its JWKS.
    tollgate_collector::licensing::add_key(
        store,
        KeyAlg::EdDSA,
        Some(&key.file.kid),
        Some(&key.file.private_pem),
        0,
        now_ms(),
    )?;
    if config["collector"]["secret"] != INGEST_SECRET {
        anyhow::bail!("{CONFIG}: collector.secret must be the demo's ingest secret");
    }
    let mut bootstrap = Bootstrap::new(config, upstream.port());
    bootstrap.collector_ports = vec![collector.addr.port()];
    let bootstrap = bootstrap.to_json();
    let envoy = Envoy::start("demo", &bootstrap, 2)?;
    println!(
        "envoy listener   {}   (pid {}, 2 worker threads, plugin config {CONFIG}, keys from the collector's JWKS)",
        envoy.url(""),
        envoy.pid()
    );
    println!("envoy admin      http://{}", envoy.admin);
    let envoy_admin = envoy.admin;
    let base = envoy.url("");
    let url = |path: &str| format!("{base}{path}");
    if let Ok(mut leftovers) = leftovers.lock() {
        leftovers.envoy = Some(envoy);
    }

    let issue = |account: &str, id: &str, plan: &str, features: &[&str]| -> Result<String> {
        let issued = tollgate_collector::licensing::issue(
            store,
            &collector.state.issuer,
            &collector.state.control.catalog.current().plan_names(),
            &LicenseRequest {
                account: account.into(),
                plan: plan.into(),
                features: features.iter().map(|f| f.to_string()).collect(),
                license_id: Some(id.into()),
                valid_days: Some(30),
                ..LicenseRequest::default()
            },
            now_ms(),
        )?;
        Ok(issued.token)
    };
    let acme = issue(
        "acme-corp",
        "lic-acme-001",
        "starter",
        &["search", "reports"],
    )?;
    let globex = issue(
        "globex",
        "lic-globex-007",
        "pro",
        &["search", "generative-design"],
    )?;
    let umbrella = issue("umbrella", "lic-umbrella-010", "trial", &["search"])?;
    let hooli = issue("hooli", "lic-hooli-020", "team", &["search"])?;
    let expired = {
        let spec = license("initech", "lic-initech-002", "starter", &["search"]);
        key.sign(&spec.claims_at(unix_now() - 7200))?
    };
    println!("\nlicenses issued by the collector's license server (EdDSA, kid demo-2026):");
    let mut licenses = Table::new(&["account", "license", "plan", "features"]);
    for row in [
        [
            "acme-corp",
            "lic-acme-001",
            "starter (5 req/s, burst 10)",
            "search, reports",
        ],
        [
            "globex",
            "lic-globex-007",
            "pro (generative-design: 2 req/s, burst 4)",
            "search, generative-design",
        ],
        [
            "umbrella",
            "lic-umbrella-010",
            "trial (10 calls a day)",
            "search",
        ],
        [
            "hooli",
            "lic-hooli-020",
            "team (2 named seats a month)",
            "search",
        ],
        [
            "initech",
            "lic-initech-002",
            "starter, expired an hour ago (minted with the same key)",
            "search",
        ],
    ] {
        licenses.row(row.map(String::from).to_vec());
    }
    for line in licenses.render().lines() {
        println!("  {line}");
    }

    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    // Envoy fetches the keys on its first tick; until then requests get 503 keys_unavailable.
    let mut warm_up = 0u64;
    let keys_at = Instant::now();
    loop {
        let answer = send(&agent, "GET", &url("/healthz"), None)?;
        warm_up += 1;
        let probe = send(&agent, "GET", &url("/v1/search?q=warm-up"), Some("x.y.z"))?;
        warm_up += 1;
        if answer.status == 200 && probe.code != "keys_unavailable" {
            break;
        }
        if keys_at.elapsed() > Duration::from_secs(10) {
            anyhow::bail!("Envoy did not fetch the license keys from the collector in 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "envoy fetched the license keys from the collector in {:.0} ms",
        keys_at.elapsed().as_secs_f64() * 1000.0
    );
    let cases: Vec<(&str, &str, Option<&str>, &str)> = vec![
        ("GET", "/healthz", None, "(none)"),
        ("GET", "/v1/search?q=bolts", None, "(none)"),
        ("GET", "/v1/search?q=bolts", Some("not-a-jwt"), "garbage"),
        ("GET", "/v1/search?q=bolts", Some(&expired), "initech"),
        ("GET", "/v1/search?q=bolts", Some(&acme), "acme-corp"),
        (
            "GET",
            "/v1/reports/2026-11?bytes=20000",
            Some(&acme),
            "acme-corp",
        ),
        ("DELETE", "/v1/reports/2026-11", Some(&acme), "acme-corp"),
        ("POST", "/v1/design/bracket", Some(&acme), "acme-corp"),
        (
            "POST",
            "/v1/design/bracket?bytes=50000",
            Some(&globex),
            "globex",
        ),
        ("GET", "/admin/users", Some(&acme), "acme-corp"),
    ];
    println!(
        "\n  {:<6} {:<34} {:<10} {:<6} answer",
        "method", "path", "license", "status"
    );
    for (method, path, token, who) in &cases {
        let answer = send(&agent, method, &url(path), *token)?;
        let detail = if answer.status == 200 {
            let seen: Value = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
            match seen["headers"]["x-tollgate-account"][0].as_str() {
                Some(account) => format!(
                    "served; upstream saw account={account} plan={} feature={}",
                    seen["headers"]["x-tollgate-plan"][0]
                        .as_str()
                        .unwrap_or("?"),
                    seen["headers"]["x-tollgate-feature"][0]
                        .as_str()
                        .unwrap_or("?")
                ),
                None if answer.body.len() > 1000 => format!("served {} bytes", answer.body.len()),
                None => "served (public route)".into(),
            }
        } else if let Some(allow) = &answer.allow {
            format!("{} (Allow: {allow})", answer.code)
        } else {
            answer.code.clone()
        };
        println!(
            "  {method:<6} {path:<34} {who:<10} {:<6} {detail}",
            answer.status
        );
    }

    println!("\nburst: 20 requests at once from acme-corp (starter: 5 req/s, burst 10)");
    let started = Instant::now();
    let (mut ok, mut limited, mut retry) = (0, 0, None);
    for _ in 0..20 {
        let answer = send(&agent, "GET", &url("/v1/search?q=nuts"), Some(&acme))?;
        match answer.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                retry = answer.retry_after;
            }
            other => println!("  unexpected {other}: {}", answer.body),
        }
    }
    println!(
        "  {ok} allowed, {limited} refused with 429 rate_limited (Retry-After: {}s) in {:.0} ms",
        retry.unwrap_or_else(|| "-".into()),
        started.elapsed().as_secs_f64() * 1000.0
    );

    println!("\nquota: 12 calls from umbrella (trial: 10 calls a day, leased from the collector)");
    let (mut ok, mut exhausted, mut left) = (0, 0, String::new());
    for _ in 0..12 {
        let response = match agent
            .get(&url("/v1/search?q=umbrellas"))
            .set("authorization", &format!("Bearer {umbrella}"))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).context("quota request"),
        };
        if response.status() == 200 {
            ok += 1;
            left = response.header("ratelimit").unwrap_or("").to_string();
        } else if response.status() == 429 {
            exhausted += 1;
        }
        let _ = response.into_string();
    }
    println!(
        "  {ok} allowed (last RateLimit: {left}), {exhausted} refused with 429 quota_exhausted"
    );

    println!("\nseats: hooli's users (team: 2 named seats a month, the collector decides)");
    let team_calls = [
        "alice@hooli.example",
        "bob@hooli.example",
        "carol@hooli.example",
        "alice@hooli.example",
    ];
    for user in team_calls {
        let response = match agent
            .get(&url("/v1/search?q=seats"))
            .set("authorization", &format!("Bearer {hooli}"))
            .set("x-end-user", user)
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e).context("seat request"),
        };
        let status = response.status();
        let body = response.into_string()?;
        let answer = if status == 200 {
            "served".to_string()
        } else {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            format!(
                "{} ({})",
                v["error"].as_str().unwrap_or("?"),
                v["message"].as_str().unwrap_or("")
            )
        };
        println!("  {user:<22} {status} {answer}");
    }
    let report = tollgate_collector::control::users_report(
        store,
        &collector.state.control,
        "hooli",
        now_ms(),
    )?;
    for seat in &report.seats {
        println!(
            "  {} {} seats taken: {} of {} (tollgate-collector users --account hooli)",
            seat.license, seat.kind, seat.in_use, seat.limit
        );
    }

    println!("\nrevocation: the operator revokes lic-globex-007 (tollgate-collector revoke --license lic-globex-007)");
    store.set_revoked("lic-globex-007", Some("demo: contract ended"), now_ms())?;
    let revoked_at = Instant::now();
    let mut after_revocation = 0u64;
    let refused = loop {
        let answer = send(&agent, "GET", &url("/v1/search?q=gears"), Some(&globex))?;
        after_revocation += 1;
        if answer.status == 403 || revoked_at.elapsed() > Duration::from_secs(5) {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "  {} {} after {:.0} ms (filters learn it with their next sync)",
        refused.status,
        refused.code,
        revoked_at.elapsed().as_secs_f64() * 1000.0
    );

    // The filter folds its counters into Envoy stats once a second.
    std::thread::sleep(Duration::from_millis(2200));
    println!("\nmetered (Envoy stats, GET http://{envoy_admin}/stats?filter=tollgate):");
    let stats = match leftovers.lock() {
        Ok(leftovers) => match &leftovers.envoy {
            Some(envoy) => envoy.stats()?,
            None => Default::default(),
        },
        Err(_) => Default::default(),
    };
    for (name, value) in stats {
        if let Some(short) = name.strip_prefix("wasmcustom.tollgate.") {
            if value > 0 {
                println!("  {short:<52} {value}");
            }
        }
    }
    println!("upstream received {} requests", upstream.requests());

    // Every call the clients made, as the collector stored it (batches arrive every 0.5 s).
    let sent = (cases.len() + 20 + 12 + team_calls.len()) as u64 + after_revocation + warm_up;
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = collector.state.store.usage(&UsageQuery::default())?;
        let calls: u64 = rows
            .iter()
            .filter(|r| r.meter == "calls")
            .map(|r| r.units)
            .sum();
        if calls >= sent || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("\nusage stored by the collector (tollgate-collector usage --database {database}; run with --keep to keep it):");
    let mut table = Table::new(&[
        "account", "license", "feature", "outcome", "meter", ">units",
    ]);
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for r in &rows {
        table.row(vec![
            or_dash(&r.account),
            or_dash(&r.license),
            or_dash(&r.feature),
            r.outcome.clone(),
            r.meter.clone(),
            r.units.to_string(),
        ]);
    }
    for line in table.render().lines() {
        println!("  {line}");
    }
    let stored: u64 = rows
        .iter()
        .filter(|r| r.meter == "calls")
        .map(|r| r.units)
        .sum();
    println!("  {stored} calls stored for {sent} sent");

    println!("\ninvoice drafts for this month, rated from the stored usage with envoy/plans.json:");
    let catalog = collector.state.control.catalog.current();
    for account in ["acme-corp", "globex", "umbrella", "hooli"] {
        let draft =
            tollgate_collector::billing::draft(store, &catalog, account, now_ms(), now_ms())?;
        let invoice = &draft.invoice;
        println!(
            "  {account:<10} total {} {:>8}   (forecast for the month {})",
            invoice.currency,
            invoice.total,
            draft
                .forecast_total
                .map(|f| format!("{} {f}", invoice.currency))
                .unwrap_or_else(|| "-".into())
        );
        for line in &invoice.lines {
            println!(
                "    {:<58} {:>12} {:>10}",
                line.description, line.quantity, line.amount
            );
        }
    }
    println!("  (tollgate-collector invoice --account globex --plans envoy/plans.json --database {database})");

    if keep_running {
        let search = url("/v1/search?q=x");
        println!("\nThe stack stays up; Ctrl-C stops it. A token for every demo account:");
        for (account, token) in [
            ("ACME", &acme),
            ("GLOBEX", &globex),
            ("UMBRELLA", &umbrella),
            ("HOOLI", &hooli),
            ("INITECH", &expired),
        ] {
            println!("  export {account}='{token}'");
        }
        println!("Then try (each line says what it answers):");
        println!("  curl -i '{search}' -H \"authorization: Bearer $ACME\"        # 200, RateLimit headers; over 5 req/s: 429 rate_limited");
        println!(
            "  curl -i -X POST {} -H \"authorization: Bearer $ACME\"   # refused: 403 feature_not_licensed (starter has no generative-design)",
            url("/v1/design/x")
        );
        println!(
            "  curl -i -X POST {} -H \"authorization: Bearer $GLOBEX\" # 200 (pro has it; 2 req/s)",
            url("/v1/design/x")
        );
        println!("  curl -i '{search}' -H \"authorization: Bearer $UMBRELLA\"    # refused once its 10 calls a day are used: 429 quota_exhausted");
        println!("  curl -i '{search}' -H \"authorization: Bearer $HOOLI\" -H 'x-end-user: dave@hooli.example'  # refused: 403 seat_limit_reached (both seats are taken)");
        println!("  curl -i '{search}' -H \"authorization: Bearer $INITECH\"     # refused: 401 token_expired");
        println!("Tollgate's own series in Prometheus format (tollgate_*):");
        println!(
            "  curl -s 'http://{envoy_admin}/stats/prometheus?usedonly&filter=^wasmcustom[.]tollgate[.]'"
        );
        println!("Issue more licenses with the admin API:");
        println!(
            "  curl -s -X POST {} -H 'authorization: Bearer {ADMIN_TOKEN}' -d '{{\"account\": \"you\", \"plan\": \"pro\", \"features\": [\"search\"]}}'",
            collector.url("/v1/admin/licenses")
        );
        let (account_token, _) = tollgate_collector::account_tokens::issue_account_token(
            store,
            &collector.state.issuer,
            "globex",
            7,
            now_ms(),
        )?;
        println!("globex's dashboard (usage, invoice draft, budget, refusals):");
        println!(
            "  {}",
            collector.url(&format!("/dashboard?account=globex#token={account_token}"))
        );
        println!("the operator's dashboard (every account, revenue, refusals, limits):");
        println!(
            "  {}",
            collector.url(&format!("/admin/dashboard#token={ADMIN_TOKEN}"))
        );
        // Until a signal ends the process (see `stop_on_signals`), or Envoy dies on its own.
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let alive = match leftovers.lock() {
                Ok(mut leftovers) => leftovers.envoy.as_mut().is_some_and(Envoy::is_running),
                Err(_) => false,
            };
            if !alive {
                anyhow::bail!("Envoy stopped on its own: the demo ends");
            }
        }
    }
    drop(collector);
    Ok(())
}
