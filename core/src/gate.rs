//! The per-request decision: route → token → plan → feature → rate limits, and the meters
//! recorded when the request ends. One `Gate` per VM (per Envoy worker).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tollgate_wire::sync::{
    ClientsSeen, LeaseRequest, LeaseReturn, LicenseSeen, Period, SeatRequest, SeatRule,
    SyncResponse,
};
use tollgate_wire::Meter;

use crate::cache::TokenCache;
use crate::config::JwksSource;
use crate::config::{FeatureId, Policy, RateQuota, UnmatchedRoutes, UserSource, WithoutCollector};
use crate::context::{combined, fields};
use crate::denials::{Denials, StoredDenial};
use crate::jwks::{Fetched, RemoteKeys};
use crate::meter::{Ledger, Outcome, UsageKey, UsageTotals};
use crate::pseudonym::Subject;
use crate::quota::{pool_key, update_pool, Reservation, SharedBlobs};
use crate::ratelimit::{RateLimits, SharedCells, StoreHealth};
use crate::refusal::{Code, LimitScope, QuotaDenial, RateLimitDenial, Refusal};
use crate::routes::RouteTarget;
use crate::seats::{update_seat, SeatCheck};
use crate::token::{self, License};

/// What the adapter read from the request headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query string included.
    pub path: &'a str,
    /// The value of the configured token header, if present.
    pub credential: Option<&'a str>,
    /// The value of `users.header`, if configured and present (raw: pseudonymised here).
    pub user: Option<&'a str>,
    /// The client's address (without the port), read when some plan detects sharing.
    pub client_address: Option<&'a str>,
}

/// The decision on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Licensed: forward with the license headers.
    Allow,
    /// A public route (or unmatched, with `unmatched_routes: allow`): forward, no license.
    Public,
    Refuse(Refusal),
    /// Licensed so far, but the user has no seat or a period quota has no lease in this Envoy
    /// yet: hold the request, sync with the collector, and decide again with
    /// [`Gate::retry_held`].
    AwaitCollector,
}

/// Units of a quota reserved for an admitted request; the real amount is committed when the
/// request ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaHold {
    pub key: String,
    pub meter: Meter,
    /// Empty: taken from the allowance (`without_collector: allow`).
    pub lease_id: String,
    pub units: u64,
    /// For the `RateLimit` headers: `quota_<meter>_<period>`, the limit, the units left as
    /// this Envoy sees them (not yet granted to anyone, plus its own leases' rest), and the
    /// seconds until the period ends.
    pub name: String,
    pub limit: u64,
    pub remaining: u64,
    pub reset_seconds: u64,
    pub window_seconds: u64,
}

/// A rate limit an allowed request passed, for the `RateLimit` headers of its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub scope: LimitScope,
    pub quota: RateQuota,
    /// Requests the bucket still admits at once, after this one.
    pub remaining: u32,
}

impl RateState {
    /// Seconds until the whole burst is available again (rounded up; at most one emission
    /// period more than the exact time, since only whole requests are counted).
    pub fn reset_seconds(&self) -> u64 {
        let empty = u64::from(self.quota.burst.saturating_sub(self.remaining));
        self.quota
            .period_nanos
            .saturating_mul(empty)
            .div_ceil(NANOS_PER_SECOND)
    }
}

/// A quota this Envoy enforces for a license: what a lease request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QuotaTarget {
    account: Arc<str>,
    license: Arc<str>,
    plan: Arc<str>,
    meter: Meter,
    period: Period,
    limit: u64,
    last_used_ms: u64,
}

/// The client's host in a proxy's `source.address` (`1.2.3.4:5678`, `[::1]:5678`): the port
/// changes per connection, the client does not.
pub fn client_host(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a sync with the collector carries from this worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncWork {
    pub leases: Vec<LeaseRequest>,
    pub returns: Vec<LeaseReturn>,
    pub licenses: Vec<LicenseSeen>,
    pub seats: Vec<SeatRequest>,
    pub clients: Vec<ClientsSeen>,
}

impl SyncWork {
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
            && self.returns.is_empty()
            && self.licenses.is_empty()
            && self.seats.is_empty()
            && self.clients.is_empty()
    }
}

/// Distinct clients of one license noted between two syncs (enough to tell sharing: a plan
/// allowing more than this many clients is told apart by the collector over several syncs).
const CLIENTS_PER_SYNC: usize = 256;
/// Client pseudonyms in one sync, all licenses together (the collector takes at most 10,000
/// items of a kind per sync; about 50 bytes each).
const CLIENT_IDS_PER_SYNC: usize = 8_000;
/// Seat asks waiting for the next sync, at most.
const MAX_SEAT_ASKS: usize = 10_000;

/// Items of each list per sync: 2,000 of each, with ids of at most 256 bytes, keep a sync well
/// under the collector's 4 MiB.
const SYNC_ITEMS: usize = 2_000;

/// How long a lease request may stay unanswered before it is asked again (same id).
const LEASE_FETCH_TIMEOUT_MS: u64 = 3_000;
/// How long an expired lease waits for its in-flight reservations before it is returned.
const LEASE_RETURN_GRACE_MS: u64 = 30_000;
/// A quota unused this long is no longer synced (its pool keeps nothing then).
const QUOTA_IDLE_MS: u64 = 600_000;

fn quota_name(meter: Meter, period: Period) -> String {
    format!("quota_{}_{}", meter.as_str(), period.as_str())
}

