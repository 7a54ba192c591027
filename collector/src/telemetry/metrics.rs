//! `/metrics`: the collector's counters in the Prometheus text format (OpenMetrics), kept by
//! `prometheus-client`. Handlers hold the counters; a scrape encodes them with the counts other
//! parts keep themselves (group commit, sharing alerts), read at that moment.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the ingest latency buckets, in seconds.
const INGEST_BUCKETS: [f64; 8] = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25];

type Labelled = Family<Vec<(&'static str, &'static str)>, Counter>;

/// The collector's own counters.
#[derive(Debug)]
pub struct Metrics {
    batches: Labelled,
    rejected: Labelled,
    pub batches_accepted: Counter,
    pub batches_duplicate: Counter,
    pub records_accepted: Counter,
    pub rejected_unauthorized: Counter,
    pub rejected_malformed: Counter,
    pub rejected_too_large: Counter,
    pub store_errors: Counter,
    pub syncs: Counter,
    pub lease_units_granted: Counter,
    pub leases_exhausted: Counter,
    pub denials: Counter,
    /// Rounds of the background worker (webhooks, budgets, invoices, retention) completed.
    pub worker_rounds: Counter,
    /// Time to decode and store a batch (its signature checked before).
    pub ingest_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let batches = Labelled::default();
        let rejected = Labelled::default();
        let by = |family: &Labelled, label: &'static str, value: &'static str| {
            family.get_or_create(&vec![(label, value)]).clone()
        };
        Metrics {
            batches_accepted: by(&batches, "result", "accepted"),
            batches_duplicate: by(&batches, "result", "duplicate"),
            rejected_unauthorized: by(&rejected, "reason", "unauthorized"),
            rejected_malformed: by(&rejected, "reason", "malformed"),
            rejected_too_large: by(&rejected, "reason", "too_large"),
            store_errors: by(&rejected, "reason", "store_error"),
            batches,
            rejected,
            records_accepted: Counter::default(),
            syncs: Counter::default(),
            lease_units_granted: Counter::default(),
            leases_exhausted: Counter::default(),
            denials: Counter::default(),
            worker_rounds: Counter::default(),
            ingest_seconds: Histogram::new(INGEST_BUCKETS),
        }
    }
}

/// Counts kept elsewhere, read when scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Elsewhere {
    /// Transactions that stored usage batches, and the batches they held.
    pub ingest_commits: u64,
    pub ingest_committed_batches: u64,
    /// Licenses detected used from more clients than their plan allows.
    pub sharing_alerts: u64,
}

impl Collector for Elsewhere {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        for (name, help, value) in [
            (
                "ingest_commits",
                "Transactions that stored usage batches (batches arriving together share one)",
                self.ingest_commits,
            ),
            (
                "ingest_committed_batches",
                "Usage batches those transactions held (over commits: the batches per commit)",
                self.ingest_committed_batches,
            ),
            (
                "sharing_alerts",
                "Licenses detected used from more clients than their plan allows (one per episode)",
                self.sharing_alerts,
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// The exposition: these counters and `elsewhere`'s.
    pub fn render(&self, elsewhere: Elsewhere) -> String {
        let mut registry = Registry::with_prefix("tollgate_collector");
        registry.register(
            "batches",
            "Usage batches taken, by result",
            self.batches.clone(),
        );
        registry.register(
            "worker_rounds",
            "Rounds of the background worker (webhooks, budgets, invoices, retention) completed",
            self.worker_rounds.clone(),
        );
        registry.register(
            "records",
            "Usage records stored",
            self.records_accepted.clone(),
        );
        registry.register(
            "rejected",
            "Requests to the ingest endpoint refused, by reason",
            self.rejected.clone(),
        );
        registry.register("syncs", "Filter syncs answered", self.syncs.clone());
        registry.register(
            "lease_units_granted",
            "Quota units handed out in leases",
            self.lease_units_granted.clone(),
        );
        registry.register(
            "leases_exhausted",
            "Lease requests answered with nothing left (or for a refused license)",
            self.leases_exhausted.clone(),
        );
        registry.register(
            "denials",
            "Licenses filters were told to refuse (revoked, suspended, spend cap)",
            self.denials.clone(),
        );
        registry.register(
            "ingest_seconds",
            "Time to decode and store a batch whose signature was checked",
            self.ingest_seconds.clone(),
        );
        registry.register_collector(Box::new(elsewhere));
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn counters_keep_their_names_and_labels() {
        let m = Metrics::default();
        m.batches_duplicate.inc();
        m.records_accepted.inc_by(7);
        m.ingest_seconds.observe(0.0004);
        let text = m.render(Elsewhere {
            sharing_alerts: 2,
            ..Default::default()
        });
        for line in [
            "tollgate_collector_batches_total{result=\"duplicate\"} 1",
            "tollgate_collector_batches_total{result=\"accepted\"} 0",
            "tollgate_collector_records_total 7",
            "tollgate_collector_rejected_total{reason=\"store_error\"} 0",
            "tollgate_collector_ingest_seconds_bucket{le=\"0.0005\"} 1",
            "tollgate_collector_ingest_seconds_count 1",
            "tollgate_collector_sharing_alerts_total 2",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }
}
