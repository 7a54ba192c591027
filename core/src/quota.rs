//! Period quotas, enforced with leases. The collector counts a license's quota; a filter holds
//! leases (slices of it, with a time to live) in a pool per (license, meter, period) that every
//! worker of one Envoy shares through proxy-wasm shared data, updated with compare-and-swap.
//!
//! A request reserves from a live lease when it starts (a call: 1; bytes and processing time:
//! an estimate) and commits the real amount when it ends. Units are only ever admitted out of
//! a grant, so with calls no Envoy can go over the quota; with bytes and time, a request can
//! end up larger than its reservation and the excess is taken past the grant (it is reported,
//! and the collector charges it to the quota). Leases that expire, or whose period ends, are
//! returned with the units they used once their in-flight reservations are committed, and the
//! collector gives the rest back to the quota.
//!
//! Pure logic with an injected clock; the adapter keeps a [`Pool`] in shared data through a
//! [`SharedBlobs`] and makes the sync calls.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tollgate_wire::sync::{LeaseGrant, LeaseReturn, Period};
use tollgate_wire::Meter;

use crate::ratelimit::StoreError;

/// How often an Envoy whose quota is used up asks the collector again.
pub const EXHAUSTED_RECHECK_MS: u64 = 5_000;

/// Lease ids a pool remembers having taken, so that a second answer for one of them is not
/// held twice. An answer comes at the latest when its call times out, a few seconds after it
/// was asked, and a pool asks for one lease at a time: 16 is many times what can be pending.
const APPLIED_KEPT: usize = 16;

/// A lease held in a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: String,
    pub granted: u64,
    /// Units reserved or committed so far (may exceed `granted`: an overshoot).
    pub used: u64,
    /// Reservations not committed yet.
    pub inflight: u32,
    /// Not used from this time on (the grant's expiry or the period's end).
    pub expires_ms: u64,
    /// Set when the lease stopped being used; it is returned once `inflight` is 0 (or the
    /// grace time is over).
    pub closing_since_ms: Option<u64>,
}

impl Lease {
    fn live(&self, now_ms: u64) -> bool {
        self.closing_since_ms.is_none() && now_ms < self.expires_ms
    }

    fn available(&self) -> u64 {
        self.granted.saturating_sub(self.used)
    }
}

/// A lease request in flight (by any worker).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    pub lease_id: String,
    pub since_ms: u64,
}

/// The leases of one quota in one Envoy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub leases: Vec<Lease>,
    /// The quota is used up until this time (the period's end): refuse without asking...
    pub exhausted_until_ms: u64,
    /// ... but ask again from this time on: leases other Envoys return unused go back to the
    /// quota, and an operator may raise the limit.
    pub recheck_ms: u64,
    /// From the latest grant: the period's end, the limit's units handed out.
    pub period_end_ms: u64,
    pub allocated: u64,
    pub fetch: Option<Fetch>,
    /// Units used outside leases (excess committed after its lease was returned; units
    /// admitted under `without_collector: allow`); added to the next return.
    pub unreported: u64,
    /// Units admitted without a lease since the last grant (`without_collector: allow`).
    pub allowance_used: u64,
    /// The latest lease ids taken into the pool (at most [`APPLIED_KEPT`]).
    #[serde(default)]
    pub applied: Vec<String>,
}

/// The outcome of a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Taken from `lease_id`; commit the real amount against it when the request ends.
    Taken { lease_id: String, units: u64 },
    /// Nothing left for the period: refuse until `until_ms`.
    Exhausted { until_ms: u64 },
    /// No live lease has units: one must be fetched (or is being fetched).
    NoLease,
}

impl Pool {
    /// Reserve `units` (or what a live lease has left, for an estimate) from the first live
    /// lease with anything left.
    pub fn reserve(&mut self, units: u64, now_ms: u64) -> Reservation {
        let units = units.max(1);
        if let Some(lease) = self
            .leases
            .iter_mut()
            .find(|l| l.live(now_ms) && l.available() > 0)
        {
            let taken = units.min(lease.available());
            lease.used = lease.used.saturating_add(taken);
            lease.inflight = lease.inflight.saturating_add(1);
            return Reservation::Taken {
                lease_id: lease.id.clone(),
                units: taken,
            };
        }
        if self.exhausted_until_ms > now_ms {
            return Reservation::Exhausted {
                until_ms: self.exhausted_until_ms,
            };
        }
        Reservation::NoLease
    }

