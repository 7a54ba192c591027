//! The refusals the collector orders for licenses (revoked, suspended, over a spend cap,
//! shared), as every worker sees them.
//!
//! All denials of an Envoy live in one shared-data entry, and each gate keeps a copy it reads
//! per request with no host call. The gate that syncs writes the entry (and its own copy) when
//! the collector answers; every other gate reloads the entry on its tick, and only parses it when
//! its version moved. So a denial reaches the other workers of an Envoy within one tick of the
//! sync that brought it (the sync's own worker at once).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tollgate_wire::sync::DenialCode;

use crate::quota::SharedBlobs;
use crate::refusal::{Code, Refusal};

/// The shared-data key of every denial of this Envoy.
const DENIALS_KEY: &str = "tollgate/denials";

/// How often a conflicting write is retried (another worker wrote the entry in between).
const WRITE_ATTEMPTS: usize = 16;

/// A refusal the collector ordered for a license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDenial {
    pub code: DenialCode,
    pub message: String,
    pub until_ms: Option<u64>,
}

/// This gate's copy of the shared denials.
#[derive(Debug, Default)]
pub struct Denials {
    local: HashMap<Arc<str>, StoredDenial>,
    /// The version of the shared entry `local` was read from (`None`: never read or absent).
    version: Option<u32>,
}

impl Denials {
    /// Reload the shared entry if another worker changed it since the last read.
    pub fn refresh(&mut self, shared: &impl SharedBlobs) {
        let Ok(stored) = shared.load(DENIALS_KEY) else {
            // The shared store failed: keep the copy (the error shows in the store's stats).
            return;
        };
        let version = stored.as_ref().map(|(_, v)| *v);
        if version == self.version {
            return;
        }
        self.local = stored.map_or_else(HashMap::new, |(bytes, _)| decode(&bytes));
        self.version = version;
    }

    /// The refusal for `license` at `now_ms`, if the collector ordered one that still holds.
    pub fn refusal(&self, license: &str, now_ms: u64) -> Option<Refusal> {
        let denial = self.local.get(license)?;
        if denial.until_ms.is_some_and(|until| until <= now_ms) {
            return None;
        }
        let code = match denial.code {
            DenialCode::LicenseRevoked => Code::LicenseRevoked,
            DenialCode::AccountSuspended => Code::AccountSuspended,
            DenialCode::SpendCapReached => Code::SpendCapReached,
            DenialCode::LicenseSharingDetected => Code::LicenseSharingDetected,
        };
        Some(Refusal {
            retry_after_seconds: denial
                .until_ms
                .map(|until| until.saturating_sub(now_ms).div_ceil(1000)),
            ..Refusal::new(code, denial.message.clone())
        })
    }

    /// Record what the collector said of the licenses a sync named: a denial, or `None` to lift
    /// one. The shared entry is merged (other workers' licenses are kept), and the last writer
    /// of a license wins: every worker writes what the collector said most recently.
    pub fn apply(
        &mut self,
        shared: &impl SharedBlobs,
        named: &BTreeMap<&str, Option<StoredDenial>>,
    ) {
        if named.is_empty() {
            return;
        }
        for _ in 0..WRITE_ATTEMPTS {
            let Ok(stored) = shared.load(DENIALS_KEY) else {
                break;
            };
            let version = stored.as_ref().map(|(_, v)| *v);
            let mut all: BTreeMap<String, StoredDenial> = stored
                .and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok())
                .unwrap_or_default();
            let mut changed = false;
            for (license, denial) in named {
                changed |= match denial {
                    Some(denial) => {
                        all.insert((*license).to_string(), denial.clone()).as_ref() != Some(denial)
                    }
                    None => all.remove(*license).is_some(),
                };
            }
            if !changed {
                // What the collector said is stored already; take the entry only if this copy
                // is behind it.
                if version != self.version {
                    self.local = into_local(all);
                    self.version = version;
                }
                return;
            }
            let Ok(bytes) = serde_json::to_vec(&all) else {
                break;
            };
            match shared.compare_and_swap(DENIALS_KEY, &bytes, version) {
                Ok(true) => {
                    self.local = into_local(all);
                    // Not the new version (the store assigns it): the next refresh rereads it,
                    // once, and finds the same.
                    self.version = None;
                    return;
                }
                Ok(false) => continue,
                Err(_) => break,
            }
        }
        // The shared store failed or stayed contended: this worker still obeys the collector,
        // and the next sync writes the entry again.
        for (license, denial) in named {
            match denial {
                Some(denial) => self.local.insert(Arc::from(*license), denial.clone()),
                None => self.local.remove(*license),
            };
        }
    }
}

