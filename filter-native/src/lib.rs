//! Tollgate as an Envoy dynamic module: the same [`Gate`] as the wasm filter, driven from
//! Envoy's native HTTP filter hooks (Envoy 1.40, ABI v0.2.0).
//!
//! Everything that decides lives in `tollgate-core`; this crate reads headers, reads the clock,
//! answers refusals and counts into Envoy stats, as `filter/src/lib.rs` does. Unlike the wasm
//! filter, all of Envoy's workers share one process: one [`Gate`] per filter configuration
//! (so one token cache and one rate-limit store per Envoy), behind a short lock.
//!
//! With a `collector`, usage is shipped exactly once and licenses are synced (denials such as
//! revocations come back) from Envoy's main thread: see [`background`].
//!
//! License keys from `token.jwks_source` are fetched the same way. Requests that wait for a
//! quota lease or a seat are held, and woken on their worker once the main thread decides. All `unsafe` lives in [`abi`].

// Slicing that can panic would answer 500 instead of deciding.
#![deny(clippy::indexing_slicing)]

mod abi;
pub mod background;
mod cells;
mod metrics;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tollgate_core::config::UserSource;
use tollgate_core::jwks::Fetched;
use tollgate_core::routes::{PathRoute, RouteTarget};
use tollgate_core::{Admission, Gate, Policy, RequestHead, UsageKey, UsageTotals, Verdict};

pub use crate::abi::LogLevel;
use crate::background::{Background, CalloutAnswer, CollectorHost};
pub use crate::cells::NativeCells;
use crate::metrics::Metrics;

/// What Envoy lends the module while a filter configuration is created.
pub trait ConfigHost {
    /// Define a counter (`dynamicmodulescustom.<name>`); `None` if Envoy refuses.
    fn define_counter(&mut self, name: &str) -> Option<usize>;
    /// Define a gauge; `None` if Envoy refuses.
    fn define_gauge(&mut self, name: &str) -> Option<usize>;
}

/// What Envoy lends the module during one hook of one stream.
pub trait Http {
    /// A request header's first value.
    fn request_header(&self, name: &str) -> Option<&[u8]>;
    /// Replace every copy of a request header (`None`: remove them).
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    fn set_response_header(&mut self, name: &str, value: &str);
    /// Set a string in the stream's dynamic metadata.
    fn set_metadata(&mut self, namespace: &str, key: &str, value: &str);
    /// The size of the body chunk the running body hook was called with.
    fn received_body_bytes(&self, request: bool) -> u64;
    /// Answer locally; the request goes no further.
    fn send_response(&mut self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    /// A handle that wakes this stream on its worker (its `scheduled` hook runs), from any
    /// thread; `None` if Envoy refuses one.
    fn waker(&mut self) -> Option<Box<dyn Wake>>;
    /// Let a request this filter stopped go on upstream.
    fn continue_request(&mut self);
    /// The downstream client's address (`source.address`: host and port).
    fn client_address(&self) -> Option<String>;
}

/// Wakes one stream on its worker thread; a stream gone by then is not woken.
pub trait Wake: Send {
    fn wake(&self);
}

/// Where a held request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Waiting for a lease or a seat.
    Waiting,
    /// Decided on the main thread; the stream is woken to answer.
    Decided,
    /// The stream answered the decision.
    Answered,
    /// The stream ended first (the client left).
    Gone,
}

/// A request held for the collector, shared by its stream and the main thread.
struct WaitSlot {
    admission: Admission,
    state: Held,
    /// When it was decided (Unix ms): processing is metered from then, so the wait for a
    /// lease is not billed as processing.
    decided_ms: u64,
}

/// A held request as the main thread sees it.
struct Waiter {
    slot: Arc<Mutex<WaitSlot>>,
    since_ms: u64,
    wake: Box<dyn Wake>,
}

/// Log to Envoy's `dynamic_modules` logger.
pub fn log(level: LogLevel, message: &str) {
    abi::log(level, message);
}

/// The gate must be shareable by Envoy's worker threads.
const _: () = {
    const fn send<T: Send>() {}
    send::<Gate<NativeCells>>();
};

