//! Envoy stats defined by the module (shown as `dynamicmodulescustom.tollgate.*`), the same
//! names as the wasm filter's `wasmcustom.tollgate.*`. Counted on the main thread's tick from
//! what the gate aggregated (as the wasm filter folds its stats on its tick), so a request
//! makes no stat call into Envoy.

use tollgate_core::ratelimit::StoreHealth;
use tollgate_core::refusal::Code;
use tollgate_core::{GateCounters, Outcome, Policy, UsageKey, UsageTotals};

use crate::background::CollectorHost;
use crate::ConfigHost;

struct FeatureMetrics {
    allowed: usize,
    refused: usize,
    request_bytes: usize,
    response_bytes: usize,
    processing_us: usize,
}

pub struct Metrics {
    allowed: usize,
    refused: Vec<usize>,
    request_bytes: usize,
    response_bytes: usize,
    processing_us: usize,
    cache_hits: usize,
    cache_misses: usize,
    store_conflicts: usize,
    store_errors: usize,
    features: Vec<FeatureMetrics>,
    /// The store's health last counted (the gate reports totals).
    reported_store: std::sync::Mutex<StoreHealth>,
}

fn counter(host: &mut impl ConfigHost, name: String) -> Result<usize, String> {
    host.define_counter(&name).ok_or(name)
}

fn add(host: &mut impl CollectorHost, counter: usize, value: u64) {
    if value > 0 {
        host.increment(counter, value);
    }
}

impl Metrics {
    /// Define every counter (Envoy allows it only while the configuration is created); the
    /// error names the stat Envoy refused.
    pub fn define(host: &mut impl ConfigHost, policy: &Policy) -> Result<Metrics, String> {
        let mut refused = Vec::with_capacity(Code::ALL.len());
        for code in Code::ALL {
            refused.push(counter(
                host,
                format!("tollgate.requests_refused.reason.{}", code.as_str()),
            )?);
        }
        let mut features = Vec::with_capacity(policy.features.len());
        for name in &policy.features {
            let mut m = |what: &str| counter(host, format!("tollgate.feature.{name}.{what}"));
            features.push(FeatureMetrics {
                allowed: m("requests_allowed")?,
                refused: m("requests_refused")?,
                request_bytes: m("request_bytes")?,
                response_bytes: m("response_bytes")?,
                processing_us: m("processing_time_us")?,
            });
        }
        Ok(Metrics {
            allowed: counter(host, "tollgate.requests_allowed".into())?,
            refused,
            request_bytes: counter(host, "tollgate.request_bytes".into())?,
            response_bytes: counter(host, "tollgate.response_bytes".into())?,
            processing_us: counter(host, "tollgate.processing_time_us".into())?,
            cache_hits: counter(host, "tollgate.token_cache_hits".into())?,
            cache_misses: counter(host, "tollgate.token_cache_misses".into())?,
            store_conflicts: counter(host, "tollgate.ratelimit_store_conflicts".into())?,
            store_errors: counter(host, "tollgate.ratelimit_store_errors".into())?,
            features,
            reported_store: std::sync::Mutex::new(StoreHealth::default()),
        })
    }

    /// Count what the gate counted and metered since the last tick.
    pub fn count(
        &self,
        http: &mut impl CollectorHost,
        counters: GateCounters,
        health: StoreHealth,
        usage: &[(UsageKey, UsageTotals)],
    ) {
        add(http, self.cache_hits, counters.token_cache_hits);
        add(http, self.cache_misses, counters.token_cache_misses);
        // Totals only grow: count what exceeds the highest total counted so far.
        let (conflicts, errors) = match self.reported_store.lock() {
            Ok(mut reported) => {
                let delta = (
                    health.cas_conflicts.saturating_sub(reported.cas_conflicts),
                    health.errors.saturating_sub(reported.errors),
                );
                reported.cas_conflicts = reported.cas_conflicts.max(health.cas_conflicts);
                reported.errors = reported.errors.max(health.errors);
                delta
            }
            // Not counted this time; the totals catch up on a later request.
            Err(_) => (0, 0),
        };
        add(http, self.store_conflicts, conflicts);
        add(http, self.store_errors, errors);
        for (key, totals) in usage {
            let processing_us = totals.processing_nanos / 1000;
            match key.outcome {
                Outcome::Allowed => add(http, self.allowed, totals.calls),
                Outcome::Refused(code) => {
                    if let Some(metric) = self.refused.get(code.index()) {
                        add(http, *metric, totals.calls);
                    }
                }
            }
            add(http, self.request_bytes, totals.request_bytes);
            add(http, self.response_bytes, totals.response_bytes);
            add(http, self.processing_us, processing_us);
            if let Some(feature) = key.feature.and_then(|f| self.features.get(usize::from(f))) {
                match key.outcome {
                    Outcome::Allowed => add(http, feature.allowed, totals.calls),
                    Outcome::Refused(_) => add(http, feature.refused, totals.calls),
                }
                add(http, feature.request_bytes, totals.request_bytes);
                add(http, feature.response_bytes, totals.response_bytes);
                add(http, feature.processing_us, processing_us);
            }
        }
    }
}