fn period_seconds(period: Period) -> u64 {
    match period {
        Period::Hour => 3_600,
        Period::Day => 86_400,
        Period::Month => 2_592_000,
    }
}

/// A decision with what it was about; kept by the adapter until the request ends.
#[derive(Debug, Clone)]
pub struct Admission {
    pub verdict: Verdict,
    pub license: Option<Arc<License>>,
    pub feature: Option<FeatureId>,
    /// The end user, pseudonymised (when `users` is configured and the request names one).
    pub user: Option<Arc<str>>,
    /// The user holds a seat of the license (or the license has no seats).
    pub seat_held: bool,
    /// Quota units reserved for the request (allowed requests only).
    pub holds: Vec<QuotaHold>,
    /// The rate limits the request passed, license first (only with `rate_limit_headers`).
    pub rates: Vec<RateState>,
}

impl Admission {
    pub fn outcome(&self) -> Outcome {
        match &self.verdict {
            Verdict::Refuse(refusal) => Outcome::Refused(refusal.code),
            Verdict::Allow | Verdict::Public => Outcome::Allowed,
            // Never decided (the client left while it waited for a seat or a lease): never
            // served.
            Verdict::AwaitCollector if !self.seat_held => Outcome::Refused(Code::SeatUnavailable),
            Verdict::AwaitCollector => Outcome::Refused(Code::QuotaUnavailable),
        }
    }

    /// `RateLimit-Policy` and `RateLimit` response headers of an allowed request
    /// (draft-ietf-httpapi-ratelimit-headers): one item per quota (its limit and window, the
    /// units left and the seconds to the period's end), then one per rate limit passed,
    /// `license` before `feature` (the burst and the seconds to refill it, the requests left
    /// at once and the seconds until the burst is whole again). Quotas come first so that a
    /// client reading only the first item sees what it saw before rate limits were listed.
    /// Empty without quotas and rate limits.
    pub fn ratelimit_headers(&self) -> Vec<(&'static str, String)> {
        if self.verdict != Verdict::Allow || (self.holds.is_empty() && self.rates.is_empty()) {
            return Vec::new();
        }
        let mut policy: Vec<String> = self
            .holds
            .iter()
            .map(|h| format!("\"{}\";q={};w={}", h.name, h.limit, h.window_seconds))
            .collect();
        let mut state: Vec<String> = self
            .holds
            .iter()
            .map(|h| format!("\"{}\";r={};t={}", h.name, h.remaining, h.reset_seconds))
            .collect();
        for rate in &self.rates {
            let name = rate.scope.policy_name();
            policy.push(format!(
                "\"{name}\";q={};w={}",
                rate.quota.burst,
                rate.quota.window_seconds()
            ));
            state.push(format!(
                "\"{name}\";r={};t={}",
                rate.remaining,
                rate.reset_seconds()
            ));
        }
        vec![
            ("ratelimit-policy", policy.join(", ")),
            ("ratelimit", state.join(", ")),
        ]
    }

    /// Request headers to remove before an allowed request goes upstream: the token header,
    /// under `token.strip_from_upstream`.
    pub fn upstream_removals<'a>(&self, policy: &'a Policy) -> Option<&'a str> {
        (self.verdict == Verdict::Allow && policy.token.strip_from_upstream)
            .then_some(policy.token.header.as_str())
    }

    /// The license context of an allowed request: its account, license, plan and feature,
    /// under those names.
    pub fn license_context<'a>(
        &'a self,
        policy: &'a Policy,
    ) -> Option<[(&'static str, &'a str); 4]> {
        let (Verdict::Allow, Some(license)) = (&self.verdict, &self.license) else {
            return None;
        };
        Some(fields(
            &license.account,
            &license.license_id,
            &license.plan.name,
            self.feature.map_or("", |f| policy.feature_name(f)),
        ))
    }

    /// The license-context headers to set upstream, for an allowed request: each configured
    /// one of the four, then the combined one.
    pub fn upstream_headers<'a>(&'a self, policy: &'a Policy) -> Vec<(&'a str, Cow<'a, str>)> {
        let Some(context) = self.license_context(policy) else {
            return Vec::new();
        };
        let h = &policy.upstream_headers;
        let names = [&h.account, &h.license, &h.plan, &h.feature];
        let mut headers: Vec<(&str, Cow<'_, str>)> = names
            .iter()
            .zip(context)
            .filter_map(|(name, (_, value))| name.as_deref().map(|n| (n, Cow::Borrowed(value))))
            .collect();
        if let Some(name) = h.combined.as_deref() {
            // Made once per license and feature when the token was verified.
            let made = self.license.as_ref().and_then(|license| {
                let feature = usize::from(self.feature?);
                license.combined_context.get(feature)?.as_deref()
            });
            let value = made.map_or_else(|| Cow::Owned(combined(&context)), Cow::Borrowed);
            headers.push((name, value));
        }
        headers
    }
}

/// Counters kept per worker and folded into Envoy stats periodically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounters {
    pub token_cache_hits: u64,
    pub token_cache_misses: u64,
}

