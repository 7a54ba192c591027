//! Keys fetched from a JWKS endpoint (the collector's `/.well-known/jwks.json`, or an identity
//! provider's): when to fetch, what to keep, and how every worker and every later VM of one
//! Envoy share the last good set through proxy-wasm shared data.
//!
//! - At start a VM takes the set another VM stored, so a reload never starts without keys.
//! - The set is fetched again every `refresh_seconds`, and sooner when a token names a `kid`
//!   the set lacks (at most once per `min_refetch_seconds`: an attacker's made-up kids cannot
//!   turn into a flood of fetches).
//! - A failed or invalid fetch keeps the last good set, and is retried with backoff.
//! - The token cache is emptied only when the set really changed, so a key that left the set
//!   stops verifying at once, and an unchanged refresh costs nothing.

use std::sync::Arc;

use crate::config::JwksSource;
use crate::quota::SharedBlobs;
use crate::token::KeySet;

/// Backoff after a failed fetch: doubling from 1 s up to this.
const MAX_BACKOFF_MS: u64 = 60_000;

/// The fetched key set and its fetch schedule, one per VM.
#[derive(Debug)]
pub struct RemoteKeys {
    source: JwksSource,
    /// Shared-data key of the last good set of this source.
    shared_key: String,
    keys: Option<Arc<KeySet>>,
    /// The JWKS body `keys` was built from.
    body: Vec<u8>,
    /// CAS version of the shared value last read or written.
    version: Option<u32>,
    /// When the set in use was fetched (by any worker), Unix ms.
    fetched_ms: u64,
    in_flight_since: Option<u64>,
    last_attempt_ms: u64,
    failures: u32,
    /// A token named a kid the set lacks.
    refetch_wanted: bool,
}

/// What a fetch brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// A set different from the one in use: now in use, tokens verified again.
    Changed { keys: usize, skipped: Vec<String> },
    /// The same set as before.
    Unchanged,
    /// The fetch failed or the answer was not a usable set; the last good set stays.
    Failed(String),
}

impl RemoteKeys {
    pub fn new(source: JwksSource) -> Self {
        let target = format!("{}{}", source.cluster, source.path);
        RemoteKeys {
            shared_key: format!("tollgate/jwks/{}:{target}", target.len()),
            source,
            keys: None,
            body: Vec::new(),
            version: None,
            fetched_ms: 0,
            in_flight_since: None,
            last_attempt_ms: 0,
            failures: 0,
            refetch_wanted: false,
        }
    }

    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    pub fn keys(&self) -> Option<&KeySet> {
        self.keys.as_deref()
    }

    /// A token named a key the set lacks: fetch again soon.
    pub fn want_refetch(&mut self) {
        self.refetch_wanted = true;
    }

    /// Take the set another worker or an earlier VM stored, if it is newer than ours. True if
    /// the set in use changed (the token cache must be emptied).
    pub fn load_shared(&mut self, blobs: &impl SharedBlobs) -> bool {
        let Ok(Some((value, version))) = blobs.load(&self.shared_key) else {
            return false;
        };
        if Some(version) == self.version {
            return false;
        }
        self.version = Some(version);
        let Some((stamp, body)) = value.split_first_chunk::<8>() else {
            return false;
        };
        let fetched_ms = u64::from_le_bytes(*stamp);
        if fetched_ms < self.fetched_ms {
            return false;
        }
        self.fetched_ms = fetched_ms;
        self.apply(body).is_ok_and(|changed| changed)
    }

    /// Use `body` if it is a usable set; true if it differs from the set in use.
    fn apply(&mut self, body: &[u8]) -> Result<bool, String> {
        if self.keys.is_some() && body == self.body.as_slice() {
            return Ok(false);
        }
        let (keys, _) = KeySet::from_remote_jwks(body)?;
        self.keys = Some(Arc::new(keys));
        self.body = body.to_vec();
        Ok(true)
    }

    /// Should a fetch start now?
    pub fn due(&self, now_ms: u64) -> bool {
        if let Some(since) = self.in_flight_since {
            // Envoy answers every call by its timeout; this only guards a lost callback.
            if now_ms.saturating_sub(since) < self.source.timeout_ms.saturating_add(1000) {
                return false;
            }
        }
        let since_attempt = now_ms.saturating_sub(self.last_attempt_ms);
        if self.failures > 0 {
            let backoff = 1000u64
                .saturating_mul(1 << self.failures.min(6))
                .min(MAX_BACKOFF_MS);
            if since_attempt < backoff {
                return false;
            }
        }
        if self.keys.is_none() {
            return true;
        }
        if now_ms.saturating_sub(self.fetched_ms) >= self.source.refresh_ms {
            return true;
        }
        self.refetch_wanted && since_attempt >= self.source.min_refetch_ms
    }

    /// A fetch was sent.
    pub fn started(&mut self, now_ms: u64) {
        self.in_flight_since = Some(now_ms);
        self.last_attempt_ms = now_ms;
        self.refetch_wanted = false;
    }

    /// The fetch could not even be sent.
    pub fn not_sent(&mut self, now_ms: u64) {
        self.in_flight_since = None;
        self.last_attempt_ms = now_ms;
        self.failures = self.failures.saturating_add(1);
    }

