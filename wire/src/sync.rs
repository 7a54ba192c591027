//! The sync exchange, version 1: a filter asks the collector for quota leases, returns the
//! leases it is done with, and names the licenses it served; the collector answers with grants
//! and with the licenses and accounts that must be refused (revoked, suspended, over their
//! spend cap). Signed like a batch (HMAC of the body under a key id).
//!
//! Every lease has an id chosen by the filter (`<instance>/<sequence>`): a request retried
//! after a lost answer gets the same grant, and a return retried is applied once.

use serde::{Deserialize, Serialize};

use crate::{check_id, Meter, WireError, MAX_BATCH_BYTES, VERSION};

/// The most lease requests, returns or licenses in one sync.
pub const MAX_SYNC_ITEMS: usize = 10_000;

/// A calendar period a quota counts over, in the collector's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Hour,
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// A filter asks for up to `want` units of `license`'s quota of `meter` per `period`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Unique per lease, chosen by the filter; a retry carries the same id.
    pub lease_id: String,
    pub account: String,
    pub license: String,
    /// The license's plan: the collector's catalogue may set this plan's limit.
    pub plan: String,
    pub meter: Meter,
    pub period: Period,
    /// The quota, as the filter's configuration and the license's claims set it now (the
    /// collector's catalogue, if it has a limit for the plan, meter and period, wins).
    pub limit: u64,
    pub want: u64,
}

/// A filter is done with a lease (used up, expired, or its period ended): `used` units of it
/// were consumed. May exceed the grant (a response larger than its reservation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseReturn {
    pub lease_id: String,
    pub used: u64,
}

/// A license a filter served since its last sync (so the collector can say whether it is still
/// good, and knows its plan for pricing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LicenseSeen {
    pub account: String,
    pub license: String,
    pub plan: String,
}

/// How a license's seats are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SeatRule {
    /// At most `limit` distinct users per calendar `per` period: a user who held a seat in the
    /// period keeps it until the period ends.
    Named { limit: u32, per: Period },
    /// At most `limit` users active within any `window_ms`: a seat is free again once its
    /// user has been inactive for the window.
    Floating { limit: u32, window_ms: u64 },
}

impl SeatRule {
    pub fn limit(self) -> u32 {
        match self {
            SeatRule::Named { limit, .. } | SeatRule::Floating { limit, .. } => limit,
        }
    }
}

/// A filter asks for (or renews) a seat of `license` for `user` (pseudonymised at the edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeatRequest {
    pub account: String,
    pub license: String,
    pub user: String,
    /// The seats as the filter's configuration and the license's claims set them now.
    pub rule: SeatRule,
}

/// The collector's answer to a seat request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeatAnswer {
    pub license: String,
    pub user: String,
    pub granted: bool,
    /// A grant is used until this time, then renewed; a refusal is kept until this time (when
    /// the earliest floating seat frees, or the named seats' period ends, at the latest).
    pub until_ms: u64,
    /// Seats taken (this one included when granted) and the limit, for the refusal message.
    pub in_use: u32,
    pub limit: u32,
}

/// The clients a license was used from since the last sync, for sharing detection. A client is
/// an address pseudonymised at the edge; the collector counts distinct clients per window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsSeen {
    pub account: String,
    pub license: String,
    pub clients: Vec<String>,
    /// More distinct clients than this within `window_ms` is sharing.
    pub max_clients: u32,
    pub window_ms: u64,
    /// Refuse the license (403 `license_sharing_detected`) for a window once sharing is seen;
    /// otherwise only alert.
    pub block: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    pub version: u32,
    /// The filter instance (as in batch ids).
    pub instance: String,
    #[serde(default)]
    pub leases: Vec<LeaseRequest>,
    #[serde(default)]
    pub returns: Vec<LeaseReturn>,
    #[serde(default)]
    pub licenses: Vec<LicenseSeen>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seats: Vec<SeatRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientsSeen>,
}

/// The collector's answer to one lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrant {
    pub lease_id: String,
    /// Units the filter may admit under this lease; 0: the quota is exhausted for the period.
    pub granted: u64,
    /// The period the lease counts in, `[start, end)`, Unix milliseconds.
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    /// The lease is not used after this time (nor after the period's end).
    pub expires_ms: u64,
    /// Units of the quota handed out for the period, this grant included.
    pub allocated: u64,
}