    /// The request for `lease_id` got no grant (the sync failed, or the license is refused):
    /// the next sync asks again at once, under the same id.
    pub fn fetch_unanswered(&mut self, lease_id: &str) {
        if let Some(fetch) = self.fetch.as_mut().filter(|f| f.lease_id == lease_id) {
            fetch.since_ms = 0;
        }
    }

    /// Admit `units` without a lease, within `allowance` per outage (until the next grant).
    pub fn take_allowance(&mut self, units: u64, allowance: u64) -> bool {
        let after = self.allowance_used.saturating_add(units);
        if after > allowance {
            return false;
        }
        self.allowance_used = after;
        self.unreported = self.unreported.saturating_add(units);
        true
    }

    /// The request that reserved `reserved` from `lease_id` (empty: the allowance) ended
    /// having used `actual`.
    pub fn commit(&mut self, lease_id: &str, reserved: u64, actual: u64) {
        if lease_id.is_empty() {
            self.unreported = self
                .unreported
                .saturating_sub(reserved)
                .saturating_add(actual);
            // Units given back (a request not served after all) return to the allowance.
            self.allowance_used = self
                .allowance_used
                .saturating_sub(reserved.saturating_sub(actual));
            return;
        }
        match self.leases.iter_mut().find(|l| l.id == lease_id) {
            Some(lease) => {
                lease.used = lease.used.saturating_sub(reserved).saturating_add(actual);
                lease.inflight = lease.inflight.saturating_sub(1);
            }
            // Returned already (its grace time ran out first): the excess goes with the next
            // return, so the collector still counts it.
            None => {
                self.unreported = self
                    .unreported
                    .saturating_add(actual.saturating_sub(reserved))
            }
        }
    }

    /// Live units left in this Envoy's leases.
    pub fn available(&self, now_ms: u64) -> u64 {
        self.leases
            .iter()
            .filter(|l| l.live(now_ms))
            .map(Lease::available)
            .sum()
    }

    /// True when a lease should be requested now: not exhausted, no request in flight (or it
    /// is older than `fetch_timeout_ms`), and fewer than half of `want` units left.
    pub fn wants_lease(&self, want: u64, fetch_timeout_ms: u64, now_ms: u64) -> bool {
        if self.exhausted_until_ms > now_ms && now_ms < self.recheck_ms {
            return false;
        }
        if self
            .fetch
            .as_ref()
            .is_some_and(|f| now_ms.saturating_sub(f.since_ms) < fetch_timeout_ms)
        {
            return false;
        }
        self.available(now_ms).saturating_mul(2) < want.max(1)
    }

    /// Mark a lease request as in flight. A request that timed out is asked again under the
    /// same id (so a grant whose answer was lost is not granted twice).
    pub fn begin_fetch(&mut self, new_lease_id: impl FnOnce() -> String, now_ms: u64) -> String {
        let id = match self.fetch.take() {
            Some(old) => old.lease_id,
            None => new_lease_id(),
        };
        self.fetch = Some(Fetch {
            lease_id: id.clone(),
            since_ms: now_ms,
        });
        id
    }

