//! Tollgate's proxy-wasm adapter: turns Envoy's callbacks into calls to the core's [`Gate`].
//!
//! Everything that decides lives in `tollgate-core`; this file only reads headers, reads the
//! clock, answers refusals, and folds counters into Envoy stats. It never panics on input:
//! header values are read as bytes (the SDK's `String` getters unwrap UTF-8 and would take
//! down the VM on a non-UTF-8 header).

// Slicing that can panic would take down the VM of every request on a worker.
#![deny(clippy::indexing_slicing)]

mod host;
mod keys;
mod ship;
mod sync;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};
use tollgate_core::config::UserSource;
use tollgate_core::routes::{PathRoute, RouteTarget};
use tollgate_core::{Admission, Gate, Policy, RequestHead, UsageTotals, Verdict};

use crate::host::{Metrics, SharedDataCells};
use crate::ship::{Answer, Outbox};
use crate::sync::{SyncCall, WaitSlot, Waiter, Waiters};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(TollgateRoot {
            context_id,
            ..TollgateRoot::default()
        })
    });
}}

/// The tick period while quotas are enforced: how soon a request that waits for a lease gets
/// its sync going, and how often waiting requests look for a lease another worker fetched.
const QUOTA_TICK_MS: u64 = 50;

/// The longest tick period with keys from a JWKS endpoint: bounds how long the first requests
/// after Envoy starts wait for keys, and a token signed with a new key for its refetch.
const JWKS_TICK_MS: u64 = 200;

pub(crate) type SharedGate = Rc<RefCell<Gate<SharedDataCells>>>;

/// One per VM: holds the compiled policy, this worker's gate and its usage outbox.
#[derive(Default)]
struct TollgateRoot {
    context_id: u32,
    gate: Option<SharedGate>,
    metrics: Option<Rc<Metrics>>,
    /// Set when the configuration has a `collector`.
    outbox: Option<Outbox>,
    /// `on_done` returned false: the host waits for `proxy_done` after the last answer.
    closing: bool,
    /// Requests held until their quota has a lease.
    waiters: Waiters,
    /// The sync with the collector in flight.
    sync: Option<SyncCall>,
    /// The JWKS fetch in flight (`token.jwks_source`).
    jwks_call: Option<u32>,
    next_sync_ms: u64,
    /// The last sync failed (logged once until one succeeds).
    sync_failing: bool,
    /// Counters are folded into stats (and usage into the outbox) this often.
    fold_interval_ms: u64,
    next_fold_ms: u64,
}

pub(crate) fn log(level: LogLevel, message: &str) {
    // Logging is best effort: a failing log call must not become a failing request.
    let _ = hostcalls::log(level, message);
}

/// The proxy's clock in Unix nanoseconds (0 if the host cannot tell, which never happens in
/// Envoy; tokens then look not yet valid rather than valid forever).
fn now_nanos() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn now_ms() -> u64 {
    now_nanos() / 1_000_000
}

impl Context for TollgateRoot {
    /// The VM is going away (shutdown, or a configuration change): fold what is left into
    /// stats, seal it, hand every unacknowledged batch to the next VM through shared data, and
    /// still try to send them (at shutdown there is no next VM). While that call is in flight
    /// the answer is false, and `proxy_done` follows its answer.
    fn on_done(&mut self) -> bool {
        self.flush_stats();
        let (Some(outbox), Some(gate)) = (self.outbox.as_mut(), self.gate.as_ref()) else {
            return true;
        };
        let policy = match gate.try_borrow() {
            Ok(gate) => Arc::clone(gate.policy()),
            Err(_) => return true,
        };
        let now = now_ms();
        outbox.seal(&policy, now);
        outbox.hand_over();
        outbox.send(now, true);
        if outbox.in_flight() {
            self.closing = true;
            return false;
        }
        outbox.close();
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let now = now_ms();
        if self.jwks_call == Some(token_id) {
            self.jwks_call = None;
            if let Some(gate) = &self.gate {
                keys::answered(gate, num_headers, body_size, now);
            }
            return;
        }
        if self.sync.as_ref().is_some_and(|c| c.token == token_id) {
            if let Some(call) = self.sync.take() {
                self.sync_answered(call, num_headers, body_size, now);
            }
            return;
        }
        let Some(outbox) = self.outbox.as_mut() else {
            return;
        };
        if self.closing {
            let answer = outbox.answered_closing(token_id, num_headers, body_size, now);
            // One batch after the other while the collector takes them; the first failure
            // ends the shutdown (the host will not wait for backoffs).
            if matches!(answer, Answer::Acknowledged | Answer::Rejected) {
                outbox.send(now, true);
            }
            if !outbox.in_flight() {
                outbox.close();
                self.closing = false;
                let _ = hostcalls::done();
            }
            return;
        }
        let answer = outbox.answered(token_id, num_headers, body_size, now);
        if matches!(answer, Answer::Acknowledged | Answer::Rejected) {
            outbox.send(now, false);
        }
        self.update_block();
    }
}