/// What every worker's requests update, under one short lock. The gate aggregates the usage
/// and counters of requests until the main thread's tick takes them.
struct Shared {
    gate: Gate<NativeCells>,
}

/// One filter configuration: the compiled policy, the gate every worker shares, and (with a
/// collector) the main thread's shipping and sync.
pub struct Config {
    shared: Mutex<Shared>,
    policy: Arc<Policy>,
    metrics: Metrics,
    background: Option<Mutex<Background>>,
    /// The callout fetching `token.jwks_source`, while one is in flight.
    jwks_call: Mutex<Option<u64>>,
    /// Requests held for a lease or a seat.
    waiters: Mutex<Vec<Waiter>>,
}

/// A JWKS is a few keys; an answer larger than this is not one.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// A poisoned lock means a panic under it: the state may be half updated, but it is counters,
/// caches and buffered usage, so carrying on beats refusing every request (or losing usage).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The policy in `bytes`, or the message that refuses it.
pub fn compile(bytes: &[u8]) -> Result<Policy, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("invalid configuration: the filter_config is empty".into());
    }
    Policy::from_json(bytes).map_err(|e| e.to_string())
}

impl Config {
    /// Compile `bytes` (the plugin JSON); `None` refuses the configuration, with a log line.
    /// Rate-limit state lives in the process's one store, so it carries over when Envoy
    /// replaces the configuration (as shared data does for the wasm filter).
    pub fn new(host: &mut impl ConfigHost, name: &[u8], bytes: &[u8]) -> Option<Config> {
        Config::with_cells(host, name, bytes, NativeCells::process().clone())
    }

    /// As [`Config::new`], over a store of the caller's (tests).
    pub fn with_cells(
        host: &mut impl ConfigHost,
        name: &[u8],
        bytes: &[u8],
        cells: NativeCells,
    ) -> Option<Config> {
        let name = String::from_utf8_lossy(name);
        if cfg!(panic = "abort") {
            log(
                LogLevel::Warn,
                "tollgate: this build aborts on a panic, taking Envoy down; build it with `make native` (profile `native`) so a panic answers 500",
            );
        }
        let policy = match compile(bytes) {
            Ok(policy) => Arc::new(policy),
            Err(message) => {
                log(LogLevel::Critical, &format!("tollgate ({name}): {message}"));
                return None;
            }
        };
        for warning in policy.warnings() {
            log(LogLevel::Warn, &format!("tollgate ({name}): {warning}"));
        }
        let metrics = match Metrics::define(host, &policy) {
            Ok(metrics) => metrics,
            Err(stat) => {
                log(
                    LogLevel::Critical,
                    &format!("tollgate ({name}): cannot define stat {stat}"),
                );
                return None;
            }
        };
        let mut gate = Gate::new(Arc::clone(&policy), cells);
        let background = match &policy.collector {
            Some(settings) => match Background::new(host, settings, now_ms()) {
                Ok(background) => {
                    gate.set_lease_prefix(&background.instance_and_start());
                    Some(Mutex::new(background))
                }
                Err(stat) => {
                    log(
                        LogLevel::Critical,
                        &format!("tollgate ({name}): cannot define stat {stat}"),
                    );
                    return None;
                }
            },
            None => None,
        };
        Some(Config {
            shared: Mutex::new(Shared { gate }),
            policy,
            metrics,
            background,
            jwks_call: Mutex::new(None),
            waiters: Mutex::new(Vec::new()),
        })
    }

    /// The main thread's periodic work: count stats, ship usage, sync, fetch keys, and tell
    /// the gate whether it can meter (fail-closed refuses while the buffer is full).
    pub fn tick(&self, host: &mut impl CollectorHost) {
        self.tick_at(host, now_ms());
    }