/// The denials in a stored entry (an unreadable entry holds none: the next sync rewrites it).
fn decode(bytes: &[u8]) -> HashMap<Arc<str>, StoredDenial> {
    serde_json::from_slice(bytes)
        .map(into_local)
        .unwrap_or_default()
}

fn into_local(all: BTreeMap<String, StoredDenial>) -> HashMap<Arc<str>, StoredDenial> {
    all.into_iter().map(|(k, v)| (Arc::from(k), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryCells;

    fn revoked() -> StoredDenial {
        StoredDenial {
            code: DenialCode::LicenseRevoked,
            message: "revoked".into(),
            until_ms: None,
        }
    }

    #[test]
    fn a_denial_reaches_another_worker_on_its_refresh() {
        let shared = MemoryCells::default();
        let mut syncing = Denials::default();
        let mut other = Denials::default();
        other.refresh(&shared);
        syncing.apply(&shared, &BTreeMap::from([("L1", Some(revoked()))]));
        assert_eq!(
            syncing.refusal("L1", 0).map(|r| r.code),
            Some(Code::LicenseRevoked)
        );
        // Not before its tick: the other worker reads its own copy.
        assert!(other.refusal("L1", 0).is_none());
        other.refresh(&shared);
        assert_eq!(
            other.refusal("L1", 0).map(|r| r.code),
            Some(Code::LicenseRevoked)
        );
        // Lifted by a later sync that names the license without a denial.
        syncing.apply(&shared, &BTreeMap::from([("L1", None)]));
        other.refresh(&shared);
        assert!(other.refusal("L1", 0).is_none());
        assert!(syncing.refusal("L1", 0).is_none());
    }

    #[test]
    fn writers_merge_and_keep_each_others_licenses() {
        let shared = MemoryCells::default();
        let mut a = Denials::default();
        let mut b = Denials::default();
        a.apply(&shared, &BTreeMap::from([("L1", Some(revoked()))]));
        b.apply(&shared, &BTreeMap::from([("L2", Some(revoked()))]));
        let mut reader = Denials::default();
        reader.refresh(&shared);
        assert!(reader.refusal("L1", 0).is_some());
        assert!(reader.refusal("L2", 0).is_some());
        // b also holds a's, though it never named it.
        assert!(b.refusal("L1", 0).is_some());
    }

    #[test]
    fn a_timed_denial_ends_with_its_retry_after() {
        let shared = MemoryCells::default();
        let mut d = Denials::default();
        let until = StoredDenial {
            code: DenialCode::SpendCapReached,
            message: "over".into(),
            until_ms: Some(10_500),
        };
        d.apply(&shared, &BTreeMap::from([("L1", Some(until))]));
        let refusal = d.refusal("L1", 9_000).expect("denied until 10.5 s");
        assert_eq!(refusal.retry_after_seconds, Some(2));
        assert!(d.refusal("L1", 10_500).is_none());
    }

    #[test]
    fn an_unreadable_entry_holds_no_denial() {
        let shared = MemoryCells::default();
        crate::quota::SharedBlobs::compare_and_swap(&shared, DENIALS_KEY, b"{not json", None)
            .unwrap();
        let mut d = Denials::default();
        d.refresh(&shared);
        assert!(d.refusal("L1", 0).is_none());
        // And the next sync rewrites it whole.
        d.apply(&shared, &BTreeMap::from([("L1", Some(revoked()))]));
        let mut reader = Denials::default();
        reader.refresh(&shared);
        assert!(reader.refusal("L1", 0).is_some());
    }
}