impl TollgateRoot {
    /// The collector answered the sync (or the call failed: `num_headers` 0).
    fn sync_answered(&mut self, call: SyncCall, num_headers: usize, body_size: usize, now: u64) {
        let Some(gate) = self.gate.clone() else {
            return;
        };
        let answer = sync::read_answer(num_headers, body_size);
        if let Ok(mut gate) = gate.try_borrow_mut() {
            match answer {
                Some(response) => {
                    if self.sync_failing {
                        log(LogLevel::Info, "syncing with the collector again");
                    }
                    self.sync_failing = false;
                    gate.apply_sync(&call.work, &response, now)
                }
                None => {
                    if !self.sync_failing {
                        log(
                            LogLevel::Warn,
                            "the collector did not answer the sync; quotas wait for leases, denials for the next sync",
                        );
                    }
                    self.sync_failing = true;
                    gate.sync_failed(call.work, now);
                }
            }
        }
        self.decide_waiters(now);
    }

    /// The quota work of a tick: decide held requests, and sync when due or needed.
    fn quota_tick(&mut self, now: u64) {
        self.decide_waiters(now);
        let (Some(gate), Some(outbox)) = (self.gate.clone(), self.outbox.as_ref()) else {
            return;
        };
        if let Some(call) = &self.sync {
            // Envoy answers every call by its timeout; this only guards a lost callback.
            if now.saturating_sub(call.sent_ms) > outbox.settings().timeout_ms.saturating_add(1000)
            {
                if let (Some(call), Ok(mut gate)) = (self.sync.take(), gate.try_borrow_mut()) {
                    gate.sync_failed(call.work, now);
                }
            }
            return;
        }
        let waiting = !self.waiters.borrow().is_empty();
        if !waiting && now < self.next_sync_ms {
            return;
        }
        self.next_sync_ms = now.saturating_add(outbox.flush_interval_ms());
        let Ok(mut gate) = gate.try_borrow_mut() else {
            return;
        };
        let work = gate.sync_work(now);
        if work.is_empty() {
            return;
        }
        match sync::dispatch(outbox.settings(), &outbox.instance(), &work) {
            Some(token) => {
                self.sync = Some(SyncCall {
                    token,
                    work,
                    sent_ms: now,
                })
            }
            None => gate.sync_failed(work, now),
        }
    }