    /// [`Config::tick`] at `now` (Unix ms).
    pub fn tick_at(&self, host: &mut impl CollectorHost, now: u64) {
        self.fetch_keys(host, now);
        let usage = self.count_stats(host);
        let Some(background) = &self.background else {
            return;
        };
        let mut background = lock(background);
        background.absorb(usage);
        background.ship(host, &self.policy, now);
        if let Some(work) = background.overdue_sync(host, now) {
            lock(&self.shared).gate.sync_failed(work, now);
        }
        // Denials a previous configuration's sync wrote (this gate's own syncs update it).
        lock(&self.shared).gate.refresh_denials();
        self.decide_waiters(now);
        let waiting = !lock(&self.waiters).is_empty();
        if background.sync_due(now, waiting) {
            let work = lock(&self.shared).gate.sync_work(now);
            if !work.is_empty() {
                if let Err(work) = background.start_sync(host, work, now) {
                    lock(&self.shared).gate.sync_failed(work, now);
                }
            }
        }
        let blocked = background.blocked();
        let mut shared = lock(&self.shared);
        if shared.gate.metering_blocked() != blocked {
            log(
                LogLevel::Warn,
                if blocked {
                    "tollgate: usage buffer full and unacknowledged: refusing requests with 503 metering_unavailable (on_buffer_full: fail_closed)"
                } else {
                    "tollgate: usage buffer has room again: serving requests"
                },
            );
            shared.gate.set_metering_blocked(blocked);
        }
    }

    /// A callout this configuration made was answered (`None`: it failed).
    pub fn callout_done(
        &self,
        host: &mut impl CollectorHost,
        id: u64,
        answer: Option<CalloutAnswer<'_>>,
    ) {
        self.callout_done_at(host, id, answer, now_ms());
    }

    /// [`Config::callout_done`] at `now` (Unix ms).
    pub fn callout_done_at(
        &self,
        host: &mut impl CollectorHost,
        id: u64,
        answer: Option<CalloutAnswer<'_>>,
        now: u64,
    ) {
        if lock(&self.jwks_call).take_if(|call| *call == id).is_some() {
            self.keys_fetched(answer, now);
            return;
        }
        let Some(background) = &self.background else {
            return;
        };
        let answered = lock(background).answered(host, id, answer, now);
        if let background::Answered::Sync(sync) = answered {
            let (work, response) = *sync;
            let gate = &mut lock(&self.shared).gate;
            match response {
                Some(response) => gate.apply_sync(&work, &response, now),
                None => gate.sync_failed(work, now),
            }
        }
        // Leases and seats may have come in: held requests go on at once, not a tick later.
        self.decide_waiters(now);
    }

    /// Decide the held requests that can be decided now (a lease or seat came in, a denial,
    /// or they waited `quota.lease_wait_ms`), and wake their streams to answer.
    fn decide_waiters(&self, now: u64) {
        let wait_ms = self.policy.quota.lease_wait_ms;
        let mut waiters = lock(&self.waiters);
        if waiters.is_empty() {
            return;
        }
        let gate = &mut lock(&self.shared).gate;
        waiters.retain(|waiter| {
            let mut slot = lock(&waiter.slot);
            if slot.state != Held::Waiting {
                return false;
            }
            let timed_out = now.saturating_sub(waiter.since_ms) >= wait_ms;
            gate.retry_held(&mut slot.admission, now, timed_out);
            if slot.admission.verdict == Verdict::AwaitCollector {
                return true;
            }
            slot.state = Held::Decided;
            slot.decided_ms = now;
            waiter.wake.wake();
            false
        });
    }

    /// Count into Envoy stats what the gate aggregated since the last tick; its usage, for the
    /// collector.
    fn count_stats(&self, host: &mut impl CollectorHost) -> Vec<(UsageKey, UsageTotals)> {
        let (counters, health, usage) = {
            let mut shared = lock(&self.shared);
            (
                shared.gate.take_counters(),
                shared.gate.store_health(),
                shared.gate.drain_usage(),
            )
        };
        self.metrics.count(host, counters, health, &usage);
        usage
    }

