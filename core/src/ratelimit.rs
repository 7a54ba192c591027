//! GCRA rate limits (through `governor`) whose state lives in cells shared by every worker.
//!
//! Envoy runs one VM per worker; a limit kept in each VM would let N workers admit N times the
//! rate. The state of a GCRA limit is one number (the theoretical arrival time, TAT), so it is
//! kept in proxy-wasm shared data and updated with compare-and-swap: read, let governor decide,
//! write back only if no other worker wrote in between, else retry.
//!
//! Those are two shared-data calls per request. A worker may instead take `k` requests from a
//! bucket at once (`rate_limit_lease`) and admit them from its own memory: one read and write
//! per `k` requests. The tokens are taken from the shared bucket when leased, so leasing never
//! admits more over time; it lets tokens taken earlier be spent later, so in any window a limit
//! admits at most `burst + rate x window + workers x (k - 1)` (a lease of `k` holds `k - 1` after
//! its first request). `k` is at most `burst / 8`, so a small burst is kept exactly; and a lease
//! lives [`LEASE_LIFETIME_NANOS`], so that one idle worker does not sit on tokens.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{NotUntil, Quota, RateLimiter};

use crate::config::RateQuota;

/// Cells of `u64` shared by every worker, with a version for compare-and-swap.
/// In Envoy: proxy-wasm shared data. In tests: [`MemoryCells`].
pub trait SharedCells {
    /// The value and its version, or `None` if the cell was never written.
    fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError>;
    /// Write `value` if the cell is still at `version` (`None`: the cell did not exist).
    /// `Ok(false)` means another writer came first.
    fn compare_and_swap(
        &self,
        key: &str,
        value: u64,
        version: Option<u32>,
    ) -> Result<bool, StoreError>;
}

/// The shared store failed (not a CAS conflict).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError;

impl<T: SharedCells + ?Sized> SharedCells for Rc<T> {
    fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        (**self).load(key)
    }
    fn compare_and_swap(
        &self,
        key: &str,
        value: u64,
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        (**self).compare_and_swap(key, value, version)
    }
}

/// In-memory cells, for native tests and tools; several limiters may share one through `Rc`.
#[derive(Debug, Default)]
pub struct MemoryCells {
    cells: std::cell::RefCell<HashMap<String, (u64, u32)>>,
    /// Byte values (quota pools, denials), as shared data holds them next to the cells.
    blobs: crate::quota::MemoryBlobs,
}

impl crate::quota::SharedBlobs for MemoryCells {
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.blobs.load(key)
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        self.blobs.compare_and_swap(key, value, version)
    }
}

impl SharedCells for MemoryCells {
    fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        Ok(self.cells.borrow().get(key).copied())
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: u64,
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let mut cells = self.cells.borrow_mut();
        let current = cells.get(key).map(|(_, v)| *v);
        if current != version {
            return Ok(false);
        }
        let next = current.map_or(1, |v| v.wrapping_add(1));
        cells.insert(key.to_string(), (value, next));
        Ok(true)
    }
}

/// How many times a conflicting CAS is retried before the decision is taken without it.
const CAS_ATTEMPTS: usize = 32;

/// How long leased tokens may wait to be spent.
pub const LEASE_LIFETIME_NANOS: u64 = 1_000_000_000;
/// A lease is at most this share of the burst (`burst / 8`).
const LEASE_BURST_SHARE: u32 = 8;
/// Leases held at once, at most (beyond it, new keys are checked one request at a time).
const MAX_LEASES: usize = 4_096;

/// Requests taken from a shared bucket and not admitted yet.
#[derive(Debug, Clone, Copy)]
struct Lease {
    quota: RateQuota,
    tokens: u32,
    /// The bucket's capacity left when the lease was taken (for the `RateLimit` header).
    remaining: u32,
    expires_nanos: u64,
}

/// Health of the shared store, for stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreHealth {
    pub cas_conflicts: u64,
    pub errors: u64,
}

/// The store's health as it is counted: atomics, so that a gate can be shared by threads
/// (the native module keeps one gate for all of Envoy's workers).
#[derive(Debug, Default)]
struct HealthCounts {
    cas_conflicts: AtomicU64,
    errors: AtomicU64,
}