/// One worker's gate: the shared policy plus this worker's cache, limiter and meters.
pub struct Gate<S: SharedCells + SharedBlobs + Clone> {
    policy: Arc<Policy>,
    cache: TokenCache,
    limits: RateLimits<S>,
    shared: S,
    /// Quotas used lately, by pool key: synced with the collector.
    quotas: HashMap<String, QuotaTarget>,
    /// Licenses served since the last sync (license → seen).
    licenses_seen: BTreeMap<Arc<str>, Seen>,
    /// Lease requests in flight: lease id → pool key.
    lease_requests: HashMap<String, String>,
    /// Returns sent but not confirmed closed yet.
    returns: Vec<LeaseReturn>,
    /// Since when this worker's syncs fail (the collector is unreachable): a request without
    /// a lease is then decided at once by `without_collector`, not held.
    sync_failing_since_ms: Option<u64>,
    /// Prefix of this worker's lease ids (unique per VM, like batch ids).
    lease_prefix: String,
    next_lease: u64,
    ledger: Ledger,
    counters: GateCounters,
    /// Account and license of usage without a verified license (shared, not allocated per request).
    anonymous: Arc<str>,
    /// Set by the adapter while the usage buffer is full under fail-closed.
    metering_blocked: bool,
    /// Keys fetched from `token.jwks_source`.
    remote_keys: Option<RemoteKeys>,
    /// Seats to ask for (or renew) with the next sync, by (license, user).
    seat_asks: BTreeMap<(Arc<str>, Arc<str>), SeatRequest>,
    /// Clients of licenses whose plan detects sharing, since the last sync.
    clients_seen: BTreeMap<Arc<str>, ClientsSeen>,
    /// The collector's denials, as this gate last read them.
    denials: Denials,
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A license served since the last sync, by reference: noting one is a request's work, so it
/// copies no strings (the sync's [`LicenseSeen`] is made when a sync takes it).
#[derive(Debug)]
struct Seen {
    account: Arc<str>,
    plan: Arc<str>,
}

impl<S: SharedCells + SharedBlobs + Clone> Gate<S> {
    pub fn new(policy: Arc<Policy>, cells: S) -> Self {
        let cache = TokenCache::new(policy.token.cache_entries, policy.token.leeway_seconds);
        let rate_lease = policy.rate_limit_lease;
        // A new VM starts with the set an earlier VM or another worker fetched, if any.
        let remote_keys = policy.token.jwks_source.clone().map(|source| {
            let mut keys = RemoteKeys::new(source);
            keys.load_shared(&cells);
            keys
        });
        let mut denials = Denials::default();
        denials.refresh(&cells);
        Gate {
            policy,
            cache,
            limits: RateLimits::with_lease(cells.clone(), rate_lease),
            shared: cells,
            quotas: HashMap::new(),
            licenses_seen: BTreeMap::new(),
            lease_requests: HashMap::new(),
            returns: Vec::new(),
            sync_failing_since_ms: None,
            lease_prefix: "tollgate".into(),
            next_lease: 1,
            ledger: Ledger::default(),
            counters: GateCounters::default(),
            anonymous: Arc::from(""),
            metering_blocked: false,
            remote_keys,
            seat_asks: BTreeMap::new(),
            clients_seen: BTreeMap::new(),
            denials,
        }
    }

    /// If keys come from a JWKS endpoint: take a set another worker stored, and say whether a
    /// fetch is due (the adapter then sends it and reports with [`Gate::jwks_started`] and
    /// [`Gate::jwks_answered`]).
    pub fn jwks_due(&mut self, now_ms: u64) -> Option<JwksSource> {
        let remote = self.remote_keys.as_mut()?;
        if remote.load_shared(&self.shared) {
            self.cache.clear();
        }
        remote.due(now_ms).then(|| remote.source().clone())
    }

    /// The JWKS fetch was sent (`true`) or could not be.
    pub fn jwks_started(&mut self, sent: bool, now_ms: u64) {
        if let Some(remote) = self.remote_keys.as_mut() {
            if sent {
                remote.started(now_ms);
            } else {
                remote.not_sent(now_ms);
            }
        }
    }

    /// The JWKS fetch answered (status and body) or failed (`None`).
    pub fn jwks_answered(&mut self, answer: Option<(u16, &[u8])>, now_ms: u64) -> Option<Fetched> {
        let remote = self.remote_keys.as_mut()?;
        let fetched = remote.answered(&self.shared, answer, now_ms);
        if matches!(fetched, Fetched::Changed { .. }) {
            self.cache.clear();
        }
        Some(fetched)
    }

    /// While set, every request is refused with 503 `metering_unavailable`: usage can not be
    /// kept (the shipper's buffer is full under `on_buffer_full: fail_closed`), and every
    /// request is metered, so none can be served. Public and unmatched routes are refused too,
    /// since they are metered like any other. The adapter updates this after each seal and
    /// acknowledgement, so a request only reads a flag.
    pub fn set_metering_blocked(&mut self, blocked: bool) {
        self.metering_blocked = blocked;
    }

