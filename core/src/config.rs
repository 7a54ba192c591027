//! The plugin configuration: the JSON an operator writes (`FilterConfig`), checked once and
//! compiled into an immutable [`Policy`] that every request reads.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use tollgate_wire::sync::{Period, SeatRule};
use tollgate_wire::Meter;

use crate::pseudonym::Pseudonymizer;
use crate::routes::{Methods, PathMatch, Route, RouteTable, RouteTarget, HTTP_METHODS};
use crate::shipper::{Overflow, ShipperConfig};
use crate::token::{Jwks, KeySet};

/// Index of a feature in [`Policy::features`]; features are named by routes.
pub type FeatureId = u16;

/// A configuration problem: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `plans.gold.rate_limit.burst`.
    pub field: String,
    /// What is wrong, for a human.
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "." {
            write!(f, "invalid configuration: {}", self.problem)
        } else {
            write!(
                f,
                "invalid configuration at `{}`: {}",
                self.field, self.problem
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// A configuration that is valid but probably not what was meant (a route that can never
/// match): accepted, and logged once when the configuration is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// Dotted path of the field the warning is about, e.g. `routes[2]`.
    pub field: String,
    /// What is odd about it, for a human.
    pub problem: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "configuration warning at `{}`: {}",
            self.field, self.problem
        )
    }
}

/// The plugin configuration as written (the `configuration` of Envoy's wasm plugin).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    pub token: TokenConfig,
    pub plans: BTreeMap<String, LimitsConfig>,
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub unmatched_routes: UnmatchedRoutes,
    #[serde(default)]
    pub upstream_headers: UpstreamHeadersConfig,
    /// How often per-worker counters are folded into Envoy stats.
    #[serde(default = "default_stats_flush_interval_ms")]
    pub stats_flush_interval_ms: u64,
    /// Where metered usage is shipped; absent: usage reaches only Envoy stats.
    #[serde(default)]
    pub collector: Option<CollectorConfig>,
    /// How period quotas are enforced (leases from the collector).
    #[serde(default)]
    pub quota: QuotaSettingsConfig,
    /// The key end users and client addresses are pseudonymised with (HMAC) before they leave
    /// the filter; needed by `users` and by a plan's `sharing`.
    #[serde(default)]
    pub pseudonyms: Option<PseudonymsConfig>,
    /// Who the end user of a request is: a claim of the license token, or a request header
    /// set by an authentication layer in front. Usage is then metered per user, and seats can
    /// be counted.
    #[serde(default)]
    pub users: Option<UsersConfig>,
    /// Allowed responses carry `RateLimit-Policy`/`RateLimit` items for the license's rate
    /// limits too (quota items are always sent). Default true.
    #[serde(default = "default_true")]
    pub rate_limit_headers: bool,
    /// Requests of a rate limit a worker takes from the shared bucket at once and then admits
    /// with no shared-data call: at most `min(this, burst / 8)` (1: every request reads and
    /// writes the shared bucket). A limit may then admit up to `workers x (lease - 1)` more
    /// than its burst and rate allow.
    #[serde(default = "default_rate_limit_lease")]
    pub rate_limit_lease: u32,
    /// A dynamic-metadata namespace the native module writes the license context into
    /// (`account`, `license`, `plan`, `feature`): for access logs, later filters and the route's
    /// header formatters, with no header written. The proxy-wasm filter cannot write dynamic
    /// metadata and refuses a configuration that asks for it.
    #[serde(default)]
    pub license_metadata: Option<String>,
}

fn default_rate_limit_lease() -> u32 {
    16
}

/// The largest `rate_limit_lease`.
const MAX_RATE_LIMIT_LEASE: u32 = 1_000;

fn default_true() -> bool {
    true
}

/// The pseudonymisation key. Rotating it (a new `key_id` and `secret`) gives every user a new
/// pseudonym from then on: rotate at the start of a billing period.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudonymsConfig {
    pub key_id: String,
    /// At least 32 bytes.
    pub secret: String,
}

/// Where the end user's identifier is read: exactly one of `claim` and `header`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    #[serde(default)]
    pub claim: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
}

/// Where the end user's identifier comes from, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSource {
    /// A claim of the license token (a string or a number), read when the token is verified.
    Claim(String),
    /// A request header (lower case), set by a trusted layer in front of Envoy.
    Header(String),
}

/// How period quotas are enforced: leases of the quota from the collector, shared by the
/// workers of one Envoy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettingsConfig {
    /// A lease asks for this share of the limit (at least 1 unit). Default 0.05.
    #[serde(default = "default_lease_fraction")]
    pub lease_fraction: f64,
    /// Units reserved at the start of a request for meters known only at its end; the real
    /// amount is committed when the request ends. Defaults: response_bytes 65536,
    /// request_bytes 65536, processing_ns 1e9 (1 s); calls are always 1.
    #[serde(default)]
    pub reserve: BTreeMap<Meter, u64>,
    /// Status of a `quota_exhausted` refusal: 429 (default) or 402.
    #[serde(default = "default_quota_status")]
    pub exhausted_status: u16,
    /// When no lease can be had (collector unreachable): `deny` (default, 503
    /// `quota_unavailable`) or `allow` up to `allowance` units per quota and Envoy until a lease is granted again.
    #[serde(default)]
    pub without_collector: WithoutCollector,
    /// Units per quota an Envoy admits without a lease under `without_collector: allow`.
    #[serde(default)]
    pub allowance: u64,
    /// How long a request waits for a lease before `without_collector` applies. Default 2000.
    #[serde(default = "default_lease_wait_ms")]
    pub lease_wait_ms: u64,
}

