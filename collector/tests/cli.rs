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
    let issued: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = issued["token"].as_str().unwrap();
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