    /// Start fetching the license keys (`token.jwks_source`) when the gate says one is due:
    /// on the refresh interval, sooner after a token named an unknown key.
    fn fetch_keys(&self, host: &mut impl CollectorHost, now: u64) {
        let mut call = lock(&self.jwks_call);
        if call.is_some() {
            // Envoy answers every callout by its timeout: the call ends by itself.
            return;
        }
        let mut shared = lock(&self.shared);
        let Some(source) = shared.gate.jwks_due(now) else {
            return;
        };
        let headers = [
            (":method", "GET"),
            (":path", source.path.as_str()),
            (":authority", source.authority.as_str()),
            ("accept", "application/jwk-set+json, application/json"),
        ];
        match host.http_call(&source.cluster, &headers, b"", source.timeout_ms) {
            Ok(id) => {
                *call = Some(id);
                shared.gate.jwks_started(true, now);
            }
            Err(why) => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "tollgate: cannot fetch the license keys from cluster {} ({why})",
                        source.cluster
                    ),
                );
                shared.gate.jwks_started(false, now);
            }
        }
    }

    /// The key fetch answered (`None`: it failed); the gate keeps the last good keys.
    fn keys_fetched(&self, answer: Option<CalloutAnswer<'_>>, now: u64) {
        let answer = answer.map(|a| {
            let status = std::str::from_utf8(a.status)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(0);
            let body = if a.body.len() > MAX_JWKS_BYTES {
                &[][..]
            } else {
                a.body
            };
            (status, body)
        });
        let fetched = lock(&self.shared).gate.jwks_answered(answer, now);
        match fetched {
            Some(Fetched::Changed { keys, skipped }) => {
                let mut message = format!("tollgate: license keys updated: {keys} key(s) from the JWKS");
                if !skipped.is_empty() {
                    message.push_str(&format!("; skipped: {}", skipped.join("; ")));
                }
                log(LogLevel::Info, &message);
            }
            Some(Fetched::Failed(why)) => log(
                LogLevel::Warn,
                &format!("tollgate: fetching the license keys failed ({why}); the last good keys stay in use"),
            ),
            Some(Fetched::Unchanged) | None => {}
        }
    }

    /// Envoy is destroying the configuration (its last stream is done): what was metered and
    /// not acknowledged goes to the next configuration.
    pub fn close(&self, host: &mut impl CollectorHost) {
        let usage = self.count_stats(host);
        let Some(background) = &self.background else {
            return;
        };
        let mut background = lock(background);
        background.absorb(usage);
        background.close(host, &self.policy, now_ms());
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }
}

/// The proxy's clock in Unix milliseconds.
fn now_ms() -> u64 {
    now_nanos() / 1_000_000
}

/// The proxy's clock in Unix nanoseconds (0 if before the epoch: tokens then look not yet
/// valid rather than valid forever).
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Refuse with 503: the request can be neither checked nor metered.
fn not_configured(http: &mut impl Http, body: &[u8]) {
    http.send_response(503, &[("content-type", "application/json")], body);
}

/// The answer to a request whose hook panicked: 500, and Envoy keeps serving.
pub fn internal_error(http: &mut impl Http) {
    http.send_response(
        500,
        &[("content-type", "application/json")],
        br#"{"error":"internal_error","message":"the licensing filter failed on this request"}"#,
    );
}

/// One request.
#[derive(Default)]
pub struct Stream {
    admission: Option<Admission>,
    /// Set while (and after) the request was held for the collector.
    held: Option<Arc<Mutex<WaitSlot>>>,
    started_nanos: u64,
    request_bytes: u64,
    response_bytes: u64,
}