impl Default for QuotaSettingsConfig {
    fn default() -> Self {
        QuotaSettingsConfig {
            lease_fraction: default_lease_fraction(),
            reserve: BTreeMap::new(),
            exhausted_status: default_quota_status(),
            without_collector: WithoutCollector::default(),
            allowance: 0,
            lease_wait_ms: default_lease_wait_ms(),
        }
    }
}

/// What happens to a request whose quota has no lease and cannot get one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithoutCollector {
    #[default]
    Deny,
    Allow,
}

fn default_lease_fraction() -> f64 {
    0.05
}
fn default_quota_status() -> u16 {
    429
}
fn default_lease_wait_ms() -> u64 {
    2000
}

/// Quota settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaSettings {
    pub lease_fraction: f64,
    /// Reservation per meter (calls: 1).
    pub reserve: BTreeMap<Meter, u64>,
    pub exhausted_status: u16,
    pub without_collector: WithoutCollector,
    pub allowance: u64,
    pub lease_wait_ms: u64,
}

impl QuotaSettings {
    fn compile(c: QuotaSettingsConfig) -> Result<QuotaSettings, ConfigError> {
        if !(c.lease_fraction > 0.0 && c.lease_fraction <= 1.0) {
            return Err(ConfigError::new(
                "quota.lease_fraction",
                "must be more than 0 and at most 1",
            ));
        }
        if c.exhausted_status != 429 && c.exhausted_status != 402 {
            return Err(ConfigError::new(
                "quota.exhausted_status",
                "must be 429 or 402",
            ));
        }
        if !(1..=60_000).contains(&c.lease_wait_ms) {
            return Err(ConfigError::new(
                "quota.lease_wait_ms",
                "must be between 1 and 60000",
            ));
        }
        if c.reserve.contains_key(&Meter::Calls) {
            return Err(ConfigError::new(
                "quota.reserve.calls",
                "a call is always reserved as 1",
            ));
        }
        let mut reserve = BTreeMap::from([
            (Meter::Calls, 1),
            (Meter::RequestBytes, 65_536),
            (Meter::ResponseBytes, 65_536),
            (Meter::ProcessingNs, 1_000_000_000),
        ]);
        reserve.extend(c.reserve);
        Ok(QuotaSettings {
            lease_fraction: c.lease_fraction,
            reserve,
            exhausted_status: c.exhausted_status,
            without_collector: c.without_collector,
            allowance: c.allowance,
            lease_wait_ms: c.lease_wait_ms,
        })
    }

    /// Units a lease asks for under `limit`.
    pub fn lease_want(&self, limit: u64) -> u64 {
        let want = (limit as f64 * self.lease_fraction).ceil();
        if want.is_finite() && want >= 1.0 {
            (want as u64).min(limit)
        } else {
            1
        }
    }
}

/// The usage collector: batches of usage records are `POST`ed to it through an Envoy cluster,
/// signed with HMAC-SHA256, and kept (and retried) until it acknowledges them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// The Envoy cluster that reaches the collector. Default `"tollgate_collector"`.
    #[serde(default = "default_collector_cluster")]
    pub cluster: String,
    /// The `:authority` of the requests to the collector. Default `"tollgate-collector"`.
    #[serde(default = "default_collector_authority")]
    pub authority: String,
    /// The request path. Default `"/v1/usage"`.
    #[serde(default = "default_collector_path")]
    pub path: String,
    /// The path of the sync (quota leases, denials). Default `"/v1/sync"`.
    #[serde(default = "default_sync_path")]
    pub sync_path: String,
    /// Names this filter instance in batch ids; must be unique per Envoy. 1-128 characters of
    /// `A-Za-z0-9._:-/`. Default: Envoy's node id plus a random suffix per VM (see
    /// [`crate::shipper::default_instance`]), which is what a configuration shared by many
    /// proxies (Istio's `WasmPlugin`) needs.
    #[serde(default)]
    pub instance: Option<String>,
    /// Names the secret in `x-tollgate-key-id`. Required: 1-128 printable ASCII characters.
    pub key_id: String,
    /// The HMAC-SHA256 secret batches are signed with. Required: at least 16 bytes.
    pub secret: String,
    /// Seal and send the usage at least this often. Default 1000 (1 to 3,600,000).
    #[serde(default = "default_collector_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// The most records in one batch; more usage is split over several batches.
    /// Default 2000 (1 to 3000, so a batch stays under the collector's 4 MiB limit).
    #[serde(default = "default_max_batch_records")]
    pub max_batch_records: usize,
    /// Records kept while unacknowledged, all batches together; when reached,
    /// `on_buffer_full` applies. Default 200000 (1 to 10,000,000).
    #[serde(default = "default_max_buffered_records")]
    pub max_buffered_records: usize,
    /// How long a call to the collector may take. Default 5000 (1 to 3,600,000).
    #[serde(default = "default_collector_timeout_ms")]
    pub timeout_ms: u64,
    /// First retry delay after a failed send; doubles on each failure (with jitter).
    /// Default 200 (at least 1).
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// The longest retry delay. Default 30000 (at least `retry_initial_ms`, at most 3,600,000).
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// What happens when the buffer is full. Default `fail_closed`.
    #[serde(default)]
    pub on_buffer_full: OnBufferFull,
}

/// What happens to requests when the usage buffer is full.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBufferFull {
    /// Refuse every request with 503 `metering_unavailable` until acknowledgements make room;
    /// the usage of requests already served is kept.
    #[default]
    FailClosed,
    /// Keep serving; usage that does not fit is dropped, counted in
    /// `tollgate.usage_dropped_calls` and logged.
    FailOpen,
}