/// governor's state store over [`SharedCells`].
struct CellStore<S> {
    cells: S,
    health: Arc<HealthCounts>,
}

impl<S: SharedCells> CellStore<S> {
    fn note_conflict(&self) {
        self.health.cas_conflicts.fetch_add(1, Ordering::Relaxed);
    }

    fn note_error(&self) {
        self.health.errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: SharedCells> StateStore for CellStore<S> {
    type Key = Box<str>;

    fn measure_and_replace<T, F, E>(&self, key: &Box<str>, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let current = match self.cells.load(key) {
                Ok(current) => current,
                Err(StoreError) => {
                    // Without the shared store the best available answer is a fresh bucket:
                    // requests keep flowing and the error shows in stats.
                    self.note_error();
                    return f(None).map(|(t, _)| t);
                }
            };
            let (outcome, new_tat) = f(current.map(|(tat, _)| Nanos::from(tat)))?;
            match self
                .cells
                .compare_and_swap(key, new_tat.as_u64(), current.map(|(_, v)| v))
            {
                Ok(true) => return Ok(outcome),
                Ok(false) if attempts < CAS_ATTEMPTS => self.note_conflict(),
                Ok(false) => return Ok(outcome),
                Err(StoreError) => {
                    self.note_error();
                    return Ok(outcome);
                }
            }
        }
    }
}

/// A clock that reads the time the adapter last set: the host's, in nanoseconds since the
/// Unix epoch.
#[derive(Debug, Clone, Default)]
struct SetClock(Arc<AtomicU64>);

impl SetClock {
    fn set(&self, now_nanos: u64) {
        self.0.store(now_nanos, Ordering::Relaxed);
    }
}

impl Clock for SetClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.0.load(Ordering::Relaxed))
    }
}

type Limiter<S> = RateLimiter<Box<str>, CellStore<S>, SetClock, StateInformationMiddleware>;

/// Rate limits for every quota in use, all over one shared store.
pub struct RateLimits<S: SharedCells + Clone> {
    cells: S,
    clock: SetClock,
    health: Arc<HealthCounts>,
    limiters: HashMap<RateQuota, Limiter<S>>,
    /// Requests taken at once from a bucket (1: none leased).
    lease_tokens: u32,
    leases: HashMap<Box<str>, Lease>,
    /// No expired lease is looked for before then (see `take_lease`).
    next_prune_nanos: u64,
}

impl<S: SharedCells + Clone> RateLimits<S> {
    /// Every request checked against the shared bucket.
    pub fn new(cells: S) -> Self {
        Self::with_lease(cells, 1)
    }

    /// Up to `lease_tokens` requests taken from a bucket at once (see the module's docs).
    pub fn with_lease(cells: S, lease_tokens: u32) -> Self {
        RateLimits {
            cells,
            clock: SetClock::default(),
            health: Arc::default(),
            limiters: HashMap::new(),
            lease_tokens: lease_tokens.max(1),
            leases: HashMap::new(),
            next_prune_nanos: 0,
        }
    }

    /// The lease size for `quota`: a small burst is never leased.
    fn lease_size(&self, quota: RateQuota) -> u32 {
        self.lease_tokens
            .min(quota.burst / LEASE_BURST_SHARE)
            .max(1)
    }

