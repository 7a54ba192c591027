//! Seats and sharing detection through two real Envoy processes (two workers each) and a real
//! collector: named seats admit exactly N distinct users across both Envoys and refuse user
//! N+1 while the first N keep working; a floating seat frees once its user has been idle for
//! the window; a token replayed from many client addresses raises the alert and is blocked;
//! and no raw user id, address, token or request path is anywhere in the collector's database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_collector::catalog::CatalogFileWatch;
use tollgate_collector::control::ControlPlane;
use tollgate_collector::{open, AppState, IngestKeys, Running};
use tollgate_devkit::envoy::workspace_root;
use tollgate_devkit::{Adapter, Bootstrap, Envoy, LicenseSpec, SigningKey, Upstream};
use tollgate_tests::collector::stored_allowed_calls;
use tollgate_tests::http::{request, request_from, RawResponse};

const SECRET: &str = "seats-e2e-secret-0123456789";
const ADMIN: &str = "seats-e2e-admin-token-0123456789";
const PSEUDONYM_SECRET: &str = "seats-e2e-pseudonym-key-0123456789abcdef";

fn plugin() -> Value {
    let mut config: Value = serde_json::from_slice(
        &std::fs::read(workspace_root().join("envoy/tollgate.json")).unwrap(),
    )
    .unwrap();
    config["pseudonyms"] = json!({"key_id": "e2e", "secret": PSEUDONYM_SECRET});
    config["users"] = json!({"header": "x-end-user"});
    config["plans"]["team"] = json!({"seats": {"named": 3, "per": "month"}});
    config["plans"]["floating"] = json!({"seats": {"floating": 2, "window_seconds": 3}});
    config["plans"]["shared"] =
        json!({"sharing": {"max_clients": 3, "window_seconds": 600, "block": true}});
    config["collector"] = json!({
        "key_id": "k1",
        "secret": SECRET,
        "flush_interval_ms": 200,
        "retry_initial_ms": 100,
        "retry_max_ms": 1000,
        "timeout_ms": 2000,
    });
    config
}

fn license(id: &str, plan: &str) -> String {
    let key = SigningKey::load(&workspace_root().join("envoy/demo-signing-key.json")).unwrap();
    let mut spec = LicenseSpec::new("acme", id, plan, &["search"]);
    spec.issuer = Some("https://licenses.tollgate.example".into());
    spec.audience = Some("api.example.com".into());
    spec.mint(&key).unwrap()
}

