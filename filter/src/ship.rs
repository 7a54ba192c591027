//! Shipping usage to the collector: the host side of the core's [`Shipper`]. The root context
//! seals the usage it drains on each tick into batches, sends one at a time with
//! `proxy_http_call`, and reports each answer back to the shipper.
//!
//! Only a 200 whose body is a `BatchAck` for the batch in flight acknowledges it; anything
//! else (a failed call, a timeout, another status, a body that is not an ack) is a failure and
//! the batch is retried with backoff.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, Status};
use tollgate_core::calls::{batch_reply, BatchReply, Signed, MAX_BATCH_ANSWER_BYTES};
use tollgate_core::config::CollectorPolicy;
use tollgate_core::handover;
use tollgate_core::meter::Ledger;
use tollgate_core::shipper::{HeldBatch, Overflow, Shipper};
use tollgate_core::{Policy, UsageKey, UsageTotals};
use tollgate_wire::{Refusal, Source};

use crate::host::{add, counter, gauge, move_gauge};
use crate::log;

/// Shared-data key holding the last VM start time handed out (see [`unique_start_ms`]).
const START_KEY: &str = "tollgate.shipper.vm_started_ms";

/// Shared-data key holding batches handed over by VMs that went away (see
/// [`tollgate_core::handover`]).
const HANDOVER_KEY: &str = "tollgate.shipper.handover";

/// Compare-and-swap attempts on a shared-data value before giving up for now.
const CAS_ATTEMPTS: usize = 32;

/// How long past the call's own timeout a call may stay unanswered before it counts as
/// failed (Envoy always answers by the timeout; this only guards against a lost callback).
const WATCHDOG_GRACE_MS: u64 = 1000;

struct OutboxMetrics {
    sent: u32,
    acked: u32,
    failed: u32,
    records_acked: u32,
    dropped_calls: u32,
    handed_over: u32,
    adopted: u32,
    rejected: u32,
    records_rejected: u32,
    buffered_records: u32,
    buffered_batches: u32,
}

impl OutboxMetrics {
    fn define() -> Result<OutboxMetrics, String> {
        Ok(OutboxMetrics {
            sent: counter("tollgate.usage_batches_sent")?,
            acked: counter("tollgate.usage_batches_acked")?,
            failed: counter("tollgate.usage_batches_failed")?,
            records_acked: counter("tollgate.usage_records_acked")?,
            dropped_calls: counter("tollgate.usage_dropped_calls")?,
            handed_over: counter("tollgate.usage_batches_handed_over")?,
            adopted: counter("tollgate.usage_batches_adopted")?,
            rejected: counter("tollgate.usage_batches_rejected")?,
            records_rejected: counter("tollgate.usage_records_rejected")?,
            buffered_records: gauge("tollgate.usage_buffered_records")?,
            buffered_batches: gauge("tollgate.usage_buffered_batches")?,
        })
    }
}

struct InFlight {
    token: u32,
    batch_id: String,
    records: usize,
    sent_ms: u64,
}

/// What became of a call the collector answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Acknowledged,
    /// Refused for good (malformed or too large): dropped as a dead letter.
    Rejected,
    Failed,
    /// Not the call in flight (a late answer to a call the watchdog gave up on).
    Unknown,
}

/// One VM's usage on its way to the collector.
pub struct Outbox {
    settings: CollectorPolicy,
    shipper: Shipper,
    /// Usage drained from the gate, not sealed yet.
    open: Ledger,
    in_flight: Option<InFlight>,
    metrics: OutboxMetrics,
    /// What this VM added to the shared gauges (records, batches).
    reported: (i64, i64),
    reported_dropped_calls: u64,
    /// The host's tick period: a window is sealed on the tick nearest its due time.
    tick_period_ms: u64,
    source: Source,
}

impl Outbox {
    pub fn new(settings: &CollectorPolicy, now_ms: u64) -> Result<Outbox, String> {
        let metrics = OutboxMetrics::define()?;
        create_shared(HANDOVER_KEY);
        let source = Source {
            instance: settings.instance.clone().unwrap_or_else(|| {
                tollgate_core::shipper::default_instance(&node_id(), random_u64())
            }),
            vm_started_ms: unique_start_ms(now_ms),
        };
        Ok(Outbox {
            shipper: Shipper::new(settings.shipper, source.clone(), now_ms),
            source,
            settings: settings.clone(),
            open: Ledger::default(),
            in_flight: None,
            metrics,
            reported: (0, 0),
            reported_dropped_calls: 0,
            tick_period_ms: settings.shipper.flush_interval_ms,
        })
    }

    /// New settings for a reconfigured VM; held batches keep their ids and are still sent.
    pub fn reconfigure(&mut self, settings: &CollectorPolicy) {
        self.shipper.set_config(settings.shipper);
        self.settings = settings.clone();
    }

