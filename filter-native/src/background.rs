//! The module's work off the request path, on Envoy's main thread: usage shipped to the
//! collector exactly once, and the sync (licenses served out, denials such as revocations in).
//!
//! A ticker thread (see `abi`) commits an event every [`TICK_MS`] through the configuration's
//! scheduler; Envoy runs it on the main thread, which calls [`crate::Config::tick`]. Calls go
//! out as config-level HTTP callouts through the collector's Envoy cluster, as the wasm
//! filter's `dispatch_http_call` does, and their answers come back on the main thread too.
//!
//! Exactly once, as in the wasm filter: the core's [`Shipper`] seals usage into batches with
//! deterministic ids and keeps each until the collector acknowledges it. When Envoy replaces a
//! configuration, the old one hands its unacknowledged batches (the one in flight included:
//! Envoy cancels its callout) to the process's [`HANDOVER`] list, and the new configuration
//! sends them; the collector counts each batch id once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tollgate_core::calls::{batch_reply, sync_answer, sync_request, BatchReply, Signed};
use tollgate_core::config::CollectorPolicy;
use tollgate_core::gate::SyncWork;
use tollgate_core::meter::Ledger;
use tollgate_core::shipper::{default_instance, HeldBatch, Overflow, Shipper};
use tollgate_core::{Policy, UsageKey, UsageTotals};
use tollgate_wire::sync::SyncResponse;
use tollgate_wire::{Refusal, Source};

use crate::{log, ConfigHost, LogLevel};

/// How often the ticker wakes the main thread. Sealing follows the shipper's own schedule
/// (`flush_interval_ms`); a short tick only makes it, the sync and the watchdog punctual.
pub const TICK_MS: u64 = 100;

/// How long past the call's own timeout a call may stay unanswered before it counts as failed
/// (Envoy answers every callout by its timeout; this only guards against a lost callback).
const WATCHDOG_GRACE_MS: u64 = 1000;

/// What Envoy lends the module on the main thread, for one configuration.
pub trait CollectorHost {
    /// Start a `POST` through `cluster`; the callout's id, or why it could not start.
    fn http_call(
        &mut self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u64, &'static str>;
    fn increment(&mut self, counter: usize, value: u64);
    /// Move a gauge by `delta` (gauges are shared by the configurations of one name).
    fn move_gauge(&mut self, gauge: usize, delta: i64);
}

/// An answered callout: `None` when it failed (reset, no healthy host, timeout).
pub struct CalloutAnswer<'a> {
    pub status: &'a [u8],
    pub body: &'a [u8],
}

/// Batches unacknowledged by configurations Envoy destroyed, by collector (cluster and path):
/// process memory outlives configurations, as shared data outlives wasm VMs.
static HANDOVER: OnceLock<Mutex<HashMap<String, Vec<HeldBatch>>>> = OnceLock::new();

fn handover() -> &'static Mutex<HashMap<String, Vec<HeldBatch>>> {
    HANDOVER.get_or_init(Mutex::default)
}

/// Batch ids are `<instance>/<start ms>/<sequence>`: two configurations of one process started
/// in the same millisecond must not share a start, or the collector would take the second's
/// batches for retries of the first's.
fn unique_start_ms(now_ms: u64) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let mine = now_ms.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, mine, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return mine,
            Err(seen) => last = seen,
        }
    }
}

/// 64 random bits from the standard library's randomly seeded hasher (one per configuration).
fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x746f_6c6c_u64)
}

/// The machine's name, for instance names: Envoy does not lend a module its node id.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

struct ShipMetrics {
    sent: usize,
    acked: usize,
    failed: usize,
    records_acked: usize,
    dropped_calls: usize,
    handed_over: usize,
    adopted: usize,
    rejected: usize,
    records_rejected: usize,
    syncs_failed: usize,
    buffered_records: usize,
    buffered_batches: usize,
}