struct Stack {
    collector: Running,
    _upstream: Upstream,
    envoys: Vec<Envoy>,
    dir: std::path::PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stack_on(adapter: Adapter, name: &str) -> Stack {
    if adapter == Adapter::Native {
        tollgate_devkit::envoy::require_native_module().unwrap();
    }
    let name = format!("{name}-{}", adapter.name());
    let name = name.as_str();
    let dir = std::env::temp_dir().join(format!("tollgate-seats-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = open(&format!("sqlite://{}", dir.join("c.db").display())).unwrap();
    let mut state = AppState::new(
        Arc::from(store),
        IngestKeys::parse([format!("k1={SECRET}").as_str()]).unwrap(),
    );
    state.admin_token = Some(ADMIN.into());
    // Named seats per month on the real clock: in a zone where it is midday, so that the
    // test never straddles a month's end.
    let catalog = dir.join("plans.json");
    std::fs::write(
        &catalog,
        tollgate_devkit::periods::midday_catalogue().to_string(),
    )
    .unwrap();
    state.control = ControlPlane {
        catalog: CatalogFileWatch::open(Some(&catalog)).unwrap(),
        // Short grants: floating seats are renewed (and free) within seconds.
        seat_ttl_ms: 2_000,
        ..ControlPlane::default()
    };
    let collector = Running::start_state(0, state).unwrap();
    let upstream = Upstream::start(0).unwrap();
    let mut bootstrap = Bootstrap::new(plugin(), upstream.port());
    bootstrap.adapter = adapter;
    bootstrap.collector_ports = vec![collector.addr.port()];
    let envoys = (0..2)
        .map(|i| Envoy::start(&format!("seats-{name}-{i}"), &bootstrap.to_json(), 2).unwrap())
        .collect();
    Stack {
        collector,
        _upstream: upstream,
        envoys,
        dir,
    }
}

fn call(envoy: &Envoy, token: &str, user: &str) -> RawResponse {
    let auth = format!("Bearer {token}");
    request(
        envoy.listener,
        "GET",
        "/v1/search",
        &[
            ("authorization", auth.as_bytes()),
            ("x-end-user", user.as_bytes()),
        ],
    )
    .unwrap()
}

fn outcome(r: &RawResponse) -> String {
    if r.status == 200 {
        "allowed".into()
    } else {
        format!("{} {}", r.status, r.code())
    }
}

fn admin_get(c: &Running, path: &str) -> Value {
    let auth = format!("Bearer {ADMIN}");
    let r = request(c.addr, "GET", path, &[("authorization", auth.as_bytes())]).unwrap();
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json().unwrap()
}

/// Wait until the collector holds `want` allowed calls of `license` (usage is shipped every
/// 200 ms); panic after 20 s.
fn wait_for_usage(c: &Running, license: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored_allowed_calls(c, license).unwrap();
        if stored == want {
            return;
        }
        assert!(stored < want, "stored {stored} > served {want}");
        assert!(Instant::now() < deadline, "stored {stored} of {want} calls");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every byte of the collector's SQLite files (database and write-ahead log).
fn database_bytes(stack: &Stack) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(&stack.dir).unwrap() {
        all.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

tollgate_tests::with_both_adapters!(
    named_seats_admit_exactly_n_users_across_two_envoys_and_the_holders_keep_working,
    a_floating_seat_frees_once_its_user_is_idle_for_the_window,
    a_token_replayed_from_many_clients_raises_the_alert_and_is_blocked,
);

fn named_seats_admit_exactly_n_users_across_two_envoys_and_the_holders_keep_working(
    adapter: Adapter,
) {
    let s = stack_on(adapter, "named");
    let token = license("lic-team", "team");
    let users = [
        "alice@acme.example",
        "bob@acme.example",
        "carol@acme.example",
    ];
    let mut served = 0;
    // Three users take the three seats, from both Envoys.
    for (i, user) in users.iter().enumerate() {
        let r = call(&s.envoys[i % 2], &token, user);
        assert_eq!(outcome(&r), "allowed", "{user}");
        served += 1;
    }
    // The fourth is refused on either Envoy, with the seats in the message.
    for envoy in &s.envoys {
        let r = call(envoy, &token, "mallory@acme.example");
        assert_eq!(outcome(&r), "403 seat_limit_reached");
        let message = r.json().unwrap()["message"].as_str().unwrap().to_string();
        assert!(message.contains("all 3 seats"), "{message}");
        assert!(r.header("retry-after").is_some());
    }
    // The three holders keep working on both Envoys, also on the Envoy they never used.
    for round in 0..10 {
        for user in users {
            let r = call(&s.envoys[round % 2], &token, user);
            assert_eq!(outcome(&r), "allowed", "{user}, round {round}");
            served += 1;
        }
    }
    // No user header: 403 missing_user.
    let auth = format!("Bearer {token}");
    let r = request(
        s.envoys[0].listener,
        "GET",
        "/v1/search",
        &[("authorization", auth.as_bytes())],
    )
    .unwrap();
    assert_eq!(outcome(&r), "403 missing_user");

    // Every served call is stored once, per (pseudonymised) user.
    wait_for_usage(&s.collector, "lic-team", served);
    let report = admin_get(&s.collector, "/v1/accounts/acme/users");
    assert_eq!(report["active_users"]["users"], 3, "{report}");
    assert_eq!(report["active_users"]["by_license"]["lic-team"], 3);
    let seats = report["seats"].as_array().unwrap();
    assert_eq!(seats.len(), 1, "{report}");
    assert_eq!(
        (seats[0]["in_use"].as_u64(), seats[0]["limit"].as_u64()),
        (Some(3), Some(3))
    );

    // No raw user id anywhere in the database; the pseudonyms are there.
    let db = database_bytes(&s);
    for user in users.iter().chain(&["mallory@acme.example"]) {
        assert!(!contains(&db, user), "{user} is stored raw");
        assert!(
            !contains(&db, user.split('@').next().unwrap()),
            "{user} is stored raw"
        );
    }
    assert!(contains(&db, "e2e."), "no pseudonym stored");
    // Nor the token, the request path or the client's address: usage data holds none of them.
    let signature = token.rsplit('.').next().unwrap();
    for secret_or_personal in [signature, "/v1/search", "127.0.0.1"] {
        assert!(
            !contains(&db, secret_or_personal),
            "`{secret_or_personal}` is stored"
        );
    }
}

/// `(first_ms, last_ms, until_ms)` of `user`'s seat of `license`, as the collector holds it.
fn seat_of(c: &Running, license: &str, user: &str) -> Option<(u64, u64, u64)> {
    let pseudonyms =
        tollgate_core::pseudonym::Pseudonymizer::new("pseudonyms", "e2e", PSEUDONYM_SECRET)
            .unwrap();
    let user_ref = pseudonyms.pseudonym(tollgate_core::pseudonym::Subject::User, user);
    let export = c.state.store.export_account("acme").unwrap();
    export.get("seats")?.iter().find_map(|row| {
        (row["license"] == license && row["user_ref"] == user_ref.as_str()).then(|| {
            let ms = |name: &str| row[name].as_u64().unwrap();
            (ms("first_ms"), ms("last_ms"), ms("until_ms"))
        })
    })
}

fn a_floating_seat_frees_once_its_user_is_idle_for_the_window(adapter: Adapter) {
    let s = stack_on(adapter, "floating");
    let token = license("lic-float", "floating");
    assert_eq!(outcome(&call(&s.envoys[0], &token, "ann")), "allowed");
    assert_eq!(outcome(&call(&s.envoys[1], &token, "ben")), "allowed");
    assert_eq!(
        outcome(&call(&s.envoys[0], &token, "cid")),
        "403 seat_limit_reached"
    );
    // Ann's seat as the collector decided it: it frees a window (3 s) after her only grant.
    let (_, ann_last, ann_until) = seat_of(&s.collector, "lic-float", "ann").unwrap();
    assert_eq!(ann_until, ann_last + 3_000);
    // Ben keeps working on both Envoys; Ann stops. Cid tries every 250 ms until a seat frees.
    // The bounds come from the collector's own times, not from how long the test took: Cid's
    // seat is granted no sooner than Ann's frees, and once it has freed (by the clock the
    // collector and the filters share with this test), Cid's next request gets it: the
    // filter keeps a refusal only until the seat it waits for frees, then asks again.
    let mut late_refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "the idle user's seat never freed"
        );
        i += 1;
        let ben = call(&s.envoys[i % 2], &token, "ben");
        assert_eq!(outcome(&ben), "allowed", "ben");
        let asked_ms = tollgate_devkit::keys::unix_now_ms();
        let cid = call(&s.envoys[(i + 1) % 2], &token, "cid");
        match outcome(&cid).as_str() {
            "allowed" => break,
            "403 seat_limit_reached" if asked_ms > ann_until => late_refusals += 1,
            "403 seat_limit_reached" => {}
            other => panic!("cid: {other}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (cid_first, _, _) = seat_of(&s.collector, "lic-float", "cid").unwrap();
    assert!(
        cid_first >= ann_until,
        "cid's seat granted at {cid_first}, ann's freed at {ann_until}"
    );
    assert_eq!(
        late_refusals, 0,
        "cid was refused after ann's seat had freed"
    );
    eprintln!(
        "floating seat: freed {} ms after its grant, taken {} ms after it freed",
        ann_until - ann_last,
        cid_first - ann_until
    );
    // Now Ann is the one without a seat.
    assert_eq!(
        outcome(&call(&s.envoys[0], &token, "ann")),
        "403 seat_limit_reached"
    );
}

fn a_token_replayed_from_many_clients_raises_the_alert_and_is_blocked(adapter: Adapter) {
    let s = stack_on(adapter, "sharing");
    let token = license("lic-shared", "shared");
    let auth = format!("Bearer {token}");
    let from = |ip: &str, envoy: &Envoy| {
        request_from(
            ip.parse::<IpAddr>().unwrap(),
            envoy.listener,
            "GET",
            "/v1/search",
            &[("authorization", auth.as_bytes())],
        )
        .unwrap()
    };
    // Three clients are within the plan.
    for (i, ip) in ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .enumerate()
    {
        assert_eq!(outcome(&from(ip, &s.envoys[i % 2])), "allowed");
    }
    // Not a wait for nothing to happen: once the collector counts the three clients, it has
    // judged them, and three is within the plan.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counted = s
            .collector
            .state
            .store
            .note_clients(
                &tollgate_wire::sync::ClientsSeen {
                    account: "acme".into(),
                    license: "lic-shared".into(),
                    clients: Vec::new(),
                    max_clients: 3,
                    window_ms: 600_000,
                    block: true,
                },
                tollgate_devkit::unix_now() * 1000,
            )
            .unwrap();
        if counted == 3 {
            break;
        }
        assert!(
            counted < 3 && Instant::now() < deadline,
            "{counted} clients counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        admin_get(&s.collector, "/v1/accounts/acme/users")["sharing"],
        json!([])
    );
    // Five more, on both Envoys: the collector sees 8 > 3 and the license is blocked on both.
    for (i, ip) in [
        "127.0.0.14",
        "127.0.0.15",
        "127.0.0.16",
        "127.0.0.17",
        "127.0.0.18",
    ]
    .iter()
    .enumerate()
    {
        let _ = from(ip, &s.envoys[i % 2]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut blocked = [false, false];
    while blocked != [true, true] {
        assert!(Instant::now() < deadline, "not blocked: {blocked:?}");
        for (i, envoy) in s.envoys.iter().enumerate() {
            let r = from("127.0.0.11", envoy);
            if outcome(&r) == "403 license_sharing_detected" {
                blocked[i] = true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The alert: one detection, one webhook event, one metric count.
    let report = admin_get(&s.collector, "/v1/accounts/acme/users");
    let sharing = report["sharing"].as_array().unwrap();
    assert_eq!(sharing.len(), 1, "{report}");
    assert_eq!(sharing[0]["license"], "lic-shared");
    assert!(sharing[0]["clients"].as_u64().unwrap() > 3);
    assert!(sharing[0]["blocked_until_ms"].as_u64().is_some());
    let events = s.collector.state.store.webhook_events(100).unwrap();
    let alerts: Vec<_> = events
        .iter()
        .filter(|e| e.event_type == "license.sharing_detected")
        .collect();
    assert_eq!(alerts.len(), 1, "{events:?}");
    assert_eq!(alerts[0].payload["license"], "lic-shared");
    let metrics = request(s.collector.addr, "GET", "/metrics", &[]).unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        metrics.contains("tollgate_collector_sharing_alerts_total 1"),
        "{metrics}"
    );
    // No client address is stored raw.
    let db = database_bytes(&s);
    for i in 11..=18 {
        assert!(
            !contains(&db, &format!("127.0.0.{i}")),
            "127.0.0.{i} is stored raw"
        );
    }
}
