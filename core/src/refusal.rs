//! Refusals as values: a stable code, the HTTP status, a message, and when to retry.

use crate::config::RateQuota;

/// The stable refusal codes: the `error` of every refusal body. Never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Code {
    MissingToken,
    InvalidToken,
    TokenExpired,
    TokenNotYetValid,
    InvalidIssuer,
    InvalidAudience,
    InvalidLicense,
    UnknownPlan,
    FeatureNotLicensed,
    RouteNotLicensed,
    RateLimited,
    /// The usage buffer is full and the collector has not acknowledged it yet, under
    /// `collector.on_buffer_full: fail_closed`: every request is metered (public routes and
    /// refusals too), so every request is refused until acknowledgements make room.
    MeteringUnavailable,
    /// A period quota of the license is used up until the period ends.
    QuotaExhausted,
    /// No quota lease could be had from the collector in time (`without_collector: deny`).
    QuotaUnavailable,
    /// The collector revoked the license.
    LicenseRevoked,
    /// The collector suspended the account.
    AccountSuspended,
    /// The account's spend this period reached its budget.
    SpendCapReached,
    /// Keys come from `token.jwks_source` and none has been fetched yet (just after Envoy
    /// started, or the endpoint has never answered).
    KeysUnavailable,
    /// The license has seats and the request names no user (no user claim, or no user
    /// header from the authentication layer in front).
    MissingUser,
    /// Every seat of the license is taken; users holding one keep working.
    SeatLimitReached,
    /// No seat could be checked with the collector in time (`quota.without_collector: deny`).
    SeatUnavailable,
    /// The license was used from more distinct clients than its plan allows.
    LicenseSharingDetected,
    /// A route serves the path, but not with the request's method (`unmatched_routes: deny`);
    /// the answer lists the methods it takes in `Allow`.
    MethodNotAllowed,
}

impl Code {
    /// Every code, in a fixed order (used to define one counter each). New codes go at the
    /// end, so that existing positions never move.
    pub const ALL: [Code; 23] = [
        Code::MissingToken,
        Code::InvalidToken,
        Code::TokenExpired,
        Code::TokenNotYetValid,
        Code::InvalidIssuer,
        Code::InvalidAudience,
        Code::InvalidLicense,
        Code::UnknownPlan,
        Code::FeatureNotLicensed,
        Code::RouteNotLicensed,
        Code::RateLimited,
        Code::MeteringUnavailable,
        Code::QuotaExhausted,
        Code::QuotaUnavailable,
        Code::LicenseRevoked,
        Code::AccountSuspended,
        Code::SpendCapReached,
        Code::KeysUnavailable,
        Code::MissingUser,
        Code::SeatLimitReached,
        Code::SeatUnavailable,
        Code::LicenseSharingDetected,
        Code::MethodNotAllowed,
    ];

    /// The code as it appears in bodies, stats and usage records.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::MissingToken => "missing_token",
            Code::InvalidToken => "invalid_token",
            Code::TokenExpired => "token_expired",
            Code::TokenNotYetValid => "token_not_yet_valid",
            Code::InvalidIssuer => "invalid_issuer",
            Code::InvalidAudience => "invalid_audience",
            Code::InvalidLicense => "invalid_license",
            Code::UnknownPlan => "unknown_plan",
            Code::FeatureNotLicensed => "feature_not_licensed",
            Code::RouteNotLicensed => "route_not_licensed",
            Code::RateLimited => "rate_limited",
            Code::MeteringUnavailable => "metering_unavailable",
            Code::QuotaExhausted => "quota_exhausted",
            Code::QuotaUnavailable => "quota_unavailable",
            Code::LicenseRevoked => "license_revoked",
            Code::AccountSuspended => "account_suspended",
            Code::SpendCapReached => "spend_cap_reached",
            Code::KeysUnavailable => "keys_unavailable",
            Code::MissingUser => "missing_user",
            Code::SeatLimitReached => "seat_limit_reached",
            Code::SeatUnavailable => "seat_unavailable",
            Code::LicenseSharingDetected => "license_sharing_detected",
            Code::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// What the code means, in words for the people whose requests it refused (the
    /// dashboard shows it beside the code; the refusal table of docs/filter.md says it in
    /// full).
    pub fn meaning(self) -> &'static str {
        match self {
            Code::MissingToken => "the request carried no license token",
            Code::InvalidToken => {
                "the token is not a valid license token (malformed, unknown key or bad signature)"
            }
            Code::TokenExpired => "the license token has expired",
            Code::TokenNotYetValid => "the license token is not valid yet",
            Code::InvalidIssuer => "the token was not issued by an accepted issuer",
            Code::InvalidAudience => "the token is not meant for this API",
            Code::InvalidLicense => {
                "the token is signed but its license claims are missing or malformed"
            }
            Code::UnknownPlan => "the license names a plan this API does not offer",
            Code::FeatureNotLicensed => "the license does not include this feature",
            Code::RouteNotLicensed => "no licensed route matches the request",
            Code::RateLimited => "too many requests: a rate limit of the license was exceeded",
            Code::MeteringUnavailable => "usage could not be recorded, so the request was refused",
            Code::QuotaExhausted => {
                "a period quota of the license is used up until the period ends"
            }
            Code::QuotaUnavailable => "the quota could not be checked in time",
            Code::LicenseRevoked => "the license was revoked",
            Code::AccountSuspended => "the account is suspended",
            Code::SpendCapReached => "the account's spend this period reached its budget",
            Code::KeysUnavailable => "the keys to check tokens were not available yet",
            Code::MissingUser => "the license counts seats and the request named no user",
            Code::SeatLimitReached => "every seat of the license is taken",
            Code::SeatUnavailable => "no seat could be checked in time",
            Code::LicenseSharingDetected => {
                "the license was used from more clients than its plan allows"
            }
            Code::MethodNotAllowed => {
                "the path is served for other methods (the Allow header lists them)"
            }
        }
    }

    /// The code named `name`, as in bodies and usage records.
    pub fn named(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Position in [`Code::ALL`].
    pub fn index(self) -> usize {
        Code::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }

    /// The HTTP status of a refusal with this code.
    pub fn status(self) -> u16 {
        match self {
            Code::MissingToken
            | Code::InvalidToken
            | Code::TokenExpired
            | Code::TokenNotYetValid
            | Code::InvalidIssuer
            | Code::InvalidAudience
            | Code::InvalidLicense => 401,
            Code::UnknownPlan
            | Code::FeatureNotLicensed
            | Code::RouteNotLicensed
            | Code::LicenseRevoked
            | Code::AccountSuspended
            | Code::MissingUser
            | Code::SeatLimitReached
            | Code::LicenseSharingDetected => 403,
            Code::RateLimited | Code::QuotaExhausted => 429,
            Code::SpendCapReached => 402,
            Code::MethodNotAllowed => 405,
            Code::MeteringUnavailable
            | Code::QuotaUnavailable
            | Code::KeysUnavailable
            | Code::SeatUnavailable => 503,
        }
    }
}