    /// Take one request from `key`'s bucket at `now` (Unix nanoseconds): the requests the
    /// bucket still admits at once after this one, or on refusal the nanoseconds until a
    /// request would conform.
    // governor's keyed limiter takes `&K`; the key is the `Box<str>` a license holds.
    #[allow(clippy::borrowed_box)]
    pub fn check(&mut self, key: &Box<str>, quota: RateQuota, now_nanos: u64) -> Result<u32, u64> {
        let lease = self.lease_size(quota);
        if lease > 1 {
            if let Some(held) = self.leases.get_mut(&**key) {
                if held.quota == quota && held.tokens > 0 && now_nanos < held.expires_nanos {
                    held.tokens -= 1;
                    return Ok(held.remaining.saturating_add(held.tokens));
                }
            }
            if let Some(remaining) = self.take_lease(key, quota, lease, now_nanos) {
                return Ok(remaining);
            }
        }
        let limiter = match self.limiter(quota, now_nanos) {
            Ok(limiter) => limiter,
            Err(burst) => return Ok(burst),
        };
        limiter
            .check_key(key)
            .map(|state| state.remaining_burst_capacity())
            .map_err(|not_until: NotUntil<Nanos>| {
                let wait: Duration = not_until.wait_time_from(Nanos::from(now_nanos));
                u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX)
            })
    }

    /// Take `size` requests from `key`'s bucket (the first admitted now, the rest leased): the
    /// requests left, or `None` when the bucket cannot give them all (then one is asked for).
    // governor's keyed limiter takes `&K`.
    #[allow(clippy::borrowed_box)]
    fn take_lease(
        &mut self,
        key: &Box<str>,
        quota: RateQuota,
        size: u32,
        now_nanos: u64,
    ) -> Option<u32> {
        if self.leases.len() >= MAX_LEASES && !self.leases.contains_key(&**key) {
            // Pruned at most once per lease lifetime: with more busy keys than leases, the
            // keys beyond the cap are checked one request at a time, not scanned for.
            if now_nanos < self.next_prune_nanos {
                return None;
            }
            self.next_prune_nanos = now_nanos.saturating_add(LEASE_LIFETIME_NANOS);
            self.leases.retain(|_, l| l.expires_nanos > now_nanos);
            if self.leases.len() >= MAX_LEASES {
                return None;
            }
        }
        let n = NonZeroU32::new(size)?;
        let limiter = self.limiter(quota, now_nanos).ok()?;
        let state = limiter.check_key_n(key, n).ok()?.ok()?;
        let lease = Lease {
            quota,
            tokens: size - 1,
            remaining: state.remaining_burst_capacity(),
            expires_nanos: now_nanos.saturating_add(LEASE_LIFETIME_NANOS),
        };
        let remaining = lease.remaining.saturating_add(lease.tokens);
        match self.leases.get_mut(&**key) {
            Some(held) => *held = lease,
            None => {
                self.leases.insert(key.clone(), lease);
            }
        }
        Some(remaining)
    }

    /// The limiter of `quota`, its clock set to `now_nanos` (`Err(burst)`: a quota governor
    /// cannot express, which admits everything).
    fn limiter(&mut self, quota: RateQuota, now_nanos: u64) -> Result<&Limiter<S>, u32> {
        let limiter = match self.limiters.entry(quota) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // governor measures time from the limiter's creation. Creating every limiter
                // while the clock reads 0 makes that origin the Unix epoch, so the TATs kept in
                // shared data mean the same to every worker and survive VM restarts.
                self.clock.set(0);
                let Some(governor_quota) = governor_quota(quota) else {
                    return Err(quota.burst);
                };
                let store = CellStore {
                    cells: self.cells.clone(),
                    health: Arc::clone(&self.health),
                };
                e.insert(Limiter::new(governor_quota, store, self.clock.clone()))
            }
        };
        self.clock.set(now_nanos);
        Ok(limiter)
    }

    /// Conflicts and errors met in the shared store so far.
    pub fn health(&self) -> StoreHealth {
        StoreHealth {
            cas_conflicts: self.health.cas_conflicts.load(Ordering::Relaxed),
            errors: self.health.errors.load(Ordering::Relaxed),
        }
    }
}