    pub fn flush_interval_ms(&self) -> u64 {
        self.settings.shipper.flush_interval_ms
    }

    pub fn settings(&self) -> &CollectorPolicy {
        &self.settings
    }

    /// This VM's instance name (as in batch ids).
    pub fn instance(&self) -> String {
        self.source.instance.clone()
    }

    /// `<instance>/<vm start ms>`: unique per VM, the prefix of its lease ids.
    pub fn instance_and_start(&self) -> String {
        format!("{}/{}", self.source.instance, self.source.vm_started_ms)
    }

    /// The period the host ticks at.
    pub fn set_tick_period(&mut self, tick_period_ms: u64) {
        self.tick_period_ms = tick_period_ms;
    }

    /// True while requests must be refused: the buffer is full under fail-closed.
    pub fn blocked(&self) -> bool {
        self.settings.shipper.overflow == Overflow::FailClosed && !self.shipper.has_room()
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    pub fn buffered_records(&self) -> usize {
        self.shipper.buffered_records()
    }

    /// Take usage drained from the gate.
    pub fn absorb(&mut self, usage: Vec<(UsageKey, UsageTotals)>) {
        for (key, totals) in usage {
            self.open.record(key, totals);
        }
    }

    /// The periodic work: give up on a call that outlived its timeout, seal when due, send.
    pub fn tick(&mut self, policy: &Policy, now_ms: u64) {
        let overdue = self.in_flight.as_ref().is_some_and(|f| {
            now_ms.saturating_sub(f.sent_ms)
                > self.settings.timeout_ms.saturating_add(WATCHDOG_GRACE_MS)
        });
        if overdue {
            if let Some(call) = self.in_flight.take() {
                log(
                    LogLevel::Warn,
                    &format!(
                        "usage batch {} got no answer within {} ms; retrying",
                        call.batch_id, self.settings.timeout_ms
                    ),
                );
                self.fail(&call.batch_id, now_ms);
            }
        }
        // Each aggregate makes at most four records. Ticks come a little early or late: a
        // window due within half a tick is sealed now, or it would wait a whole extra tick
        // (a 1 s interval would seal every 2 s about half the time).
        let due_by = now_ms.saturating_add(self.tick_period_ms / 2);
        if self
            .shipper
            .seal_due(self.open.len().saturating_mul(4), due_by)
        {
            self.seal(policy, now_ms);
        }
        self.send(now_ms, false);
        self.report();
    }

    /// Seal the open usage into batches now.
    pub fn seal(&mut self, policy: &Policy, now_ms: u64) {
        let usage = self.open.drain();
        self.shipper
            .seal(usage, |feature| policy.feature_name(feature), now_ms);
        let dropped = self.shipper.dropped().calls;
        let new_drops = dropped.saturating_sub(self.reported_dropped_calls);
        if new_drops > 0 {
            self.reported_dropped_calls = dropped;
            add(self.metrics.dropped_calls, new_drops);
            log(
                LogLevel::Warn,
                &format!(
                    "usage buffer full ({} records unacknowledged): the usage of {new_drops} calls was dropped (on_buffer_full: fail_open)",
                    self.shipper.buffered_records()
                ),
            );
        }
        self.report();
    }

    /// Send the next batch if none is in flight and one is due (`last`: due or not, the last
    /// try of a VM shutting down).
    pub fn send(&mut self, now_ms: u64, last: bool) {
        if self.in_flight.is_some() {
            return;
        }
        let next = if last {
            self.shipper.next_send_final()
        } else {
            self.shipper.next_send(now_ms)
        };
        let Some(out) = next else {
            return;
        };
        let call = Signed::new(&self.settings, out.body);
        let headers = call.headers(&self.settings, &self.settings.path).to_vec();
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        add(self.metrics.sent, 1);
        match hostcalls::dispatch_http_call(
            &self.settings.cluster,
            headers,
            Some(&call.body),
            Vec::new(),
            timeout,
        ) {
            Ok(token) => {
                self.in_flight = Some(InFlight {
                    token,
                    batch_id: out.batch_id,
                    records: out.records,
                    sent_ms: now_ms,
                });
            }
            Err(status) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "cannot call the usage collector through cluster `{}` ({}); retrying",
                        self.settings.cluster,
                        status_name(status)
                    ),
                );
                self.fail(&out.batch_id, now_ms);
            }
        }
    }

    fn fail(&mut self, batch_id: &str, now_ms: u64) {
        add(self.metrics.failed, 1);
        self.shipper.failed(batch_id, now_ms);
    }

    /// The collector answered call `token` (`num_headers` 0: the call failed).
    pub fn answered(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        now_ms: u64,
    ) -> Answer {
        if self.in_flight.as_ref().map(|f| f.token) != Some(token) {
            return Answer::Unknown;
        }
        let Some(call) = self.in_flight.take() else {
            return Answer::Unknown;
        };
        let reply = if num_headers == 0 {
            // A failed call (reset, no healthy host...): Envoy has no response maps then, and
            // reading one would be an error the SDK turns into a panic.
            BatchReply::Nothing
        } else {
            read_reply(body_size)
        };
        let answer = match reply {
            BatchReply::Ack(ack)
                if ack.batch_id == call.batch_id && self.shipper.acknowledged(&ack) =>
            {
                add(self.metrics.acked, 1);
                add(self.metrics.records_acked, call.records as u64);
                Answer::Acknowledged
            }
            BatchReply::Refused(refusal) if refusal.is_permanent() => {
                match self.shipper.rejected(&call.batch_id) {
                    Some(dead) => {
                        self.dead_letter(&dead, &refusal);
                        Answer::Rejected
                    }
                    None => {
                        self.fail(&call.batch_id, now_ms);
                        Answer::Failed
                    }
                }
            }
            _ => {
                // The shipper still holds the batch as in flight: mark it failed.
                self.fail(&call.batch_id, now_ms);
                Answer::Failed
            }
        };
        self.report();
        answer
    }

    /// A batch the collector will never take: count it and log it whole, so an operator can
    /// fix and replay it; keeping it would hold back every batch behind it forever.
    fn dead_letter(&self, dead: &HeldBatch, refusal: &Refusal) {
        add(self.metrics.rejected, 1);
        add(self.metrics.records_rejected, dead.records as u64);
        log(LogLevel::Critical, &dead.dead_letter_message(refusal));
    }

    /// The VM is going away: put every unacknowledged batch where the next VM finds it
    /// (shared data outlives VMs). This VM still tries to send them; if both get through, the
    /// collector counts each batch id once.
    pub fn hand_over(&mut self) {
        let held: Vec<HeldBatch> = self.shipper.held().collect();
        if held.is_empty() {
            return;
        }
        let (count, records) = (held.len(), held.iter().map(|b| b.records).sum::<usize>());
        let done = update_shared(HANDOVER_KEY, |list| {
            handover::append(list, held.iter().cloned());
        });
        if done {
            add(self.metrics.handed_over, count as u64);
            log(
                LogLevel::Info,
                &format!("handing {count} unacknowledged usage batches ({records} records) to the next VM"),
            );
        } else {
            log(
                LogLevel::Error,
                &format!("could not hand {count} unacknowledged usage batches ({records} records) to the next VM; only this VM's last send can deliver them"),
            );
        }
    }

    /// Take the batches that replaced VMs handed over, if any.
    pub fn adopt(&mut self, now_ms: u64) {
        let Ok((Some(bytes), Some(cas))) = hostcalls::get_shared_data(HANDOVER_KEY) else {
            return;
        };
        if bytes.is_empty() {
            return;
        }
        // Take the whole list at once; another VM that raced for it takes it next time.
        match hostcalls::set_shared_data(HANDOVER_KEY, Some(&[]), Some(cas)) {
            Ok(()) => {}
            Err(_) => return,
        }
        let (batches, damaged) = handover::decode(&bytes);
        if damaged > 0 {
            log(
                LogLevel::Error,
                &format!("{damaged} bytes of handed-over usage could not be read"),
            );
        }
        let (mut count, mut records) = (0usize, 0usize);
        for batch in batches {
            let batch_records = batch.records;
            if self.shipper.adopt(batch, now_ms) {
                count += 1;
                records += batch_records;
            }
        }
        if count > 0 {
            add(self.metrics.adopted, count as u64);
            log(
                LogLevel::Info,
                &format!("took over {count} usage batches ({records} records) from a replaced VM"),
            );
        }
        self.report();
    }

    /// A batch this VM handed over was acknowledged after all: take it off the list, so the
    /// next VM does not send it again (it would only be a counted-once duplicate).
    fn withdraw(&self, batch_id: &str) {
        update_shared(HANDOVER_KEY, |list| {
            *list = handover::without(list, batch_id);
        });
    }

    /// Bring the shared gauges to this VM's figures.
    fn report(&mut self) {
        let records = i64::try_from(self.shipper.buffered_records()).unwrap_or(i64::MAX);
        let batches = i64::try_from(self.shipper.buffered_batches()).unwrap_or(i64::MAX);
        self.set_reported(records, batches);
    }

    fn set_reported(&mut self, records: i64, batches: i64) {
        let (old_records, old_batches) = std::mem::replace(&mut self.reported, (records, batches));
        move_gauge(
            self.metrics.buffered_records,
            records.saturating_sub(old_records),
        );
        move_gauge(
            self.metrics.buffered_batches,
            batches.saturating_sub(old_batches),
        );
    }

    /// The VM is going away: take this VM's share out of the gauges, and say what is left.
    pub fn close(&mut self) {
        let left = self.shipper.buffered_records();
        if left > 0 {
            log(
                LogLevel::Warn,
                &format!(
                    "going away with {left} usage records the collector has not acknowledged: the next VM sends them; if Envoy is exiting, they are lost"
                ),
            );
        }
        self.set_reported(0, 0);
    }

    /// The answer to the last sends of a VM going away: an acknowledged batch comes off the
    /// handover list.
    pub fn answered_closing(
        &mut self,
        token: u32,
        num_headers: usize,
        body_size: usize,
        now_ms: u64,
    ) -> Answer {
        let batch_id = self.in_flight.as_ref().map(|f| f.batch_id.clone());
        let answer = self.answered(token, num_headers, body_size, now_ms);
        if let (Answer::Acknowledged | Answer::Rejected, Some(batch_id)) = (answer, batch_id) {
            self.withdraw(&batch_id);
        }
        answer
    }
}