fn default_collector_cluster() -> String {
    "tollgate_collector".into()
}
fn default_collector_authority() -> String {
    "tollgate-collector".into()
}
fn default_collector_path() -> String {
    "/v1/usage".into()
}
fn default_sync_path() -> String {
    "/v1/sync".into()
}
fn default_collector_flush_interval_ms() -> u64 {
    1000
}
fn default_max_batch_records() -> usize {
    2000
}
fn default_max_buffered_records() -> usize {
    200_000
}
fn default_collector_timeout_ms() -> u64 {
    5000
}
fn default_retry_initial_ms() -> u64 {
    200
}
fn default_retry_max_ms() -> u64 {
    30_000
}

/// The most records per batch: 3000 records with 256-byte identifiers stay under 4 MiB.
pub const MAX_BATCH_RECORDS: usize = 3000;
const MAX_BUFFERED_RECORDS: usize = 10_000_000;

/// The collector settings, checked.
#[derive(Debug, Clone)]
pub struct CollectorPolicy {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub sync_path: String,
    /// `None`: derived from the node id when the VM starts.
    pub instance: Option<String>,
    pub key_id: String,
    pub secret: Vec<u8>,
    pub timeout_ms: u64,
    pub shipper: ShipperConfig,
}

impl CollectorPolicy {
    fn compile(c: CollectorConfig) -> Result<CollectorPolicy, ConfigError> {
        let at = |field: &str| format!("collector.{field}");
        if c.cluster.is_empty() || c.cluster.chars().any(char::is_control) {
            return Err(ConfigError::new(
                at("cluster"),
                "must be a non-empty Envoy cluster name",
            ));
        }
        if c.authority.is_empty() || !c.authority.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                at("authority"),
                "must be a non-empty host name (printable ASCII, no spaces)",
            ));
        }
        if !c.sync_path.starts_with('/') || !c.sync_path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                at("sync_path"),
                "must start with `/` and be printable ASCII without spaces",
            ));
        }
        if !c.path.starts_with('/') || !c.path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                at("path"),
                "must start with `/` and be printable ASCII without spaces",
            ));
        }
        let instance_byte =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-' | b'/');
        if c.instance.as_ref().is_some_and(|instance| {
            instance.is_empty() || instance.len() > 128 || !instance.bytes().all(instance_byte)
        }) {
            return Err(ConfigError::new(
                at("instance"),
                "must be 1-128 characters of A-Z, a-z, 0-9, `.`, `_`, `:`, `-`, `/`",
            ));
        }
        if c.key_id.is_empty()
            || c.key_id.len() > 128
            || !c.key_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::new(
                at("key_id"),
                "must be 1-128 printable ASCII characters without spaces",
            ));
        }
        if c.secret.len() < 16 {
            return Err(ConfigError::new(at("secret"), "must be at least 16 bytes"));
        }
        let in_range = |field: &str, value: u64, low: u64, high: u64| {
            if (low..=high).contains(&value) {
                Ok(value)
            } else {
                Err(ConfigError::new(
                    at(field),
                    format!("must be between {low} and {high}"),
                ))
            }
        };
        let hour = MAX_STATS_FLUSH_INTERVAL_MS;
        let flush_interval_ms = in_range("flush_interval_ms", c.flush_interval_ms, 1, hour)?;
        let timeout_ms = in_range("timeout_ms", c.timeout_ms, 1, hour)?;
        let retry_initial_ms = in_range("retry_initial_ms", c.retry_initial_ms, 1, hour)?;
        let retry_max_ms = in_range("retry_max_ms", c.retry_max_ms, retry_initial_ms, hour)?;
        if !(1..=MAX_BATCH_RECORDS).contains(&c.max_batch_records) {
            return Err(ConfigError::new(
                at("max_batch_records"),
                format!("must be between 1 and {MAX_BATCH_RECORDS}"),
            ));
        }
        if !(1..=MAX_BUFFERED_RECORDS).contains(&c.max_buffered_records) {
            return Err(ConfigError::new(
                at("max_buffered_records"),
                format!("must be between 1 and {MAX_BUFFERED_RECORDS}"),
            ));
        }
        Ok(CollectorPolicy {
            cluster: c.cluster,
            authority: c.authority,
            path: c.path,
            sync_path: c.sync_path,
            instance: c.instance,
            key_id: c.key_id,
            secret: c.secret.into_bytes(),
            timeout_ms,
            shipper: ShipperConfig {
                flush_interval_ms,
                max_batch_records: c.max_batch_records,
                max_buffered_records: c.max_buffered_records,
                retry_initial_ms,
                retry_max_ms,
                overflow: match c.on_buffer_full {
                    OnBufferFull::FailClosed => Overflow::FailClosed,
                    OnBufferFull::FailOpen => Overflow::FailOpen,
                },
            },
        })
    }
}

/// The host takes the tick period as 32-bit milliseconds; an hour is plenty.
const MAX_STATS_FLUSH_INTERVAL_MS: u64 = 3_600_000;

fn default_stats_flush_interval_ms() -> u64 {
    1000
}

/// Where the license token is and how it is checked.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    #[serde(default = "default_token_header")]
    pub header: String,
    #[serde(default = "default_token_prefix")]
    pub prefix: String,
    /// Accepted `iss` values; empty: `iss` is not checked.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Accepted `aud` values (one must match); empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default = "default_leeway_seconds")]
    pub leeway_seconds: u64,
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Keys in the configuration; needed unless `jwks_source` is given (both: either verifies).
    #[serde(default)]
    pub jwks: Option<Jwks>,
    /// Keys fetched from a JWKS endpoint through an Envoy cluster.
    #[serde(default)]
    pub jwks_source: Option<JwksSourceConfig>,
    /// Remove the token header from licensed requests before they go upstream, so the
    /// upstream never sees (and cannot replay) the license. Default true.
    #[serde(default = "default_true")]
    pub strip_from_upstream: bool,
}

