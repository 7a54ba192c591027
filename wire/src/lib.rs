//! The usage batch wire format, version 1: what a filter sends to the collector and what the
//! collector answers. One crate for both sides, pinned by the golden files in `golden/`, so a
//! change of the format is a visible diff.
//!
//! A batch is JSON, authenticated by an HMAC-SHA256 of the exact body bytes under a shared
//! secret named by a key id (headers [`KEY_ID_HEADER`] and [`SIGNATURE_HEADER`]). Its
//! `batch_id` is the idempotency key: the collector stores a batch id once, and answers a
//! retry with the same acknowledgement.

#![cfg_attr(not(test), deny(clippy::indexing_slicing))]

pub mod sync;

use std::fmt::{self, Write as _};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The format version this crate speaks.
pub const VERSION: u32 = 1;
/// Request header naming the secret a batch is signed with.
pub const KEY_ID_HEADER: &str = "x-tollgate-key-id";
/// Request header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-tollgate-signature";
/// The largest body the collector reads (bytes).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// The most records in one batch.
pub const MAX_RECORDS: usize = 20_000;
/// The longest identifier (account, license, feature, batch id, instance).
pub const MAX_ID_BYTES: usize = 256;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    /// Requests.
    Calls,
    /// Request body bytes.
    RequestBytes,
    /// Response body bytes.
    ResponseBytes,
    /// Processing time (request start to end of response), nanoseconds.
    ProcessingNs,
}

impl Meter {
    pub const ALL: [Meter; 4] = [
        Meter::Calls,
        Meter::RequestBytes,
        Meter::ResponseBytes,
        Meter::ProcessingNs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Calls => "calls",
            Meter::RequestBytes => "request_bytes",
            Meter::ResponseBytes => "response_bytes",
            Meter::ProcessingNs => "processing_ns",
        }
    }
}

/// One aggregate: units of one meter for one account, license, feature and outcome, counted
/// in the window `[window_start_ms, window_end_ms)` (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    /// Customer account (`sub`); empty for requests without a verified license.
    pub account: String,
    /// License id (`lid`); empty without a verified license.
    pub license: String,
    /// Feature of the route; empty for public routes.
    pub feature: String,
    /// `allowed`, or the refusal code.
    pub outcome: String,
    /// The end user, pseudonymised at the edge (`<key id>.<keyed HMAC>`); empty when the
    /// filter is not configured to tell users apart. Never a raw identifier.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    pub meter: Meter,
    pub units: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
}

/// Who sent a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The filter instance (configured, e.g. the Envoy node and plugin name).
    pub instance: String,
    /// When the sending VM started, Unix milliseconds.
    pub vm_started_ms: u64,
}

/// A batch of usage records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    pub version: u32,
    /// The idempotency key: the same id is stored once.
    pub batch_id: String,
    pub source: Source,
    /// Batch number within the source; gaps and order carry no meaning for storage.
    pub sequence: u64,
    /// When the batch was first formed, Unix milliseconds (retries keep it).
    pub created_ms: u64,
    pub records: Vec<UsageRecord>,
}

impl UsageBatch {
    /// The batch id for a source and sequence: unique as long as (instance, VM start) is.
    pub fn id_for(source: &Source, sequence: u64) -> String {
        format!("{}/{}/{}", source.instance, source.vm_started_ms, sequence)
    }

    /// The body bytes to send.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse and check a body.
    pub fn decode(body: &[u8]) -> Result<UsageBatch, WireError> {
        if body.len() > MAX_BATCH_BYTES {
            return Err(WireError::TooLarge { bytes: body.len() });
        }
        let batch: UsageBatch =
            serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        batch.check()?;
        Ok(batch)
    }