/// Read-modify-write of a shared-data value with compare-and-swap; false if it kept losing
/// races or the key does not exist (see [`create_shared`]).
fn update_shared(key: &str, change: impl Fn(&mut Vec<u8>)) -> bool {
    for _ in 0..CAS_ATTEMPTS {
        let Ok((value, Some(cas))) = hostcalls::get_shared_data(key) else {
            return false;
        };
        let mut value = value.unwrap_or_default();
        change(&mut value);
        match hostcalls::set_shared_data(key, Some(&value), Some(cas)) {
            Ok(()) => return true,
            Err(Status::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Create `key` with an empty value if it does not exist. Envoy's first write of a key cannot
/// be compare-and-swapped (CAS 0 means "unconditional"), so it happens here, when a VM is
/// configured: Envoy configures a canary VM on the main thread before any worker VM starts,
/// and shared data lives as long as Envoy, so this write never races with an update.
fn create_shared(key: &str) {
    if let Ok((_, None)) = hostcalls::get_shared_data(key) {
        let _ = hostcalls::set_shared_data(key, Some(&[]), None);
    }
}

/// The `:status` and body of the collector's answer, read as bytes (the SDK's String getters
/// unwrap UTF-8 and would panic).
fn read_reply(body_size: usize) -> BatchReply {
    let Some(status) = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
    else {
        return BatchReply::Nothing;
    };
    if body_size == 0 || body_size > MAX_BATCH_ANSWER_BYTES {
        return BatchReply::Nothing;
    }
    let Some(body) = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
    else {
        return BatchReply::Nothing;
    };
    batch_reply(&status, &body)
}

/// Envoy's node id (`--service-node` or the bootstrap's `node.id`; Istio's is per pod), or "".
/// Envoy 1.40 has it as the attribute `xds.node.id`; older Envoys (and Istio's) as `node.id`.
fn node_id() -> String {
    for path in [vec!["xds", "node", "id"], vec!["node", "id"]] {
        if let Ok(Some(bytes)) = hostcalls::get_property(path) {
            if !bytes.is_empty() {
                return String::from_utf8_lossy(&bytes).into_owned();
            }
        }
    }
    String::new()
}

/// 64 random bits. `RandomState` seeds itself from the host's randomness (WASI `random_get`),
/// which saves a dependency for the one random number a VM needs.
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x746f_6c6c_u64)
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::BadArgument => "bad argument: unknown cluster?",
        Status::InternalFailure => "internal failure",
        _ => "error",
    }
}

/// A VM start time (Unix ms) no other VM of this Envoy has: batch ids are
/// `<instance>/<vm start ms>/<sequence>`, and two workers started in the same millisecond
/// must not share ids (the collector would take the second batch for a retry of the first).
/// The last time handed out is kept in shared data and advanced with compare-and-swap. Only
/// the first write of the key is unconditional (Envoy's CAS 0); Envoy configures a canary VM
/// on the main thread before any worker VM starts, so that first write does not race.
fn unique_start_ms(now_ms: u64) -> u64 {
    for _ in 0..CAS_ATTEMPTS {
        let (last, cas) = match hostcalls::get_shared_data(START_KEY) {
            Ok((Some(bytes), cas)) => match <[u8; 8]>::try_from(bytes.as_slice()) {
                Ok(value) => (Some(u64::from_le_bytes(value)), cas),
                Err(_) => (None, cas),
            },
            Ok((None, cas)) => (None, cas),
            Err(_) => break,
        };
        let mine = last.map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
        match hostcalls::set_shared_data(START_KEY, Some(&mine.to_le_bytes()), cas) {
            Ok(()) => return mine,
            Err(Status::CasMismatch) => continue,
            Err(_) => break,
        }
    }
    log(
        LogLevel::Warn,
        "could not reserve a unique VM start time in shared data; batch ids use the clock alone",
    );
    now_ms
}