/// Where to fetch the JWKS: an Envoy cluster and a path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksSourceConfig {
    pub cluster: String,
    #[serde(default = "default_jwks_path")]
    pub path: String,
    /// `:authority` of the fetch; default: the cluster name.
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default = "default_jwks_refresh_seconds")]
    pub refresh_seconds: u64,
    #[serde(default = "default_jwks_min_refetch_seconds")]
    pub min_refetch_seconds: u64,
    #[serde(default = "default_jwks_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_jwks_path() -> String {
    "/.well-known/jwks.json".into()
}
fn default_jwks_refresh_seconds() -> u64 {
    300
}
fn default_jwks_min_refetch_seconds() -> u64 {
    10
}
fn default_jwks_timeout_ms() -> u64 {
    2000
}

/// A checked `token.jwks_source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSource {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    pub refresh_ms: u64,
    pub min_refetch_ms: u64,
    pub timeout_ms: u64,
}

fn default_token_header() -> String {
    "authorization".into()
}
fn default_token_prefix() -> String {
    "Bearer ".into()
}
fn default_leeway_seconds() -> u64 {
    30
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_max_token_bytes() -> usize {
    8192
}

/// Limits of a plan, or a license's overrides of its plan's limits (the `limits` claim).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests per license, all features together.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Requests per license and feature, by feature name.
    #[serde(default)]
    pub feature_rate_limits: BTreeMap<String, RateLimitConfig>,
    /// Period quotas per license, by meter (`calls`, `request_bytes`, `response_bytes`,
    /// `processing_ns`), counted by the collector over calendar periods.
    #[serde(default)]
    pub quotas: BTreeMap<String, QuotaConfig>,
    /// Seats: how many distinct users may use the license (`users` must be configured).
    #[serde(default)]
    pub seats: Option<SeatsConfig>,
    /// Sharing detection: how many distinct client addresses may use one license within a
    /// window. Plans only (a license cannot loosen it).
    #[serde(default)]
    pub sharing: Option<SharingConfig>,
}

/// Named seats (`named`: distinct users per calendar period `per`, default month) or floating
/// seats (`floating`: users active within `window_seconds`, default 900).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeatsConfig {
    #[serde(default)]
    pub named: Option<u32>,
    #[serde(default)]
    pub per: Option<Period>,
    #[serde(default)]
    pub floating: Option<u32>,
    #[serde(default)]
    pub window_seconds: Option<u64>,
}

/// More than `max_clients` distinct client addresses within `window_seconds` (default 3600)
/// is sharing: an alert, and with `block`, 403 `license_sharing_detected` for a window.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharingConfig {
    pub max_clients: u32,
    #[serde(default = "default_sharing_window_seconds")]
    pub window_seconds: u64,
    #[serde(default)]
    pub block: bool,
}

fn default_sharing_window_seconds() -> u64 {
    3_600
}

/// A plan's sharing rule, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharingRule {
    pub max_clients: u32,
    pub window_ms: u64,
    pub block: bool,
}

/// The longest seat or sharing window: 31 days.
const MAX_WINDOW_SECONDS: u64 = 31 * 86_400;

impl SeatsConfig {
    fn compile(&self, field: &str) -> Result<SeatRule, ConfigError> {
        match (self.named, self.floating) {
            (Some(limit), None) => {
                if self.window_seconds.is_some() {
                    return Err(ConfigError::new(
                        format!("{field}.window_seconds"),
                        "named seats count per calendar period: use `per`",
                    ));
                }
                if limit == 0 {
                    return Err(ConfigError::new(
                        format!("{field}.named"),
                        "must be at least 1",
                    ));
                }
                Ok(SeatRule::Named {
                    limit,
                    per: self.per.unwrap_or(Period::Month),
                })
            }
            (None, Some(limit)) => {
                if self.per.is_some() {
                    return Err(ConfigError::new(
                        format!("{field}.per"),
                        "floating seats count over a sliding window: use `window_seconds`",
                    ));
                }
                let window = self.window_seconds.unwrap_or(900);
                if limit == 0 {
                    return Err(ConfigError::new(
                        format!("{field}.floating"),
                        "must be at least 1",
                    ));
                }
                if !(1..=MAX_WINDOW_SECONDS).contains(&window) {
                    return Err(ConfigError::new(
                        format!("{field}.window_seconds"),
                        format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
                    ));
                }
                Ok(SeatRule::Floating {
                    limit,
                    window_ms: window * 1000,
                })
            }
            _ => Err(ConfigError::new(
                field,
                "give exactly one of `named` and `floating`",
            )),
        }
    }
}

impl SharingConfig {
    fn compile(&self, field: &str) -> Result<SharingRule, ConfigError> {
        if self.max_clients == 0 {
            return Err(ConfigError::new(
                format!("{field}.max_clients"),
                "must be at least 1",
            ));
        }
        if !(1..=MAX_WINDOW_SECONDS).contains(&self.window_seconds) {
            return Err(ConfigError::new(
                format!("{field}.window_seconds"),
                format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
            ));
        }
        Ok(SharingRule {
            max_clients: self.max_clients,
            window_ms: self.window_seconds * 1000,
            block: self.block,
        })
    }
}

/// At most `limit` units of a meter per calendar period (`hour`, `day` or `month`, in the
/// collector's time zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    pub per: Period,
    pub limit: u64,
}