impl ShipMetrics {
    /// The wasm filter's stat names (`dynamicmodulescustom.` instead of `wasmcustom.`).
    fn define(host: &mut impl ConfigHost) -> Result<ShipMetrics, String> {
        let mut c = |name: &str| host.define_counter(name).ok_or_else(|| name.to_string());
        let counters = ShipMetrics {
            sent: c("tollgate.usage_batches_sent")?,
            acked: c("tollgate.usage_batches_acked")?,
            failed: c("tollgate.usage_batches_failed")?,
            records_acked: c("tollgate.usage_records_acked")?,
            dropped_calls: c("tollgate.usage_dropped_calls")?,
            handed_over: c("tollgate.usage_batches_handed_over")?,
            adopted: c("tollgate.usage_batches_adopted")?,
            rejected: c("tollgate.usage_batches_rejected")?,
            records_rejected: c("tollgate.usage_records_rejected")?,
            syncs_failed: c("tollgate.syncs_failed")?,
            buffered_records: 0,
            buffered_batches: 0,
        };
        let mut g = |name: &str| host.define_gauge(name).ok_or_else(|| name.to_string());
        Ok(ShipMetrics {
            buffered_records: g("tollgate.usage_buffered_records")?,
            buffered_batches: g("tollgate.usage_buffered_batches")?,
            ..counters
        })
    }
}

fn add(host: &mut impl CollectorHost, counter: usize, value: u64) {
    if value > 0 {
        host.increment(counter, value);
    }
}

struct InFlight {
    id: u64,
    batch_id: String,
    records: usize,
    sent_ms: u64,
}

struct SyncCall {
    id: u64,
    work: SyncWork,
    sent_ms: u64,
}

/// One configuration's usage on its way to the collector, and its sync.
pub struct Background {
    settings: CollectorPolicy,
    source: Source,
    shipper: Shipper,
    /// Usage taken from the gate, not sealed yet.
    open: Ledger,
    in_flight: Option<InFlight>,
    sync: Option<SyncCall>,
    next_sync_ms: u64,
    metrics: ShipMetrics,
    /// What this configuration added to the shared gauges (records, batches).
    reported: (i64, i64),
    reported_dropped_calls: u64,
}

/// What became of a callout's answer.
#[derive(Debug, PartialEq)]
pub enum Answered {
    Acknowledged,
    Rejected,
    Failed,
    /// A sync's work, and the collector's response (`None`: it failed).
    Sync(Box<(SyncWork, Option<SyncResponse>)>),
    /// Not a call in flight (a late answer to a call the watchdog gave up on).
    Unknown,
}

impl Background {
    pub fn new(
        host: &mut impl ConfigHost,
        settings: &CollectorPolicy,
        now_ms: u64,
    ) -> Result<Background, String> {
        let source = Source {
            instance: settings
                .instance
                .clone()
                .unwrap_or_else(|| default_instance(&host_name(), random_u64())),
            vm_started_ms: unique_start_ms(now_ms),
        };
        Ok(Background {
            shipper: Shipper::new(settings.shipper, source.clone(), now_ms),
            source,
            settings: settings.clone(),
            open: Ledger::default(),
            in_flight: None,
            sync: None,
            next_sync_ms: now_ms,
            metrics: ShipMetrics::define(host)?,
            reported: (0, 0),
            reported_dropped_calls: 0,
        })
    }

    /// `<instance>/<start ms>`: unique per configuration, the prefix of its lease ids.
    pub fn instance_and_start(&self) -> String {
        format!("{}/{}", self.source.instance, self.source.vm_started_ms)
    }

    /// True while requests must be refused: the buffer is full under fail-closed.
    pub fn blocked(&self) -> bool {
        self.settings.shipper.overflow == Overflow::FailClosed && !self.shipper.has_room()
    }

    /// Take usage drained from the gate.
    pub fn absorb(&mut self, usage: Vec<(UsageKey, UsageTotals)>) {
        for (key, totals) in usage {
            self.open.record(key, totals);
        }
    }

    /// The handover list this configuration adopts from and hands over to.
    fn handover_key(&self) -> String {
        format!("{}\n{}", self.settings.cluster, self.settings.path)
    }

    /// The shipping work of a tick: adopt what replaced configurations left, give up on a call
    /// that outlived its timeout, seal when due, send.
    pub fn ship(&mut self, host: &mut impl CollectorHost, policy: &Policy, now_ms: u64) {
        self.adopt(host, now_ms);
        let limit = self.settings.timeout_ms.saturating_add(WATCHDOG_GRACE_MS);
        if let Some(call) = self
            .in_flight
            .take_if(|f| now_ms.saturating_sub(f.sent_ms) > limit)
        {
            log(
                LogLevel::Warn,
                &format!(
                    "usage batch {} got no answer within {} ms; retrying",
                    call.batch_id, self.settings.timeout_ms
                ),
            );
            self.fail(host, &call.batch_id, now_ms);
        }
        // Each aggregate makes at most four records; a window due within half a tick is
        // sealed now rather than a whole tick late.
        let due_by = now_ms.saturating_add(TICK_MS / 2);
        if self
            .shipper
            .seal_due(self.open.len().saturating_mul(4), due_by)
        {
            self.seal(host, policy, now_ms);
        }
        self.send(host, now_ms);
        self.report(host);
    }

