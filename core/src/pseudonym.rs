//! Pseudonyms for end users and client addresses: a keyed HMAC, computed at the edge, so that
//! no raw identifier leaves the filter. `<key id>.<hex of the first 16 bytes of
//! HMAC-SHA256(key, "<kind>:" + value)>`: the same value gives the same pseudonym under one key
//! (distinct users can be counted), nobody without the key can compute or reverse one, and the
//! key id says which key made it (after a rotation, one person has a new pseudonym).

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::ConfigError;

/// The shortest key accepted: an HMAC key below the hash's 32 bytes would be guessable sooner
/// than the pseudonyms it protects.
pub const MIN_KEY_BYTES: usize = 32;

/// A keyed pseudonymiser; the HMAC state is keyed once, and cloned per value.
#[derive(Clone)]
pub struct Pseudonymizer {
    key_id: String,
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for Pseudonymizer {
    // The key never goes to a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymizer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// What a pseudonym stands for: the same value under two kinds gives two unrelated pseudonyms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    User,
    Client,
}

impl Pseudonymizer {
    pub fn new(field: &str, key_id: &str, secret: &str) -> Result<Pseudonymizer, ConfigError> {
        let id_ok = !key_id.is_empty()
            && key_id.len() <= 32
            && key_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(ConfigError::new(
                format!("{field}.id"),
                "1-32 characters of letters, digits, `-` and `_`",
            ));
        }
        if secret.len() < MIN_KEY_BYTES {
            return Err(ConfigError::new(
                format!("{field}.secret"),
                format!("at least {MIN_KEY_BYTES} bytes"),
            ));
        }
        let keyed = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
            .map_err(|_| ConfigError::new(format!("{field}.secret"), "not a usable HMAC key"))?;
        Ok(Pseudonymizer {
            key_id: key_id.to_string(),
            keyed,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The pseudonym of `value` as a `subject`.
    pub fn pseudonym(&self, subject: Subject, value: &str) -> String {
        let mut mac = self.keyed.clone();
        mac.update(match subject {
            Subject::User => b"user:",
            Subject::Client => b"client:",
        });
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(self.key_id.len() + 33);
        out.push_str(&self.key_id);
        out.push('.');
        for byte in digest.iter().take(16) {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn pseudonyms_are_stable_keyed_and_kind_separated() {
        let p = Pseudonymizer::new("k", "k2026", SECRET).unwrap();
        let alice = p.pseudonym(Subject::User, "alice@example.com");
        assert_eq!(alice, p.pseudonym(Subject::User, "alice@example.com"));
        assert!(alice.starts_with("k2026."), "{alice}");
        assert_eq!(alice.len(), "k2026.".len() + 32);
        assert!(!alice.contains("alice"));
        assert_ne!(alice, p.pseudonym(Subject::User, "bob@example.com"));
        assert_ne!(alice, p.pseudonym(Subject::Client, "alice@example.com"));
        // Another key: another pseudonym, and its id says so.
        let rotated = Pseudonymizer::new("k", "k2027", &SECRET.replace('0', "x")).unwrap();
        let again = rotated.pseudonym(Subject::User, "alice@example.com");
        assert!(again.starts_with("k2027."));
        assert_ne!(alice[6..], again[6..]);
        // The HMAC itself, pinned (RFC 2104 HMAC-SHA256 of "user:alice@example.com").
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(b"user:alice@example.com");
        let hex: String = mac.finalize().into_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(alice, format!("k2026.{hex}"));
    }

    #[test]
    fn weak_keys_and_bad_ids_are_refused() {
        let e = Pseudonymizer::new("users.key", "k1", "short").unwrap_err();
        assert_eq!(e.field, "users.key.secret");
        assert!(Pseudonymizer::new("k", "", SECRET).is_err());
        assert!(Pseudonymizer::new("k", "a.b", SECRET).is_err());
        assert!(!format!("{:?}", Pseudonymizer::new("k", "k1", SECRET).unwrap()).contains(SECRET));
    }
}
