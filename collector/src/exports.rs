//! Usage exports for payment and metering systems: CSV and JSON of the stored records, Stripe
//! meter events, and CloudEvents as OpenMeter ingests them.
//!
//! Every exported event carries an identifier derived from the stored record alone (its batch
//! id and its key), so exporting the same records again gives the same identifiers, and the
//! receiving system drops the copies: a re-export never bills twice. The identifier does not
//! depend on the database's row numbers, so it survives a restore or a move to PostgreSQL.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_wire::Meter;

use crate::billing::csv_field;
use crate::catalog::Catalog;
use crate::storage::StoredRecord;

/// The formats of `GET /v1/admin/exports/usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Csv,
    Json,
    /// Stripe meter events (`POST /v1/billing/meter_events` bodies), allowed usage only.
    Stripe,
    /// A CloudEvents batch (`application/cloudevents-batch+json`), as OpenMeter ingests it.
    Cloudevents,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json | Format::Stripe => "application/json",
            Format::Cloudevents => "application/cloudevents-batch+json",
        }
    }
}

/// The stable identifier of a stored record: 128 bits of SHA-256 over the batch id and the
/// record's key (the user included, when there is one). A batch holds one record per key, so
/// no two records share one; payment systems de-duplicate on it.
pub fn record_identifier(r: &StoredRecord) -> String {
    let mut hash = Sha256::new();
    let window_start = r.window_start_ms.to_string();
    let mut parts = vec![
        r.batch_id.as_str(),
        r.account.as_str(),
        r.license.as_str(),
        r.feature.as_str(),
        r.outcome.as_str(),
        r.meter.as_str(),
        &window_start,
    ];
    // Only when set: records without a user keep the identifiers they always had.
    if !r.user.is_empty() {
        parts.push(&r.user);
    }
    for part in parts {
        // Length-prefixed: no two different keys hash the same parts.
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    format!(
        "tg_{}",
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn rfc3339_utc(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn meter_named(name: &str) -> Option<Meter> {
    Meter::ALL.into_iter().find(|m| m.as_str() == name)
}

/// One Stripe meter event per allowed record (others are not billed).
pub fn stripe_events(catalog: &Catalog, records: &[StoredRecord]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r.outcome == "allowed" && r.units > 0)
        .filter_map(|r| {
            let meter = meter_named(&r.meter)?;
            Some(json!({
                "event_name": catalog.stripe_event_name(meter),
                "payload": {
                    "stripe_customer_id": catalog.customer_of(&r.account),
                    "value": r.units.to_string(),
                    "license": r.license,
                    "feature": r.feature,
                },
                "identifier": record_identifier(r),
                "timestamp": r.window_start_ms / 1000,
            }))
        })
        .collect()
}

/// One CloudEvent per record; OpenMeter meters sum `data.units` grouped by the other fields
/// (filter on `outcome` = `allowed` for billing).
pub fn cloud_events(catalog: &Catalog, records: &[StoredRecord]) -> Vec<Value> {
    records
        .iter()
        .map(|r| {
            json!({
                "specversion": "1.0",
                "id": record_identifier(r),
                "source": "tollgate",
                "type": format!("tollgate.usage.{}", r.meter),
                "subject": catalog.customer_of(&r.account),
                "time": rfc3339_utc(r.window_start_ms),
                "datacontenttype": "application/json",
                "data": {
                    "account": r.account,
                    "license": r.license,
                    "feature": r.feature,
                    "outcome": r.outcome,
                    "user": r.user,
                    "meter": r.meter,
                    "units": r.units,
                    "window_start": rfc3339_utc(r.window_start_ms),
                    "window_end": rfc3339_utc(r.window_end_ms),
                },
            })
        })
        .collect()
}

/// The records as JSON objects, each with its identifier.
pub fn json_records(records: &[StoredRecord]) -> Vec<Value> {
    records
        .iter()
        .map(|r| {
            let mut v = json!(r);
            v["identifier"] = json!(record_identifier(r));
            v["window_start"] = json!(rfc3339_utc(r.window_start_ms));
            v["window_end"] = json!(rfc3339_utc(r.window_end_ms));
            v
        })
        .collect()
}

/// The CSV header of [`csv_records`].
pub const CSV_HEADER: &str =
    "identifier,batch_id,account,license,feature,outcome,meter,units,window_start,window_end,user\n";

/// The records as CSV rows (no header).
pub fn csv_records(records: &[StoredRecord]) -> String {
    let mut out = String::new();
    for r in records {
        let fields = [
            record_identifier(r),
            r.batch_id.clone(),
            r.account.clone(),
            r.license.clone(),
            r.feature.clone(),
            r.outcome.clone(),
            r.meter.clone(),
            r.units.to_string(),
            rfc3339_utc(r.window_start_ms),
            rfc3339_utc(r.window_end_ms),
            r.user.clone(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn record(batch: &str, license: &str, units: u64) -> StoredRecord {
        StoredRecord {
            id: 7,
            batch_id: batch.into(),
            account: "acme".into(),
            license: license.into(),
            feature: "design".into(),
            outcome: "allowed".into(),
            meter: "calls".into(),
            units,
            window_start_ms: 1_795_000_000_000,
            window_end_ms: 1_795_000_001_000,
            user: String::new(),
        }
    }

    #[test]
    fn identifiers_depend_on_the_record_only() {
        let a = record("b1", "lic-1", 5);
        let mut moved = a.clone();
        moved.id = 99;
        assert_eq!(record_identifier(&a), record_identifier(&moved));
        assert_ne!(
            record_identifier(&a),
            record_identifier(&record("b2", "lic-1", 5))
        );
        assert_ne!(
            record_identifier(&a),
            record_identifier(&record("b1", "lic-2", 5))
        );
        // Length prefixes: moving a character from one field to the next changes the id.
        let mut shifted = a.clone();
        shifted.batch_id = "b1l".into();
        shifted.license = "ic-1".into();
        assert_ne!(record_identifier(&a), record_identifier(&shifted));
        assert_eq!(record_identifier(&a).len(), 3 + 32);
        // Records of two users in one batch: two identifiers, and none is the user-less one
        // (which stays what it was before users existed).
        let user = |u: &str| StoredRecord {
            user: u.into(),
            ..a.clone()
        };
        assert_ne!(
            record_identifier(&user("k1.aa")),
            record_identifier(&user("k1.bb"))
        );
        assert_ne!(record_identifier(&user("k1.aa")), record_identifier(&a));
        assert_eq!(
            record_identifier(&a),
            "tg_cc67a795a059f94be8b97e0de17ef7d9",
            "identifiers of records without a user never change"
        );
    }

    #[test]
    fn stripe_events_bill_allowed_usage_to_the_mapped_customer() {
        let catalog = Catalog::from_json(
            br#"{"customers": {"acme": "cus_123"}, "stripe_event_names": {"calls": "api_calls"}}"#,
        )
        .unwrap();
        let mut refused = record("b1", "lic-1", 3);
        refused.outcome = "rate_limited".into();
        let events = stripe_events(&catalog, &[record("b1", "lic-1", 5), refused]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event_name"], "api_calls");
        assert_eq!(events[0]["payload"]["stripe_customer_id"], "cus_123");
        assert_eq!(events[0]["payload"]["value"], "5");
        assert_eq!(events[0]["timestamp"], 1_795_000_000);
        let cloud = cloud_events(&catalog, &[record("b1", "lic-1", 5)]);
        assert_eq!(cloud[0]["id"], events[0]["identifier"]);
        assert_eq!(cloud[0]["subject"], "cus_123");
        assert_eq!(cloud[0]["type"], "tollgate.usage.calls");
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("-1.50"), "-1.50");
    }
}