/// A GCRA rate: a sustained rate and the burst allowed on top of it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    /// Requests that may arrive at once; defaults to one second's worth (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One route: a path (exact or prefix), optional methods, and the feature it belongs to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub feature: Option<String>,
    /// Served without a license (no token needed, no metering by account).
    #[serde(default)]
    pub public: bool,
}

/// What happens to a request that no route matches.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmatchedRoutes {
    /// Refuse with 403 `route_not_licensed`.
    #[default]
    Deny,
    /// Pass through untouched, like a public route.
    Allow,
}

/// Names of the request headers that carry the license context upstream; `null` turns one off.
/// `combined` names one header carrying all four (a structured-field dictionary, RFC 9651):
/// one header write instead of four, for upstreams that parse it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamHeadersConfig {
    pub account: Option<String>,
    pub license: Option<String>,
    pub plan: Option<String>,
    pub feature: Option<String>,
    pub combined: Option<String>,
}

impl Default for UpstreamHeadersConfig {
    fn default() -> Self {
        UpstreamHeadersConfig {
            account: Some("x-tollgate-account".into()),
            license: Some("x-tollgate-license".into()),
            plan: Some("x-tollgate-plan".into()),
            feature: Some("x-tollgate-feature".into()),
            combined: None,
        }
    }
}

/// A compiled rate: the GCRA emission interval and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateQuota {
    /// Nanoseconds between two requests at the sustained rate.
    pub period_nanos: u64,
    pub burst: u32,
}

impl RateQuota {
    /// Seconds for an empty bucket to refill to the full burst (the `w` of `RateLimit-Policy`).
    pub fn window_seconds(&self) -> u64 {
        let nanos = self.period_nanos.saturating_mul(u64::from(self.burst));
        nanos.div_ceil(1_000_000_000).max(1)
    }

    fn compile(field: &str, rate: &RateLimitConfig) -> Result<RateQuota, ConfigError> {
        let rps = rate.requests_per_second;
        if !rps.is_finite() || rps <= 0.0 || rps > 1e9 {
            return Err(ConfigError::new(
                format!("{field}.requests_per_second"),
                "must be a number above 0 and at most 1e9",
            ));
        }
        let burst = match rate.burst {
            Some(0) => {
                return Err(ConfigError::new(
                    format!("{field}.burst"),
                    "must be at least 1",
                ))
            }
            Some(b) => b,
            // `as` saturates for floats; rps <= 1e9 fits in u32 after ceil anyway.
            None => (rps.ceil() as u32).max(1),
        };
        let period_nanos = (1e9 / rps).round() as u64;
        Ok(RateQuota {
            period_nanos: period_nanos.max(1),
            burst,
        })
    }
}

/// Rate limits in force for one license: its plan's, with the license's overrides applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompiledLimits {
    pub license: Option<RateQuota>,
    /// Indexed by [`FeatureId`].
    pub per_feature: Vec<Option<RateQuota>>,
    /// Period quotas by meter.
    pub quotas: BTreeMap<Meter, QuotaConfig>,
    pub seats: Option<SeatRule>,
    pub sharing: Option<SharingRule>,
}

impl CompiledLimits {
    /// The limits of `overrides` laid over `self`; each override replaces the plan's value.
    pub(crate) fn overridden(
        &self,
        field: &str,
        overrides: &LimitsConfig,
        features: &[String],
    ) -> Result<CompiledLimits, ConfigError> {
        let mut out = self.clone();
        if let Some(rate) = &overrides.rate_limit {
            out.license = Some(RateQuota::compile(&format!("{field}.rate_limit"), rate)?);
        }
        for (name, quota) in &overrides.quotas {
            let Some(meter) = Meter::ALL.into_iter().find(|m| m.as_str() == name) else {
                return Err(ConfigError::new(
                    format!("{field}.quotas.{name}"),
                    "not a meter: calls, request_bytes, response_bytes or processing_ns",
                ));
            };
            if quota.limit == 0 {
                return Err(ConfigError::new(
                    format!("{field}.quotas.{name}.limit"),
                    "must be at least 1 (remove the plan's feature instead)",
                ));
            }
            out.quotas.insert(meter, *quota);
        }
        if let Some(seats) = &overrides.seats {
            out.seats = Some(seats.compile(&format!("{field}.seats"))?);
        }
        if let Some(sharing) = &overrides.sharing {
            out.sharing = Some(sharing.compile(&format!("{field}.sharing"))?);
        }
        for (name, rate) in &overrides.feature_rate_limits {
            let at = format!("{field}.feature_rate_limits.{name}");
            let Some(index) = features.iter().position(|f| f == name) else {
                return Err(ConfigError::new(at, "no route names this feature"));
            };
            if let Some(slot) = out.per_feature.get_mut(index) {
                *slot = Some(RateQuota::compile(&at, rate)?);
            }
        }
        Ok(out)
    }

    pub fn for_feature(&self, feature: FeatureId) -> Option<RateQuota> {
        self.per_feature
            .get(usize::from(feature))
            .copied()
            .flatten()
    }
}

/// A plan as compiled from the configuration.
#[derive(Debug)]
pub struct Plan {
    pub name: Arc<str>,
    /// Shared by every license of the plan that does not override its limits.
    pub limits: Arc<CompiledLimits>,
}

/// Token checks, compiled.
#[derive(Debug)]
pub struct TokenPolicy {
    /// Lower-case header name.
    pub header: String,
    pub prefix: String,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub leeway_seconds: u64,
    pub cache_entries: usize,
    pub max_token_bytes: usize,
    /// The configuration's keys (empty when they all come from `jwks_source`).
    pub keys: KeySet,
    pub jwks_source: Option<JwksSource>,
    /// Remove `header` from licensed requests before they go upstream.
    pub strip_from_upstream: bool,
}