impl Stream {
    /// Decide the request; true lets it continue upstream.
    pub fn request_headers(&mut self, config: &Config, http: &mut impl Http) -> bool {
        self.started_nanos = now_nanos();
        #[cfg(feature = "panic-probe")]
        probe(http);
        let policy = &config.policy;
        let admission = {
            // Bytes that are not UTF-8 cannot be a configured path or method.
            let path = std::str::from_utf8(http.request_header(":path").unwrap_or_default());
            let path = path.unwrap_or("");
            // Each read is a call into Envoy: `:method` only where a route names methods, the
            // token, user and address only when the route is a licensed feature's.
            let (method, target) = match policy.routes.lookup_path(path) {
                PathRoute::Found(target) => ("", target),
                PathRoute::NeedsMethod => {
                    let method = http.request_header(":method").unwrap_or_default();
                    let method = std::str::from_utf8(method).unwrap_or("");
                    (method, policy.routes.lookup(method, path))
                }
            };
            let licensed = matches!(target, Some(RouteTarget::Feature(_)));
            // Bytes that are not UTF-8 cannot be a JWT.
            let credential = licensed
                .then(|| http.request_header(&policy.token.header))
                .flatten()
                .map(|c| std::str::from_utf8(c).unwrap_or("\u{fffd}"));
            let user = match &policy.users {
                Some(UserSource::Header(name)) if licensed => http.request_header(name),
                _ => None,
            };
            // Read only when a plan limits sharing.
            let address = if licensed && policy.reads_client_address {
                http.client_address()
            } else {
                None
            };
            let head = RequestHead {
                method,
                path,
                credential,
                user: user.and_then(|u| std::str::from_utf8(u).ok()),
                client_address: address.as_deref().map(tollgate_core::gate::client_host),
            };
            lock(&config.shared)
                .gate
                .admit_routed(target, &head, self.started_nanos)
        };
        if admission.verdict == Verdict::AwaitCollector && config.background.is_some() {
            if let Some(wake) = http.waker() {
                let slot = Arc::new(Mutex::new(WaitSlot {
                    admission,
                    state: Held::Waiting,
                    decided_ms: 0,
                }));
                lock(&config.waiters).push(Waiter {
                    slot: Arc::clone(&slot),
                    since_ms: self.started_nanos / 1_000_000,
                    wake,
                });
                self.held = Some(slot);
                return false;
            }
        }
        self.deliver(admission, policy, http)
    }

    /// Answer `admission`; true when the request goes on upstream.
    fn deliver(&mut self, admission: Admission, policy: &Policy, http: &mut impl Http) -> bool {
        let answered = answer(&admission, policy, http);
        self.admission = Some(admission);
        match answered {
            Answered::Continue => true,
            // Envoy does not pass a filter's own local reply through its body hook.
            Answered::Replied(bytes) => {
                self.response_bytes = self.response_bytes.saturating_add(bytes);
                false
            }
        }
    }

    /// True while the request is held and not answered: its body and trailers must wait
    /// (letting them on would send the headers on too).
    pub fn holding(&self) -> bool {
        self.held
            .as_ref()
            .is_some_and(|slot| matches!(lock(slot).state, Held::Waiting | Held::Decided))
    }

    /// The main thread decided the held request: take the decision as this stream's, and say
    /// how to answer it. The answer is given after the stream is let go ([`Resumed::answer`]):
    /// outside a filter callback, Envoy may complete the stream inside the call that answers
    /// it (a local reply, or `continue_decoding` on to a direct response), and its completion
    /// meters what this stream holds by then.
    pub fn resume(&mut self, config: &Config) -> Option<Resumed> {
        let admission = {
            let mut slot = lock(self.held.as_ref()?);
            if slot.state != Held::Decided {
                return None;
            }
            slot.state = Held::Answered;
            self.started_nanos = self
                .started_nanos
                .max(slot.decided_ms.saturating_mul(1_000_000));
            slot.admission.clone()
        };
        self.response_bytes = self.response_bytes.saturating_add(reply_bytes(&admission));
        self.admission = Some(admission.clone());
        Some(Resumed {
            admission,
            policy: Arc::clone(&config.policy),
        })
    }

    /// The rate limits left, for clients that pace themselves (allowed requests).
    pub fn response_headers(&mut self, http: &mut impl Http) {
        if let Some(admission) = &self.admission {
            for (name, value) in admission.ratelimit_headers() {
                http.set_response_header(name, &value);
            }
        }
    }

    /// A chunk of the request body went by.
    pub fn request_body(&mut self, http: &impl Http) {
        self.request_bytes = self
            .request_bytes
            .saturating_add(http.received_body_bytes(true));
    }

    /// A chunk of the response body (the upstream's or a refusal's) went by.
    pub fn response_body(&mut self, http: &impl Http) {
        self.response_bytes = self
            .response_bytes
            .saturating_add(http.received_body_bytes(false));
    }