    pub fn metering_blocked(&self) -> bool {
        self.metering_blocked
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Decide on a request at `now_nanos` (Unix nanoseconds, the proxy's clock).
    pub fn admit(&mut self, request: &RequestHead<'_>, now_nanos: u64) -> Admission {
        let target = self.policy.routes.lookup(request.method, request.path);
        self.admit_routed(target, request, now_nanos)
    }

    /// [`Gate::admit`] for a request whose route the adapter has looked up already (it needs
    /// the route to know which headers to read: see
    /// [`crate::routes::RouteTable::lookup_path`]).
    pub fn admit_routed(
        &mut self,
        target: Option<RouteTarget>,
        request: &RequestHead<'_>,
        now_nanos: u64,
    ) -> Admission {
        if self.metering_blocked {
            let feature = match target {
                Some(RouteTarget::Feature(feature)) => Some(feature),
                Some(RouteTarget::Public) | None => None,
            };
            return refuse(
                None,
                feature,
                Refusal::new(
                    Code::MeteringUnavailable,
                    "usage metering is unavailable; try again shortly",
                ),
            );
        }
        let feature = match target {
            Some(RouteTarget::Feature(feature)) => feature,
            Some(RouteTarget::Public) => return public(),
            None => match self.policy.unmatched_routes {
                UnmatchedRoutes::Allow => return public(),
                UnmatchedRoutes::Deny => {
                    let allowed = self.policy.routes.allowed_methods(request.path);
                    let refusal = if allowed.is_empty() {
                        Refusal::new(
                            Code::RouteNotLicensed,
                            "no licensed feature serves this route",
                        )
                    } else {
                        let allow = allowed.join(", ");
                        Refusal {
                            message: format!("this route takes only {allow}"),
                            allow: Some(allow),
                            ..Refusal::new(Code::MethodNotAllowed, "")
                        }
                    };
                    return refuse(None, None, refusal);
                }
            },
        };

        let license = match self.license(request.credential, now_nanos / NANOS_PER_SECOND) {
            Ok(license) => license,
            Err(refusal) => return refuse(None, Some(feature), refusal),
        };
        let user = match &self.policy.users {
            Some(UserSource::Claim(_)) => license.user.clone(),
            Some(UserSource::Header(_)) => request
                .user
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .zip(self.policy.pseudonyms.as_ref())
                .map(|(raw, p)| Arc::from(p.pseudonym(Subject::User, raw))),
            None => None,
        };
        let mut admission = self.admit_license(request, feature, license, user.clone(), now_nanos);
        admission.user = user;
        admission
    }

    /// The rest of [`Gate::admit`] for a verified license: entitlement, the collector's
    /// denials, rate limits, then seats and quotas.
    fn admit_license(
        &mut self,
        request: &RequestHead<'_>,
        feature: FeatureId,
        license: Arc<License>,
        user: Option<Arc<str>>,
        now_nanos: u64,
    ) -> Admission {
        if !license.features.contains(feature) {
            let message = format!(
                "the license does not include the feature `{}`",
                self.policy.feature_name(feature)
            );
            return refuse(
                Some(license),
                Some(feature),
                Refusal::new(Code::FeatureNotLicensed, message),
            );
        }

        let now_ms = now_nanos / 1_000_000;
        // Named in the next sync even when refused, so that a lifted denial is learned too.
        // Without a collector there is no sync: nothing to remember, and no denial to read.
        let syncs = self.policy.collector.is_some();
        if syncs && !self.licenses_seen.contains_key(&license.license_id) {
            self.licenses_seen.insert(
                Arc::clone(&license.license_id),
                Seen {
                    account: Arc::clone(&license.account),
                    plan: Arc::clone(&license.plan.name),
                },
            );
        }
        if let Some(refusal) = syncs.then(|| self.denial(&license, now_ms)).flatten() {
            return refuse(Some(license), Some(feature), refusal);
        }
        if let (Some(rule), Some(address), Some(pseudonyms)) = (
            license.limits.sharing,
            request.client_address,
            self.policy.pseudonyms.as_ref(),
        ) {
            let seen = self
                .clients_seen
                .entry(Arc::clone(&license.license_id))
                .or_insert_with(|| ClientsSeen {
                    account: license.account.to_string(),
                    license: license.license_id.to_string(),
                    clients: Vec::new(),
                    max_clients: rule.max_clients,
                    window_ms: rule.window_ms,
                    block: rule.block,
                });
            if seen.clients.len() < CLIENTS_PER_SYNC {
                let client = pseudonyms.pseudonym(Subject::Client, address);
                if !seen.clients.contains(&client) {
                    seen.clients.push(client);
                }
            }
        }
        if license.limits.seats.is_some() && user.is_none() {
            return refuse(Some(license), Some(feature), missing_user());
        }
        let checks = [
            (
                LimitScope::License,
                license.limits.license,
                Some(&license.rate_key),
            ),
            (
                LimitScope::Feature,
                license.limits.for_feature(feature),
                license
                    .feature_rate_keys
                    .get(usize::from(feature))
                    .and_then(Option::as_ref),
            ),
        ];
        let mut rates = Vec::new();
        for (scope, quota, key) in checks {
            let (Some(quota), Some(key)) = (quota, key) else {
                continue;
            };
            match self.limits.check(key, quota, now_nanos) {
                Ok(remaining) => {
                    if self.policy.rate_limit_headers {
                        rates.push(RateState {
                            scope,
                            quota,
                            remaining,
                        });
                    }
                }
                Err(wait_nanos) => {
                    let refusal = Refusal {
                        code: Code::RateLimited,
                        message: match scope {
                            LimitScope::License => "the license's request rate is exceeded".into(),
                            LimitScope::Feature => format!(
                                "the license's request rate for `{}` is exceeded",
                                self.policy.feature_name(feature)
                            ),
                        },
                        rate_limit: Some(RateLimitDenial {
                            scope,
                            quota,
                            wait_nanos,
                        }),
                        ..Refusal::new(Code::RateLimited, "")
                    };
                    return refuse(Some(Arc::clone(&license)), Some(feature), refusal);
                }
            }
        }
        let mut admission = Admission {
            verdict: Verdict::AwaitCollector,
            license: Some(license),
            feature: Some(feature),
            user,
            seat_held: false,
            holds: Vec::new(),
            rates,
        };
        self.decide_held(&mut admission, now_ms, false);
        admission
    }

    /// A refusal the collector ordered for this license, if one is in force.
    fn denial(&self, license: &License, now_ms: u64) -> Option<Refusal> {
        self.denials.refusal(&license.license_id, now_ms)
    }

    /// Take the denials another worker's sync brought (see [`crate::denials`]): the adapter
    /// calls this on every tick.
    pub fn refresh_denials(&mut self) {
        self.denials.refresh(&self.shared);
    }

    /// Reserve the license's period quotas for `admission` (verdict [`Verdict::AwaitCollector`]):
    /// it becomes allowed with its holds, refused, or stays waiting for a lease. `timed_out`:
    /// it waited long enough, so without a lease `quota.without_collector` decides.
    pub fn retry_held(&mut self, admission: &mut Admission, now_ms: u64, timed_out: bool) {
        if admission.verdict != Verdict::AwaitCollector {
            return;
        }
        // The sync it waited for may have brought a denial (revoked, suspended, over budget,
        // shared): a held request obeys it like a new one.
        if let Some(license) = admission.license.clone() {
            if let Some(refusal) = self.denial(&license, now_ms) {
                admission.verdict = Verdict::Refuse(refusal);
                return;
            }
        }
        self.decide_held(admission, now_ms, timed_out);
    }

    /// [`Gate::retry_held`] without the denial check ([`Gate::admit`] has just made it).
    fn decide_held(&mut self, admission: &mut Admission, now_ms: u64, timed_out: bool) {
        if admission.verdict != Verdict::AwaitCollector {
            return;
        }
        let Some(license) = admission.license.clone() else {
            return;
        };
        // The collector has not answered for a while: holding the request would only delay
        // the same decision.
        let timed_out = timed_out
            || self.sync_failing_since_ms.is_some_and(|since| {
                now_ms.saturating_sub(since) >= self.policy.quota.lease_wait_ms
            });
        if !admission.seat_held {
            match self.seat(&license, admission.user.as_ref(), now_ms, timed_out) {
                SeatStep::Held => admission.seat_held = true,
                SeatStep::Wait => return,
                SeatStep::Refuse(refusal) => {
                    admission.verdict = Verdict::Refuse(refusal);
                    return;
                }
            }
        }
        let quotas = &license.limits.quotas;
        if quotas.is_empty() {
            admission.verdict = Verdict::Allow;
            return;
        }
        let mut holds = Vec::with_capacity(quotas.len());
        let mut outcome = Verdict::Allow;
        for (meter, quota) in quotas {
            let key = pool_key(&license.license_id, *meter, quota.per);
            // Only synced quotas are tracked (without a collector no sync would ever forget one).
            if self.policy.collector.is_some() {
                self.quotas
                    .entry(key.clone())
                    .and_modify(|t| {
                        t.limit = quota.limit;
                        t.last_used_ms = now_ms;
                    })
                    .or_insert_with(|| QuotaTarget {
                        account: Arc::clone(&license.account),
                        license: Arc::clone(&license.license_id),
                        plan: Arc::clone(&license.plan.name),
                        meter: *meter,
                        period: quota.per,
                        limit: quota.limit,
                        last_used_ms: now_ms,
                    });
            }
            let units = self.policy.quota.reserve.get(meter).copied().unwrap_or(1);
            let reserved = update_pool(&self.shared, &key, |pool| {
                let reservation = pool.reserve(units, now_ms);
                let remaining = quota
                    .limit
                    .saturating_sub(pool.allocated)
                    .saturating_add(pool.available(now_ms));
                let reset_seconds = pool.period_end_ms.saturating_sub(now_ms).div_ceil(1000);
                (reservation, remaining, reset_seconds)
            });
            let hold =
                |lease_id: String, units: u64, remaining: u64, reset_seconds: u64| QuotaHold {
                    key: key.clone(),
                    meter: *meter,
                    lease_id,
                    units,
                    name: quota_name(*meter, quota.per),
                    limit: quota.limit,
                    remaining,
                    reset_seconds,
                    window_seconds: period_seconds(quota.per),
                };
            match reserved {
                Ok((Reservation::Taken { lease_id, units }, remaining, reset)) => {
                    holds.push(hold(lease_id, units, remaining, reset));
                }
                Ok((Reservation::Exhausted { until_ms }, _, _)) => {
                    let status = self.policy.quota.exhausted_status;
                    outcome = Verdict::Refuse(Refusal {
                        quota: Some(Box::new(QuotaDenial {
                            name: quota_name(*meter, quota.per),
                            limit: quota.limit,
                            retry_after_seconds: until_ms.saturating_sub(now_ms).div_ceil(1000),
                            window_seconds: period_seconds(quota.per),
                        })),
                        status: (status != Code::QuotaExhausted.status()).then_some(status),
                        ..Refusal::new(
                            Code::QuotaExhausted,
                            format!(
                                "the license's {} quota of {} per {} is used up",
                                meter.as_str(),
                                quota.limit,
                                quota.per.as_str()
                            ),
                        )
                    });
                    break;
                }
                Ok((Reservation::NoLease, _, _)) if !timed_out => {
                    outcome = Verdict::AwaitCollector;
                    break;
                }
                Ok((Reservation::NoLease, _, _)) => {
                    let allowance = self.policy.quota.allowance;
                    let allowed = self.policy.quota.without_collector == WithoutCollector::Allow
                        && update_pool(&self.shared, &key, |pool| {
                            pool.take_allowance(units, allowance)
                        })
                        .unwrap_or(false);
                    if allowed {
                        holds.push(hold(String::new(), units, 0, 0));
                    } else {
                        outcome = Verdict::Refuse(Refusal::new(
                            Code::QuotaUnavailable,
                            "the license's quota cannot be checked right now; try again shortly",
                        ));
                        break;
                    }
                }
                Err(_) => {
                    outcome = Verdict::Refuse(Refusal::new(
                        Code::QuotaUnavailable,
                        "the license's quota cannot be checked right now; try again shortly",
                    ));
                    break;
                }
            }
        }
        if outcome == Verdict::Allow {
            admission.holds = holds;
        } else {
            // Give back what was taken before the quota that failed.
            for hold in &holds {
                let _ = update_pool(&self.shared, &hold.key, |pool| {
                    pool.commit(&hold.lease_id, hold.units, 0)
                });
            }
        }
        admission.verdict = outcome;
    }

    /// The seat step of a held request: the user holds a seat, must wait for the collector, or
    /// is refused. Licenses without seats always hold one.
    fn seat(
        &mut self,
        license: &Arc<License>,
        user: Option<&Arc<str>>,
        now_ms: u64,
        timed_out: bool,
    ) -> SeatStep {
        let Some(rule) = license.limits.seats else {
            return SeatStep::Held;
        };
        let Some(user) = user else {
            return SeatStep::Refuse(missing_user());
        };
        let checked = update_seat(&self.shared, &license.license_id, user, |seat| {
            seat.check(now_ms)
        });
        let pending = match checked {
            Ok(SeatCheck::Held { renew }) => {
                if renew {
                    self.ask_seat(license, user, rule);
                }
                return SeatStep::Held;
            }
            Ok(SeatCheck::Refused {
                until_ms,
                in_use,
                limit,
            }) => {
                let over = match rule {
                    SeatRule::Named { per, .. } => format!("this {}", per.as_str()),
                    SeatRule::Floating { window_ms, .. } => {
                        format!("within {} s", window_ms.div_ceil(1000))
                    }
                };
                return SeatStep::Refuse(Refusal {
                    retry_after_seconds: Some(until_ms.saturating_sub(now_ms).div_ceil(1000)),
                    ..Refusal::new(
                        Code::SeatLimitReached,
                        format!(
                            "all {limit} seats of the license are taken ({in_use} users {over}); users holding a seat keep working"
                        ),
                    )
                });
            }
            Ok(SeatCheck::Ask) => {
                self.ask_seat(license, user, rule);
                true
            }
            Ok(SeatCheck::Waiting) => true,
            Err(_) => false,
        };
        if pending && !timed_out {
            return SeatStep::Wait;
        }
        if self.policy.quota.without_collector == WithoutCollector::Allow {
            // Admitted unchecked, like quota units under the allowance; metered per user all
            // the same, and the seat is asked for once the collector answers again.
            return SeatStep::Held;
        }
        SeatStep::Refuse(Refusal::new(
            Code::SeatUnavailable,
            "the license's seats cannot be checked right now; try again shortly",
        ))
    }

    fn ask_seat(&mut self, license: &License, user: &Arc<str>, rule: SeatRule) {
        if self.seat_asks.len() >= MAX_SEAT_ASKS {
            // More new users at once than syncs carry: this one is asked for when its ask
            // times out (its request waits, then `without_collector` decides).
            return;
        }
        self.seat_asks
            .entry((Arc::clone(&license.license_id), Arc::clone(user)))
            .or_insert_with(|| SeatRequest {
                account: license.account.to_string(),
                license: license.license_id.to_string(),
                user: user.to_string(),
                rule,
            });
    }

    /// Give back the quota units held for a request that will not be served after all.
    pub fn release(&mut self, admission: &mut Admission) {
        for hold in admission.holds.drain(..) {
            let _ = update_pool(&self.shared, &hold.key, |pool| {
                pool.commit(&hold.lease_id, hold.units, 0)
            });
        }
    }

    /// Name this worker's lease ids `<prefix>/q<n>` (the prefix must be unique per VM).
    pub fn set_lease_prefix(&mut self, prefix: &str) {
        self.lease_prefix = prefix.to_string();
    }

    /// What the next sync carries: leases to request (pools running low), leases to return
    /// (expired or used up), and the licenses served since the last sync.
    pub fn sync_work(&mut self, now_ms: u64) -> SyncWork {
        let mut work = SyncWork::default();
        let quota = &self.policy.quota;
        let mut idle = Vec::new();
        for (key, target) in &self.quotas {
            // A sync carries at most SYNC_ITEMS of each list: the rest waits for the next.
            if work.leases.len() >= SYNC_ITEMS || work.returns.len() >= SYNC_ITEMS {
                break;
            }
            let want = quota.lease_want(target.limit);
            let mut next = self.next_lease;
            let prefix = &self.lease_prefix;
            let step = update_pool(&self.shared, key, |pool| {
                let returns = pool.sweep(LEASE_RETURN_GRACE_MS, now_ms);
                let fetch = pool
                    .wants_lease(want, LEASE_FETCH_TIMEOUT_MS, now_ms)
                    .then(|| {
                        pool.begin_fetch(
                            || {
                                let id = format!("{prefix}/q{next}");
                                next += 1;
                                id
                            },
                            now_ms,
                        )
                    });
                let empty = pool.leases.is_empty() && pool.fetch.is_none();
                (returns, fetch, empty)
            });
            self.next_lease = next;
            let Ok((returns, fetch, empty)) = step else {
                continue;
            };
            work.returns.extend(returns);
            if let Some(lease_id) = fetch {
                self.lease_requests.insert(lease_id.clone(), key.clone());
                work.leases.push(LeaseRequest {
                    lease_id,
                    account: target.account.to_string(),
                    license: target.license.to_string(),
                    plan: target.plan.to_string(),
                    meter: target.meter,
                    period: target.period,
                    limit: target.limit,
                    want,
                });
            }
            if empty && now_ms.saturating_sub(target.last_used_ms) > QUOTA_IDLE_MS {
                idle.push(key.clone());
            }
        }
        for key in idle {
            self.quotas.remove(&key);
        }
        self.returns.append(&mut work.returns);
        work.returns = self.returns.iter().take(SYNC_ITEMS).cloned().collect();
        while work.licenses.len() < SYNC_ITEMS {
            let Some((license, seen)) = self.licenses_seen.pop_first() else {
                break;
            };
            work.licenses.push(LicenseSeen {
                account: seen.account.to_string(),
                license: license.to_string(),
                plan: seen.plan.to_string(),
            });
        }
        while work.seats.len() < SYNC_ITEMS {
            let Some((_, ask)) = self.seat_asks.pop_first() else {
                break;
            };
            work.seats.push(ask);
        }
        let mut client_ids = 0;
        while let Some((_, next)) = self.clients_seen.first_key_value() {
            client_ids += next.clients.len().max(1);
            if client_ids > CLIENT_IDS_PER_SYNC {
                break;
            }
            let Some((_, seen)) = self.clients_seen.pop_first() else {
                break;
            };
            work.clients.push(seen);
        }
        work
    }

    /// The sync carrying `work` failed: the licenses go with the next one (returns are kept
    /// until confirmed; lease requests are asked again under the same ids).
    pub fn sync_failed(&mut self, work: SyncWork, now_ms: u64) {
        self.sync_failing_since_ms.get_or_insert(now_ms);
        self.lease_requests_unanswered(&work.leases);
        self.seat_asks_unanswered(&work.seats);
        for seen in work.clients {
            let license: Arc<str> = Arc::from(seen.license.as_str());
            match self.clients_seen.get_mut(&license) {
                Some(now) => {
                    for client in seen.clients {
                        if now.clients.len() < CLIENTS_PER_SYNC && !now.clients.contains(&client) {
                            now.clients.push(client);
                        }
                    }
                }
                None => {
                    self.clients_seen.insert(license, seen);
                }
            }
        }
        for seen in work.licenses {
            let license: Arc<str> = Arc::from(seen.license.as_str());
            self.licenses_seen.entry(license).or_insert_with(|| Seen {
                account: Arc::from(seen.account.as_str()),
                plan: Arc::from(seen.plan.as_str()),
            });
        }
    }

    /// Seat asks that got no answer: the next request of each user asks again.
    fn seat_asks_unanswered(&mut self, seats: &[SeatRequest]) {
        for seat in seats {
            let _ = update_seat(&self.shared, &seat.license, &seat.user, |entry| {
                entry.unanswered()
            });
        }
    }

    /// Lease requests that got no grant: their pools ask again with the next sync, under the
    /// same ids.
    fn lease_requests_unanswered(&mut self, leases: &[LeaseRequest]) {
        for lease in leases {
            if let Some(key) = self.lease_requests.remove(&lease.lease_id) {
                let _ = update_pool(&self.shared, &key, |pool| {
                    pool.fetch_unanswered(&lease.lease_id)
                });
            }
        }
    }

    /// Pending lease returns and the next lease number: a gate built for a new configuration
    /// of the same VM takes them over, so no lease id is used twice and no return is lost.
    pub fn take_over(&mut self, previous: &mut Gate<S>) {
        self.returns = std::mem::take(&mut previous.returns);
        self.next_lease = previous.next_lease;
        self.lease_requests = std::mem::take(&mut previous.lease_requests);
        self.quotas = std::mem::take(&mut previous.quotas);
        self.seat_asks = std::mem::take(&mut previous.seat_asks);
        self.clients_seen = std::mem::take(&mut previous.clients_seen);
    }

    /// The collector answered the sync that carried `work`: hold the granted leases, forget
    /// the closed returns, and record (or lift) the denials of the licenses it named.
    pub fn apply_sync(&mut self, work: &SyncWork, response: &SyncResponse, now_ms: u64) {
        self.sync_failing_since_ms = None;
        for grant in &response.grants {
            if let Some(key) = self.lease_requests.remove(&grant.lease_id) {
                let _ = update_pool(&self.shared, &key, |pool| pool.apply_grant(grant, now_ms));
            }
        }
        // No grant (a refused license): ask again with the next sync, once it is allowed.
        let unanswered: Vec<LeaseRequest> = work
            .leases
            .iter()
            .filter(|l| !response.grants.iter().any(|g| g.lease_id == l.lease_id))
            .cloned()
            .collect();
        self.lease_requests_unanswered(&unanswered);
        for answer in &response.seats {
            let _ = update_seat(&self.shared, &answer.license, &answer.user, |entry| {
                entry.apply(answer, now_ms)
            });
        }
        let unanswered: Vec<SeatRequest> = work
            .seats
            .iter()
            .filter(|ask| {
                !response
                    .seats
                    .iter()
                    .any(|a| a.license == ask.license && a.user == ask.user)
            })
            .cloned()
            .collect();
        self.seat_asks_unanswered(&unanswered);
        self.returns
            .retain(|r| !response.closed.iter().any(|id| id == &r.lease_id));
        let mut named: BTreeMap<&str, Option<StoredDenial>> = work
            .licenses
            .iter()
            .map(|l| (l.license.as_str(), None))
            .collect();
        for denial in &response.denials {
            named.insert(
                denial.license.as_str(),
                Some(StoredDenial {
                    code: denial.code,
                    message: denial.message.clone(),
                    until_ms: denial.until_ms,
                }),
            );
        }
        self.denials.apply(&self.shared, &named);
    }

    fn license(&mut self, credential: Option<&str>, now: u64) -> Result<Arc<License>, Refusal> {
        let token = bearer_token(credential, &self.policy.token.prefix)?;
        if let Some(license) = self.cache.get(token, now) {
            self.counters.token_cache_hits += 1;
            return Ok(license);
        }
        self.counters.token_cache_misses += 1;
        let fetched = self.remote_keys.as_ref().and_then(RemoteKeys::keys);
        if self.remote_keys.is_some() && fetched.is_none() && self.policy.token.keys.is_empty() {
            return Err(Refusal::new(
                Code::KeysUnavailable,
                "the license keys are not loaded yet; try again shortly",
            ));
        }
        let license = token::verify(&self.policy, fetched, token, now).map_err(|e| {
            if e.unknown_key {
                if let Some(remote) = self.remote_keys.as_mut() {
                    remote.want_refetch();
                }
            }
            Refusal::new(e.code, e.message)
        })?;
        let license = Arc::new(license);
        self.cache.insert(token, Arc::clone(&license));
        Ok(license)
    }

    /// Meter a finished request.
    pub fn record(&mut self, admission: &Admission, usage: UsageTotals) {
        let (account, license) = match &admission.license {
            Some(l) => (Arc::clone(&l.account), Arc::clone(&l.license_id)),
            None => (Arc::clone(&self.anonymous), Arc::clone(&self.anonymous)),
        };
        let key = UsageKey {
            account,
            license,
            feature: admission.feature,
            outcome: admission.outcome(),
            user: admission.user.clone(),
        };
        for hold in &admission.holds {
            let actual = match hold.meter {
                Meter::Calls => usage.calls,
                Meter::RequestBytes => usage.request_bytes,
                Meter::ResponseBytes => usage.response_bytes,
                Meter::ProcessingNs => usage.processing_nanos,
            };
            let _ = update_pool(&self.shared, &hold.key, |pool| {
                pool.commit(&hold.lease_id, hold.units, actual)
            });
        }
        self.ledger.record(key, usage);
    }

    /// The usage aggregated since the last call.
    pub fn drain_usage(&mut self) -> Vec<(UsageKey, UsageTotals)> {
        self.ledger.drain()
    }

    /// Counters since the last call.
    pub fn take_counters(&mut self) -> GateCounters {
        std::mem::take(&mut self.counters)
    }

    pub fn store_health(&self) -> StoreHealth {
        self.limits.health()
    }

    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }
}

fn missing_user() -> Refusal {
    Refusal::new(
        Code::MissingUser,
        "the license counts seats per user, and the request names no user",
    )
}

/// Where a held request stands with its seat.
enum SeatStep {
    Held,
    Wait,
    Refuse(Refusal),
}

fn public() -> Admission {
    Admission {
        verdict: Verdict::Public,
        license: None,
        feature: None,
        user: None,
        seat_held: true,
        holds: Vec::new(),
        rates: Vec::new(),
    }
}

fn refuse(
    license: Option<Arc<License>>,
    feature: Option<FeatureId>,
    refusal: Refusal,
) -> Admission {
    Admission {
        verdict: Verdict::Refuse(refusal),
        license,
        feature,
        user: None,
        seat_held: false,
        holds: Vec::new(),
        rates: Vec::new(),
    }
}

/// The token in a credential header value: after the prefix (matched without regard to case,
/// as the `Bearer` scheme is), trimmed.
fn bearer_token<'a>(credential: Option<&'a str>, prefix: &str) -> Result<&'a str, Refusal> {
    let Some(value) = credential.map(str::trim).filter(|v| !v.is_empty()) else {
        return Err(Refusal::new(
            Code::MissingToken,
            "a license token is required",
        ));
    };
    let scheme = prefix.trim();
    let token = if scheme.is_empty() {
        value
    } else {
        let split = value.get(..scheme.len()).zip(value.get(scheme.len()..));
        match split {
            // The scheme must be followed by whitespace: `Bearerabc` is not `Bearer abc`.
            Some((head, rest))
                if head.eq_ignore_ascii_case(scheme)
                    && (rest.is_empty() || rest.starts_with([' ', '\t'])) =>
            {
                rest
            }
            _ => {
                return Err(Refusal::new(
                    Code::InvalidToken,
                    format!("the credential does not use the `{scheme}` scheme"),
                ))
            }
        }
    };
    let token = token.trim_start();
    if token.is_empty() {
        return Err(Refusal::new(
            Code::MissingToken,
            "a license token is required",
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod client_host_tests {
    use super::client_host;

    #[test]
    fn the_port_goes_and_the_host_stays() {
        assert_eq!(client_host("10.1.2.3:5678"), "10.1.2.3");
        assert_eq!(client_host("[::1]:443"), "::1");
        assert_eq!(client_host("10.1.2.3"), "10.1.2.3");
    }
}
