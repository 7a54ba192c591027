//! The per-request decision: route → token → plan → feature → rate limits, and the meters
//! recorded when the request ends. One `Gate` per VM (per Envoy worker).

use std::sync::Arc;

use crate::cache::TokenCache;
use crate::config::{FeatureId, Policy, UnmatchedRoutes};
use crate::meter::{Ledger, Outcome, UsageKey, UsageTotals};
use crate::ratelimit::{RateLimits, SharedCells, StoreHealth};
use crate::refusal::{Code, LimitScope, RateLimitDenial, Refusal};
use crate::routes::RouteTarget;
use crate::token::{self, License};

/// What the adapter read from the request headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// `:path`, query string included.
    pub path: &'a str,
    /// The value of the configured token header, if present.
    pub credential: Option<&'a str>,
}

/// The decision on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Licensed: forward with the license headers.
    Allow,
    /// A public route (or unmatched, with `unmatched_routes: allow`): forward, no license.
    Public,
    Refuse(Refusal),
}

/// A decision with what it was about; kept by the adapter until the request ends.
#[derive(Debug, Clone)]
pub struct Admission {
    pub verdict: Verdict,
    pub license: Option<Arc<License>>,
    pub feature: Option<FeatureId>,
}

impl Admission {
    pub fn outcome(&self) -> Outcome {
        match &self.verdict {
            Verdict::Refuse(refusal) => Outcome::Refused(refusal.code),
            Verdict::Allow | Verdict::Public => Outcome::Allowed,
        }
    }

    /// The license-context headers to set upstream, for an allowed request.
    pub fn upstream_headers<'a>(&'a self, policy: &'a Policy) -> Vec<(&'a str, &'a str)> {
        let (Verdict::Allow, Some(license)) = (&self.verdict, &self.license) else {
            return Vec::new();
        };
        let h = &policy.upstream_headers;
        let feature = self.feature.map_or("", |f| policy.feature_name(f));
        [
            (h.account.as_deref(), &*license.account),
            (h.license.as_deref(), &*license.license_id),
            (h.plan.as_deref(), &*license.plan.name),
            (h.feature.as_deref(), feature),
        ]
        .into_iter()
        .filter_map(|(name, value)| name.map(|n| (n, value)))
        .collect()
    }
}

/// Counters kept per worker and folded into Envoy stats periodically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GateCounters {
    pub token_cache_hits: u64,
    pub token_cache_misses: u64,
}

/// One worker's gate: the shared policy plus this worker's cache, limiter and meters.
pub struct Gate<S: SharedCells + Clone> {
    policy: Arc<Policy>,
    cache: TokenCache,
    limits: RateLimits<S>,
    ledger: Ledger,
    counters: GateCounters,
    /// Account and license of usage without a verified license (shared, not allocated per request).
    anonymous: Arc<str>,
    /// Set by the adapter while the usage buffer is full under fail-closed.
    metering_blocked: bool,
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;

impl<S: SharedCells + Clone> Gate<S> {
    pub fn new(policy: Arc<Policy>, cells: S) -> Self {
        let cache = TokenCache::new(policy.token.cache_entries, policy.token.leeway_seconds);
        Gate {
            policy,
            cache,
            limits: RateLimits::new(cells),
            ledger: Ledger::default(),
            counters: GateCounters::default(),
            anonymous: Arc::from(""),
            metering_blocked: false,
        }
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
                    return refuse(
                        None,
                        None,
                        Refusal::new(
                            Code::RouteNotLicensed,
                            "no licensed feature serves this route",
                        ),
                    )
                }
            },
        };

        let license = match self.license(request.credential, now_nanos / NANOS_PER_SECOND) {
            Ok(license) => license,
            Err(refusal) => return refuse(None, Some(feature), refusal),
        };
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
        for (scope, quota, key) in checks {
            let (Some(quota), Some(key)) = (quota, key) else {
                continue;
            };
            if let Err(wait_nanos) = self.limits.check(key, quota, now_nanos) {
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
                };
                return refuse(Some(Arc::clone(&license)), Some(feature), refusal);
            }
        }
        Admission {
            verdict: Verdict::Allow,
            license: Some(license),
            feature: Some(feature),
        }
    }

    fn license(&mut self, credential: Option<&str>, now: u64) -> Result<Arc<License>, Refusal> {
        let token = bearer_token(credential, &self.policy.token.prefix)?;
        if let Some(license) = self.cache.get(token, now) {
            self.counters.token_cache_hits += 1;
            return Ok(license);
        }
        self.counters.token_cache_misses += 1;
        let license =
            token::verify(&self.policy, token, now).map_err(|e| Refusal::new(e.code, e.message))?;
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
        };
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

fn public() -> Admission {
    Admission {
        verdict: Verdict::Public,
        license: None,
        feature: None,
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