    /// The rules a decoded batch must follow.
    pub fn check(&self) -> Result<(), WireError> {
        if self.version != VERSION {
            return Err(WireError::Version(self.version));
        }
        check_id("batch_id", &self.batch_id, false)?;
        check_id("source.instance", &self.source.instance, false)?;
        check_storable("sequence", self.sequence)?;
        check_storable("created_ms", self.created_ms)?;
        if self.records.len() > MAX_RECORDS {
            return Err(WireError::Invalid(format!(
                "{} records; at most {MAX_RECORDS} per batch",
                self.records.len()
            )));
        }
        for (i, r) in self.records.iter().enumerate() {
            check_id(&format!("records[{i}].account"), &r.account, true)?;
            check_id(&format!("records[{i}].license"), &r.license, true)?;
            check_id(&format!("records[{i}].feature"), &r.feature, true)?;
            check_id(&format!("records[{i}].outcome"), &r.outcome, false)?;
            check_id(&format!("records[{i}].user"), &r.user, true)?;
            check_storable(&format!("records[{i}].units"), r.units)?;
            check_storable(&format!("records[{i}].window_start_ms"), r.window_start_ms)?;
            check_storable(&format!("records[{i}].window_end_ms"), r.window_end_ms)?;
            if r.window_end_ms < r.window_start_ms {
                return Err(WireError::Invalid(format!(
                    "records[{i}]: window ends before it starts"
                )));
            }
        }
        Ok(())
    }

    /// Total units per meter, for counting in tests and logs.
    pub fn units(&self, meter: Meter) -> u64 {
        self.records
            .iter()
            .filter(|r| r.meter == meter)
            .map(|r| r.units)
            .sum()
    }
}

/// Collectors store numbers as signed 64-bit integers (SQLite, PostgreSQL `BIGINT`): a larger
/// value is malformed here, a permanent refusal, rather than a store error the sender would
/// retry for ever (found by the `collector_ingest` fuzzer).
fn check_storable(field: &str, value: u64) -> Result<(), WireError> {
    if value > i64::MAX.unsigned_abs() {
        return Err(WireError::Invalid(format!(
            "{field} {value} is larger than {}",
            i64::MAX
        )));
    }
    Ok(())
}

