//! Personal data (GDPR): retention of raw usage, and export and erasure of everything stored
//! about one account or one end user.
//!
//! - **Retention.** Raw usage records older than the configured age are rolled up into hourly
//!   aggregates per account, license, feature, outcome and meter (no end user, no batch) and
//!   deleted, in one transaction: every unit is in a record or in an aggregate, never both, and
//!   billing and usage queries read both. Seats, clients and sharing detections that ended
//!   before the cut-off go too.
//! - **An account** is erased with everything that names it or one of its licenses; refused
//!   while one of its licenses is still valid (its token would still be served, and deleting a
//!   revocation would make a revoked token good again).
//! - **An end user** (a pseudonym, `<key id>.<HMAC>`, as filters send it) is unlinked from usage
//!   (the calls stay billed to the account, with no user) and their seats and client entries are
//!   deleted.
//!
//! Batches (id, filter instance, counts, times) are kept: their ids make ingest exactly-once,
//! and a retried batch after an erasure must not store its records again.

use anyhow::Result;

use crate::errors::{conflict, invalid};
use crate::storage::Store;

/// A retention shorter than this could delete usage of a billing period (a calendar month,
/// plus its finalisation grace) before its invoice is final.
pub const MIN_RETENTION_DAYS: u64 = 62;

/// Raw records rolled up per transaction: a long retention round never holds the write lock
/// for long.
pub const RETENTION_CHUNK: u32 = 10_000;

pub use crate::storage::{Erased, Export, Retained};

/// A pseudonym as filters make it: `<key id>.<32 hex digits>`. Anything else is refused, so
/// that a raw identifier typed by mistake is not searched for (it is never stored).
pub fn check_subject(subject: &str) -> Result<()> {
    let valid = subject.split_once('.').is_some_and(|(key, mac)| {
        !key.is_empty()
            && key.len() <= 32
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && mac.len() == 32
            && mac
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "`{}` is not an end-user pseudonym (`<key id>.<32 hex digits>`, as the filter's \
             `pseudonyms` key makes it)",
            subject.chars().take(80).collect::<String>()
        )))
    }
}

/// Erase an account, unless one of its issued licenses is still valid at `now_ms`.
pub fn erase_account(store: &dyn Store, account: &str, now_ms: u64) -> Result<Erased> {
    if account.is_empty() {
        return Err(invalid("the account is empty"));
    }
    let live: Vec<String> = store
        .issued_licenses(Some(account))?
        .into_iter()
        .filter(|l| l.expires_ms > now_ms)
        .map(|l| l.license)
        .collect();
    if !live.is_empty() {
        return Err(conflict(format!(
            "account `{account}` still has {} valid license(s) ({}): erasing it would leave them \
             usable; wait until they expire, or issue them with an earlier expiry",
            live.len(),
            live.join(", ")
        )));
    }
    store.erase_account(account)
}

/// Erase an end user's pseudonym.
pub fn erase_subject(store: &dyn Store, subject: &str) -> Result<Erased> {
    check_subject(subject)?;
    store.erase_subject(subject)
}

/// Export an end user's data.
pub fn export_subject(store: &dyn Store, subject: &str) -> Result<Export> {
    check_subject(subject)?;
    store.export_subject(subject)
}

/// Retention until nothing older than `before_ms` is left (or `max_chunks` transactions ran).
pub fn apply_retention(store: &dyn Store, before_ms: u64, max_chunks: u32) -> Result<Retained> {
    let mut total = Retained::default();
    for _ in 0..max_chunks.max(1) {
        let done = store.apply_retention(before_ms, RETENTION_CHUNK)?;
        total.add(done);
        if done.records < u64::from(RETENTION_CHUNK) {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_must_be_pseudonyms() {
        assert!(check_subject("k1.0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "alice",
            "k1.0123456789ABCDEF0123456789abcdef",
            ".0123456789abcdef0123456789abcdef",
            "k1.0123",
            "",
        ] {
            assert!(check_subject(bad).is_err(), "{bad}");
        }
    }
}