/// Which limit refused a request: named in the `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    License,
    Feature,
}

impl LimitScope {
    /// The name of the limit in `RateLimit-Policy` and `RateLimit`.
    pub fn policy_name(self) -> &'static str {
        match self {
            LimitScope::License => "license",
            LimitScope::Feature => "feature",
        }
    }
}

/// Details of a rate-limit refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitDenial {
    pub scope: LimitScope,
    pub quota: RateQuota,
    /// Nanoseconds until the next request would conform.
    pub wait_nanos: u64,
}

impl RateLimitDenial {
    /// Whole seconds to wait, rounded up (`Retry-After` has no fractions), at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        self.wait_nanos.div_ceil(1_000_000_000).max(1)
    }
}

/// Details of a period-quota refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDenial {
    /// `quota_<meter>_<period>`, named in the `RateLimit` headers.
    pub name: String,
    pub limit: u64,
    /// Seconds until the period ends.
    pub retry_after_seconds: u64,
    /// Seconds the period lasts.
    pub window_seconds: u64,
}

/// A refused request: everything needed to answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    pub rate_limit: Option<RateLimitDenial>,
    pub quota: Option<Box<QuotaDenial>>,
    /// A status other than the code's (`quota_exhausted` configured as 402).
    pub status: Option<u16>,
    /// `Retry-After` when it is not a rate or quota limit's (a spend cap: the period's end).
    pub retry_after_seconds: Option<u64>,
    /// `Allow` of a `method_not_allowed` refusal: the methods the path takes, e.g. `GET, POST`.
    pub allow: Option<String>,
}

