//! Usage on its way to the collector: aggregates sealed into batches with a deterministic
//! idempotency key, sent one at a time, kept until the collector acknowledges them, retried
//! with exponential backoff and jitter, within a bounded buffer.
//!
//! Pure logic with an injected clock: the adapter sends what [`Shipper::next_send`] returns and
//! reports the answer with [`Shipper::acknowledged`] or [`Shipper::failed`].

use std::collections::VecDeque;

use serde::Serialize;
use tollgate_wire::{BatchAck, Meter, Source, UsageBatch, VERSION};

use crate::meter::{UsageKey, UsageTotals};

/// What to do with new usage when the buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse new requests until the buffer drains: unmetered use is unbilled use.
    FailClosed,
    /// Keep serving; count and log the usage that could not be kept.
    FailOpen,
}

/// The instance name of a filter whose configuration names none: `<node id>/<16 hex digits>`.
/// Batch ids must be unique across every proxy shipping to one collector, and one
/// configuration may be shared by many proxies (Istio hands the same `WasmPlugin` to every
/// sidecar): the node id tells proxies apart (Istio's is per pod) and the random part covers
/// proxies that share a node id, or have none. The node id is reduced to the characters batch
/// ids allow and to 100 bytes.
pub fn default_instance(node_id: &str, random: u64) -> String {
    let node: String = node_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '/') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let node = if node.is_empty() {
        "envoy"
    } else {
        node.as_str()
    };
    format!("{node}/{random:016x}")
}

/// A [`UsageRecord`] borrowing its names from the meters' keys: sealing a window makes no
/// string copies (a window of many licenses makes thousands of records a second).
/// Serialises to exactly the bytes of `UsageRecord` (same fields, same order; a test checks).
#[derive(Serialize)]
struct RecordRef<'a> {
    account: &'a str,
    license: &'a str,
    feature: &'a str,
    outcome: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    user: &'a str,
    meter: Meter,
    units: u64,
    window_start_ms: u64,
    window_end_ms: u64,
}

/// A [`UsageBatch`] over borrowed records; the same bytes as `UsageBatch::encode`.
#[derive(Serialize)]
struct BatchRef<'a> {
    version: u32,
    batch_id: &'a str,
    source: &'a Source,
    sequence: u64,
    created_ms: u64,
    records: &'a [RecordRef<'a>],
}

impl BatchRef<'_> {
    fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Batching and retry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipperConfig {
    /// Seal and send at least this often.
    pub flush_interval_ms: u64,
    /// Seal early when the open aggregates would make this many records.
    pub max_batch_records: usize,
    /// Records kept while unacknowledged, all batches together.
    pub max_buffered_records: usize,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub overflow: Overflow,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            flush_interval_ms: 1000,
            max_batch_records: 2000,
            max_buffered_records: 200_000,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            overflow: Overflow::FailClosed,
        }
    }
}

/// A sealed batch waiting for its acknowledgement.
#[derive(Debug, Clone)]
struct Sealed {
    batch_id: String,
    records: usize,
    body: Vec<u8>,
    attempts: u32,
    not_before_ms: u64,
}

/// A batch to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub batch_id: String,
    pub body: Vec<u8>,
    /// 1 for the first try.
    pub attempt: u32,
    /// Records in the batch.
    pub records: usize,
}

/// Usage that fail-open had to drop, by meter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub calls: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub processing_nanos: u64,
}

/// One VM's outbox.
#[derive(Debug)]
pub struct Shipper {
    config: ShipperConfig,
    source: Source,
    next_sequence: u64,
    window_start_ms: u64,
    queue: VecDeque<Sealed>,
    in_flight: Option<String>,
    dropped: Dropped,
    rng: u64,
}

impl Shipper {
    /// An outbox for `source`, with the window starting at `now_ms`.
    pub fn new(config: ShipperConfig, source: Source, now_ms: u64) -> Self {
        // Jitter needs no cryptographic randomness; seeding from the VM start spreads retries
        // of different VMs apart.
        let rng = source.vm_started_ms ^ 0x9e37_79b9_7f4a_7c15;
        Shipper {
            config,
            source,
            next_sequence: 1,
            window_start_ms: now_ms,
            queue: VecDeque::new(),
            in_flight: None,
            dropped: Dropped::default(),
            rng: rng.max(1),
        }
    }

