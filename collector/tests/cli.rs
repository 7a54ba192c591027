//! The operator's command line as a new user meets it: names nobody knows are errors, reading
//! never creates a store, an issued license is usable as issued, a closed pipe is no panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::{Command, Output, Stdio};

const PLANS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../envoy/plans.json");

fn cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate-collector"))
        .args(args)
        .env_remove("TOLLGATE_DATABASE")
        .env_remove("TOLLGATE_PLANS")
        .env_remove("TOLLGATE_ISSUER")
        .env_remove("TOLLGATE_AUDIENCE")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh folder with a store made by `init`, and one license issued by the CLI.
fn store(name: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("tollgate.db").display());
    let out = cli(&["init", "--database", &url]);
    assert!(out.status.success(), "{}", text(&out));
    (dir, url)
}

fn issue(url: &str, plan: &str) -> Output {
    cli(&[
        "license",
        "issue",
        "--database",
        url,
        "--account",
        "acme",
        "--plan",
        plan,
        "--features",
        "search",
        "--license-id",
        "lic-acme-1",
        "--issuer",
        "https://licenses.example",
        "--audience",
        "api.example",
        "--plans",
        PLANS,
    ])
}

#[test]
fn reading_commands_never_create_a_store() {
    let dir = std::env::temp_dir().join(format!("tollgate-cli-none-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("typo.db");
    let url = format!("sqlite://{}", missing.display());
    for args in [
        vec!["usage", "--database", &url],
        vec!["license", "list", "--database", &url],
        vec!["keys", "list", "--database", &url],
        vec![
            "revoke",
            "--database",
            &url,
            "--license",
            "lic-x",
            "--force",
        ],
    ] {
        let out = cli(&args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("no database at"),
            "{args:?}: {}",
            text(&out)
        );
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }
    // A file that is not a Tollgate store is refused, and left as it was.
    std::fs::write(&missing, b"").unwrap();
    let out = cli(&["usage", "--database", &url]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not a Tollgate database"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::metadata(&missing).unwrap().len(), 0);
}

#[test]
fn names_nobody_knows_are_errors_unless_forced() {
    let (_dir, url) = store("unknown");
    let out = issue(&url, "pro");
    assert!(out.status.success(), "{}", text(&out));
    for args in [
        vec!["revoke", "--database", &url, "--license", "lic-nope"],
        vec![
            "revoke",
            "--database",
            &url,
            "--license",
            "lic-nope",
            "--undo",
        ],
        vec!["suspend", "--database", &url, "--account", "nobody"],
        vec![
            "budget",
            "--database",
            &url,
            "--account",
            "nobody",
            "--amount",
            "5",
        ],
        vec!["account", "--database", &url, "--account", "nobody"],
        vec!["users", "--database", &url, "--account", "nobody"],
        vec![
            "invoice",
            "--database",
            &url,
            "--account",
            "nobody",
            "--plans",
            PLANS,
        ],
        vec!["license", "list", "--database", &url, "--account", "nobody"],
        vec![
            "license",
            "show",
            "--database",
            &url,
            "--license",
            "lic-nope",
        ],
    ] {
        let out = cli(&args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        assert!(
            text(&out).contains("nope") || text(&out).contains("nobody"),
            "{args:?}: {}",
            text(&out)
        );
    }
    // Known names work; a license issued elsewhere is revoked with --force.
    let out = cli(&["revoke", "--database", &url, "--license", "lic-acme-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&[
        "license",
        "show",
        "--database",
        &url,
        "--license",
        "lic-acme-1",
    ]);
    assert!(
        text(&out).contains("revoked by an operator"),
        "{}",
        text(&out)
    );
    let out = cli(&[
        "revoke",
        "--database",
        &url,
        "--license",
        "lic-elsewhere",
        "--force",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // ... and once revoked it is known: the revocation can be lifted without --force.
    let out = cli(&[
        "revoke",
        "--database",
        &url,
        "--license",
        "lic-elsewhere",
        "--undo",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(&["suspend", "--database", &url, "--account", "acme"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_license_issued_by_the_command_line_is_checked_and_usable_as_issued() {
    let (_dir, url) = store("issue");
    let out = issue(&url, "platinum");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not in the plan catalogue"),
        "{}",
        text(&out)
    );
    // Without an issuer (flag or TOLLGATE_ISSUER) the token would be refused by filters.
    let out = cli(&[
        "license",
        "issue",
        "--database",
        &url,
        "--account",
        "acme",
        "--plan",
        "pro",
        "--plans",
        PLANS,
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--issuer"), "{}", text(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-collector"))
        .args([
            "license",
            "issue",
            "--database",
            &url,
            "--account",
            "acme",
            "--plan",
            "pro",
        ])
        .env("TOLLGATE_PLANS", PLANS)
        .env("TOLLGATE_ISSUER", "https://licenses.example")
        .env("TOLLGATE_AUDIENCE", "api.example")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The token alone on stdout (for `TOKEN=$(...)`), what it grants on stderr.
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let token = stdout.trim();
    assert_eq!(token.split('.').count(), 3, "{stdout}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("plan:"),
        "{}",
        text(&out)
    );
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["iss"], "https://licenses.example");
    assert_eq!(claims["aud"], "api.example");
}

#[test]
fn invoices_need_a_catalogue_and_filters_must_match_something() {
    let (_dir, url) = store("filters");
    assert!(issue(&url, "pro").status.success());
    let out = cli(&["invoice", "--database", &url, "--account", "acme"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--plans"), "{}", text(&out));
    let out = cli(&[
        "invoice",
        "--database",
        &url,
        "--account",
        "acme",
        "--plans",
        PLANS,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("has no usage"), "{}", text(&out));

    let out = cli(&["usage", "--database", &url, "--meter", "bogus"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("valid values: calls, processing_ns, request_bytes, response_bytes"),
        "{}",
        text(&out)
    );
    let out = cli(&["usage", "--database", &url, "--meter", "calls"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_reader_that_stops_early_is_no_panic() {
    let (_dir, url) = store("pipe");
    assert!(issue(&url, "pro").status.success());
    // `--help` output is long enough to fill a pipe nobody reads; `keys list` prints JSON.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-collector"))
        .args(["keys", "list", "--database", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.success(), "{status:?} {stderr}");
}

#[test]
fn people_get_tables_in_the_catalogues_time_and_machines_get_json() {
    let (_dir, url) = store("tables");
    assert!(issue(&url, "pro").status.success());
    // A table whose times are in the catalogue's zone (Berlin), not epoch milliseconds.
    let out = cli(&["license", "list", "--database", &url, "--plans", PLANS]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["license", "account", "plan", "features", "standing", "from", "until", "key"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["lic-acme-1", "acme", "pro", "search", "valid"]);
    assert!(
        row[5].ends_with("+01:00") || row[5].ends_with("+02:00"),
        "{table}"
    );
    // --json, anywhere on the line, gives the records.
    let out = cli(&["license", "list", "--database", &url, "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["licenses"][0]["license"], "lic-acme-1");
    assert!(listed["licenses"][0]["expires_ms"].is_u64());
    let out = cli(&["--json", "keys", "list", "--database", &url]);
    let keys: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(keys["keys"][0]["state"], "active");
    let out = cli(&["keys", "list", "--database", &url]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("kid "), "{table}");
    assert!(table.contains("EdDSA") && table.contains("Z "), "{table}");

    let out = cli(&[
        "license",
        "show",
        "--database",
        &url,
        "--license",
        "lic-acme-1",
    ]);
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(
        shown.contains("standing:") && shown.contains("valid"),
        "{shown}"
    );

    let out = cli(&[
        "invoice",
        "--database",
        &url,
        "--account",
        "acme",
        "--plans",
        PLANS,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let invoice = String::from_utf8(out.stdout).unwrap();
    assert!(
        invoice.contains("invoice:") && invoice.contains("total:"),
        "{invoice}"
    );
    assert!(invoice.contains("unit price"), "{invoice}");
    let out = cli(&[
        "invoice",
        "--database",
        &url,
        "--account",
        "acme",
        "--plans",
        PLANS,
        "--json",
    ]);
    let draft: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The id names the period's start as the period does, in the catalogue's zone.
    let id = draft["invoice_id"].as_str().unwrap();
    let start = draft["period_start"].as_str().unwrap();
    assert_eq!(id, format!("acme/{}", start.replace(".000", "")), "{draft}");
    let out = cli(&[
        "invoice",
        "--database",
        &url,
        "--account",
        "acme",
        "--plans",
        PLANS,
        "--json",
        "--csv",
    ]);
    assert!(!out.status.success(), "{}", text(&out));

    let out = cli(&[
        "account",
        "--database",
        &url,
        "--account",
        "acme",
        "--plans",
        PLANS,
    ]);
    let account = String::from_utf8(out.stdout).unwrap();
    assert!(
        account.contains("spend:") && account.contains("suspended:"),
        "{account}"
    );
    let out = cli(&["users", "--database", &url, "--account", "acme"]);
    let users = String::from_utf8(out.stdout).unwrap();
    assert!(users.contains("active users:"), "{users}");
}