impl Refusal {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            rate_limit: None,
            quota: None,
            status: None,
            retry_after_seconds: None,
            allow: None,
        }
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or(self.code.status())
    }

    /// The JSON body: `{"error": code, "message": text}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.code.as_str(), "message": self.message }).to_string()
    }

    /// Response headers besides `content-type`.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = vec![("content-type", "application/json".to_string())];
        match self.code {
            // RFC 6750 section 3.1: a request without credentials gets no error code.
            Code::MissingToken => {
                headers.push(("www-authenticate", "Bearer realm=\"tollgate\"".into()));
            }
            code if code.status() == 401 => headers.push((
                "www-authenticate",
                format!(
                    "Bearer realm=\"tollgate\", error=\"invalid_token\", error_description=\"{}\"",
                    code.as_str()
                ),
            )),
            // The buffer drains as soon as the collector answers; a second is a fair guess.
            Code::MeteringUnavailable | Code::QuotaUnavailable | Code::KeysUnavailable => {
                headers.push(("retry-after", "1".into()))
            }
            _ => {}
        }
        if let Some(allow) = &self.allow {
            headers.push(("allow", allow.clone()));
        }
        if let Some(seconds) = self.retry_after_seconds {
            headers.push(("retry-after", seconds.max(1).to_string()));
        }
        if let Some(quota) = &self.quota {
            let retry = quota.retry_after_seconds.max(1);
            headers.push(("retry-after", retry.to_string()));
            headers.push((
                "ratelimit-policy",
                format!(
                    "\"{}\";q={};w={}",
                    quota.name, quota.limit, quota.window_seconds
                ),
            ));
            headers.push(("ratelimit", format!("\"{}\";r=0;t={retry}", quota.name)));
        }
        if let Some(limit) = &self.rate_limit {
            let retry = limit.retry_after_seconds();
            let name = limit.scope.policy_name();
            headers.push(("retry-after", retry.to_string()));
            // draft-ietf-httpapi-ratelimit-headers (structured fields): q = quota units,
            // w = window seconds, r = remaining, t = seconds until units are available.
            headers.push((
                "ratelimit-policy",
                format!(
                    "\"{name}\";q={};w={}",
                    limit.quota.burst,
                    limit.quota.window_seconds()
                ),
            ));
            headers.push(("ratelimit", format!("\"{name}\";r=0;t={retry}")));
        }
        headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_listed_once_with_their_status() {
        for (i, code) in Code::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
            assert!(matches!(code.status(), 401 | 402 | 403 | 405 | 429 | 503));
            assert!(!code.meaning().is_empty());
            assert_eq!(Code::named(code.as_str()), Some(*code));
        }
    }

    #[test]
    fn the_docs_refusal_table_lists_every_code() {
        let doc = include_str!("../../docs/filter.md");
        for code in Code::ALL {
            assert!(
                doc.contains(&format!("| `{}` |", code.as_str())),
                "the refusal table of docs/filter.md lacks {}",
                code.as_str()
            );
        }
    }

    #[test]
    fn new_codes_come_after_the_existing_ones() {
        // Positions are part of the stats layout: appending keeps every older code's.
        assert_eq!(Code::ALL[0], Code::MissingToken);
        assert_eq!(Code::LicenseSharingDetected.index(), 21);
        assert_eq!(Code::MethodNotAllowed.index(), 22);
    }

    #[test]
    fn method_not_allowed_is_405_with_allow() {
        let refusal = Refusal {
            allow: Some("GET, POST".into()),
            ..Refusal::new(Code::MethodNotAllowed, "use GET or POST")
        };
        assert_eq!(refusal.status(), 405);
        assert_eq!(refusal.code.as_str(), "method_not_allowed");
        let headers = refusal.headers();
        assert!(headers
            .iter()
            .any(|(k, v)| *k == "allow" && v == "GET, POST"));
        assert!(!headers.iter().any(|(k, _)| *k == "www-authenticate"));
    }

    #[test]
    fn rate_limit_refusal_has_retry_after_and_ratelimit_headers() {
        let refusal = Refusal {
            code: Code::RateLimited,
            message: "slow down".into(),
            rate_limit: Some(RateLimitDenial {
                scope: LimitScope::License,
                quota: RateQuota {
                    period_nanos: 100_000_000,
                    burst: 20,
                },
                wait_nanos: 1_200_000_000,
            }),
            ..Refusal::new(Code::RateLimited, "")
        };
        let headers = refusal.headers();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("retry-after"), Some("2"));
        assert_eq!(get("ratelimit-policy"), Some("\"license\";q=20;w=2"));
        assert_eq!(get("ratelimit"), Some("\"license\";r=0;t=2"));
        assert_eq!(refusal.status(), 429);
        let body: serde_json::Value = serde_json::from_str(&refusal.body()).unwrap();
        assert_eq!(body["error"], "rate_limited");
    }

    #[test]
    fn metering_unavailable_is_503_with_retry_after() {
        let refusal = Refusal::new(Code::MeteringUnavailable, "later");
        assert_eq!(refusal.status(), 503);
        let headers = refusal.headers();
        assert!(headers.iter().any(|(k, v)| *k == "retry-after" && v == "1"));
        assert!(!headers.iter().any(|(k, _)| *k == "www-authenticate"));
    }

    #[test]
    fn invalid_token_names_the_error_but_missing_token_does_not() {
        let invalid = Refusal::new(Code::TokenExpired, "expired").headers();
        assert!(invalid
            .iter()
            .any(|(k, v)| *k == "www-authenticate" && v.contains("invalid_token")));
        let missing = Refusal::new(Code::MissingToken, "none").headers();
        assert!(missing
            .iter()
            .any(|(k, v)| *k == "www-authenticate" && !v.contains("error=")));
    }

    #[test]
    fn quota_refusals_name_the_quota_and_the_reset() {
        let refusal = Refusal {
            quota: Some(Box::new(QuotaDenial {
                name: "quota_calls_day".into(),
                limit: 1000,
                retry_after_seconds: 3600,
                window_seconds: 86_400,
            })),
            status: Some(402),
            ..Refusal::new(Code::QuotaExhausted, "used up")
        };
        assert_eq!(refusal.status(), 402);
        let headers = refusal.headers();
        let get = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("retry-after"), Some("3600"));
        assert_eq!(
            get("ratelimit-policy"),
            Some("\"quota_calls_day\";q=1000;w=86400")
        );
        assert_eq!(get("ratelimit"), Some("\"quota_calls_day\";r=0;t=3600"));
        assert_eq!(Refusal::new(Code::SpendCapReached, "").status(), 402);
        assert_eq!(Refusal::new(Code::LicenseRevoked, "").status(), 403);
    }
}