    /// Records held, sealed and unacknowledged.
    pub fn buffered_records(&self) -> usize {
        self.queue.iter().map(|s| s.records).sum()
    }

    /// Batches held.
    pub fn buffered_batches(&self) -> usize {
        self.queue.len()
    }

    /// True while the buffer has room for more usage.
    pub fn has_room(&self) -> bool {
        self.buffered_records() < self.config.max_buffered_records
    }

    pub fn overflow(&self) -> Overflow {
        self.config.overflow
    }

    /// What fail-open dropped so far.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// Seal `usage` (the drained aggregates) into batches covering `[window start, now_ms)`,
    /// at most `max_batch_records` records each. `feature_name` names a feature id. Returns
    /// the ids of the batches sealed (none if there was nothing to seal).
    ///
    /// When the buffer is full: under fail-open the usage is dropped and counted in
    /// [`Shipper::dropped`]; under fail-closed it is kept all the same (it is usage of requests
    /// already served; the gate refuses new ones while [`Shipper::has_room`] is false), so the
    /// buffer may exceed its bound by what was served until the gate learned it was full.
    pub fn seal<'a>(
        &mut self,
        usage: Vec<(UsageKey, UsageTotals)>,
        feature_name: impl Fn(u16) -> &'a str,
        now_ms: u64,
    ) -> Vec<String> {
        let window_start_ms = std::mem::replace(&mut self.window_start_ms, now_ms);
        if usage.is_empty() {
            return Vec::new();
        }
        if !self.has_room() && self.config.overflow == Overflow::FailOpen {
            for (_, totals) in &usage {
                self.dropped.calls = self.dropped.calls.saturating_add(totals.calls);
                self.dropped.request_bytes = self
                    .dropped
                    .request_bytes
                    .saturating_add(totals.request_bytes);
                self.dropped.response_bytes = self
                    .dropped
                    .response_bytes
                    .saturating_add(totals.response_bytes);
                self.dropped.processing_nanos = self
                    .dropped
                    .processing_nanos
                    .saturating_add(totals.processing_nanos);
            }
            return Vec::new();
        }
        let mut records = Vec::with_capacity(usage.len() * 2);
        let window_end_ms = now_ms.max(window_start_ms);
        for (key, totals) in &usage {
            let feature = key.feature.map_or("", &feature_name);
            for (meter, units) in [
                (Meter::Calls, totals.calls),
                (Meter::RequestBytes, totals.request_bytes),
                (Meter::ResponseBytes, totals.response_bytes),
                (Meter::ProcessingNs, totals.processing_nanos),
            ] {
                if units == 0 {
                    continue;
                }
                records.push(RecordRef {
                    account: &key.account,
                    license: &key.license,
                    feature,
                    outcome: key.outcome.as_str(),
                    user: key.user.as_deref().unwrap_or(""),
                    meter,
                    units,
                    window_start_ms,
                    window_end_ms,
                });
            }
        }
        let per_batch = self.config.max_batch_records.max(1);
        let mut ids = Vec::with_capacity(records.len().div_ceil(per_batch));
        for chunk in records.chunks(per_batch) {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            let batch_id = UsageBatch::id_for(&self.source, sequence);
            let body = BatchRef {
                version: VERSION,
                batch_id: &batch_id,
                source: &self.source,
                sequence,
                created_ms: now_ms,
                records: chunk,
            }
            .encode();
            ids.push(batch_id.clone());
            self.queue.push_back(Sealed {
                records: chunk.len(),
                batch_id,
                body,
                attempts: 0,
                not_before_ms: now_ms,
            });
        }
        ids
    }

    /// The batch id in flight, if any.
    pub fn in_flight(&self) -> Option<&str> {
        self.in_flight.as_deref()
    }

    /// New batching and retry settings (a reconfigured VM); held batches are kept.
    pub fn set_config(&mut self, config: ShipperConfig) {
        self.config = config;
    }

    /// True when the open window is due to be sealed.
    pub fn seal_due(&self, open_records: usize, now_ms: u64) -> bool {
        open_records >= self.config.max_batch_records
            || now_ms.saturating_sub(self.window_start_ms) >= self.config.flush_interval_ms
    }

    /// The batch to send now, if none is in flight and the oldest is due. Batches go one at a
    /// time, oldest first, so a collector outage costs one timeout per retry, not one per batch.
    pub fn next_send(&mut self, now_ms: u64) -> Option<Outgoing> {
        self.take_next(Some(now_ms))
    }

    /// The oldest batch, backoff or not, if none is in flight: the last try of a VM that is
    /// shutting down.
    pub fn next_send_final(&mut self) -> Option<Outgoing> {
        self.take_next(None)
    }

    fn take_next(&mut self, now_ms: Option<u64>) -> Option<Outgoing> {
        if self.in_flight.is_some() {
            return None;
        }
        let head = self.queue.front_mut()?;
        if now_ms.is_some_and(|now| head.not_before_ms > now) {
            return None;
        }
        head.attempts += 1;
        self.in_flight = Some(head.batch_id.clone());
        Some(Outgoing {
            batch_id: head.batch_id.clone(),
            body: head.body.clone(),
            attempt: head.attempts,
            records: head.records,
        })
    }

    /// The collector acknowledged a batch: it is stored, drop it. An acknowledgement for another
    /// batch than the one in flight changes nothing.
    pub fn acknowledged(&mut self, ack: &BatchAck) -> bool {
        if self.in_flight.as_deref() != Some(ack.batch_id.as_str()) {
            return false;
        }
        self.in_flight = None;
        match self.queue.front() {
            Some(head) if head.batch_id == ack.batch_id => {
                self.queue.pop_front();
                true
            }
            _ => false,
        }
    }

    /// The send of `batch_id` failed (no answer, an error status, or not an acknowledgement):
    /// keep it, and try again after a backoff.
    pub fn failed(&mut self, batch_id: &str, now_ms: u64) {
        if self.in_flight.as_deref() != Some(batch_id) {
            return;
        }
        self.in_flight = None;
        let delay = self.backoff_ms(self.queue.front().map_or(1, |s| s.attempts));
        if let Some(head) = self.queue.front_mut() {
            head.not_before_ms = now_ms.saturating_add(delay);
        }
    }

    /// Exponential backoff with "equal jitter": half fixed, half random, capped.
    fn backoff_ms(&mut self, attempts: u32) -> u64 {
        let exp = self
            .config
            .retry_initial_ms
            .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
            .min(self.config.retry_max_ms)
            .max(1);
        let half = exp / 2;
        half + self.next_random() % (exp - half + 1)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The collector refused the batch in flight for good (malformed or too large: sending it
    /// again can only get the same answer). It leaves the buffer, so that one poison batch
    /// cannot hold back all usage after it; the adapter logs it in full as a dead letter.
    pub fn rejected(&mut self, batch_id: &str) -> Option<HeldBatch> {
        if self.in_flight.as_deref() != Some(batch_id) {
            return None;
        }
        self.in_flight = None;
        match self.queue.front() {
            Some(head) if head.batch_id == batch_id => self.queue.pop_front().map(|s| HeldBatch {
                batch_id: s.batch_id,
                records: s.records,
                body: s.body,
            }),
            _ => None,
        }
    }

    /// Every unacknowledged batch, oldest first: what a VM going away hands to its successor.
    pub fn held(&self) -> impl Iterator<Item = HeldBatch> + '_ {
        self.queue.iter().map(|s| HeldBatch {
            batch_id: s.batch_id.clone(),
            records: s.records,
            body: s.body.clone(),
        })
    }

    /// Take over a batch sealed by another VM (one that was replaced before the collector
    /// acknowledged it). It keeps its id, so if the other VM's last send got through after
    /// all, the collector counts it once. A batch already held is not taken twice.
    pub fn adopt(&mut self, batch: HeldBatch, now_ms: u64) -> bool {
        if self.queue.iter().any(|s| s.batch_id == batch.batch_id) {
            return false;
        }
        self.queue.push_back(Sealed {
            batch_id: batch.batch_id,
            records: batch.records,
            body: batch.body,
            attempts: 0,
            not_before_ms: now_ms,
        });
        true
    }
}