    /// The fetch answered: `status` and body, or `None` if the call failed. A good set is
    /// stored in shared data for the other workers and later VMs.
    pub fn answered(
        &mut self,
        blobs: &impl SharedBlobs,
        answer: Option<(u16, &[u8])>,
        now_ms: u64,
    ) -> Fetched {
        self.in_flight_since = None;
        let failed = |this: &mut Self, why: String| {
            this.failures = this.failures.saturating_add(1);
            Fetched::Failed(why)
        };
        let body = match answer {
            None => return failed(self, "no answer".into()),
            Some((status, _)) if status != 200 => {
                return failed(self, format!("answered HTTP {status}"))
            }
            Some((_, body)) => body,
        };
        let skipped = match KeySet::from_remote_jwks(body) {
            Ok((_, skipped)) => skipped,
            Err(why) => return failed(self, why),
        };
        self.failures = 0;
        let changed = match self.apply(body) {
            Ok(changed) => changed,
            Err(why) => return failed(self, why),
        };
        self.fetched_ms = now_ms;
        let mut value = now_ms.to_le_bytes().to_vec();
        value.extend_from_slice(body);
        // A CAS on the version we last saw: if another worker stored a set meanwhile, theirs
        // stays, and ours is taken again by the next load (both came from the same endpoint).
        if let Ok(true) = blobs.compare_and_swap(&self.shared_key, &value, self.version) {
            if let Ok(Some((_, version))) = blobs.load(&self.shared_key) {
                self.version = Some(version);
            }
        }
        if changed {
            Fetched::Changed {
                keys: self.keys.as_ref().map_or(0, |k| k.len()),
                skipped,
            }
        } else {
            Fetched::Unchanged
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quota::MemoryBlobs;

    const ED_A: &str = r#"{"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
    const ED_B: &str = r#"{"kty":"OKP","crv":"Ed25519","kid":"b","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;

    fn set(keys: &[&str]) -> Vec<u8> {
        format!(r#"{{"keys":[{}]}}"#, keys.join(",")).into_bytes()
    }

    fn source() -> JwksSource {
        JwksSource {
            cluster: "collector".into(),
            path: "/.well-known/jwks.json".into(),
            authority: "collector".into(),
            refresh_ms: 300_000,
            min_refetch_ms: 10_000,
            timeout_ms: 2000,
        }
    }

    #[test]
    fn fetched_at_start_refreshed_and_shared_with_the_next_vm() {
        let blobs = MemoryBlobs::default();
        let mut keys = RemoteKeys::new(source());
        assert!(keys.due(1000));
        keys.started(1000);
        assert!(!keys.due(1500), "one fetch at a time");
        let body = set(&[ED_A]);
        assert!(matches!(
            keys.answered(&blobs, Some((200, &body)), 1100),
            Fetched::Changed { keys: 1, .. }
        ));
        assert!(!keys.due(2000));
        assert!(keys.due(1100 + 300_000), "refreshed every refresh_seconds");
        // The same set again: nothing changes, the token cache stays.
        keys.started(301_100);
        assert_eq!(
            keys.answered(&blobs, Some((200, &body)), 301_200),
            Fetched::Unchanged
        );
        // A new VM (a reload) starts with the stored set, without a fetch.
        let mut next = RemoteKeys::new(source());
        assert!(next.load_shared(&blobs));
        assert!(next.keys().is_some());
        assert!(!next.due(301_300));
        assert!(!next.load_shared(&blobs), "read once per change");
    }

    #[test]
    fn a_failed_fetch_keeps_the_last_good_set_and_backs_off() {
        let blobs = MemoryBlobs::default();
        let mut keys = RemoteKeys::new(source());
        keys.started(0);
        keys.answered(&blobs, Some((200, &set(&[ED_A]))), 0);
        keys.started(300_000);
        assert!(matches!(
            keys.answered(&blobs, Some((503, b"down")), 300_010),
            Fetched::Failed(_)
        ));
        assert!(keys.keys().is_some());
        keys.started(300_020);
        assert!(matches!(
            keys.answered(&blobs, Some((200, b"{\"keys\":[]}")), 300_030),
            Fetched::Failed(_)
        ));
        keys.started(300_040);
        assert!(matches!(
            keys.answered(&blobs, Some((200, b"not json")), 300_050),
            Fetched::Failed(_)
        ));
        assert!(keys.keys().is_some(), "the last good set stays");
        assert!(!keys.due(300_060), "backs off");
        assert!(keys.due(300_050 + MAX_BACKOFF_MS));
    }

    #[test]
    fn an_unknown_kid_refetches_at_most_once_per_interval() {
        let blobs = MemoryBlobs::default();
        let mut keys = RemoteKeys::new(source());
        keys.started(0);
        keys.answered(&blobs, Some((200, &set(&[ED_A]))), 0);
        keys.want_refetch();
        assert!(keys.due(10_000));
        keys.started(10_000);
        assert!(matches!(
            keys.answered(&blobs, Some((200, &set(&[ED_A, ED_B]))), 10_010),
            Fetched::Changed { keys: 2, .. }
        ));
        keys.want_refetch();
        assert!(!keys.due(15_000), "min_refetch_seconds apart");
        assert!(keys.due(20_000));
    }
}