/// Why requests of a license or account must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialCode {
    LicenseRevoked,
    AccountSuspended,
    SpendCapReached,
    /// Used from more distinct clients than the plan allows within its window.
    LicenseSharingDetected,
}

impl DenialCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DenialCode::LicenseRevoked => "license_revoked",
            DenialCode::AccountSuspended => "account_suspended",
            DenialCode::SpendCapReached => "spend_cap_reached",
            DenialCode::LicenseSharingDetected => "license_sharing_detected",
        }
    }
}

/// Refuse requests of `license` (of `account`) with `code`, until `until_ms` if set (a spend
/// cap lifts at the period's end), else until the collector says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Denial {
    pub account: String,
    pub license: String,
    pub code: DenialCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncResponse {
    pub version: u32,
    pub grants: Vec<LeaseGrant>,
    /// Ids of the returned leases now closed (including ones closed before: a retry).
    pub closed: Vec<String>,
    /// For the licenses named in the request: the ones to refuse.
    pub denials: Vec<Denial>,
    /// One answer per seat request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seats: Vec<SeatAnswer>,
}

impl SyncRequest {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parse and check a body.
    pub fn decode(body: &[u8]) -> Result<SyncRequest, WireError> {
        if body.len() > MAX_BATCH_BYTES {
            return Err(WireError::TooLarge { bytes: body.len() });
        }
        let request: SyncRequest =
            serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if request.version != VERSION {
            return Err(WireError::Version(request.version));
        }
        request.validate()?;
        Ok(request)
    }

    fn validate(&self) -> Result<(), WireError> {
        check_id("instance", &self.instance, false)?;
        for (what, n) in [
            ("leases", self.leases.len()),
            ("returns", self.returns.len()),
            ("licenses", self.licenses.len()),
            ("seats", self.seats.len()),
            (
                "clients",
                self.clients.iter().map(|c| c.clients.len().max(1)).sum(),
            ),
        ] {
            if n > MAX_SYNC_ITEMS {
                return Err(WireError::Invalid(format!(
                    "{n} {what}; at most {MAX_SYNC_ITEMS}"
                )));
            }
        }
        for (i, lease) in self.leases.iter().enumerate() {
            let at = |e| within(&format!("lease {i}"), e);
            check_id("lease_id", &lease.lease_id, false).map_err(at)?;
            check_id("account", &lease.account, false).map_err(at)?;
            check_id("license", &lease.license, false).map_err(at)?;
            check_id("plan", &lease.plan, false).map_err(at)?;
        }
        for (i, r) in self.returns.iter().enumerate() {
            check_id("lease_id", &r.lease_id, false)
                .map_err(|e| within(&format!("return {i}"), e))?;
        }
        for (i, l) in self.licenses.iter().enumerate() {
            let at = |e| within(&format!("license {i}"), e);
            check_id("account", &l.account, false).map_err(at)?;
            check_id("license", &l.license, false).map_err(at)?;
            check_id("plan", &l.plan, false).map_err(at)?;
        }
        for (i, seat) in self.seats.iter().enumerate() {
            let at = |e| within(&format!("seat {i}"), e);
            check_id("account", &seat.account, false).map_err(at)?;
            check_id("license", &seat.license, false).map_err(at)?;
            check_id("user", &seat.user, false).map_err(at)?;
            let sane = match seat.rule {
                SeatRule::Named { limit, .. } => limit > 0,
                SeatRule::Floating { limit, window_ms } => limit > 0 && window_ms > 0,
            };
            if !sane {
                return Err(at(WireError::Invalid(
                    "seat limit and window must be above 0".into(),
                )));
            }
        }
        for (i, seen) in self.clients.iter().enumerate() {
            let at = |e| within(&format!("clients {i}"), e);
            check_id("account", &seen.account, false).map_err(at)?;
            check_id("license", &seen.license, false).map_err(at)?;
            for client in &seen.clients {
                check_id("client", client, false).map_err(at)?;
            }
            if seen.window_ms == 0 {
                return Err(at(WireError::Invalid("window_ms must be above 0".into())));
            }
        }
        Ok(())
    }
}

/// `e`, said of the item `what`.
fn within(what: &str, e: WireError) -> WireError {
    match e {
        WireError::Invalid(message) => WireError::Invalid(format!("{what}: {message}")),
        other => other,
    }
}