    /// The collector answered a lease request that this worker sent (the caller checks that).
    ///
    /// The answer to the request in flight is taken. So is a grant for another id this pool
    /// has not taken yet: two workers that create a pool at once both ask for a lease, and
    /// Envoy cannot check a new key's first write, so one of the two requests in flight may
    /// be overwritten; its grant is allocated at the collector all the same, and dropping it
    /// would leave those units unused and never returned until the period ends. A second
    /// answer for an id already taken (two workers asked under it, or a retried call) is not
    /// held again: its units may already have been used and returned.
    pub fn apply_grant(&mut self, grant: &LeaseGrant, now_ms: u64) {
        let in_flight = self
            .fetch
            .as_ref()
            .is_some_and(|f| f.lease_id == grant.lease_id);
        let taken = self.applied.iter().any(|id| id == &grant.lease_id)
            || self.leases.iter().any(|l| l.id == grant.lease_id);
        if taken || (!in_flight && grant.granted == 0) {
            // A refusal for a request no longer in flight says nothing the pool's own
            // request will not say.
            return;
        }
        if in_flight {
            self.fetch = None;
        }
        if self.applied.len() >= APPLIED_KEPT {
            self.applied.remove(0);
        }
        self.applied.push(grant.lease_id.clone());
        self.period_end_ms = grant.period_end_ms;
        self.allocated = grant.allocated;
        if grant.granted == 0 {
            self.exhausted_until_ms = grant.period_end_ms.max(now_ms.saturating_add(1));
            self.recheck_ms = now_ms.saturating_add(EXHAUSTED_RECHECK_MS);
            return;
        }
        self.exhausted_until_ms = 0;
        self.allowance_used = 0;
        self.leases.push(Lease {
            id: grant.lease_id.clone(),
            granted: grant.granted,
            used: 0,
            inflight: 0,
            expires_ms: grant.expires_ms.min(grant.period_end_ms),
            closing_since_ms: None,
        });
    }

    /// Take leases out of use that expired or are used up, and give back those whose
    /// reservations are all committed (or that waited `grace_ms`): their returns, to send.
    pub fn sweep(&mut self, grace_ms: u64, now_ms: u64) -> Vec<LeaseReturn> {
        for lease in &mut self.leases {
            let spent = lease.available() == 0 && lease.inflight == 0;
            if lease.closing_since_ms.is_none() && (now_ms >= lease.expires_ms || spent) {
                lease.closing_since_ms = Some(now_ms);
            }
        }
        let mut returns = Vec::new();
        let mut unreported = std::mem::take(&mut self.unreported);
        self.leases.retain(|lease| {
            let done = lease.closing_since_ms.is_some_and(|since| {
                lease.inflight == 0 || now_ms.saturating_sub(since) >= grace_ms
            });
            if done {
                returns.push(LeaseReturn {
                    lease_id: lease.id.clone(),
                    used: lease.used.saturating_add(std::mem::take(&mut unreported)),
                });
            }
            !done
        });
        self.unreported = unreported;
        returns
    }

    /// The pool in shared data: a fixed binary layout (see [`pool_layout`]), which a request
    /// reads and writes twice (reserve, commit), so it is made and parsed without JSON.
    pub fn encode(&self) -> Vec<u8> {
        pool_layout::encode(self)
    }

    /// A stored pool. A value in the JSON an earlier build wrote (a configuration reload that
    /// brings a new filter into the same Envoy keeps shared data) still reads. A damaged value
    /// reads as an empty pool (its leases are then never returned: the quota is under-used for
    /// the period, never over-used).
    pub fn decode(bytes: &[u8]) -> Pool {
        if bytes.first() == Some(&b'{') {
            return serde_json::from_slice(bytes).unwrap_or_default();
        }
        pool_layout::decode(bytes).unwrap_or_default()
    }
}

/// The binary layout of a [`Pool`], little-endian, pinned by a golden test:
///
/// ```text
/// u8  version (1)
/// u64 exhausted_until_ms, recheck_ms, period_end_ms, allocated, unreported, allowance_used
/// u8  fetch present (0 or 1); if 1: u64 since_ms, str lease_id
/// u16 lease count; each: str id, u64 granted, u64 used, u32 inflight, u64 expires_ms,
///     u64 closing_since_ms (u64::MAX: not closing)
/// u16 applied count; each: str id
/// str = u16 byte length, then UTF-8
/// ```
///
/// Anything else (another version, a short or long value, bad UTF-8) does not decode.
mod pool_layout {
    use super::{Fetch, Lease, Pool};

    const VERSION: u8 = 1;
    const NOT_CLOSING: u64 = u64::MAX;