    /// Decide the requests held for a lease: admit or refuse those that can be decided now.
    fn decide_waiters(&mut self, now: u64) {
        let Some(gate) = self.gate.clone() else {
            return;
        };
        let decided: Vec<(u32, Admission)> = {
            let Ok(mut gate) = gate.try_borrow_mut() else {
                return;
            };
            let wait_ms = gate.policy().quota.lease_wait_ms;
            let mut decided = Vec::new();
            self.waiters.borrow_mut().retain(|waiter| {
                let Ok(mut slot) = waiter.slot.try_borrow_mut() else {
                    return true;
                };
                if slot.gone {
                    return false;
                }
                let Some(admission) = slot.admission.as_mut() else {
                    return false;
                };
                let timed_out = now.saturating_sub(waiter.since_ms) >= wait_ms;
                gate.retry_held(admission, now, timed_out);
                if admission.verdict == Verdict::AwaitCollector {
                    return true;
                }
                decided.push((waiter.context_id, admission.clone()));
                slot.decided_ms = now;
                false
            });
            decided
        };
        if decided.is_empty() {
            return;
        }
        let Some(policy) = gate.try_borrow().ok().map(|g| Arc::clone(g.policy())) else {
            return;
        };
        for (context_id, mut admission) in decided {
            // The stream may be gone (the client left): nothing to answer, and what was
            // reserved for it goes back.
            if hostcalls::set_effective_context(context_id).is_err() {
                if let Ok(mut gate) = gate.try_borrow_mut() {
                    gate.release(&mut admission);
                }
                continue;
            }
            answer(&admission, &policy);
            if admission.verdict == Verdict::Allow {
                let _ = hostcalls::resume_http_request();
            }
        }
        // Calls made after this (usage batches, syncs) belong to the root context.
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    /// Fold the gate's counters and usage into stats; the usage goes on to the outbox.
    fn flush_stats(&mut self) {
        if let (Some(gate), Some(metrics)) = (&self.gate, &self.metrics) {
            if let Ok(mut gate) = gate.try_borrow_mut() {
                let usage = metrics.flush(&mut gate);
                if let Some(outbox) = self.outbox.as_mut() {
                    outbox.absorb(usage);
                }
            }
        }
    }

    /// Tell the gate whether requests can be metered.
    fn update_block(&self) {
        if let (Some(gate), Some(outbox)) = (&self.gate, &self.outbox) {
            if let Ok(mut gate) = gate.try_borrow_mut() {
                let blocked = outbox.blocked();
                if gate.metering_blocked() != blocked {
                    let message = if blocked {
                        "usage buffer full and unacknowledged: refusing requests with 503 metering_unavailable (on_buffer_full: fail_closed)"
                    } else {
                        "usage buffer has room again: serving requests"
                    };
                    log(LogLevel::Warn, message);
                }
                gate.set_metering_blocked(blocked);
            }
        }
    }
}

impl RootContext for TollgateRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(bytes)) => bytes,
            Ok(None) | Err(_) => {
                log(
                    LogLevel::Critical,
                    "invalid configuration: the plugin configuration is empty",
                );
                return false;
            }
        };
        let policy = match Policy::from_json(&config) {
            Ok(policy) => Arc::new(policy),
            Err(e) => {
                log(LogLevel::Critical, &e.to_string());
                return false;
            }
        };
        if policy.license_metadata.is_some() {
            log(
                LogLevel::Critical,
                "invalid configuration at `license_metadata`: proxy-wasm cannot write dynamic metadata; use the native module, or `upstream_headers`",
            );
            return false;
        }
        // Once per configuration of this VM, never per request.
        for warning in policy.warnings() {
            log(LogLevel::Warn, &warning.to_string());
        }
        let metrics = match Metrics::define(&policy) {
            Ok(metrics) => Rc::new(metrics),
            Err(problem) => {
                log(
                    LogLevel::Critical,
                    &format!("cannot define stats: {problem}"),
                );
                return false;
            }
        };
        // Counters of an earlier configuration of this VM go out before it is replaced.
        self.flush_stats();
        match (&policy.collector, self.outbox.as_mut()) {
            (Some(settings), Some(outbox)) => outbox.reconfigure(settings),
            (Some(settings), None) => match Outbox::new(settings, now_ms()) {
                Ok(outbox) => self.outbox = Some(outbox),
                Err(problem) => {
                    log(
                        LogLevel::Critical,
                        &format!("cannot define stats: {problem}"),
                    );
                    return false;
                }
            },
            (None, Some(outbox)) => {
                if outbox.buffered_records() > 0 {
                    log(
                        LogLevel::Warn,
                        "the collector was removed from the configuration; unacknowledged usage is dropped",
                    );
                }
                outbox.close();
                self.outbox = None;
            }
            (None, None) => {}
        }
        let mut interval_ms = policy.stats_flush_interval_ms;
        if let Some(outbox) = self.outbox.as_mut() {
            interval_ms = interval_ms.min(outbox.flush_interval_ms());
            outbox.set_tick_period(interval_ms);
        }
        self.fold_interval_ms = interval_ms;
        // Quotas and seats need a quick tick: a request waiting for a lease or a seat starts a
        // sync on the next one. (Seats may come from a license's claims, which need `users`.)
        let holds_requests = self.outbox.is_some()
            && (policy.users.is_some()
                || policy
                    .plans
                    .values()
                    .any(|plan| !plan.limits.quotas.is_empty()));
        let tick_ms = if holds_requests {
            interval_ms.min(QUOTA_TICK_MS)
        } else {
            interval_ms
        };
        // Keys from a JWKS endpoint: a refetch for an unknown kid waits for the next tick.
        let tick_ms = if policy.token.jwks_source.is_some() {
            tick_ms.min(JWKS_TICK_MS)
        } else {
            tick_ms
        };
        let mut gate = Gate::new(policy, SharedDataCells);
        if let Some(outbox) = &self.outbox {
            gate.set_lease_prefix(&outbox.instance_and_start());
        }
        // A new configuration of this VM: the old gate's pending returns and lease numbering
        // carry over (lease ids must never repeat).
        if let Some(Ok(mut previous)) = self.gate.as_ref().map(|g| g.try_borrow_mut()) {
            gate.take_over(&mut previous);
        }
        self.gate = Some(Rc::new(RefCell::new(gate)));
        self.metrics = Some(metrics);
        self.update_block();
        let _ = hostcalls::set_tick_period(Duration::from_millis(tick_ms));
        true
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        if !self.closing {
            if let Some(gate) = &self.gate {
                if let Some(token) = keys::tick(gate, now) {
                    self.jwks_call = Some(token);
                }
            }
        }
        if now >= self.next_fold_ms {
            self.next_fold_ms = now.saturating_add(self.fold_interval_ms);
            self.flush_stats();
        }
        if !self.closing {
            // Denials another worker's sync brought: one shared-data read per tick, so that
            // requests read none.
            if let (Some(_), Some(Ok(mut gate))) =
                (&self.outbox, self.gate.as_ref().map(|g| g.try_borrow_mut()))
            {
                gate.refresh_denials();
            }
            self.quota_tick(now);
        }
        if let (Some(outbox), Some(gate)) = (self.outbox.as_mut(), self.gate.as_ref()) {
            let policy = match gate.try_borrow() {
                Ok(gate) => Arc::clone(gate.policy()),
                Err(_) => return,
            };
            let now = now_ms();
            if !self.closing {
                outbox.adopt(now);
            }
            outbox.tick(&policy, now);
            if self.closing {
                // The watchdog gave up on the last call of a VM shutting down.
                if !outbox.in_flight() {
                    outbox.close();
                    self.closing = false;
                    let _ = hostcalls::done();
                }
                return;
            }
            self.update_block();
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(TollgateHttp {
            context_id,
            gate: self.gate.clone(),
            waiters: Rc::clone(&self.waiters),
            waiting: None,
            admission: None,
            started_nanos: 0,
            request_bytes: 0,
            held_request_bytes: 0,
            response_bytes: 0,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One per request.
struct TollgateHttp {
    context_id: u32,
    gate: Option<SharedGate>,
    waiters: Waiters,
    /// Set while (and after) the request was held for a quota lease: the root decides it.
    waiting: Option<Rc<RefCell<WaitSlot>>>,
    admission: Option<Admission>,
    started_nanos: u64,
    request_bytes: u64,
    /// Request body buffered while the request was held for a lease.
    held_request_bytes: u64,
    response_bytes: u64,
}

impl Context for TollgateHttp {}

impl TollgateHttp {
    /// True while the request is held for a quota lease and not decided yet.
    fn undecided(&self) -> bool {
        self.waiting.as_ref().is_some_and(|slot| {
            slot.try_borrow().map_or(true, |s| {
                s.admission
                    .as_ref()
                    .is_some_and(|a| a.verdict == Verdict::AwaitCollector)
            })
        })
    }
}

/// The downstream client's IP address (Envoy's `source.address`, without the port).
fn client_address() -> Option<String> {
    let bytes = hostcalls::get_property(vec!["source", "address"]).ok()??;
    let address = String::from_utf8(bytes).ok()?;
    Some(tollgate_core::gate::client_host(&address).to_string())
}

fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// Refuse with 503 and `body`: the request can be neither checked nor metered.
fn not_configured(body: &[u8]) -> Action {
    let headers = vec![("content-type", "application/json")];
    let _ = hostcalls::send_http_response(503, headers, Some(body));
    Action::Pause
}

/// Forward with the license headers, strip forged ones, or send the refusal.
fn answer(admission: &Admission, policy: &Policy) {
    match &admission.verdict {
        Verdict::Allow => {
            // The upstream is served on the license's behalf; it never needs the license.
            if let Some(name) = admission.upstream_removals(policy) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
            }
            // Replacing a header also removes every copy the client sent.
            for (name, value) in admission.upstream_headers(policy) {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(&value));
            }
        }
        Verdict::Public => {
            for name in policy.upstream_headers.names() {
                let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
            }
        }
        // Held: nothing to answer yet.
        Verdict::AwaitCollector => {}
        Verdict::Refuse(refusal) => {
            let headers = refusal.headers();
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = refusal.body();
            let status = u32::from(refusal.status());
            if hostcalls::send_http_response(status, headers, Some(body.as_bytes())).is_err() {
                log(LogLevel::Error, "could not send a refusal");
            }
        }
    }
}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.started_nanos = now_nanos();
        let Some(gate) = self.gate.clone() else {
            // The VM has no valid configuration; Envoy normally refuses to start so. Fail closed.
            return not_configured(br#"{"error":"not_configured","message":"the licensing filter has no valid configuration"}"#);
        };
        let (admission, policy) = {
            // try_borrow: a re-entrant callback must get an error path, never a panic.
            let Ok(mut gate) = gate.try_borrow_mut() else {
                // Cannot happen (callbacks do not nest); if it did, the request could be
                // neither checked nor metered, so it is refused, as with no configuration.
                log(
                    LogLevel::Error,
                    "gate busy in on_http_request_headers; request refused",
                );
                return not_configured(
                    br#"{"error":"not_configured","message":"the licensing filter is not ready"}"#,
                );
            };
            let policy = Arc::clone(gate.policy());
            let path = request_header(":path").unwrap_or_default();
            // Bytes that are not UTF-8 cannot be a configured path or method.
            let path = std::str::from_utf8(&path).unwrap_or("");
            // Each read is a host call: `:method` only where a route names methods, the token,
            // user and address only when the route is a licensed feature's.
            let method_bytes;
            let (method, target) = match policy.routes.lookup_path(path) {
                PathRoute::Found(target) => ("", target),
                PathRoute::NeedsMethod => {
                    method_bytes = request_header(":method").unwrap_or_default();
                    let method = std::str::from_utf8(&method_bytes).unwrap_or("");
                    (method, policy.routes.lookup(method, path))
                }
            };
            let licensed = matches!(target, Some(RouteTarget::Feature(_)));
            let credential = if licensed {
                request_header(&policy.token.header)
            } else {
                None
            };
            // Bytes that are not UTF-8 cannot be a JWT.
            let credential = credential
                .as_deref()
                .map(|c| std::str::from_utf8(c).unwrap_or("\u{fffd}"));
            let user = match &policy.users {
                Some(UserSource::Header(name)) if licensed => request_header(name),
                _ => None,
            };
            let client_address = if licensed && policy.reads_client_address {
                client_address()
            } else {
                None
            };
            let head = RequestHead {
                method,
                path,
                credential,
                user: user.as_deref().and_then(|u| std::str::from_utf8(u).ok()),
                client_address: client_address.as_deref(),
            };
            (gate.admit_routed(target, &head, self.started_nanos), policy)
        };
        if admission.verdict == Verdict::AwaitCollector {
            let slot = Rc::new(RefCell::new(WaitSlot {
                admission: Some(admission),
                gone: false,
                decided_ms: 0,
            }));
            self.waiters.borrow_mut().push(Waiter {
                context_id: self.context_id,
                since_ms: self.started_nanos / 1_000_000,
                slot: Rc::clone(&slot),
            });
            self.waiting = Some(slot);
            return Action::Pause;
        }
        answer(&admission, &policy);
        let action = match admission.verdict {
            Verdict::Refuse(_) | Verdict::AwaitCollector => Action::Pause,
            Verdict::Allow | Verdict::Public => Action::Continue,
        };
        self.admission = Some(admission);
        action
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        if self.undecided() {
            // Held for a lease: the body must not go upstream before the decision (a Continue
            // here would send the headers on too). Envoy buffers it, and reports the whole
            // buffered size on each call.
            self.held_request_bytes = body_size as u64;
            return Action::Pause;
        }
        self.request_bytes = self.request_bytes.saturating_add(body_size as u64);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.undecided() {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // The quota left, for clients that pace themselves (allowed requests with quotas).
        let headers = match &self.waiting {
            Some(slot) => slot
                .try_borrow()
                .ok()
                .and_then(|s| s.admission.as_ref().map(Admission::ratelimit_headers)),
            None => self.admission.as_ref().map(Admission::ratelimit_headers),
        };
        for (name, value) in headers.unwrap_or_default() {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&value));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_bytes = self.response_bytes.saturating_add(body_size as u64);
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(slot) = &self.waiting {
            // Decided by the root (or never: the client left while it waited).
            if let Ok(mut slot) = slot.try_borrow_mut() {
                slot.gone = true;
                self.admission = slot.admission.take();
                self.started_nanos = self
                    .started_nanos
                    .max(slot.decided_ms.saturating_mul(1_000_000));
            }
        }
        let (Some(gate), Some(admission)) = (&self.gate, &self.admission) else {
            return;
        };
        let usage = UsageTotals {
            calls: 1,
            request_bytes: self.request_bytes.saturating_add(self.held_request_bytes),
            response_bytes: self.response_bytes,
            processing_nanos: now_nanos().saturating_sub(self.started_nanos),
        };
        match gate.try_borrow_mut() {
            Ok(mut gate) => gate.record(admission, usage),
            Err(_) => log(
                LogLevel::Error,
                "gate busy in on_log; usage of one request not metered",
            ),
        }
    }
}