impl SyncResponse {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(body: &[u8]) -> Result<SyncResponse, WireError> {
        let response: SyncResponse =
            serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
        if response.version != VERSION {
            return Err(WireError::Version(response.version));
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn golden(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("golden")
            .join(name);
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn golden_request() -> SyncRequest {
        SyncRequest {
            version: 1,
            instance: "node-a/5f1c2e9a7b3d4c60".into(),
            leases: vec![LeaseRequest {
                lease_id: "node-a/5f1c2e9a7b3d4c60/17".into(),
                account: "acme".into(),
                license: "lic-1".into(),
                plan: "pro".into(),
                meter: Meter::Calls,
                period: Period::Day,
                limit: 100_000,
                want: 1000,
            }],
            returns: vec![LeaseReturn {
                lease_id: "node-a/5f1c2e9a7b3d4c60/12".into(),
                used: 998,
            }],
            licenses: vec![LicenseSeen {
                account: "acme".into(),
                license: "lic-1".into(),
                plan: "pro".into(),
            }],
            seats: vec![SeatRequest {
                account: "acme".into(),
                license: "lic-1".into(),
                user: "k2026.5c0e7a31d94b2f68a1c3e5079b8d4f26".into(),
                rule: SeatRule::Floating {
                    limit: 5,
                    window_ms: 900_000,
                },
            }],
            clients: vec![ClientsSeen {
                account: "acme".into(),
                license: "lic-1".into(),
                clients: vec!["k2026.0b7d1f9e2c4a6385d7e9f1a3c5b70e42".into()],
                max_clients: 3,
                window_ms: 3_600_000,
                block: true,
            }],
        }
    }

    #[test]
    fn sync_request_v1_matches_its_golden_file() {
        let text = golden("sync_request_v1.json.golden");
        assert_eq!(
            serde_json::to_string_pretty(&golden_request())
                .unwrap()
                .trim(),
            text.trim(),
            "the wire format changed: update the golden file on purpose"
        );
        assert_eq!(
            SyncRequest::decode(text.as_bytes()).unwrap(),
            golden_request()
        );
    }

    #[test]
    fn sync_response_v1_matches_its_golden_file() {
        let response = SyncResponse {
            version: 1,
            grants: vec![LeaseGrant {
                lease_id: "node-a/5f1c2e9a7b3d4c60/17".into(),
                granted: 1000,
                period_start_ms: 1_780_272_000_000,
                period_end_ms: 1_780_358_400_000,
                expires_ms: 1_780_308_030_000,
                allocated: 42_000,
            }],
            closed: vec!["node-a/5f1c2e9a7b3d4c60/12".into()],
            denials: vec![Denial {
                account: "acme".into(),
                license: "lic-1".into(),
                code: DenialCode::SpendCapReached,
                message: "account acme spent 100.00 EUR of its 100.00 EUR budget this month".into(),
                until_ms: Some(1_782_864_000_000),
            }],
            seats: vec![SeatAnswer {
                license: "lic-1".into(),
                user: "k2026.5c0e7a31d94b2f68a1c3e5079b8d4f26".into(),
                granted: true,
                until_ms: 1_780_308_030_000,
                in_use: 3,
                limit: 5,
            }],
        };
        let text = golden("sync_response_v1.json.golden");
        assert_eq!(
            serde_json::to_string_pretty(&response).unwrap().trim(),
            text.trim(),
            "the wire format changed: update the golden file on purpose"
        );
        assert_eq!(SyncResponse::decode(text.as_bytes()).unwrap(), response);
    }

    #[test]
    fn invalid_sync_requests_are_refused_with_a_reason() {
        let mut r = golden_request();
        r.leases[0].lease_id.clear();
        let e = SyncRequest::decode(&r.encode()).unwrap_err().to_string();
        assert!(e.contains("lease 0: lease_id is empty"), "{e}");
        let mut r = golden_request();
        r.licenses[0].plan = "x\u{7}".into();
        let e = SyncRequest::decode(&r.encode()).unwrap_err().to_string();
        assert!(
            e.contains("license 0: plan contains control characters"),
            "{e}"
        );
        let mut r = golden_request();
        r.version = 2;
        assert_eq!(
            SyncRequest::decode(&r.encode()).unwrap_err(),
            WireError::Version(2)
        );
        assert!(SyncRequest::decode(br#"{"version":1,"instance":"a","bogus":1}"#).is_err());
        // Lists may be left out.
        assert!(SyncRequest::decode(br#"{"version":1,"instance":"a"}"#).is_ok());
    }
}
