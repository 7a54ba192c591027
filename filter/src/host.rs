//! The host side of the core's traits: shared data for rate state, Envoy stats for counters.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};
use tollgate_core::quota::SharedBlobs;
use tollgate_core::refusal::Code;
use tollgate_core::{Gate, Outcome, Policy, SharedCells, StoreError, UsageKey, UsageTotals};

/// Rate-limit state in proxy-wasm shared data: one cell per key, shared by every worker of
/// this Envoy, kept across VM replacement (plugin reloads).
#[derive(Clone, Copy)]
pub struct SharedDataCells;

impl SharedCells for SharedDataCells {
    fn load(&self, key: &str) -> Result<Option<(u64, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => {
                let value = <[u8; 8]>::try_from(bytes.as_slice()).map_err(|_| StoreError)?;
                // A stored value always has a CAS; 0 would mean "no check" on the write back.
                Ok(Some((u64::from_le_bytes(value), cas.unwrap_or(0))))
            }
            Ok((None, _)) => Ok(None),
            Err(_) => Err(StoreError),
        }
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: u64,
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        // Envoy takes CAS 0 as "write unconditionally": the first write of a key can race
        // with another worker's first write; both wrote from an empty bucket, so at most one
        // extra request per worker is admitted, once per key.
        match hostcalls::set_shared_data(key, Some(&value.to_le_bytes()), version) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(_) => Err(StoreError),
        }
    }
}

/// Quota pools and denials in proxy-wasm shared data, shared by every worker of this Envoy.
impl SharedBlobs for SharedDataCells {
    fn load(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            // An existing value always has a CAS; an empty one may come back as no bytes.
            Ok((bytes, Some(cas))) => Ok(Some((bytes.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(_) => Err(StoreError),
        }
    }

    fn compare_and_swap(
        &self,
        key: &str,
        value: &[u8],
        version: Option<u32>,
    ) -> Result<bool, StoreError> {
        // A new key's first write cannot be checked (Envoy's CAS 0 is unconditional): two
        // workers creating one pool at once can lose one of the two writes. Both started from
        // an empty pool holding no lease, so what is lost is one worker's lease request in
        // flight, and `Pool::apply_grant` still takes its grant when it comes.
        match hostcalls::set_shared_data(key, Some(value), version) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(_) => Err(StoreError),
        }
    }
}

/// Per-feature stat ids.
struct FeatureMetrics {
    allowed: u32,
    refused: u32,
    request_bytes: u32,
    response_bytes: u32,
    processing_us: u32,
}

/// Envoy stats defined by the filter (shown as `wasmcustom.tollgate.*`). Per-request counts
/// are folded in on each tick rather than with a host call per request.
pub struct Metrics {
    allowed: u32,
    refused: Vec<u32>,
    request_bytes: u32,
    response_bytes: u32,
    processing_us: u32,
    cache_hits: u32,
    cache_misses: u32,
    store_conflicts: u32,
    store_errors: u32,
    features: Vec<FeatureMetrics>,
    reported_store: std::cell::Cell<(u64, u64)>,
}

pub(crate) fn gauge(name: &str) -> Result<u32, String> {
    hostcalls::define_metric(MetricType::Gauge, name).map_err(|s| format!("{name}: {s:?}"))
}

/// Move a gauge by `delta` (Envoy shares one gauge between the workers, so each VM adds its
/// own changes rather than setting a value).
pub(crate) fn move_gauge(metric: u32, delta: i64) {
    if delta != 0 {
        let _ = hostcalls::increment_metric(metric, delta);
    }
}

pub(crate) fn counter(name: &str) -> Result<u32, String> {
    hostcalls::define_metric(MetricType::Counter, name).map_err(|s| format!("{name}: {s:?}"))
}

pub(crate) fn add(metric: u32, value: u64) {
    if value > 0 {
        let _ = hostcalls::increment_metric(metric, i64::try_from(value).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    pub fn define(policy: &Policy) -> Result<Metrics, String> {
        let mut refused = Vec::with_capacity(Code::ALL.len());
        for code in Code::ALL {
            refused.push(counter(&format!(
                "tollgate.requests_refused.reason.{}",
                code.as_str()
            ))?);
        }
        let mut features = Vec::with_capacity(policy.features.len());
        for name in &policy.features {
            let m = |what: &str| counter(&format!("tollgate.feature.{name}.{what}"));
            features.push(FeatureMetrics {
                allowed: m("requests_allowed")?,
                refused: m("requests_refused")?,
                request_bytes: m("request_bytes")?,
                response_bytes: m("response_bytes")?,
                processing_us: m("processing_time_us")?,
            });
        }
        Ok(Metrics {
            allowed: counter("tollgate.requests_allowed")?,
            refused,
            request_bytes: counter("tollgate.request_bytes")?,
            response_bytes: counter("tollgate.response_bytes")?,
            processing_us: counter("tollgate.processing_time_us")?,
            cache_hits: counter("tollgate.token_cache_hits")?,
            cache_misses: counter("tollgate.token_cache_misses")?,
            store_conflicts: counter("tollgate.ratelimit_store_conflicts")?,
            store_errors: counter("tollgate.ratelimit_store_errors")?,
            features,
            reported_store: std::cell::Cell::new((0, 0)),
        })
    }

    /// Fold what the gate counted since the last flush into Envoy stats; returns the usage
    /// drained, for the collector.
    pub fn flush<S: SharedCells + SharedBlobs + Clone>(
        &self,
        gate: &mut Gate<S>,
    ) -> Vec<(UsageKey, UsageTotals)> {
        let counters = gate.take_counters();
        add(self.cache_hits, counters.token_cache_hits);
        add(self.cache_misses, counters.token_cache_misses);
        let health = gate.store_health();
        let (conflicts, errors) = self
            .reported_store
            .replace((health.cas_conflicts, health.errors));
        add(
            self.store_conflicts,
            health.cas_conflicts.saturating_sub(conflicts),
        );
        add(self.store_errors, health.errors.saturating_sub(errors));

        let usage = gate.drain_usage();
        for (key, totals) in &usage {
            let processing_us = totals.processing_nanos / 1000;
            match key.outcome {
                Outcome::Allowed => add(self.allowed, totals.calls),
                Outcome::Refused(code) => {
                    if let Some(metric) = self.refused.get(code.index()) {
                        add(*metric, totals.calls);
                    }
                }
            }
            add(self.request_bytes, totals.request_bytes);
            add(self.response_bytes, totals.response_bytes);
            add(self.processing_us, processing_us);
            if let Some(feature) = key.feature.and_then(|f| self.features.get(usize::from(f))) {
                match key.outcome {
                    Outcome::Allowed => add(feature.allowed, totals.calls),
                    Outcome::Refused(_) => add(feature.refused, totals.calls),
                }
                add(feature.request_bytes, totals.request_bytes);
                add(feature.response_bytes, totals.response_bytes);
                add(feature.processing_us, processing_us);
            }
        }
        usage
    }
}