    pub(super) fn encode(pool: &Pool) -> Vec<u8> {
        let ids: usize = pool.leases.iter().map(|l| l.id.len() + 38).sum::<usize>()
            + pool.applied.iter().map(|a| a.len() + 2).sum::<usize>()
            + pool.fetch.as_ref().map_or(0, |f| f.lease_id.len() + 10);
        let mut out = Vec::with_capacity(54 + ids);
        out.push(VERSION);
        for n in [
            pool.exhausted_until_ms,
            pool.recheck_ms,
            pool.period_end_ms,
            pool.allocated,
            pool.unreported,
            pool.allowance_used,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        match &pool.fetch {
            Some(fetch) => {
                out.push(1);
                out.extend_from_slice(&fetch.since_ms.to_le_bytes());
                put_str(&mut out, &fetch.lease_id);
            }
            None => out.push(0),
        }
        // Counts and ids above u16::MAX cannot occur (a pool holds a few leases; ids are a
        // worker prefix and a number); they are cut rather than written wrongly.
        let kept = usize::from(u16::MAX);
        put_len(&mut out, pool.leases.len().min(kept));
        for lease in pool.leases.iter().take(kept) {
            put_str(&mut out, &lease.id);
            out.extend_from_slice(&lease.granted.to_le_bytes());
            out.extend_from_slice(&lease.used.to_le_bytes());
            out.extend_from_slice(&lease.inflight.to_le_bytes());
            out.extend_from_slice(&lease.expires_ms.to_le_bytes());
            let closing = lease.closing_since_ms.unwrap_or(NOT_CLOSING);
            out.extend_from_slice(&closing.to_le_bytes());
        }
        put_len(&mut out, pool.applied.len().min(kept));
        for id in pool.applied.iter().take(kept) {
            put_str(&mut out, id);
        }
        out
    }

    fn put_len(out: &mut Vec<u8>, len: usize) {
        let len = u16::try_from(len).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        let mut end = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        put_len(out, end);
        out.extend_from_slice(s.as_bytes().get(..end).unwrap_or_default());
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }

        fn u8(&mut self) -> Option<u8> {
            self.take(1).and_then(|b| b.first().copied())
        }

        fn u16(&mut self) -> Option<u16> {
            Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
        }

        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }

        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }

        fn str(&mut self) -> Option<String> {
            let len = usize::from(self.u16()?);
            let bytes = self.take(len)?;
            std::str::from_utf8(bytes).ok().map(str::to_string)
        }
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Pool> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let mut pool = Pool {
            exhausted_until_ms: r.u64()?,
            recheck_ms: r.u64()?,
            period_end_ms: r.u64()?,
            allocated: r.u64()?,
            unreported: r.u64()?,
            allowance_used: r.u64()?,
            ..Pool::default()
        };
        pool.fetch = match r.u8()? {
            0 => None,
            1 => {
                let since_ms = r.u64()?;
                Some(Fetch {
                    lease_id: r.str()?,
                    since_ms,
                })
            }
            _ => return None,
        };
        let leases = r.u16()?;
        pool.leases = Vec::with_capacity(usize::from(leases));
        for _ in 0..leases {
            let id = r.str()?;
            let (granted, used, inflight, expires_ms) = (r.u64()?, r.u64()?, r.u32()?, r.u64()?);
            let closing = r.u64()?;
            pool.leases.push(Lease {
                id,
                granted,
                used,
                inflight,
                expires_ms,
                closing_since_ms: (closing != NOT_CLOSING).then_some(closing),
            });
        }
        let applied = r.u16()?;
        pool.applied = (0..applied).map(|_| r.str()).collect::<Option<_>>()?;
        r.0.is_empty().then_some(pool)
    }
}

/// The shared-data key of a quota's pool: length-prefixed license so that ids with `/` cannot
/// collide.
pub fn pool_key(license: &str, meter: Meter, period: Period) -> String {
    format!(
        "tollgate/q/{}:{license}/{}/{}",
        license.len(),
        meter.as_str(),
        period.as_str()
    )
}

/// Byte values shared by the workers of one Envoy, with compare-and-swap (proxy-wasm shared
/// data in the filter; memory in tests).
pub trait SharedBlobs {
    /// The value and its version.
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Write if the version is still `version` (`None`: the key is new); false on a conflict.
    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError>;
}

impl<T: SharedBlobs + ?Sized> SharedBlobs for std::rc::Rc<T> {
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).load(key)
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        (**self).compare_and_swap(key, value, version)
    }
}

/// Compare-and-swap attempts before giving up (each is a read and a conditional write of a
/// few hundred bytes; workers only collide while touching the same quota at once).
const CAS_ATTEMPTS: usize = 1024;

