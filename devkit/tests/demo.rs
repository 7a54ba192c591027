//! `make run` and `make up` as a new user meets them: the script ends with every call stored,
//! and a signal stops the stack at once, Envoy included, leaving no folders behind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The demo as a child process, its stdout lines arriving on a channel.
fn demo(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-demo"))
        .args(args)
        .env_remove("TOLLGATE_KEEP_TMP")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Lines until one contains `marker`, or the deadline.
fn read_until(rx: &mpsc::Receiver<String>, marker: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let found = line.contains(marker);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!("no line with {marker:?}:\n{}", seen.join("\n"));
}

/// The word after `after` on the banner line that starts with `label`.
fn banner(seen: &[String], label: &str, after: &str) -> String {
    let line = seen
        .iter()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line:\n{}", seen.join("\n")));
    let rest = &line[line.find(after).unwrap() + after.len()..];
    rest.split([' ', ',', ')']).next().unwrap().to_string()
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the demo did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process that ended and was waited for is gone from /proc; a zombie is not.
fn gone(pid: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_demo_stores_every_call_and_leaves_nothing_behind() {
    let (mut child, rx) = demo(&[]);
    let mut seen = Vec::new();
    read_until(&rx, "calls stored for", &mut seen);
    let stored = seen.last().unwrap().clone();
    let numbers: Vec<u64> = stored
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 2, "{stored}");
    assert_eq!(numbers[0], numbers[1], "{}", seen.join("\n"));
    assert!(wait_exit(&mut child).success(), "{}", seen.join("\n"));
    let scratch = banner(&seen, "temporary files", "temporary files  ");
    assert!(
        !std::path::Path::new(&scratch).exists(),
        "{scratch} is left"
    );
    assert!(gone(&banner(&seen, "envoy listener", "(pid ")));
    assert!(
        seen.iter()
            .any(|l| l.contains("plugin config envoy/demo.json")),
        "{}",
        seen.join("\n")
    );
}

#[test]
fn a_signal_stops_the_kept_stack_envoy_included() {
    let (mut child, rx) = demo(&["--keep-running"]);
    let mut seen = Vec::new();
    read_until(&rx, "dashboard", &mut seen);
    // A token for every demo account, ready for curl.
    for account in ["ACME", "GLOBEX", "UMBRELLA", "HOOLI", "INITECH"] {
        assert!(
            seen.iter()
                .any(|l| l.starts_with(&format!("  export {account}='ey"))),
            "{account}: {}",
            seen.join("\n")
        );
    }
    let scratch = banner(&seen, "temporary files", "temporary files  ");
    let envoy = banner(&seen, "envoy listener", "(pid ");
    assert!(std::path::Path::new(&format!("/proc/{envoy}")).exists());
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(130), "{}", seen.join("\n"));
    assert!(gone(&envoy), "Envoy (pid {envoy}) outlived the demo");
    assert!(
        !std::path::Path::new(&scratch).exists(),
        "{scratch} is left"
    );
}