fn check_id(field: &str, value: &str, may_be_empty: bool) -> Result<(), WireError> {
    if value.is_empty() && !may_be_empty {
        return Err(WireError::Invalid(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(WireError::Invalid(format!(
            "{field} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(WireError::Invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// How the collector took a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Stored now.
    Accepted,
    /// Stored before (a retry): nothing counted again.
    Duplicate,
}

/// The collector's answer to a batch it took. Only this answer lets a filter drop the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchAck {
    pub version: u32,
    pub batch_id: String,
    pub status: AckStatus,
    /// Records the batch held when it was first stored.
    pub records: u64,
}

impl BatchAck {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<BatchAck, WireError> {
        let ack: BatchAck =
            serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if ack.version != VERSION {
            return Err(WireError::Version(ack.version));
        }
        Ok(ack)
    }
}

/// The collector's refusal of a request: `{"error": <code>, "message": <reason>}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub error: String,
    pub message: String,
}

impl Refusal {
    /// The batch is not valid (400): the same bytes will always be refused.
    pub const MALFORMED_BATCH: &'static str = "malformed_batch";
    /// The batch is larger than the collector takes (413): the same bytes will always be refused.
    pub const BATCH_TOO_LARGE: &'static str = "batch_too_large";

    pub fn new(error: &str, message: impl Into<String>) -> Refusal {
        Refusal {
            error: error.into(),
            message: message.into(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A refusal body, if `body` is one (a proxy's error page is not).
    pub fn decode(body: &[u8]) -> Option<Refusal> {
        serde_json::from_slice(body).ok()
    }

    /// True when sending the same batch again cannot succeed. Only the collector's own
    /// refusal codes count: a 400 from something else on the way (a misrouted cluster, a
    /// proxy) must not make a filter give up on usage.
    pub fn is_permanent(&self) -> bool {
        self.error == Self::MALFORMED_BATCH || self.error == Self::BATCH_TOO_LARGE
    }
}

/// Why a body is not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    TooLarge { bytes: usize },
    Malformed(String),
    Version(u32),
    Invalid(String),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLarge { bytes } => {
                write!(f, "batch of {bytes} bytes is larger than {MAX_BATCH_BYTES}")
            }
            WireError::Malformed(e) => write!(f, "not a usage batch: {e}"),
            WireError::Version(v) => {
                write!(f, "unsupported version {v}; this side speaks {VERSION}")
            }
            WireError::Invalid(e) => write!(f, "invalid batch: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

type HmacSha256 = Hmac<Sha256>;

/// The [`SIGNATURE_HEADER`] value for `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    // HMAC accepts keys of any length.
    if let Ok(mut mac) = HmacSha256::new_from_slice(secret) {
        mac.update(body);
        for byte in mac.finalize().into_bytes() {
            let _ = write!(out, "{byte:02x}");
        }
    }
    out
}

const HEX: [u8; 16] = *b"0123456789abcdef";

/// True if `signature` (a [`SIGNATURE_HEADER`] value) is `body`'s HMAC under `secret`;
/// compared in constant time.
pub fn verify(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Some(expected) = decode_hex(hex) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| HEX.iter().position(|h| *h == c.to_ascii_lowercase());
    hex.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some(u8::try_from(digit(*hi)? * 16 + digit(*lo)?).ok()?),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_a_collector_cannot_store_are_malformed() {
        let mut batch = golden_batch();
        assert!(batch.check().is_ok());
        batch.records[0].units = i64::MAX.unsigned_abs();
        assert!(batch.check().is_ok(), "the largest storable value passes");
        batch.records[0].units = u64::MAX;
        let err = batch.check().unwrap_err().to_string();
        assert!(err.contains("records[0].units"), "{err}");
        let mut batch = golden_batch();
        batch.sequence = 1 << 63;
        assert!(UsageBatch::decode(&batch.encode()).is_err());
        let mut batch = golden_batch();
        batch.records[0].window_end_ms = u64::MAX;
        assert!(batch.check().is_err());
    }

    /// The batch pinned by `golden/batch_v1.json`.
    fn golden_batch() -> UsageBatch {
        let source = Source {
            instance: "node-a/tollgate".into(),
            vm_started_ms: 1_780_000_000_000,
        };
        let record = |feature: &str, outcome: &str, meter, units| UsageRecord {
            account: "acme-corp".into(),
            license: "lic-acme-001".into(),
            feature: feature.into(),
            outcome: outcome.into(),
            user: String::new(),
            meter,
            units,
            window_start_ms: 1_780_000_060_000,
            window_end_ms: 1_780_000_061_000,
        };
        UsageBatch {
            version: 1,
            batch_id: UsageBatch::id_for(&source, 42),
            source,
            sequence: 42,
            created_ms: 1_780_000_061_005,
            records: vec![
                record("search", "allowed", Meter::Calls, 12),
                record("search", "allowed", Meter::RequestBytes, 0),
                record("search", "allowed", Meter::ResponseBytes, 12_288),
                record("search", "allowed", Meter::ProcessingNs, 3_456_789),
                record("search", "rate_limited", Meter::Calls, 3),
                UsageRecord {
                    user: "k2026.5c0e7a31d94b2f68a1c3e5079b8d4f26".into(),
                    ..record("search", "allowed", Meter::Calls, 7)
                },
            ],
        }
    }

    /// A golden file: `#` lines are comments, the rest is the pretty JSON.
    fn golden(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("golden")
            .join(name);
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn batch_v1_matches_its_golden_file() {
        let text = golden("batch_v1.json.golden");
        let pretty = serde_json::to_string_pretty(&golden_batch()).unwrap();
        assert_eq!(
            pretty.trim(),
            text.trim(),
            "the wire format changed: update the golden file on purpose"
        );
        assert_eq!(UsageBatch::decode(text.as_bytes()).unwrap(), golden_batch());
    }

    #[test]
    fn ack_v1_matches_its_golden_file() {
        let ack = BatchAck {
            version: 1,
            batch_id: "node-a/tollgate/1780000000000/42".into(),
            status: AckStatus::Duplicate,
            records: 5,
        };
        let text = golden("ack_v1.json.golden");
        assert_eq!(
            serde_json::to_string_pretty(&ack).unwrap().trim(),
            text.trim()
        );
        assert_eq!(BatchAck::decode(text.as_bytes()).unwrap(), ack);
    }

    #[test]
    fn refusal_v1_matches_its_golden_file() {
        let refusal = Refusal::new(
            Refusal::MALFORMED_BATCH,
            "invalid batch: record 3: window_end_ms is before window_start_ms",
        );
        let text = golden("refusal_v1.json.golden");
        assert_eq!(
            serde_json::to_string_pretty(&refusal).unwrap().trim(),
            text.trim()
        );
        let decoded = Refusal::decode(text.as_bytes()).unwrap();
        assert_eq!(decoded, refusal);
        assert!(decoded.is_permanent());
        assert!(Refusal::new(Refusal::BATCH_TOO_LARGE, "").is_permanent());
        assert!(!Refusal::new("unauthorized", "").is_permanent());
        assert!(!Refusal::new("store_unavailable", "").is_permanent());
        assert_eq!(Refusal::decode(b"<html>400 Bad Request</html>"), None);
    }

    #[test]
    fn round_trip_and_counting() {
        let batch = golden_batch();
        let decoded = UsageBatch::decode(&batch.encode()).unwrap();
        assert_eq!(decoded, batch);
        assert_eq!(decoded.units(Meter::Calls), 22);
    }

    #[test]
    fn invalid_batches_are_refused_with_a_reason() {
        let mut wrong_version = golden_batch();
        wrong_version.version = 2;
        let mut empty_id = golden_batch();
        empty_id.batch_id.clear();
        let mut backwards = golden_batch();
        backwards.records[0].window_end_ms = 0;
        let mut control = golden_batch();
        control.records[0].account = "a\nb".into();
        for (batch, reason) in [
            (wrong_version, "unsupported version 2"),
            (empty_id, "batch_id is empty"),
            (backwards, "records[0]: window ends"),
            (control, "records[0].account contains control"),
        ] {
            let err = UsageBatch::decode(&batch.encode()).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
        }
        let mut extra: serde_json::Value =
            serde_json::from_slice(&golden_batch().encode()).unwrap();
        extra["records"][0]["bonus"] = serde_json::json!(1);
        let err = UsageBatch::decode(extra.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `bonus`"), "{err}");
        for junk in [&b""[..], b"{", b"[]", b"null", b"\xff", b"{\"version\":1}"] {
            assert!(matches!(
                UsageBatch::decode(junk),
                Err(WireError::Malformed(_))
            ));
        }
        let huge = vec![b' '; MAX_BATCH_BYTES + 1];
        assert!(matches!(
            UsageBatch::decode(&huge),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn signatures_verify_only_for_the_same_secret_and_body() {
        let body = golden_batch().encode();
        let signature = sign(b"secret-1", &body);
        assert!(signature.starts_with("sha256=") && signature.len() == 7 + 64);
        assert!(verify(b"secret-1", &body, &signature));
        assert!(verify(
            b"secret-1",
            &body,
            &signature.to_uppercase().replace("SHA256=", "sha256=")
        ));
        assert!(!verify(b"secret-2", &body, &signature));
        let mut altered = body.clone();
        altered[10] ^= 1;
        assert!(!verify(b"secret-1", &altered, &signature));
        for bad in [
            "",
            "sha256=",
            "sha256=zz",
            "md5=00",
            &signature[..signature.len() - 1],
        ] {
            assert!(!verify(b"secret-1", &body, bad), "{bad}");
        }
        // RFC 4231 test case 2: pins the HMAC itself.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
