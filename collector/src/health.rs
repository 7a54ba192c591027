//! Liveness and readiness, answered from memory.
//!
//! `/healthz` says the process serves HTTP. `/readyz` says the store answered a probe made on a
//! connection of its own within the last [`STALE_AFTER`]. Both answer in microseconds whatever
//! ingest is doing: a readiness check that queued behind ingest for the store's one connection
//! (as `/readyz` once did) timed out under load, took a healthy replica out of Envoy's cluster
//! and left the cluster in panic mode, where a replica that is really down gets batches too.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::storage::{Store, StoreProbe};

/// How often the prober checks the store. A stopped store is seen within this (plus the
/// failing check's own time), well inside the shipped configs' 1 s health-check interval.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// A last good check older than this means the probe hangs (a database that stopped answering
/// without closing its connection): not ready.
pub const STALE_AFTER: Duration = Duration::from_millis(1000);

/// What the prober last saw.
#[derive(Default)]
pub struct Readiness {
    /// Nanoseconds since [`epoch`] of the last good check; 0: none yet.
    ok_at_ns: AtomicU64,
    /// Checks done, good or not.
    checks: AtomicU64,
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// The monotonic origin of readiness times (a wall clock that jumps must not make a store
/// look stale or fresh).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch_ns(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The answer to `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyAnswer {
    pub ready: bool,
    pub body: String,
}

impl Readiness {
    /// Note a check's result, taken at `at`.
    pub fn record(&self, result: &anyhow::Result<()>, at: Instant) {
        match result {
            Ok(()) => {
                self.ok_at_ns.store(since_epoch_ns(at), Ordering::Release);
                self.failing.store(false, Ordering::Release);
            }
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(format!("{e:#}"));
                }
                self.failing.store(true, Ordering::Release);
            }
        }
        self.checks.fetch_add(1, Ordering::AcqRel);
    }

    /// Checks done so far.
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Acquire)
    }

    /// Ready at `now`: the last check was good and is recent.
    pub fn answer(&self, now: Instant) -> ReadyAnswer {
        let checks = self.checks();
        let ok_at = self.ok_at_ns.load(Ordering::Acquire);
        let age_ms = (ok_at > 0).then(|| since_epoch_ns(now).saturating_sub(ok_at) / 1_000_000);
        let failing = self.failing.load(Ordering::Acquire);
        let stale = age_ms.is_none_or(|age| u128::from(age) > STALE_AFTER.as_millis());
        let ready = !failing && !stale;
        let mut body = json!({"ready": ready, "checks": checks, "last_ok_ms_ago": age_ms});
        if !ready {
            body["reason"] = json!(if failing {
                let last = self.last_error.lock().ok().and_then(|e| e.clone());
                format!("the store fails its check: {}", last.unwrap_or_default())
            } else if age_ms.is_none() {
                "the store has not been checked yet".to_string()
            } else {
                format!(
                    "the store's check has not answered for over {} ms",
                    STALE_AFTER.as_millis()
                )
            });
        }
        ReadyAnswer {
            ready,
            body: format!("{body}\n"),
        }
    }
}

/// The prober's thread: checks the store every [`PROBE_EVERY`] until dropped. A thread of its
/// own, not the runtime's blocking pool, so that ingest filling the pool cannot delay it.
pub struct Prober {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Start probing `store` into `readiness`; the first check is done before this returns, so
    /// a collector is ready (or says why not) from its first request.
    pub fn start(store: &dyn Store, readiness: Arc<Readiness>) -> std::io::Result<Prober> {
        let mut probe: Box<dyn StoreProbe> = store.probe();
        let first = probe.check();
        readiness.record(&first, Instant::now());
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tollgate-readiness".into())
            .spawn(move || loop {
                match stopped.recv_timeout(PROBE_EVERY) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
                let result = probe.check();
                readiness.record(&result, Instant::now());
            })?;
        Ok(Prober {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // A check that hangs (an unreachable database) is not waited for: the thread ends
        // when it returns.
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_a_recent_good_check() {
        let readiness = Readiness::default();
        epoch();
        let t0 = Instant::now();
        assert!(!readiness.answer(t0).ready, "no check yet");
        readiness.record(&Ok(()), t0);
        assert!(readiness.answer(t0 + Duration::from_millis(10)).ready);
        let stale = readiness.answer(t0 + STALE_AFTER + Duration::from_millis(1));
        assert!(!stale.ready);
        assert!(stale.body.contains("has not answered"), "{}", stale.body);
        readiness.record(&Err(anyhow::anyhow!("connection refused")), t0);
        let failing = readiness.answer(t0);
        assert!(!failing.ready);
        assert!(
            failing.body.contains("connection refused"),
            "{}",
            failing.body
        );
        readiness.record(&Ok(()), t0);
        assert!(readiness.answer(t0).ready);
        assert_eq!(readiness.checks(), 3);
    }
}