/// Header names for the license context sent upstream.
#[derive(Debug, Clone)]
pub struct UpstreamHeaders {
    pub account: Option<String>,
    pub license: Option<String>,
    pub plan: Option<String>,
    pub feature: Option<String>,
    pub combined: Option<String>,
}

impl UpstreamHeaders {
    /// Every configured header name, for stripping client-sent copies.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        [
            &self.account,
            &self.license,
            &self.plan,
            &self.feature,
            &self.combined,
        ]
        .into_iter()
        .filter_map(|name| name.as_deref())
    }
}

/// The compiled, immutable configuration shared by every request of a VM.
#[derive(Debug)]
pub struct Policy {
    pub token: TokenPolicy,
    /// Feature names; a [`FeatureId`] indexes this list.
    pub features: Vec<String>,
    pub plans: BTreeMap<String, Arc<Plan>>,
    pub routes: RouteTable,
    pub unmatched_routes: UnmatchedRoutes,
    pub upstream_headers: UpstreamHeaders,
    pub stats_flush_interval_ms: u64,
    /// Where usage is shipped; `None`: only to Envoy stats.
    pub collector: Option<CollectorPolicy>,
    pub quota: QuotaSettings,
    pub pseudonyms: Option<Pseudonymizer>,
    pub users: Option<UserSource>,
    /// Some plan detects sharing: the adapter reads each request's client address.
    pub reads_client_address: bool,
    /// Allowed responses carry `RateLimit` items for rate limits, not only for quotas.
    pub rate_limit_headers: bool,
    /// Requests a worker takes from a shared rate-limit bucket at once (see
    /// [`crate::ratelimit`]).
    pub rate_limit_lease: u32,
    /// The dynamic-metadata namespace of the license context (native module only).
    pub license_metadata: Option<String>,
    /// What is valid but suspicious in the configuration (logged once by the adapter).
    warnings: Vec<ConfigWarning>,
}

impl Policy {
    /// Parse and check a configuration; the error names the field at fault.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let config: FilterConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                // Not JSON: there is no field to name (the path reads `?`), only a place.
                return json_syntax_error(&inner);
            }
            // serde_json appends "at line L column C"; keep it, it helps with long configs.
            ConfigError::new(field, inner.to_string())
        })?;
        de.end().map_err(|e| json_syntax_error(&e))?;
        Policy::compile(config)
    }

    /// What is valid but suspicious in the configuration: routes that can never match.
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    /// Check a parsed configuration and compile it.
    pub fn compile(config: FilterConfig) -> Result<Policy, ConfigError> {
        let token = compile_token(config.token)?;
        let collector = config.collector.map(CollectorPolicy::compile).transpose()?;
        if !(1..=MAX_STATS_FLUSH_INTERVAL_MS).contains(&config.stats_flush_interval_ms) {
            return Err(ConfigError::new(
                "stats_flush_interval_ms",
                format!("must be between 1 and {MAX_STATS_FLUSH_INTERVAL_MS} (one hour)"),
            ));
        }

        let mut features: Vec<String> = Vec::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, route) in config.routes.iter().enumerate() {
            routes.push(compile_route(
                &format!("routes[{i}]"),
                route,
                &mut features,
            )?);
        }
        if features.len() > usize::from(FeatureId::MAX) {
            return Err(ConfigError::new("routes", "too many distinct features"));
        }
        let warnings = shadowed_routes(&routes);

        if config.plans.is_empty() {
            return Err(ConfigError::new("plans", "at least one plan is needed"));
        }
        let empty = CompiledLimits {
            license: None,
            per_feature: vec![None; features.len()],
            quotas: BTreeMap::new(),
            seats: None,
            sharing: None,
        };
        let mut plans = BTreeMap::new();
        for (name, limits) in &config.plans {
            let limits = empty.overridden(&format!("plans.{name}"), limits, &features)?;
            plans.insert(
                name.clone(),
                Arc::new(Plan {
                    name: name.as_str().into(),
                    limits: Arc::new(limits),
                }),
            );
        }

        if collector.is_none() {
            if let Some(name) = plans
                .iter()
                .find(|(_, plan)| !plan.limits.quotas.is_empty())
                .map(|(name, _)| name)
            {
                return Err(ConfigError::new(
                    format!("plans.{name}.quotas"),
                    "quotas are counted by the collector: configure `collector`",
                ));
            }
        }
        let quota = QuotaSettings::compile(config.quota)?;

        let pseudonyms = config
            .pseudonyms
            .map(|p| Pseudonymizer::new("pseudonyms", &p.key_id, &p.secret))
            .transpose()?;
        let users = config
            .users
            .map(|u| match (u.claim, u.header) {
                (Some(claim), None) if !claim.is_empty() => Ok(UserSource::Claim(claim)),
                (None, Some(header)) => {
                    let header = header.to_ascii_lowercase();
                    if !is_header_name(&header) || header.starts_with(':') {
                        return Err(ConfigError::new(
                            "users.header",
                            "not a valid HTTP header name",
                        ));
                    }
                    if header == token.header {
                        return Err(ConfigError::new(
                            "users.header",
                            "must not be the token header",
                        ));
                    }
                    Ok(UserSource::Header(header))
                }
                _ => Err(ConfigError::new(
                    "users",
                    "give exactly one of `claim` (a token claim) and `header` (a request header)",
                )),
            })
            .transpose()?;
        if users.is_some() && pseudonyms.is_none() {
            return Err(ConfigError::new(
                "users",
                "users leave the filter only pseudonymised: configure `pseudonyms`",
            ));
        }
        for (name, plan) in &plans {
            if plan.limits.seats.is_some() && users.is_none() {
                return Err(ConfigError::new(
                    format!("plans.{name}.seats"),
                    "seats count users: configure `users`",
                ));
            }
            if plan.limits.sharing.is_some() && pseudonyms.is_none() {
                return Err(ConfigError::new(
                    format!("plans.{name}.sharing"),
                    "client addresses leave the filter only pseudonymised: configure `pseudonyms`",
                ));
            }
            if (plan.limits.seats.is_some() || plan.limits.sharing.is_some()) && collector.is_none()
            {
                return Err(ConfigError::new(
                    format!("plans.{name}"),
                    "seats and sharing are counted by the collector: configure `collector`",
                ));
            }
        }
        let reads_client_address = plans.values().any(|p| p.limits.sharing.is_some());

        let headers = config.upstream_headers;
        let upstream_headers = UpstreamHeaders {
            account: header_name("upstream_headers.account", headers.account)?,
            license: header_name("upstream_headers.license", headers.license)?,
            plan: header_name("upstream_headers.plan", headers.plan)?,
            feature: header_name("upstream_headers.feature", headers.feature)?,
            combined: header_name("upstream_headers.combined", headers.combined)?,
        };
        if upstream_headers.names().any(|name| name == token.header) {
            return Err(ConfigError::new(
                "upstream_headers",
                "a license header must not be the token header",
            ));
        }
        let mut named: Vec<&str> = upstream_headers.names().collect();
        named.sort_unstable();
        if named.windows(2).any(|pair| pair.first() == pair.get(1)) {
            return Err(ConfigError::new(
                "upstream_headers",
                "each license header needs its own name",
            ));
        }

        if !(1..=MAX_RATE_LIMIT_LEASE).contains(&config.rate_limit_lease) {
            return Err(ConfigError::new(
                "rate_limit_lease",
                format!("must be between 1 and {MAX_RATE_LIMIT_LEASE}"),
            ));
        }
        let rate_limit_lease = config.rate_limit_lease;
        let license_metadata = config.license_metadata;
        if let Some(namespace) = &license_metadata {
            let valid = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
            if namespace.is_empty() || namespace.len() > 128 || !namespace.bytes().all(valid) {
                return Err(ConfigError::new(
                    "license_metadata",
                    "must be 1-128 of A-Za-z0-9._- (a dynamic-metadata namespace)",
                ));
            }
        }
        Ok(Policy {
            token,
            features,
            plans,
            routes: RouteTable::new(routes),
            unmatched_routes: config.unmatched_routes,
            upstream_headers,
            stats_flush_interval_ms: config.stats_flush_interval_ms,
            collector,
            quota,
            pseudonyms,
            users,
            reads_client_address,
            rate_limit_headers: config.rate_limit_headers,
            rate_limit_lease,
            license_metadata,
            warnings,
        })
    }

    /// The feature's name.
    pub fn feature_name(&self, feature: FeatureId) -> &str {
        self.features
            .get(usize::from(feature))
            .map(String::as_str)
            .unwrap_or("")
    }
}

