//! A bounded cache of verified tokens, so a signature is checked once per token and worker.
//!
//! Two generations approximate LRU without per-hit bookkeeping: inserts go to `young`; when
//! `young` is full it becomes `old` and the previous `old` is dropped; a hit in `old` moves the
//! entry back to `young` while `young` has room. At most `2 * capacity / 2 = capacity` entries
//! are held, and a working set of up to `capacity` tokens stays cached.

use std::sync::Arc;

use crate::token::License;

type Map = foldhash::HashMap<Box<str>, Arc<License>>;

/// Verified tokens by their full text (hashed by the map; compared in full on a hit, so a hash
/// collision can never pass one token off as another).
#[derive(Debug)]
pub struct TokenCache {
    young: Map,
    old: Map,
    generation_size: usize,
    leeway_seconds: u64,
}

impl TokenCache {
    /// A cache of at most `capacity` tokens; entries stay usable until `exp + leeway_seconds`,
    /// the same rule a fresh verification applies.
    pub fn new(capacity: usize, leeway_seconds: u64) -> Self {
        TokenCache {
            young: Map::default(),
            old: Map::default(),
            generation_size: (capacity / 2).max(1),
            leeway_seconds,
        }
    }

    /// The license of `token` if it was verified and has not expired at `now` (Unix seconds).
    pub fn get(&mut self, token: &str, now: u64) -> Option<Arc<License>> {
        if let Some(license) = self.young.get(token) {
            if self.is_live(license, now) {
                return Some(Arc::clone(license));
            }
            self.young.remove(token);
            return None;
        }
        let license = Arc::clone(self.old.get(token)?);
        if !self.is_live(&license, now) {
            self.old.remove(token);
            return None;
        }
        // Promoted only while the young generation has room: a promotion that swapped the
        // generations would drop the old generation's other live entries, and a working set
        // as large as the cache would then be verified again and again. Only a new token
        // swaps generations.
        if self.young.len() < self.generation_size {
            if let Some((key, license)) = self.old.remove_entry(token) {
                self.young.insert(key, license);
            }
        }
        Some(license)
    }

    /// Remember a verified token.
    pub fn insert(&mut self, token: &str, license: Arc<License>) {
        self.insert_boxed(token.into(), license);
    }

    fn insert_boxed(&mut self, token: Box<str>, license: Arc<License>) {
        if self.young.len() >= self.generation_size {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(token, license);
    }

    fn is_live(&self, license: &License, now: u64) -> bool {
        now <= license.expires_at.saturating_add(self.leeway_seconds)
    }

    /// Forget every token: the keys changed, each must be verified again.
    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
