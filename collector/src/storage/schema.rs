//! Where personal data lives in the schema (both backends have the same tables): what retention,
//! export and erasure walk.

use std::collections::BTreeSet;

use serde_json::Value;

/// Tables with an `account` column, in the order an account is erased, and whether they have
/// a `license` column too (where an account's licenses are found).
pub(crate) const ACCOUNT_TABLES: &[(&str, bool)] = &[
    ("usage_records", true),
    ("usage_rollups", true),
    ("leases", true),
    ("seats", true),
    ("license_clients", true),
    ("sharing_detections", true),
    ("licenses", true),
    ("issued_licenses", true),
    ("invoices", false),
    ("budgets", false),
    ("suspended_accounts", false),
];

/// The tables of [`ACCOUNT_TABLES`] with a `license` column.
pub(crate) fn license_sources() -> impl Iterator<Item = &'static str> {
    ACCOUNT_TABLES
        .iter()
        .filter(|(_, has_license)| *has_license)
        .map(|(table, _)| *table)
}

/// Tables keyed by license alone.
pub(crate) const LICENSE_TABLES: &[&str] = &["quota_allocations", "revoked_licenses"];

/// Tables with an end user's pseudonym, and its column. Usage records are unlinked, not deleted.
pub(crate) const SUBJECT_TABLES: &[(&str, &str)] = &[
    ("usage_records", "user_ref"),
    ("seats", "user_ref"),
    ("license_clients", "client_ref"),
];

/// True when `payload` holds one of `values` as a string anywhere (webhook events name an
/// account or license in different places: `account`, `invoice.account`, `license`...).
pub(crate) fn mentions(payload: &Value, values: &BTreeSet<String>) -> bool {
    match payload {
        Value::String(s) => values.contains(s),
        Value::Array(items) => items.iter().any(|v| mentions(v, values)),
        Value::Object(fields) => fields.values().any(|v| mentions(v, values)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_mentions_are_found_at_any_depth() {
        let values: BTreeSet<String> = ["acme".to_string(), "lic-1".to_string()].into();
        let invoice = serde_json::json!({"invoice": {"account": "acme", "lines": []}});
        let sharing = serde_json::json!({"account": "other", "licenses": ["x", "lic-1"]});
        let unrelated = serde_json::json!({"account": "acme-2", "n": 3});
        assert!(mentions(&invoice, &values));
        assert!(mentions(&sharing, &values));
        assert!(!mentions(&unrelated, &values));
    }
}