/// A sealed, unacknowledged batch as it leaves one outbox for another (or the dead letters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldBatch {
    pub batch_id: String,
    pub records: usize,
    pub body: Vec<u8>,
}

impl HeldBatch {
    /// The log line of a batch the collector refused for good: the whole body, so that an
    /// operator can fix and replay it.
    pub fn dead_letter_message(&self, refusal: &tollgate_wire::Refusal) -> String {
        format!(
            "usage batch {} ({} records) refused for good by the collector ({}: {}); dropped as a dead letter, body follows: {}",
            self.batch_id,
            self.records,
            refusal.error,
            refusal.message,
            String::from_utf8_lossy(&self.body)
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tollgate_wire::AckStatus;

    use super::*;
    use crate::meter::Outcome;
    use crate::refusal::Code;

    const T0: u64 = 1_780_000_000_000;

    fn source() -> Source {
        Source {
            instance: "node-a/tollgate".into(),
            vm_started_ms: T0,
        }
    }

    fn usage(calls: u64) -> Vec<(UsageKey, UsageTotals)> {
        let key = |outcome| UsageKey {
            account: Arc::from("acme"),
            license: Arc::from("lic-1"),
            feature: Some(0),
            outcome,
            // One aggregate per user: records carry the user when there is one.
            user: (outcome == Outcome::Allowed).then(|| Arc::from("k1.00ff")),
        };
        vec![
            (
                key(Outcome::Allowed),
                UsageTotals {
                    calls,
                    request_bytes: 0,
                    response_bytes: 100 * calls,
                    processing_nanos: 5,
                },
            ),
            (
                key(Outcome::Refused(Code::RateLimited)),
                UsageTotals {
                    calls: 1,
                    request_bytes: 0,
                    response_bytes: 0,
                    processing_nanos: 0,
                },
            ),
        ]
    }

    fn ack(id: &str) -> BatchAck {
        BatchAck {
            version: 1,
            batch_id: id.into(),
            status: AckStatus::Accepted,
            records: 0,
        }
    }

    fn shipper(config: ShipperConfig) -> Shipper {
        Shipper::new(config, source(), T0)
    }

    #[test]
    fn sealed_bodies_are_the_bytes_of_the_wire_crates_encoding() {
        // Sealing serialises borrowed records; the collector decodes `UsageBatch`, whose
        // encoding the wire crate's golden files pin. Both must give the same bytes.
        let mut s = shipper(ShipperConfig::default());
        s.seal(usage(3), |_| "search \"quoted\" é", T0 + 1000);
        let out = s.next_send(T0 + 1000).unwrap();
        let batch = UsageBatch::decode(&out.body).unwrap();
        assert_eq!(batch.records.len(), 4);
        assert_eq!(batch.encode(), out.body);
    }

    #[test]
    fn sealed_usage_becomes_records_per_meter_with_a_deterministic_id() {
        let mut s = shipper(ShipperConfig::default());
        let id = s.seal(usage(3), |_| "search", T0 + 1000).pop().unwrap();
        assert_eq!(id, "node-a/tollgate/1780000000000/1");
        let out = s.next_send(T0 + 1000).unwrap();
        let batch = UsageBatch::decode(&out.body).unwrap();
        // calls, response_bytes, processing_ns for allowed; calls for the refusal; no zero units.
        assert_eq!(batch.records.len(), 4);
        assert_eq!(batch.units(Meter::Calls), 4);
        assert_eq!(batch.units(Meter::ResponseBytes), 300);
        assert!(batch
            .records
            .iter()
            .all(|r| r.window_start_ms == T0 && r.window_end_ms == T0 + 1000));
        assert_eq!(batch.records[0].feature, "search");
        // The next window starts where this one ended.
        let id2 = s.seal(usage(1), |_| "search", T0 + 2000).pop().unwrap();
        assert_eq!(id2, "node-a/tollgate/1780000000000/2");
        assert!(s.seal(Vec::new(), |_| "search", T0 + 3000).is_empty());
    }

    #[test]
    fn one_batch_in_flight_and_only_an_ack_removes_it() {
        let mut s = shipper(ShipperConfig::default());
        let first = s.seal(usage(1), |_| "f", T0).pop().unwrap();
        let second = s.seal(usage(2), |_| "f", T0).pop().unwrap();
        let out = s.next_send(T0).unwrap();
        assert_eq!(out.batch_id, first);
        assert!(s.next_send(T0).is_none(), "one in flight at a time");
        assert!(
            !s.acknowledged(&ack(&second)),
            "an ack for another batch changes nothing"
        );
        assert!(s.acknowledged(&ack(&first)));
        assert_eq!(s.next_send(T0).unwrap().batch_id, second);
        assert_eq!(s.buffered_batches(), 1);
    }

    #[test]
    fn a_failed_batch_is_retried_with_the_same_id_and_body_after_backoff() {
        let mut s = shipper(ShipperConfig {
            retry_initial_ms: 100,
            retry_max_ms: 1000,
            ..Default::default()
        });
        s.seal(usage(1), |_| "f", T0).pop().unwrap();
        let first = s.next_send(T0).unwrap();
        let mut now = T0;
        let mut delays = Vec::new();
        for attempt in 2..=8 {
            s.failed(&first.batch_id, now);
            assert!(s.next_send(now).is_none(), "not before the backoff");
            let mut t = now;
            let retry = loop {
                t += 1;
                if let Some(out) = s.next_send(t) {
                    break out;
                }
            };
            delays.push(t - now);
            assert_eq!(
                (
                    retry.batch_id.as_str(),
                    retry.body.as_slice(),
                    retry.attempt
                ),
                (first.batch_id.as_str(), first.body.as_slice(), attempt)
            );
            now = t;
        }
        // Equal jitter: each delay within [exp/2, exp] of 100, 200, 400, 800, 1000, 1000, 1000.
        for (delay, exp) in delays.iter().zip([100, 200, 400, 800, 1000, 1000, 1000]) {
            assert!((exp / 2..=exp).contains(delay), "{delays:?}");
        }
        assert!(s.acknowledged(&ack(&first.batch_id)));
        assert_eq!(s.buffered_records(), 0);
    }

    #[test]
    fn the_buffer_is_bounded_and_fail_open_counts_what_it_drops() {
        let mut s = shipper(ShipperConfig {
            max_buffered_records: 8,
            overflow: Overflow::FailOpen,
            ..Default::default()
        });
        s.seal(usage(1), |_| "f", T0).pop().unwrap(); // 4 records
        assert!(s.has_room());
        s.seal(usage(1), |_| "f", T0).pop().unwrap(); // 8 records
        assert!(!s.has_room());
        assert!(s.seal(usage(5), |_| "f", T0).is_empty());
        assert_eq!(
            s.dropped(),
            Dropped {
                calls: 6,
                request_bytes: 0,
                response_bytes: 500,
                processing_nanos: 5
            }
        );
        // Acknowledged batches make room again.
        let out = s.next_send(T0).unwrap();
        s.acknowledged(&ack(&out.batch_id));
        assert!(s.has_room());
    }

    #[test]
    fn sealing_is_due_on_time_or_size() {
        let s = shipper(ShipperConfig {
            flush_interval_ms: 1000,
            max_batch_records: 10,
            ..Default::default()
        });
        assert!(!s.seal_due(9, T0 + 999));
        assert!(s.seal_due(10, T0 + 1));
        assert!(s.seal_due(0, T0 + 1000));
    }

    #[test]
    fn large_usage_is_split_into_batches_of_at_most_max_batch_records() {
        let mut s = shipper(ShipperConfig {
            max_batch_records: 3,
            ..Default::default()
        });
        let mut big = usage(1);
        big.extend(usage(2));
        // 4 + 4 records: batches of 3, 3 and 2, consecutive ids, nothing lost.
        let ids = s.seal(big, |_| "f", T0 + 10);
        assert_eq!(ids.len(), 3);
        assert_eq!(s.buffered_records(), 8);
        let mut calls = 0;
        for (i, id) in ids.iter().enumerate() {
            let out = s.next_send(T0 + 10).unwrap();
            assert_eq!(&out.batch_id, id);
            let batch = UsageBatch::decode(&out.body).unwrap();
            assert_eq!(batch.records.len(), out.records);
            assert!(batch.records.len() <= 3);
            assert_eq!(batch.sequence, i as u64 + 1);
            calls += batch.units(Meter::Calls);
            assert!(s.acknowledged(&ack(id)));
        }
        assert_eq!(calls, 5);
    }

    #[test]
    fn fail_closed_keeps_usage_already_served_even_past_the_bound() {
        let mut s = shipper(ShipperConfig {
            max_buffered_records: 4,
            overflow: Overflow::FailClosed,
            ..Default::default()
        });
        assert_eq!(s.seal(usage(1), |_| "f", T0).len(), 1);
        assert!(!s.has_room());
        assert_eq!(s.seal(usage(2), |_| "f", T0).len(), 1);
        assert_eq!(s.buffered_records(), 8);
        assert_eq!(s.dropped(), Dropped::default());
    }

    #[test]
    fn the_final_send_ignores_the_backoff_and_in_flight_is_visible() {
        let mut s = shipper(ShipperConfig::default());
        let id = s.seal(usage(1), |_| "f", T0).pop().unwrap();
        let out = s.next_send(T0).unwrap();
        assert_eq!(s.in_flight(), Some(id.as_str()));
        s.failed(&out.batch_id, T0);
        assert_eq!(s.in_flight(), None);
        assert!(s.next_send(T0).is_none());
        let last = s.next_send_final().unwrap();
        assert_eq!((last.batch_id, last.body, last.attempt), (id, out.body, 2));
        assert!(s.next_send_final().is_none(), "still one in flight");
    }
    #[test]
    fn a_successor_adopts_held_batches_under_their_ids_once() {
        let mut old = shipper(ShipperConfig::default());
        let first = old.seal(usage(1), |_| "f", T0).pop().unwrap();
        old.seal(usage(2), |_| "f", T0 + 1).pop().unwrap();
        let held: Vec<HeldBatch> = old.held().collect();
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].batch_id, first);

        let mut new = Shipper::new(
            ShipperConfig::default(),
            Source {
                instance: "node-a/tollgate".into(),
                vm_started_ms: T0 + 5,
            },
            T0 + 5,
        );
        for batch in held.iter().cloned() {
            assert!(new.adopt(batch, T0 + 6));
        }
        assert!(!new.adopt(held[0].clone(), T0 + 6), "never held twice");
        assert_eq!(new.buffered_records(), 8);
        let out = new.next_send(T0 + 6).unwrap();
        assert_eq!(
            (out.batch_id.as_str(), out.body.as_slice()),
            (first.as_str(), held[0].body.as_slice())
        );
        assert_eq!(out.records, 4);
        assert!(new.acknowledged(&ack(&first)));
        // The successor's own batches have its own ids.
        let own = new.seal(usage(1), |_| "f", T0 + 7).pop().unwrap();
        assert_eq!(own, "node-a/tollgate/1780000000005/1");
    }

