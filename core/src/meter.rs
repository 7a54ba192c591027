//! Usage metering: every request adds to an aggregate per account, license, feature and
//! outcome; nothing is kept per request.

use std::sync::Arc;

use crate::config::FeatureId;
use crate::refusal::Code;

/// How a request ended, as far as billing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Allowed,
    Refused(Code),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused(code) => code.as_str(),
        }
    }
}

/// What one aggregate is about. Requests with no verified license have empty account and
/// license; public routes have no feature.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageKey {
    pub account: Arc<str>,
    pub license: Arc<str>,
    pub feature: Option<FeatureId>,
    pub outcome: Outcome,
    /// The end user, pseudonymised; `None` when users are not told apart.
    pub user: Option<Arc<str>>,
}

/// The meters of one aggregate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub calls: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Request start to the end of the response.
    pub processing_nanos: u64,
}

impl UsageTotals {
    fn add(&mut self, other: &UsageTotals) {
        self.calls = self.calls.saturating_add(other.calls);
        self.request_bytes = self.request_bytes.saturating_add(other.request_bytes);
        self.response_bytes = self.response_bytes.saturating_add(other.response_bytes);
        self.processing_nanos = self.processing_nanos.saturating_add(other.processing_nanos);
    }
}

/// Usage aggregated since the last drain.
#[derive(Debug, Default)]
pub struct Ledger {
    entries: foldhash::HashMap<UsageKey, UsageTotals>,
}

impl Ledger {
    /// Add one finished request.
    pub fn record(&mut self, key: UsageKey, usage: UsageTotals) {
        self.entries.entry(key).or_default().add(&usage);
    }

    /// Take everything aggregated so far, in a stable order, leaving the ledger empty.
    pub fn drain(&mut self) -> Vec<(UsageKey, UsageTotals)> {
        let mut out: Vec<_> = self.entries.drain().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Aggregates held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(license: &str, outcome: Outcome) -> UsageKey {
        UsageKey {
            account: "acct".into(),
            license: license.into(),
            feature: Some(0),
            outcome,
            user: None,
        }
    }

    #[test]
    fn requests_with_the_same_key_aggregate() {
        let mut ledger = Ledger::default();
        let one = UsageTotals {
            calls: 1,
            request_bytes: 10,
            response_bytes: 100,
            processing_nanos: 5,
        };
        for _ in 0..3 {
            ledger.record(key("l1", Outcome::Allowed), one);
        }
        ledger.record(key("l1", Outcome::Refused(Code::RateLimited)), one);
        ledger.record(key("l2", Outcome::Allowed), one);
        assert_eq!(ledger.len(), 3);
        let drained = ledger.drain();
        assert!(ledger.is_empty());
        assert_eq!(drained[0].0, key("l1", Outcome::Allowed));
        assert_eq!(
            drained[0].1,
            UsageTotals {
                calls: 3,
                request_bytes: 30,
                response_bytes: 300,
                processing_nanos: 15
            }
        );
        assert_eq!(drained.iter().map(|(_, t)| t.calls).sum::<u64>(), 5);
    }
}
