//! The collector's clock: the system's wall clock in milliseconds, which NTP (or an operator)
//! may step forward or back, plus an offset that tests step instead of the machine's clock.
//! Periods, leases, seats, budgets, invoices and webhook retries all read it; readiness uses
//! the monotonic clock instead (see `health`). What a step does is documented in
//! docs/testing.md (Faults: a clock that jumps) and shown by `tests/clock.rs`.

use std::sync::atomic::{AtomicI64, Ordering};

/// Wall-clock time, stepped by [`Clock::step`].
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        let wall = u64::try_from(now_ms()).unwrap_or(0);
        let offset = self.offset_ms.load(Ordering::Relaxed);
        if offset >= 0 {
            wall.saturating_add(offset.unsigned_abs())
        } else {
            wall.saturating_sub(offset.unsigned_abs())
        }
    }

    /// Step the clock by `by_ms` (negative: back), as NTP stepping the system clock would.
    pub fn step(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }
}

/// Unix milliseconds now, by the system's clock (no offset: what stored rows are stamped with).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