fn compile_token(token: TokenConfig) -> Result<TokenPolicy, ConfigError> {
    let header = token.header.to_ascii_lowercase();
    if !is_header_name(&header) || header.starts_with(':') {
        return Err(ConfigError::new(
            "token.header",
            "not a valid HTTP header name",
        ));
    }
    if token.cache_entries == 0 {
        return Err(ConfigError::new(
            "token.cache_entries",
            "must be at least 1",
        ));
    }
    if token.max_token_bytes < 64 {
        return Err(ConfigError::new(
            "token.max_token_bytes",
            "must be at least 64",
        ));
    }
    let keys =
        match &token.jwks {
            Some(jwks) => KeySet::from_jwks(jwks)?,
            None if token.jwks_source.is_some() => KeySet::empty(),
            None => return Err(ConfigError::new(
                "token",
                "give the keys: `jwks` (inline) or `jwks_source` (fetched from an Envoy cluster)",
            )),
        };
    let jwks_source = token
        .jwks_source
        .map(|s| {
            if s.cluster.is_empty() {
                return Err(ConfigError::new(
                    "token.jwks_source.cluster",
                    "name the Envoy cluster that serves the JWKS",
                ));
            }
            if !s.path.starts_with('/') {
                return Err(ConfigError::new(
                    "token.jwks_source.path",
                    "must start with `/`",
                ));
            }
            if s.refresh_seconds == 0 || s.timeout_ms == 0 || s.min_refetch_seconds == 0 {
                return Err(ConfigError::new(
                    "token.jwks_source",
                    "refresh_seconds, min_refetch_seconds and timeout_ms must be at least 1 (a refetch per unknown kid, unbounded, would let made-up kids flood the endpoint)",
                ));
            }
            Ok(JwksSource {
                authority: s.authority.unwrap_or_else(|| s.cluster.clone()),
                cluster: s.cluster,
                path: s.path,
                refresh_ms: s.refresh_seconds.saturating_mul(1000),
                min_refetch_ms: s.min_refetch_seconds.saturating_mul(1000),
                timeout_ms: s.timeout_ms,
            })
        })
        .transpose()?;
    Ok(TokenPolicy {
        header,
        prefix: token.prefix,
        issuers: token.issuers,
        audiences: token.audiences,
        leeway_seconds: token.leeway_seconds,
        cache_entries: token.cache_entries,
        max_token_bytes: token.max_token_bytes,
        keys,
        jwks_source,
        strip_from_upstream: token.strip_from_upstream,
    })
}

