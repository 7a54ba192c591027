//! The collector as a child process: the real program, which a test can kill with SIGKILL
//! (an in-process collector can only be stopped gracefully).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `tollgate-collector serve` process; killed when dropped.
pub struct CollectorProcess {
    child: Child,
    log: PathBuf,
    pub port: u16,
}

impl CollectorProcess {
    /// Run `bin serve` on 127.0.0.1:`port` (0: a free port) with `database` and one ingest
    /// key `key_id=secret`; returns once it listens. Its log goes to `log`.
    pub fn start(
        bin: &Path,
        port: u16,
        database: &str,
        ingest_key: &str,
        log: &Path,
    ) -> Result<CollectorProcess> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(bin)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", database, "--ingest-key", ingest_key])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut process = CollectorProcess {
            child,
            log: log.to_path_buf(),
            port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.child.try_wait()? {
                bail!("collector exited ({status}):\n{}", process.log_text());
            }
            if let Some(port) = listening_port(&process.log_text()) {
                process.port = port;
                return Ok(process);
            }
            if Instant::now() > deadline {
                bail!(
                    "collector did not listen within 30 s:\n{}",
                    process.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no graceful shutdown, batches in flight are cut off mid-transaction.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CollectorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The port of the `collector listening` log line.
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["message"] != "collector listening" {
            return None;
        }
        v["addr"].as_str()?.rsplit_once(':')?.1.parse().ok()
    })
}

/// Allowed calls of `license` stored by the collector `c` (what it will bill).
pub fn stored_allowed_calls(c: &tollgate_collector::Running, license: &str) -> Result<u64> {
    let rows = c.state.store.usage(&tollgate_collector::UsageQuery {
        license: Some(license.into()),
        meter: Some("calls".into()),
        outcome: Some("allowed".into()),
        ..Default::default()
    })?;
    Ok(rows.iter().map(|r| r.units).sum())
}

/// A process's resident memory (KiB) and open file descriptors, from /proc.
pub fn rss_kib_and_fds(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}