fn governor_quota(quota: RateQuota) -> Option<Quota> {
    let burst = NonZeroU32::new(quota.burst)?;
    Some(Quota::with_period(Duration::from_nanos(quota.period_nanos))?.allow_burst(burst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const SECOND: u64 = 1_000_000_000;
    // Some day in 2026, in nanoseconds since the epoch: TATs are absolute times.
    const T0: u64 = 1_780_000_000 * SECOND;

    fn quota(rps: u64, burst: u32) -> RateQuota {
        RateQuota {
            period_nanos: SECOND / rps,
            burst,
        }
    }

    #[test]
    fn burst_then_sustained_rate() {
        let mut limits = RateLimits::new(Rc::new(MemoryCells::default()));
        let key: Box<str> = "lic".into();
        let q = quota(10, 5);
        for left in (0..5).rev() {
            assert_eq!(limits.check(&key, q, T0), Ok(left));
        }
        let wait = limits.check(&key, q, T0).unwrap_err();
        assert_eq!(wait, SECOND / 10);
        // One period later exactly one more request conforms.
        assert_eq!(limits.check(&key, q, T0 + SECOND / 10), Ok(0));
        assert!(limits.check(&key, q, T0 + SECOND / 10).is_err());
        // After a full second the bucket is full again.
        for left in (0..5).rev() {
            assert_eq!(limits.check(&key, q, T0 + 2 * SECOND), Ok(left));
        }
    }

    #[test]
    fn two_workers_sharing_cells_admit_one_limit_not_two() {
        let cells = Rc::new(MemoryCells::default());
        let mut worker_a = RateLimits::new(Rc::clone(&cells));
        let mut worker_b = RateLimits::new(Rc::clone(&cells));
        let key: Box<str> = "lic".into();
        let q = quota(10, 10);
        let mut admitted = 0;
        // 3 seconds of requests alternating between workers, 100 per second each.
        for step in 0..600u64 {
            let now = T0 + step * SECOND / 200;
            let worker = if step % 2 == 0 {
                &mut worker_a
            } else {
                &mut worker_b
            };
            if worker.check(&key, q, now).is_ok() {
                admitted += 1;
            }
        }
        // burst + rate * elapsed, within one request.
        assert!((39..=40).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn limiter_created_later_reads_the_same_state() {
        let cells = Rc::new(MemoryCells::default());
        let key: Box<str> = "lic".into();
        let q = quota(1, 1);
        let mut first = RateLimits::new(Rc::clone(&cells));
        assert_eq!(first.check(&key, q, T0), Ok(0));
        // A VM started after a reload sees the bucket the old VM drained.
        let mut second = RateLimits::new(Rc::clone(&cells));
        assert_eq!(second.check(&key, q, T0 + SECOND / 2), Err(SECOND / 2));
    }

    /// Cells that count their reads: each is a shared-data call in Envoy.
    #[derive(Default)]
    struct Counted {
        inner: MemoryCells,
        loads: Cell<u64>,
    }

    impl SharedCells for Counted {
        fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
            self.loads.set(self.loads.get() + 1);
            self.inner.load(key)
        }
        fn compare_and_swap(
            &self,
            key: &str,
            value: u64,
            version: Option<u32>,
        ) -> Result<bool, StoreError> {
            self.inner.compare_and_swap(key, value, version)
        }
    }

    #[test]
    fn a_lease_serves_k_requests_per_shared_call() {
        let cells = Rc::new(Counted::default());
        let mut limits = RateLimits::with_lease(Rc::clone(&cells), 16);
        let key: Box<str> = "lic".into();
        let q = quota(1_000, 1_000);
        for i in 0..160u64 {
            assert!(limits.check(&key, q, T0 + i * 1_000).is_ok());
        }
        assert_eq!(cells.loads.get(), 10);
    }

    #[test]
    fn leases_across_workers_stay_within_the_documented_bound() {
        // 4 workers, each leasing 16, a limit of 100/s with a burst of 200; 3 s of requests,
        // 1,000 per second per worker in turn.
        let cells = Rc::new(MemoryCells::default());
        let mut workers: Vec<_> = (0..4)
            .map(|_| RateLimits::with_lease(Rc::clone(&cells), 16))
            .collect();
        let key: Box<str> = "lic".into();
        let q = quota(100, 200);
        let mut admitted = 0u64;
        for step in 0..12_000u64 {
            let now = T0 + step * SECOND / 4_000;
            let worker = &mut workers[(step % 4) as usize];
            if worker.check(&key, q, now).is_ok() {
                admitted += 1;
            }
        }
        // burst + rate x 3 s = 500; leases may add workers x (k - 1) = 60, and hold back as
        // many (tokens leased and not spent yet when the test ends).
        assert!((440..=560).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn a_small_burst_is_never_leased() {
        let cells = Rc::new(Counted::default());
        let mut a = RateLimits::with_lease(Rc::clone(&cells), 16);
        let mut b = RateLimits::with_lease(Rc::clone(&cells), 16);
        let key: Box<str> = "lic".into();
        // burst 15 / 8 = 1: every request reads the shared bucket, and two workers admit
        // the burst exactly.
        let q = quota(1, 15);
        let admitted = (0..40)
            .filter(|i| {
                let w = if i % 2 == 0 { &mut a } else { &mut b };
                w.check(&key, q, T0).is_ok()
            })
            .count();
        assert_eq!(admitted, 15);
        assert_eq!(cells.loads.get(), 40);
    }

    #[test]
    fn unspent_leased_tokens_lapse_after_the_lease_lifetime() {
        let cells = Rc::new(MemoryCells::default());
        let mut limits = RateLimits::with_lease(Rc::clone(&cells), 16);
        let key: Box<str> = "lic".into();
        // 16/s, burst 128: one request leases 16 of the burst.
        let q = quota(16, 128);
        assert_eq!(limits.check(&key, q, T0), Ok(112 + 15));
        assert_eq!(limits.check(&key, q, T0 + 1), Ok(112 + 14));
        // Past the lease's life its 14 tokens are gone (taken from the bucket, never
        // admitted): a new lease comes from the bucket, which refilled 16 in that second.
        let later = T0 + LEASE_LIFETIME_NANOS;
        assert_eq!(limits.check(&key, q, later), Ok(112 + 15));
    }

    #[test]
    fn keys_beyond_the_lease_cap_are_checked_one_request_at_a_time() {
        let cells = Rc::new(Counted::default());
        let mut limits = RateLimits::with_lease(Rc::clone(&cells), 16);
        let q = quota(1_000, 1_000);
        for i in 0..MAX_LEASES {
            let key: Box<str> = format!("lic-{i}").into();
            assert!(limits.check(&key, q, T0).is_ok());
        }
        assert_eq!(limits.leases.len(), MAX_LEASES);
        let before = cells.loads.get();
        let extra: Box<str> = "lic-extra".into();
        for _ in 0..10 {
            assert!(limits.check(&extra, q, T0 + 1).is_ok());
        }
        // Not leased (the cap holds), and still limited through the shared bucket.
        assert_eq!(limits.leases.len(), MAX_LEASES);
        assert_eq!(cells.loads.get() - before, 10);
        // Once the leases lapsed, a prune makes room.
        assert!(limits
            .check(&extra, q, T0 + LEASE_LIFETIME_NANOS + 1)
            .is_ok());
        assert_eq!(limits.leases.len(), 1);
    }

    /// Cells whose every first CAS loses to another writer.
    struct Contended {
        inner: MemoryCells,
        lose_next: Cell<bool>,
    }

    impl SharedCells for Contended {
        fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
            self.inner.load(key)
        }
        fn compare_and_swap(
            &self,
            key: &str,
            value: u64,
            version: Option<u32>,
        ) -> Result<bool, StoreError> {
            if self.lose_next.replace(false) {
                // Another worker takes a request in between our read and our write.
                let current = self.inner.load(key)?;
                let tat = current.map_or(T0, |(t, _)| t) + SECOND;
                self.inner
                    .compare_and_swap(key, tat, current.map(|(_, v)| v))?;
                return Ok(false);
            }
            self.lose_next.set(true);
            self.inner.compare_and_swap(key, value, version)
        }
    }

    #[test]
    fn cas_conflict_rereads_and_decides_again() {
        let cells = Rc::new(Contended {
            inner: MemoryCells::default(),
            lose_next: Cell::new(false),
        });
        let mut limits = RateLimits::new(Rc::clone(&cells));
        let key: Box<str> = "lic".into();
        let q = quota(1, 2);
        assert_eq!(limits.check(&key, q, T0), Ok(1));
        // This check's first write loses: the other worker's request took the last unit.
        assert!(limits.check(&key, q, T0).is_err());
        assert_eq!(limits.health().cas_conflicts, 1);
    }
}