/// A configuration that is not JSON: where the parser stopped, as line and column.
fn json_syntax_error(e: &serde_json::Error) -> ConfigError {
    let text = e.to_string();
    // serde_json's message ends with " at line L column C"; say it once, in our words.
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let problem = text.strip_suffix(&suffix).unwrap_or(&text);
    ConfigError::new(
        "",
        format!(
            "not valid JSON at line {}, column {}: {problem}",
            e.line(),
            e.column()
        ),
    )
}

/// Routes that earlier routes leave nothing (or only some methods) to match: the first match
/// wins, so a route whose path every earlier route covering it already takes, for each of its
/// methods, is dead.
fn shadowed_routes(routes: &[Route]) -> Vec<ConfigWarning> {
    let mut warnings = Vec::new();
    for (j, later) in routes.iter().enumerate() {
        let covering: Vec<(usize, &Route)> = routes
            .iter()
            .take(j)
            .enumerate()
            .filter(|(_, earlier)| earlier.path.covers(&later.path))
            .collect();
        if covering.is_empty() {
            continue;
        }
        let field = format!("routes[{j}]");
        if let Some((i, _)) = covering.iter().find(|(_, e)| e.methods.is_any()) {
            warnings.push(ConfigWarning {
                field,
                problem: format!(
                    "can never match: routes[{i}] comes first and matches every path and method it does"
                ),
            });
            continue;
        }
        if later.methods.is_any() {
            // Some methods are taken earlier; the rest still match here.
            continue;
        }
        let taken_by = |method: &str| {
            covering
                .iter()
                .find(|(_, e)| e.methods.names().iter().any(|m| m == method))
                .map(|(i, _)| *i)
        };
        let dead: Vec<(&str, usize)> = later
            .methods
            .names()
            .iter()
            .filter_map(|m| taken_by(m).map(|i| (m.as_str(), i)))
            .collect();
        if dead.is_empty() {
            continue;
        }
        let mut indices: Vec<usize> = dead.iter().map(|(_, i)| *i).collect();
        indices.sort_unstable();
        indices.dedup();
        let earlier: Vec<String> = indices.iter().map(|i| format!("routes[{i}]")).collect();
        let methods: Vec<&str> = dead.iter().map(|(m, _)| *m).collect();
        let earlier = match earlier.len() {
            1 => format!("{} comes first and matches", earlier.join("")),
            _ => format!("{} come first and match", earlier.join(", ")),
        };
        let problem = if dead.len() == later.methods.names().len() {
            format!(
                "can never match: {earlier} its paths for {}",
                methods.join(", ")
            )
        } else {
            format!(
                "never matches {}: {earlier} its paths for {}",
                methods.join(", "),
                if methods.len() == 1 { "it" } else { "them" }
            )
        };
        warnings.push(ConfigWarning { field, problem });
    }
    warnings
}

fn compile_route(
    at: &str,
    route: &RouteConfig,
    features: &mut Vec<String>,
) -> Result<Route, ConfigError> {
    let (path, written) = match (&route.path, &route.prefix) {
        (Some(path), None) => (PathMatch::Exact(path.clone()), "path"),
        (None, Some(prefix)) => (PathMatch::Prefix(prefix.clone()), "prefix"),
        _ => {
            return Err(ConfigError::new(
                at,
                "needs exactly one of `path` or `prefix`",
            ))
        }
    };
    let (PathMatch::Exact(p) | PathMatch::Prefix(p)) = &path;
    if !p.starts_with('/') {
        // Name the field as written: `prefix` when the route has a prefix.
        return Err(ConfigError::new(
            format!("{at}.{written}"),
            "must start with `/`",
        ));
    }
    let mut methods: Vec<String> = Vec::with_capacity(route.methods.len());
    for (i, method) in route.methods.iter().enumerate() {
        if !HTTP_METHODS.contains(&method.as_str()) {
            return Err(ConfigError::new(
                format!("{at}.methods[{i}]"),
                format!(
                    "`{method}` is not an HTTP method; use one of {} (upper case)",
                    HTTP_METHODS.join(", ")
                ),
            ));
        }
        if !methods.contains(method) {
            methods.push(method.clone());
        }
    }
    let target = match (&route.feature, route.public) {
        (Some(name), false) => {
            if name.is_empty() || name.len() > 64 || !name.bytes().all(is_name_byte) {
                return Err(ConfigError::new(
                    format!("{at}.feature"),
                    "feature names are 1-64 characters of a-z, A-Z, 0-9, `-`, `_`",
                ));
            }
            let id = match features.iter().position(|f| f == name) {
                Some(id) => id,
                None => {
                    features.push(name.clone());
                    features.len() - 1
                }
            };
            RouteTarget::Feature(FeatureId::try_from(id).unwrap_or(FeatureId::MAX))
        }
        (None, true) => RouteTarget::Public,
        _ => {
            return Err(ConfigError::new(
                at,
                "needs exactly one of `feature` or `public: true`",
            ))
        }
    };
    Ok(Route {
        path,
        methods: Methods::new(methods),
        target,
    })
}

fn header_name(field: &str, name: Option<String>) -> Result<Option<String>, ConfigError> {
    match name {
        None => Ok(None),
        Some(name) => {
            let lower = name.to_ascii_lowercase();
            if !is_header_name(&lower) || lower.starts_with(':') {
                return Err(ConfigError::new(field, "not a valid HTTP header name"));
            }
            Ok(Some(lower))
        }
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:!#$%&'*+^`|~".contains(&b))
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}
