//! A bounded cache of verified tokens, so a signature is checked once per token and worker.
//!
//! Two generations approximate LRU without per-hit bookkeeping: inserts go to `young`; when
//! `young` is full it becomes `old` and the previous `old` is dropped; a hit in `old` moves the
//! entry back to `young` while `young` has room. At most `2 * capacity / 2 = capacity` entries
//! are held, and a working set of up to `capacity` tokens stays cached.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use siphasher::sip128::{Hasher128, SipHasher24};

use crate::token::License;

/// A token's 128-bit digest: what the cache keeps instead of the token's text (hundreds of
/// bytes), so a cached license costs tens of bytes of key, not the token.
type Digest = u128;

type Map = foldhash::HashMap<Digest, Arc<License>>;

/// Verified tokens by a keyed digest of their full text.
///
/// The digest is SipHash-2-4 with 128-bit output under a secret key drawn from the host's
/// random source when the cache is made (each configuration of each VM). SipHash is a pseudo-random function: without the
/// key, nobody can make a token whose digest equals a cached one's (a forged token would need
/// about 2^128 tries, each a request), and two real tokens meet by chance with a probability
/// of about n^2 / 2^129 for n cached tokens. An unkeyed fast hash would let an attacker
/// search offline for a token colliding with someone else's license.
pub struct TokenCache {
    young: Map,
    old: Map,
    generation_size: usize,
    leeway_seconds: u64,
    key: (u64, u64),
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TokenCache")
            .field("len", &self.len())
            .field("generation_size", &self.generation_size)
            .finish()
    }
}

/// A fresh secret key from the host's random source (WASI `random_get` in the filter). Should
/// the host refuse, std's `RandomState` (seeded from the same source) is the fallback.
fn random_key() -> (u64, u64) {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_ok() {
        let (k0, k1) = bytes.split_at(8);
        if let (Ok(k0), Ok(k1)) = (<[u8; 8]>::try_from(k0), <[u8; 8]>::try_from(k1)) {
            return (u64::from_le_bytes(k0), u64::from_le_bytes(k1));
        }
    }
    let seed = RandomState::new();
    (
        seed.hash_one("tollgate token cache key 0"),
        seed.hash_one("tollgate token cache key 1"),
    )
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
            key: random_key(),
        }
    }

    fn digest(&self, token: &str) -> Digest {
        let mut hasher = SipHasher24::new_with_keys(self.key.0, self.key.1);
        hasher.write(token.as_bytes());
        hasher.finish128().as_u128()
    }

    /// The license of `token` if it was verified and has not expired at `now` (Unix seconds).
    pub fn get(&mut self, token: &str, now: u64) -> Option<Arc<License>> {
        let digest = self.digest(token);
        if let Some(license) = self.young.get(&digest) {
            if self.is_live(license, now) {
                return Some(Arc::clone(license));
            }
            self.young.remove(&digest);
            return None;
        }
        let license = Arc::clone(self.old.get(&digest)?);
        if !self.is_live(&license, now) {
            self.old.remove(&digest);
            return None;
        }
        // Promoted only while the young generation has room: a promotion that swapped the
        // generations would drop the old generation's other live entries, and a working set
        // as large as the cache would then be verified again and again. Only a new token
        // swaps generations.
        if self.young.len() < self.generation_size {
            if let Some(license) = self.old.remove(&digest) {
                self.young.insert(digest, license);
            }
        }
        Some(license)
    }

    /// Remember a verified token.
    pub fn insert(&mut self, token: &str, license: Arc<License>) {
        let digest = self.digest(token);
        if self.young.len() >= self.generation_size {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(digest, license);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_keyed_per_cache() {
        let (a, b) = (TokenCache::new(4, 0), TokenCache::new(4, 0));
        let token = "eyJhbGciOiJFZERTQSJ9.e30.c2ln";
        assert_eq!(a.digest(token), a.digest(token));
        // Another cache (another VM) draws another key: digests cannot be precomputed.
        assert_ne!(a.digest(token), b.digest(token));
        assert_ne!(a.digest(token), a.digest("eyJhbGciOiJFZERTQSJ9.e30.c2lm"));
    }
}