    /// Meter the request: the gate aggregates it until the main thread's next tick.
    pub fn complete(&mut self, config: &Config) {
        if let Some(slot) = self.held.take() {
            let unanswered = {
                let mut slot = lock(&slot);
                let state = std::mem::replace(&mut slot.state, Held::Gone);
                match state {
                    // Answered: `self.admission` is what was served.
                    Held::Answered => None,
                    // The client left while it waited: metered as still waiting (quota or
                    // seat unavailable). Decided but not answered yet: what was reserved for
                    // it goes back, and it is metered the same way.
                    Held::Waiting | Held::Decided | Held::Gone => Some(slot.admission.clone()),
                }
            };
            if let Some(mut admission) = unanswered {
                if admission.verdict != Verdict::AwaitCollector {
                    lock(&config.shared).gate.release(&mut admission);
                    admission.verdict = Verdict::AwaitCollector;
                }
                self.admission = Some(admission);
            }
        }
        let Some(admission) = self.admission.take() else {
            return;
        };
        let usage = UsageTotals {
            calls: 1,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            processing_nanos: now_nanos().saturating_sub(self.started_nanos),
        };
        lock(&config.shared).gate.record(&admission, usage);
    }
}

/// A held request's decision, to answer once its stream is let go (see [`Stream::resume`]).
pub struct Resumed {
    admission: Admission,
    policy: Arc<Policy>,
}

impl Resumed {
    /// Answer the request; an admitted one goes on upstream.
    pub fn answer(self, http: &mut impl Http) {
        if let Answered::Continue = answer(&self.admission, &self.policy, http) {
            http.continue_request();
        }
    }
}

/// The body bytes of the local reply [`answer`] sends for `admission` (0 when it goes on).
fn reply_bytes(admission: &Admission) -> u64 {
    match &admission.verdict {
        Verdict::Allow | Verdict::Public => 0,
        Verdict::AwaitCollector => CANNOT_HOLD.len() as u64,
        Verdict::Refuse(refusal) => refusal.body().len() as u64,
    }
}

/// The answer to a request that must wait for the collector when Envoy lends no way to wake
/// it later: it can be neither decided nor let through.
const CANNOT_HOLD: &[u8] =
    br#"{"error":"not_configured","message":"the licensing filter cannot hold requests"}"#;

/// The test build's panic, to prove the hooks' guard (feature `panic-probe`).
#[cfg(feature = "panic-probe")]
#[allow(clippy::panic)]
fn probe(http: &impl Http) {
    if http.request_header("x-tollgate-panic-probe").is_some() {
        panic!("panic probe");
    }
}

/// What became of a request.
enum Answered {
    /// On to the upstream.
    Continue,
    /// Answered here, with a body of this many bytes.
    Replied(u64),
}

/// Forward with the license headers, strip forged ones, or send the refusal.
fn answer(admission: &Admission, policy: &Policy, http: &mut impl Http) -> Answered {
    match &admission.verdict {
        Verdict::Allow => {
            // The upstream is served on the license's behalf; it never needs the license.
            if let Some(name) = admission.upstream_removals(policy) {
                http.set_request_header(name, None);
            }
            // Replacing a header also removes every copy the client sent.
            for (name, value) in admission.upstream_headers(policy) {
                http.set_request_header(name, Some(&value));
            }
            if let (Some(namespace), Some(context)) = (
                policy.license_metadata.as_deref(),
                admission.license_context(policy),
            ) {
                for (key, value) in context {
                    http.set_metadata(namespace, key, value);
                }
            }
            Answered::Continue
        }
        Verdict::Public => {
            for name in policy.upstream_headers.names() {
                http.set_request_header(name, None);
            }
            Answered::Continue
        }
        // Held requests never get here (see `Stream::request_headers`); if Envoy refused a
        // waker, the request cannot wait: never let it through.
        Verdict::AwaitCollector => {
            not_configured(http, CANNOT_HOLD);
            Answered::Replied(CANNOT_HOLD.len() as u64)
        }
        Verdict::Refuse(refusal) => {
            let headers = refusal.headers();
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let body = refusal.body();
            http.send_response(u32::from(refusal.status()), &headers, body.as_bytes());
            Answered::Replied(body.len() as u64)
        }
    }
}

#[cfg(test)]
mod tests;