/// Read-modify-write of the pool at `key`: `change` may run several times (once per conflict)
/// and its last result is returned.
pub fn update_pool<T>(
    shared: &impl SharedBlobs,
    key: &str,
    change: impl FnMut(&mut Pool) -> T,
) -> Result<T, StoreError> {
    update_blob(shared, key, Pool::decode, Pool::encode, change)
}

/// Read, change and write back one shared value with compare-and-swap, retried on conflicts.
pub fn update_blob<B: Default + PartialEq + Clone, T>(
    shared: &impl SharedBlobs,
    key: &str,
    decode: impl Fn(&[u8]) -> B,
    encode: impl Fn(&B) -> Vec<u8>,
    mut change: impl FnMut(&mut B) -> T,
) -> Result<T, StoreError> {
    for _ in 0..CAS_ATTEMPTS {
        let loaded = shared.load(key)?;
        let (mut value, version) = match &loaded {
            Some((bytes, version)) => (decode(bytes), Some(*version)),
            None => (B::default(), None),
        };
        let before = value.clone();
        let out = change(&mut value);
        // Nothing changed (a refusal while exhausted, a request that finds no lease, a user
        // holding a seat): no encoding and no write, which on the request path is a
        // shared-data write saved.
        if value == before {
            return Ok(out);
        }
        if shared.compare_and_swap(key, &encode(&value), version)? {
            return Ok(out);
        }
    }
    Err(StoreError)
}