    fn seal(&mut self, host: &mut impl CollectorHost, policy: &Policy, now_ms: u64) {
        let usage = self.open.drain();
        self.shipper
            .seal(usage, |feature| policy.feature_name(feature), now_ms);
        let dropped = self.shipper.dropped().calls;
        let new_drops = dropped.saturating_sub(self.reported_dropped_calls);
        if new_drops > 0 {
            self.reported_dropped_calls = dropped;
            add(host, self.metrics.dropped_calls, new_drops);
            log(
                LogLevel::Warn,
                &format!(
                    "usage buffer full ({} records unacknowledged): the usage of {new_drops} calls was dropped (on_buffer_full: fail_open)",
                    self.shipper.buffered_records()
                ),
            );
        }
    }

    fn send(&mut self, host: &mut impl CollectorHost, now_ms: u64) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(out) = self.shipper.next_send(now_ms) else {
            return;
        };
        let call = Signed::new(&self.settings, out.body);
        add(host, self.metrics.sent, 1);
        match host.http_call(
            &self.settings.cluster,
            &call.headers(&self.settings, &self.settings.path),
            &call.body,
            self.settings.timeout_ms,
        ) {
            Ok(id) => {
                self.in_flight = Some(InFlight {
                    id,
                    batch_id: out.batch_id,
                    records: out.records,
                    sent_ms: now_ms,
                })
            }
            Err(why) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "cannot call the usage collector through cluster `{}` ({why}); retrying",
                        self.settings.cluster
                    ),
                );
                self.fail(host, &out.batch_id, now_ms);
            }
        }
    }

    fn fail(&mut self, host: &mut impl CollectorHost, batch_id: &str, now_ms: u64) {
        add(host, self.metrics.failed, 1);
        self.shipper.failed(batch_id, now_ms);
    }

    /// The sync in flight, if it outlived its timeout: its work goes back to the gate.
    pub fn overdue_sync(&mut self, host: &mut impl CollectorHost, now_ms: u64) -> Option<SyncWork> {
        let limit = self.settings.timeout_ms.saturating_add(WATCHDOG_GRACE_MS);
        let call = self
            .sync
            .take_if(|c| now_ms.saturating_sub(c.sent_ms) > limit)?;
        add(host, self.metrics.syncs_failed, 1);
        Some(call.work)
    }

    /// True when a sync is due: none in flight, and the interval passed or requests wait for
    /// its answer (`waiting`). The next is due an interval later.
    pub fn sync_due(&mut self, now_ms: u64, waiting: bool) -> bool {
        if self.sync.is_some() || (!waiting && now_ms < self.next_sync_ms) {
            return false;
        }
        self.next_sync_ms = now_ms.saturating_add(self.settings.shipper.flush_interval_ms);
        true
    }

    /// Send the gate's sync `work`; it comes back if it could not be sent.
    pub fn start_sync(
        &mut self,
        host: &mut impl CollectorHost,
        work: SyncWork,
        now_ms: u64,
    ) -> Result<(), SyncWork> {
        let call = sync_request(&self.settings, &self.source.instance, &work);
        match host.http_call(
            &self.settings.cluster,
            &call.headers(&self.settings, &self.settings.sync_path),
            &call.body,
            self.settings.timeout_ms,
        ) {
            Ok(id) => {
                self.sync = Some(SyncCall {
                    id,
                    work,
                    sent_ms: now_ms,
                });
                Ok(())
            }
            Err(why) => {
                log(
                    LogLevel::Warn,
                    &format!("cannot sync with the collector ({why}); retrying"),
                );
                add(host, self.metrics.syncs_failed, 1);
                Err(work)
            }
        }
    }

    /// Callout `id` was answered (`None`: it failed).
    pub fn answered(
        &mut self,
        host: &mut impl CollectorHost,
        id: u64,
        answer: Option<CalloutAnswer<'_>>,
        now_ms: u64,
    ) -> Answered {
        if let Some(call) = self.sync.take_if(|c| c.id == id) {
            let response = answer.and_then(|a| sync_answer(a.status, a.body));
            if response.is_none() {
                add(host, self.metrics.syncs_failed, 1);
            }
            return Answered::Sync(Box::new((call.work, response)));
        }
        let Some(call) = self.in_flight.take_if(|f| f.id == id) else {
            return Answered::Unknown;
        };
        let reply = answer.map_or(BatchReply::Nothing, |a| batch_reply(a.status, a.body));
        let outcome = match reply {
            BatchReply::Ack(ack)
                if ack.batch_id == call.batch_id && self.shipper.acknowledged(&ack) =>
            {
                add(host, self.metrics.acked, 1);
                add(host, self.metrics.records_acked, call.records as u64);
                Answered::Acknowledged
            }
            BatchReply::Refused(refusal) if refusal.is_permanent() => {
                match self.shipper.rejected(&call.batch_id) {
                    Some(dead) => {
                        self.dead_letter(host, &dead, &refusal);
                        Answered::Rejected
                    }
                    None => {
                        self.fail(host, &call.batch_id, now_ms);
                        Answered::Failed
                    }
                }
            }
            _ => {
                self.fail(host, &call.batch_id, now_ms);
                Answered::Failed
            }
        };
        // The next batch goes out now rather than a tick later.
        if outcome == Answered::Acknowledged {
            self.send(host, now_ms);
        }
        self.report(host);
        outcome
    }

    /// A batch the collector will never take: count it and log it whole, so an operator can
    /// fix and replay it; keeping it would hold back every batch behind it forever.
    fn dead_letter(&self, host: &mut impl CollectorHost, dead: &HeldBatch, refusal: &Refusal) {
        add(host, self.metrics.rejected, 1);
        add(host, self.metrics.records_rejected, dead.records as u64);
        log(LogLevel::Critical, &dead.dead_letter_message(refusal));
    }

    /// Take the batches destroyed configurations handed over, if any.
    fn adopt(&mut self, host: &mut impl CollectorHost, now_ms: u64) {
        let batches = match handover().lock() {
            Ok(mut lists) => lists.remove(&self.handover_key()).unwrap_or_default(),
            Err(_) => return,
        };
        let (mut count, mut records) = (0u64, 0usize);
        for batch in batches {
            let batch_records = batch.records;
            if self.shipper.adopt(batch, now_ms) {
                count += 1;
                records += batch_records;
            }
        }
        if count > 0 {
            add(host, self.metrics.adopted, count);
            log(
                LogLevel::Info,
                &format!("took over {count} usage batches ({records} records) from a replaced configuration"),
            );
        }
    }

    /// Envoy is destroying the configuration: seal what is open and hand every unacknowledged
    /// batch (the one in flight too: Envoy cancels its callout) to the next configuration.
    pub fn close(&mut self, host: &mut impl CollectorHost, policy: &Policy, now_ms: u64) {
        self.seal(host, policy, now_ms);
        let held: Vec<HeldBatch> = self.shipper.held().collect();
        let (count, records) = (held.len(), held.iter().map(|b| b.records).sum::<usize>());
        if count > 0 {
            match handover().lock() {
                Ok(mut lists) => {
                    lists.entry(self.handover_key()).or_default().extend(held);
                    add(host, self.metrics.handed_over, count as u64);
                    log(
                        LogLevel::Info,
                        &format!("handing {count} unacknowledged usage batches ({records} records) to the next configuration"),
                    );
                }
                Err(_) => log(
                    LogLevel::Error,
                    &format!("could not hand {count} unacknowledged usage batches ({records} records) to the next configuration"),
                ),
            }
        }
        self.set_reported(host, 0, 0);
    }

    /// Bring the shared gauges to this configuration's figures.
    fn report(&mut self, host: &mut impl CollectorHost) {
        let records = i64::try_from(self.shipper.buffered_records()).unwrap_or(i64::MAX);
        let batches = i64::try_from(self.shipper.buffered_batches()).unwrap_or(i64::MAX);
        self.set_reported(host, records, batches);
    }

    fn set_reported(&mut self, host: &mut impl CollectorHost, records: i64, batches: i64) {
        let (old_records, old_batches) = std::mem::replace(&mut self.reported, (records, batches));
        if records != old_records {
            host.move_gauge(
                self.metrics.buffered_records,
                records.saturating_sub(old_records),
            );
        }
        if batches != old_batches {
            host.move_gauge(
                self.metrics.buffered_batches,
                batches.saturating_sub(old_batches),
            );
        }
    }
}