    #[test]
    fn a_rejected_batch_leaves_the_buffer_and_the_next_one_goes() {
        let mut s = shipper(ShipperConfig::default());
        let poison = s.seal(usage(1), |_| "f", T0).pop().unwrap();
        let next = s.seal(usage(1), |_| "f", T0).pop().unwrap();
        assert!(s.rejected(&poison).is_none(), "only the batch in flight");
        let out = s.next_send(T0).unwrap();
        let dead = s.rejected(&out.batch_id).unwrap();
        assert_eq!(
            (dead.batch_id, dead.records, dead.body),
            (poison, 4, out.body)
        );
        assert_eq!(s.next_send(T0).unwrap().batch_id, next);
        assert_eq!(s.buffered_batches(), 1);
    }

    #[test]
    fn the_default_instance_is_the_node_id_made_safe_plus_a_random_part() {
        assert_eq!(
            default_instance(
                "sidecar~10.1.2.3~api-7d9f.shop~shop.svc.cluster.local",
                0xab
            ),
            "sidecar_10.1.2.3_api-7d9f.shop_shop.svc.cluster.local/00000000000000ab"
        );
        assert_eq!(default_instance("", 1), "envoy/0000000000000001");
        let long = default_instance(&"n".repeat(500), u64::MAX);
        assert_eq!(long.len(), 100 + 1 + 16);
        // Whatever the node id, the result is a valid instance for a batch id.
        let weird = default_instance("é\u{0}/x y", 7);
        assert!(weird
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-/".contains(&b)));
    }
}