/// [`SharedBlobs`] in memory, for tests and tools.
#[derive(Debug, Default)]
pub struct MemoryBlobs {
    values: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedBlobs for MemoryBlobs {
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let values = self.values.lock().map_err(|_| StoreError)?;
        Ok(values.get(key).cloned())
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        let mut values = self.values.lock().map_err(|_| StoreError)?;
        let current = values.get(key).map(|(_, v)| *v);
        if current != version {
            return Ok(false);
        }
        let next = current.unwrap_or(0).wrapping_add(1).max(1);
        values.insert(key.to_string(), (value.to_vec(), next));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_781_517_600_000;
    const END: u64 = T0 + 3_600_000;

    fn grant(id: &str, granted: u64, expires_ms: u64) -> LeaseGrant {
        LeaseGrant {
            lease_id: id.into(),
            granted,
            period_start_ms: T0 - 1000,
            period_end_ms: END,
            expires_ms,
            allocated: granted,
        }
    }

    fn taken(r: Reservation) -> (String, u64) {
        match r {
            Reservation::Taken { lease_id, units } => (lease_id, units),
            other => panic!("not taken: {other:?}"),
        }
    }

    #[test]
    fn calls_are_admitted_only_out_of_grants() {
        let mut pool = Pool::default();
        assert_eq!(pool.reserve(1, T0), Reservation::NoLease);
        assert!(pool.wants_lease(10, 2000, T0));
        let id = pool.begin_fetch(|| "a/1".into(), T0);
        assert!(!pool.wants_lease(10, 2000, T0), "one request at a time");
        pool.apply_grant(&grant(&id, 3, T0 + 10_000), T0);
        assert!(pool.fetch.is_none());
        for _ in 0..3 {
            let (lease, units) = taken(pool.reserve(1, T0));
            assert_eq!((lease.as_str(), units), ("a/1", 1));
            pool.commit(&lease, 1, 1);
        }
        assert_eq!(pool.reserve(1, T0), Reservation::NoLease);
        // Used up with nothing in flight: returned at once with what it used.
        assert_eq!(
            pool.sweep(5000, T0),
            vec![LeaseReturn {
                lease_id: "a/1".into(),
                used: 3
            }]
        );
        assert!(pool.leases.is_empty());
    }

    #[test]
    fn an_exhausted_quota_refuses_until_the_period_ends() {
        let mut pool = Pool::default();
        let id = pool.begin_fetch(|| "a/1".into(), T0);
        pool.apply_grant(&grant(&id, 0, T0 + 10_000), T0);
        assert_eq!(
            pool.reserve(1, T0),
            Reservation::Exhausted { until_ms: END }
        );
        assert!(!pool.wants_lease(10, 2000, T0 + 1000));
        // The next period: ask again.
        assert_eq!(pool.reserve(1, END), Reservation::NoLease);
        assert!(pool.wants_lease(10, 2000, END));
    }

    #[test]
    fn estimates_are_reserved_and_the_real_amount_committed() {
        let mut pool = Pool::default();
        pool.begin_fetch(|| "b/1".into(), T0);
        pool.apply_grant(&grant("b/1", 100_000, T0 + 10_000), T0);
        // Responses reserve 64 KiB each: the first gets it all, the second what is left.
        let r: Vec<(String, u64)> = (0..2).map(|_| taken(pool.reserve(65_536, T0))).collect();
        assert_eq!(r[0].1, 65_536);
        assert_eq!(r[1].1, 100_000 - 65_536);
        assert_eq!(pool.reserve(65_536, T0), Reservation::NoLease);
        // Small responses give the rest back...
        pool.commit(&r[0].0, r[0].1, 1_000);
        pool.commit(&r[1].0, r[1].1, 2_000);
        assert_eq!(pool.available(T0), 97_000);
        // ... a large one takes more than its reservation: an overshoot, reported as used.
        assert_eq!(
            pool.reserve(65_536, T0),
            Reservation::Taken {
                lease_id: "b/1".into(),
                units: 65_536
            }
        );
        pool.commit("b/1", 65_536, 250_000);
        assert_eq!(pool.available(T0), 0);
        let returns = pool.sweep(5000, T0 + 10_000);
        assert_eq!(
            returns,
            vec![LeaseReturn {
                lease_id: "b/1".into(),
                used: 253_000
            }]
        );
    }

    #[test]
    fn an_expired_lease_waits_for_its_reservations_then_returns_what_it_used() {
        let mut pool = Pool::default();
        pool.begin_fetch(|| "c/1".into(), T0);
        pool.apply_grant(&grant("c/1", 50, T0 + 1000), T0);
        let (lease, _) = taken(pool.reserve(10, T0));
        // Expired with a reservation in flight: out of use, not returned yet.
        assert!(pool.sweep(5000, T0 + 1000).is_empty());
        assert_eq!(pool.reserve(1, T0 + 1000), Reservation::NoLease);
        pool.commit(&lease, 10, 7);
        assert_eq!(
            pool.sweep(5000, T0 + 1100),
            vec![LeaseReturn {
                lease_id: "c/1".into(),
                used: 7
            }]
        );
        // A reservation that never commits is given up after the grace time; its late commit
        // goes with the next return.
        pool.begin_fetch(|| "c/2".into(), T0 + 1100);
        pool.apply_grant(&grant("c/2", 50, T0 + 2000), T0 + 1100);
        let (lease, _) = taken(pool.reserve(10, T0 + 1100));
        assert!(pool.sweep(5000, T0 + 2000).is_empty());
        assert_eq!(
            pool.sweep(5000, T0 + 7000),
            vec![LeaseReturn {
                lease_id: "c/2".into(),
                used: 10
            }]
        );
        pool.commit(&lease, 10, 30);
        assert_eq!(pool.unreported, 20);
        pool.begin_fetch(|| "c/3".into(), T0 + 7000);
        pool.apply_grant(&grant("c/3", 5, T0 + 8000), T0 + 7000);
        let (lease, _) = taken(pool.reserve(1, T0 + 7000));
        pool.commit(&lease, 1, 1);
        assert_eq!(
            pool.sweep(5000, T0 + 8000),
            vec![LeaseReturn {
                lease_id: "c/3".into(),
                used: 21
            }]
        );
        assert_eq!(pool.unreported, 0);
    }

    #[test]
    fn a_timed_out_lease_request_is_asked_again_under_the_same_id() {
        let mut pool = Pool::default();
        let first = pool.begin_fetch(|| "d/1".into(), T0);
        assert!(!pool.wants_lease(10, 2000, T0 + 1999));
        assert!(pool.wants_lease(10, 2000, T0 + 2000));
        let again = pool.begin_fetch(|| "d/2".into(), T0 + 2000);
        assert_eq!(first, again);
        // A grant delivered twice (a retried answer) is held once, also after the first copy
        // was used up and returned.
        pool.apply_grant(&grant("d/1", 5, T0 + 10_000), T0 + 2001);
        pool.apply_grant(&grant("d/1", 5, T0 + 10_000), T0 + 2002);
        assert_eq!(pool.available(T0 + 2002), 5);
        for _ in 0..5 {
            let (lease, _) = taken(pool.reserve(1, T0 + 2003));
            pool.commit(&lease, 1, 1);
        }
        assert_eq!(pool.sweep(5000, T0 + 2004).len(), 1);
        pool.apply_grant(&grant("d/1", 5, T0 + 10_000), T0 + 2005);
        assert_eq!(pool.available(T0 + 2005), 0);
        // A request that got no grant is asked again at once, under the same id.
        let id = pool.begin_fetch(|| "d/9".into(), T0 + 3000);
        assert!(!pool.wants_lease(10, 2000, T0 + 3001));
        pool.fetch_unanswered(&id);
        assert!(pool.wants_lease(10, 2000, T0 + 3001));
        assert_eq!(pool.begin_fetch(|| "d/10".into(), T0 + 3001), "d/9");
    }

    /// Envoy cannot check a new key's first write: two workers that create a pool at once
    /// both ask for a lease, and the pool keeps only the second one's request. Both grants are
    /// allocated at the collector, so both are held (dropping one would leave its units unused
    /// and never returned until the period's end), and a second copy of either is not.
    #[test]
    fn both_grants_are_held_when_two_workers_create_a_pool_at_once() {
        let mut first = Pool::default();
        let a = first.begin_fetch(|| "a/q0".into(), T0);
        // The second worker read no pool either; its write replaces the first one's.
        let mut pool = Pool::default();
        let b = pool.begin_fetch(|| "b/q0".into(), T0);
        pool.apply_grant(&grant(&a, 50, T0 + 10_000), T0 + 10);
        assert_eq!(pool.available(T0 + 10), 50);
        assert!(
            pool.fetch.is_some(),
            "the second worker's request is still in flight"
        );
        pool.apply_grant(&grant(&b, 50, T0 + 10_000), T0 + 20);
        assert_eq!(pool.available(T0 + 20), 100);
        assert!(pool.fetch.is_none());
        pool.apply_grant(&grant(&a, 50, T0 + 10_000), T0 + 30);
        assert_eq!(pool.available(T0 + 30), 100);
        // Used up and returned: a late copy of either is still not held again.
        for _ in 0..100 {
            let (lease, _) = taken(pool.reserve(1, T0 + 40));
            pool.commit(&lease, 1, 1);
        }
        assert_eq!(pool.sweep(5000, T0 + 50).len(), 2);
        pool.apply_grant(&grant(&b, 50, T0 + 10_000), T0 + 60);
        pool.apply_grant(&grant(&a, 50, T0 + 10_000), T0 + 60);
        assert_eq!(pool.available(T0 + 60), 0);
        // A refusal for a request no longer in flight changes nothing.
        let c = pool.begin_fetch(|| "a/q1".into(), T0 + 70);
        pool.apply_grant(&grant("b/q1", 0, T0 + 10_000), T0 + 80);
        assert_eq!(pool.exhausted_until_ms, 0);
        assert_eq!(
            pool.fetch.as_ref().map(|f| f.lease_id.as_str()),
            Some(c.as_str())
        );
        // The pool remembers a bounded number of ids.
        for n in 0..40 {
            pool.apply_grant(&grant(&format!("z/{n}"), 1, T0 + 10_000), T0 + 90);
        }
        assert_eq!(pool.applied.len(), APPLIED_KEPT);
    }

    /// Workers sharing one pool through compare-and-swap never admit more than was granted.
    #[test]
    fn workers_sharing_a_pool_admit_exactly_the_grant() {
        let shared = std::sync::Arc::new(MemoryBlobs::default());
        let key = pool_key("lic/1", Meter::Calls, Period::Day);
        update_pool(shared.as_ref(), &key, |p| {
            p.begin_fetch(|| "e/1".into(), T0);
            p.apply_grant(&grant("e/1", 1000, T0 + 60_000), T0)
        })
        .unwrap();
        let admitted: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let shared = std::sync::Arc::clone(&shared);
                    let key = key.clone();
                    scope.spawn(move || {
                        let mut admitted = 0;
                        for _ in 0..400 {
                            let r =
                                update_pool(shared.as_ref(), &key, |p| p.reserve(1, T0)).unwrap();
                            if let Reservation::Taken { lease_id, .. } = r {
                                admitted += 1;
                                update_pool(shared.as_ref(), &key, |p| p.commit(&lease_id, 1, 1))
                                    .unwrap();
                            }
                        }
                        admitted
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
        let returns = update_pool(shared.as_ref(), &key, |p| p.sweep(5000, T0)).unwrap();
        assert_eq!(
            returns,
            vec![LeaseReturn {
                lease_id: "e/1".into(),
                used: 1000
            }]
        );
    }

    #[test]
    fn pool_keys_cannot_collide_and_damaged_values_read_as_empty() {
        // A license id with `/` in it cannot pass for another license's key.
        assert_eq!(
            pool_key("a/b", Meter::Calls, Period::Day),
            "tollgate/q/3:a/b/calls/day"
        );
        assert_ne!(
            pool_key("a/b", Meter::Calls, Period::Day),
            pool_key("a", Meter::Calls, Period::Day)
        );
        assert_eq!(
            pool_key("lic-1", Meter::ResponseBytes, Period::Month),
            "tollgate/q/5:lic-1/response_bytes/month"
        );
        assert_eq!(Pool::decode(b"\xff not json"), Pool::default());
    }

    fn sample_pool() -> Pool {
        Pool {
            leases: vec![
                Lease {
                    id: "w1/q7".into(),
                    granted: 50,
                    used: 12,
                    inflight: 2,
                    expires_ms: T0 + 10_000,
                    closing_since_ms: None,
                },
                Lease {
                    id: "w2/q3".into(),
                    granted: 50,
                    used: 50,
                    inflight: 0,
                    expires_ms: T0 + 5_000,
                    closing_since_ms: Some(T0 + 4_000),
                },
            ],
            exhausted_until_ms: 0,
            recheck_ms: T0 + 5_000,
            period_end_ms: END,
            allocated: 900,
            fetch: Some(Fetch {
                lease_id: "w1/q8".into(),
                since_ms: T0 + 1,
            }),
            unreported: 3,
            allowance_used: 1,
            applied: vec!["w2/q3".into(), "w1/q7".into()],
        }
    }

    /// The layout workers of one Envoy share, byte for byte: a change to it must be a new
    /// version (a reload can put two builds of the filter in one Envoy at once).
    #[test]
    fn the_pool_layout_is_pinned() {
        let bytes = sample_pool().encode();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "01",
                "0000000000000000",
                "8858b9ca9e010000",
                "8033f0ca9e010000",
                "8403000000000000",
                "0300000000000000",
                "0100000000000000",
                "01",
                "0145b9ca9e010000",
                "0500",
                "77312f7138",
                "0200",
                "0500",
                "77312f7137",
                "3200000000000000",
                "0c00000000000000",
                "02000000",
                "106cb9ca9e010000",
                "ffffffffffffffff",
                "0500",
                "77322f7133",
                "3200000000000000",
                "3200000000000000",
                "00000000",
                "8858b9ca9e010000",
                "a054b9ca9e010000",
                "0200",
                "0500",
                "77322f7133",
                "0500",
                "77312f7137",
            )
        );
        assert_eq!(Pool::decode(&bytes), sample_pool());
    }

    #[test]
    fn damaged_pools_read_as_empty_and_json_from_an_earlier_build_still_reads() {
        let bytes = sample_pool().encode();
        // Every cut, an extra byte, another version and bad UTF-8 in an id.
        for cut in 0..bytes.len() {
            assert_eq!(Pool::decode(&bytes[..cut]), Pool::default(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(Pool::decode(&long), Pool::default());
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(Pool::decode(&other), Pool::default());
        let mut bad = bytes.clone();
        let at = bytes.windows(5).position(|w| w == b"w1/q8").unwrap();
        bad[at] = 0xff;
        assert_eq!(Pool::decode(&bad), Pool::default());
        // The JSON earlier builds wrote (no `applied` list yet).
        let mut earlier = serde_json::to_value(sample_pool()).unwrap();
        earlier.as_object_mut().unwrap().remove("applied");
        let read = Pool::decode(earlier.to_string().as_bytes());
        assert_eq!(read.leases, sample_pool().leases);
        assert_eq!(read.fetch, sample_pool().fetch);
        assert!(read.applied.is_empty());
    }
}
