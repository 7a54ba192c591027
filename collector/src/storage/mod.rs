//! Storage: one trait per domain (usage, seats, control, licensing, billing, webhook events,
//! privacy), gathered in [`Store`], and a module per backend holding each domain's SQL:
//! [`sqlite`] (embedded, the default) and [`postgres`] (a cluster of replicas). Domain modules
//! take a `&dyn Store` and know no SQL; backends know no domain rules beyond their transactions.
//! A batch is stored atomically with its idempotency key, so a retried batch is recognised and
//! counts zero more. The same tests run against both backends (`tests/common`, `conformance!`).

pub(crate) mod connections;
pub mod postgres;
pub(crate) mod schema;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use rust_decimal::Decimal;
use serde::Serialize;
use tollgate_wire::sync::{
    ClientsSeen, LeaseGrant, LeaseRequest, LicenseSeen, Period, SeatAnswer, SeatRequest, SeatRule,
};
use tollgate_wire::UsageBatch;

pub use crate::clock::now_ms;

/// How a batch was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Stored now, with this many records.
    Accepted { records: u64 },
    /// Stored before; nothing added. `records` is what the first copy held.
    Duplicate { records: u64 },
}

/// Calendar buckets for queries (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

/// Which usage to sum.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    pub account: Option<String>,
    pub license: Option<String>,
    pub feature: Option<String>,
    pub meter: Option<String>,
    pub outcome: Option<String>,
    /// Windows starting at or after this time (Unix ms).
    pub from_ms: Option<u64>,
    /// Windows starting before this time (Unix ms).
    pub to_ms: Option<u64>,
    pub granularity: Option<Granularity>,
}

/// One line of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Start of the calendar bucket, RFC 3339 UTC.
    pub period: String,
    pub account: String,
    pub license: String,
    pub feature: String,
    pub outcome: String,
    pub meter: String,
    pub units: u64,
}

/// A lease to grant; its period and expiry are decided by the caller (the catalogue's calendar).
#[derive(Debug, Clone)]
pub struct LeaseAsk<'a> {
    /// The filter instance asking.
    pub holder: &'a str,
    pub request: &'a LeaseRequest,
    /// The limit in force: the catalogue's for the plan, else the request's.
    pub limit: u64,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    pub expires_ms: u64,
}

/// A spend cap: at most `amount` (in the catalogue's currency) per calendar `period`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub period: Period,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// What filters must obey for some licenses and accounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restrictions {
    /// License → reason.
    pub revoked: BTreeMap<String, String>,
    /// Account → reason.
    pub suspended: BTreeMap<String, String>,
    /// Account → its budget.
    pub budgets: BTreeMap<String, Budget>,
    /// License → its latest sharing detection that blocks (the caller checks the time).
    pub sharing_blocks: BTreeMap<String, SharingDetection>,
}

/// A seat to decide: the request, and the period its named seats count in (`0, u64::MAX`
/// for floating seats).
#[derive(Debug, Clone, Copy)]
pub struct SeatAsk<'a> {
    pub request: &'a SeatRequest,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    /// How long a filter uses a grant before it renews it.
    pub ttl_ms: u64,
}

impl SeatAsk<'_> {
    pub(crate) fn kind(&self) -> &'static str {
        match self.request.rule {
            SeatRule::Named { .. } => "named",
            SeatRule::Floating { .. } => "floating",
        }
    }
}

/// A license seen used from more distinct clients than its plan allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SharingDetection {
    pub license: String,
    pub account: String,
    /// Distinct clients within the window when it was detected (or since, at most).
    pub clients: u32,
    pub max_clients: u32,
    pub window_ms: u64,
    pub detected_ms: u64,
    /// Requests of the license are refused until then (`None`: an alert only).
    pub blocked_until_ms: Option<u64>,
}

/// Distinct end users of an account's allowed usage in a time range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ActiveUsers {
    pub users: u64,
    pub by_license: BTreeMap<String, u64>,
    pub by_feature: BTreeMap<String, u64>,
}

/// The seats of one license taken now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeatUse {
    pub license: String,
    /// `named` or `floating`.
    pub kind: String,
    pub limit: u32,
    pub in_use: u32,
}

/// A license signing key as stored. The private key never leaves the collector's API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub kid: String,
    /// `EdDSA`, `ES256` or `RS256`.
    pub alg: String,
    pub private_pem: String,
    /// The public JWK, JSON text.
    pub public_jwk: String,
    pub created_ms: u64,
    /// New licenses are signed with the newest active key.
    pub activates_ms: u64,
    /// Retired keys leave the JWKS: licenses they signed stop verifying.
    pub retired_ms: Option<u64>,
}

/// What an issued license says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedLicense {
    pub license: String,
    pub account: String,
    pub plan: String,
    pub features: Vec<String>,
    /// The `limits` claim, if the license overrides its plan's limits.
    pub limits: Option<serde_json::Value>,
    pub not_before_ms: u64,
    pub expires_ms: u64,
    /// The key that signed it.
    pub kid: String,
    pub issued_ms: u64,
    /// When it was revoked, if it is: from the next billing period on it pays no fee.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// Allowed usage of one license, feature and meter: what is billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BillableUsage {
    pub license: String,
    /// Empty when no filter named the license's plan and it was not issued here.
    pub plan: String,
    pub feature: String,
    pub meter: String,
    pub units: u64,
}

/// One stored usage record, for exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRecord {
    /// Position in the store: exports page by it.
    pub id: i64,
    pub batch_id: String,
    pub account: String,
    pub license: String,
    pub feature: String,
    pub outcome: String,
    pub meter: String,
    pub units: u64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// The pseudonymised end user; empty when the filter does not tell users apart.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// A finalised invoice: frozen as it was rated then.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredInvoice {
    pub invoice_id: String,
    pub account: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    pub currency: String,
    /// Decimal text.
    pub total: String,
    /// The whole invoice (lines, unpriced usage) as rated when finalised.
    pub body: serde_json::Value,
    pub finalized_ms: u64,
    /// Usage received up to this instant is billed in this invoice or an earlier one.
    pub cut_ms: u64,
}

/// An event for the payment system's webhook. The id is stable (the same event is never
/// enqueued twice) and is sent as the idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookEvent {
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: serde_json::Value,
    pub created_ms: u64,
    pub next_attempt_ms: u64,
    pub attempts: u32,
    pub delivered_ms: Option<u64>,
    /// Set when delivery was given up after the last attempt.
    pub failed_ms: Option<u64>,
}

/// One attempt to deliver an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    pub event_id: String,
    pub attempt: u32,
    pub at_ms: u64,
    /// The receiver's HTTP status; absent when there was no answer.
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A quota of a license in a running period: what the collector handed out of its limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaState {
    pub license: String,
    pub meter: String,
    pub period_start_ms: u64,
    pub period_end_ms: u64,
    pub limit: u64,
    /// Units in open leases plus units used by closed ones: the most that can have been used.
    pub allocated: u64,
}

/// What follows a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    RetryAt(u64),
    GaveUp,
}

/// Why a store operation failed, in words for the caller: a full disk is named (SQLite's
/// `SQLITE_FULL`, PostgreSQL's `disk_full`), since the operator has to act on it; anything
/// else is the store failing.
pub fn failure_reason(e: &anyhow::Error) -> &'static str {
    let disk_full = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<rusqlite::Error>(),
            Some(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull
        ) || postgres::is_disk_full(cause)
    });
    if disk_full {
        "the collector's disk is full"
    } else {
        "the collector's store failed"
    }
}

/// A readiness check of a store with a connection of its own.
pub trait StoreProbe: Send {
    /// One round trip to the store that reads from it (not just `SELECT 1`: a SQLite file that
    /// was removed or a PostgreSQL that stopped fails it).
    fn check(&mut self) -> Result<()>;
}

/// Usage: batches taken exactly once, and the queries over what they hold.
pub trait UsageStore: Send + Sync {
    /// Store `batch` unless its id was stored before, in one transaction.
    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
        let mut outcomes = self.ingest_group(&[(batch, received_ms)])?;
        outcomes
            .pop()
            .context("the store answered no outcome for the batch")
    }

    /// Group commit: store each batch unless its id was stored before (also earlier in the
    /// same group), all in one transaction, so that batches arriving together pay for one
    /// commit (one fsync). All are stored or none is: on an error, nothing of the group was
    /// stored, and the caller may store them one by one to find the one that fails.
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>>;

    /// Sum usage by calendar bucket, account, license, feature, outcome and meter.
    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;

    /// The earliest window start of `account`'s usage in `[from_ms, to_ms)`, if any.
    fn first_usage_ms(&self, account: &str, from_ms: u64, to_ms: u64) -> Result<Option<u64>>;

    /// Usage records with windows starting in `[from_ms, to_ms)`, `id > after_id` and
    /// received up to `received_until_ms`, in id order, at most `limit`.
    fn records(
        &self,
        from_ms: u64,
        to_ms: u64,
        after_id: i64,
        limit: u32,
        received_until_ms: u64,
    ) -> Result<Vec<StoredRecord>>;

    /// Accounts with usage in windows starting in `[from_ms, to_ms)`, or an issued license.
    fn accounts(&self, from_ms: u64, to_ms: u64) -> Result<Vec<String>>;
}

/// Users, seats and sharing: seat grants, the clients a license is used from, sharing detections.
pub trait SeatStore: Send + Sync {
    /// Decide a seat request (see [`crate::seats::decide`]) and record a grant, atomically per
    /// license: two collectors deciding at once cannot hand out one seat twice.
    fn take_seat(&self, ask: &SeatAsk<'_>, now_ms: u64) -> Result<SeatAnswer>;

    /// Note the clients a license was used from; the distinct clients within the window
    /// (older ones are forgotten).
    fn note_clients(&self, seen: &ClientsSeen, now_ms: u64) -> Result<u32>;

    /// Record a sharing detection; true when it is new (none for the license within its
    /// window), so that one episode raises one alert.
    fn detect_sharing(&self, detection: &SharingDetection) -> Result<bool>;

    /// Sharing detections, newest first, of one account or all.
    fn sharing_detections(&self, account: Option<&str>) -> Result<Vec<SharingDetection>>;

    /// Distinct end users in an account's allowed usage in `[from_ms, to_ms)`, in batches
    /// received up to `received_until_ms` if given (an invoice's cut).
    fn active_users(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<ActiveUsers>;

    /// Seats of an account's licenses taken at `now_ms`.
    fn seat_use(&self, account: &str, now_ms: u64) -> Result<Vec<SeatUse>>;
}

/// What filters obey: quota leases, revocations, suspensions, budgets, and the licenses they served.
pub trait ControlStore: Send + Sync {
    /// Grant up to `want` units of the quota, at most what is left of `limit` for the period,
    /// atomically with the allocation. A lease id seen before gets its stored grant.
    fn grant_lease(&self, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant>;

    /// Close a lease with the units it used: the allocation keeps `used` instead of the grant.
    /// Once per lease id; false if the lease is unknown.
    fn close_lease(&self, lease_id: &str, used: u64, now_ms: u64) -> Result<bool>;

    /// Revoke a license (`Some(reason)`) or lift the revocation (`None`).
    fn set_revoked(&self, license: &str, reason: Option<&str>, now_ms: u64) -> Result<()>;

    /// Suspend an account (`Some(reason)`) or resume it (`None`).
    fn set_suspended(&self, account: &str, reason: Option<&str>, now_ms: u64) -> Result<()>;

    /// Set or remove an account's spend cap.
    fn set_budget(&self, account: &str, budget: Option<&Budget>, now_ms: u64) -> Result<()>;

    /// Whether the store has heard of a license (issued here, served by a filter, revoked) or
    /// an account (licenses, usage, restrictions, invoices): operator commands refuse names
    /// nobody knows, so that a typo is an error instead of a silent no-op.
    fn is_known(&self, name: &Named<'_>) -> Result<bool>;

    /// The revocations, suspensions and budgets among `licenses` and `accounts`.
    fn restrictions(&self, licenses: &[String], accounts: &[String]) -> Result<Restrictions>;

    /// Remember the plan of licenses filters served.
    fn record_licenses(&self, seen: &[LicenseSeen], now_ms: u64) -> Result<()>;

    /// Every account's budget.
    fn budgets(&self) -> Result<BTreeMap<String, Budget>>;

    /// The quotas of `account`'s licenses in periods that end after `now_ms`.
    fn quotas(&self, account: &str, now_ms: u64) -> Result<Vec<QuotaState>>;
}

/// The license server: signing keys and the licenses issued here.
pub trait LicensingStore: Send + Sync {
    /// Add a signing key; false if its kid exists.
    fn add_signing_key(&self, key: &StoredKey) -> Result<bool>;

    /// Every signing key, retired ones too, oldest first.
    fn signing_keys(&self) -> Result<Vec<StoredKey>>;

    /// Retire a key; false if there is no such key.
    fn retire_signing_key(&self, kid: &str, now_ms: u64) -> Result<bool>;

    /// Record an issued license (and its plan, for billing); false if its id exists.
    fn add_license(&self, license: &IssuedLicense) -> Result<bool>;

    /// Issued licenses, of one account or all, by id.
    fn issued_licenses(&self, account: Option<&str>) -> Result<Vec<IssuedLicense>>;
}

/// Billing: the usage an invoice bills, and finalised invoices.
pub trait BillingStore: Send + Sync {
    /// Allowed usage of `account` in windows starting in `[from_ms, to_ms)`, by license,
    /// feature and meter, with each license's plan.
    fn billable_usage(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>>;

    /// Allowed usage of `account` in windows starting before `before_ms`, in batches
    /// received in `(received_after_ms, received_until_ms]` (no upper bound if `None`): the late
    /// usage an invoice bills (see `billing`).
    fn late_usage(
        &self,
        account: &str,
        before_ms: u64,
        received_after_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>>;

    /// Store `invoice` and enqueue `event` in one transaction, unless the invoice was
    /// finalised before: then nothing changes. The stored invoice, and whether it is new.
    fn finalize_invoice(
        &self,
        invoice: &StoredInvoice,
        event: Option<&WebhookEvent>,
    ) -> Result<(StoredInvoice, bool)>;

    /// Finalised invoices, of one account or all, oldest period first.
    fn invoices(&self, account: Option<&str>) -> Result<Vec<StoredInvoice>>;
}

/// Webhook events: the outbox, its deliveries, and its log.
pub trait EventStore: Send + Sync {
    /// Enqueue an event; false if its id was enqueued before.
    fn enqueue_event(&self, event: &WebhookEvent) -> Result<bool>;

    /// Take up to `limit` events due at `now_ms` for delivery: each is not due again for
    /// `lease_ms`, so that replicas sharing the database do not send it at the same time.
    fn claim_events(&self, now_ms: u64, lease_ms: u64, limit: u32) -> Result<Vec<WebhookEvent>>;

    /// Log an attempt and what follows it.
    fn record_delivery(&self, delivery: &Delivery, outcome: DeliveryOutcome) -> Result<()>;

    /// Make every pending event due at `now_ms` (after the clock stepped back, retries
    /// scheduled on the old time would wait the step out); how many were moved.
    fn webhooks_due_now(&self, now_ms: u64) -> Result<u64>;

    /// The latest events, newest first.
    fn webhook_events(&self, limit: u32) -> Result<Vec<WebhookEvent>>;

    /// The attempts to deliver one event, in order.
    fn deliveries(&self, event_id: &str) -> Result<Vec<Delivery>>;
}

/// Personal data: retention, and export and erasure of an account or an end user.
pub trait PrivacyStore: Send + Sync {
    /// Roll up to `limit` raw usage records whose window started before `before_ms` into the
    /// hourly aggregates and delete them, in one transaction; delete seats, client entries and
    /// sharing detections that ended before then. See `privacy`.
    fn apply_retention(&self, before_ms: u64, limit: u32) -> Result<Retained>;

    /// Every row naming the account or one of its licenses, webhook events included.
    fn export_account(&self, account: &str) -> Result<Export>;

    /// Delete what [`Store::export_account`] returns, in one transaction.
    fn erase_account(&self, account: &str) -> Result<Erased>;

    /// Every row holding an end user's (or client's) pseudonym.
    fn export_subject(&self, subject: &str) -> Result<Export>;

    /// Unlink the pseudonym from usage records, delete its seats and client entries.
    fn erase_subject(&self, subject: &str) -> Result<Erased>;
}

/// Where usage, and the state filters obey, are kept: every domain's store, one per backend
/// ([`sqlite::SqliteStore`], [`postgres::PostgresStore`]), each domain's SQL in its own module
/// (`sqlite/billing.rs`, `postgres/billing.rs`, ...).
pub trait Store:
    UsageStore
    + SeatStore
    + ControlStore
    + LicensingStore
    + BillingStore
    + EventStore
    + PrivacyStore
    + Send
    + Sync
    + 'static
{
    /// A check of the store on a connection of its own (opened on first use, again after a
    /// failure): what `/readyz` reports, without waiting behind ingest for the store's
    /// connection.
    fn probe(&self) -> Box<dyn StoreProbe>;
}

/// A stored invoice row.
pub(crate) type InvoiceRow = (String, String, i64, i64, String, String, String, i64, i64);

pub(crate) fn invoice_of(row: InvoiceRow) -> StoredInvoice {
    let (invoice_id, account, start, end, currency, total, body, finalized, cut) = row;
    StoredInvoice {
        invoice_id,
        account,
        period_start_ms: u64_of(start),
        period_end_ms: u64_of(end),
        currency,
        total,
        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        finalized_ms: u64_of(finalized),
        cut_ms: u64_of(cut),
    }
}

/// A stored event row.
pub(crate) type EventRow = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
);

pub(crate) fn event_of(row: EventRow) -> WebhookEvent {
    let (event_id, event_type, payload, created, next, attempts, delivered, failed) = row;
    WebhookEvent {
        event_id,
        event_type,
        payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
        created_ms: u64_of(created),
        next_attempt_ms: u64_of(next),
        attempts: u32::try_from(attempts).unwrap_or(0),
        delivered_ms: delivered.map(u64_of),
        failed_ms: failed.map(u64_of),
    }
}

/// The columns of an event: what [`event_of`] takes.
pub(crate) const EVENT_COLUMNS: &str =
    "event_id, type, payload, created_ms, next_attempt_ms, attempts, delivered_ms, failed_ms";
/// The columns of an invoice: what [`invoice_of`] takes.
pub(crate) const INVOICE_COLUMNS: &str =
    "invoice_id, account, period_start_ms, period_end_ms, currency, total, body, finalized_ms, cut_ms";

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A stored license row, JSON columns decoded.
pub(crate) type LicenseRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    String,
    i64,
    Option<i64>,
);

/// A license row's features and limits, stored as JSON text.
pub(crate) fn license_of(row: LicenseRow) -> IssuedLicense {
    let (license, account, plan, features, limits, nbf, exp, kid, issued, revoked) = row;
    IssuedLicense {
        license,
        account,
        plan,
        features: serde_json::from_str(&features).unwrap_or_default(),
        limits: limits.and_then(|l| serde_json::from_str(&l).ok()),
        not_before_ms: u64_of(nbf),
        expires_ms: u64_of(exp),
        kid,
        issued_ms: u64_of(issued),
        revoked_ms: revoked.map(u64_of),
    }
}

/// Open the store a URL names: `sqlite://<path>` (or a bare path), or `postgres://...`.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(path) => Ok(Box::new(sqlite::SqliteStore::open(path)?)),
        DatabaseUrl::Postgres(url) => Ok(Box::new(postgres::PostgresStore::open(url)?)),
    }
}

/// Open a store that exists already: what every command but `serve` and `init` does, so that
/// a mistyped `--database` is an error instead of a new, empty store answering with nothing.
pub fn open_existing(url: &str) -> Result<Box<dyn Store>> {
    match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(path) => {
            if !path.is_file() {
                bail!(
                    "no database at {}: name it with --database (or TOLLGATE_DATABASE); `tollgate-collector serve` or `init` creates one",
                    path.display()
                );
            }
            sqlite::require_schema(path)?;
            Ok(Box::new(sqlite::SqliteStore::open(path)?))
        }
        DatabaseUrl::Postgres(url) => {
            postgres::require_schema(url)?;
            Ok(Box::new(postgres::PostgresStore::open(url)?))
        }
    }
}

/// A `--database` value.
enum DatabaseUrl<'a> {
    Sqlite(&'a Path),
    Postgres(&'a str),
}

impl<'a> DatabaseUrl<'a> {
    fn parse(url: &'a str) -> Result<DatabaseUrl<'a>> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(DatabaseUrl::Sqlite(Path::new(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url));
        }
        if url.contains("://") {
            bail!(
                "unknown database URL `{url}`: use sqlite://<path> or postgres://user@host:port/db"
            );
        }
        Ok(DatabaseUrl::Sqlite(Path::new(url)))
    }
}

/// A license or an account, as an operator names it.
#[derive(Debug, Clone, Copy)]
pub enum Named<'a> {
    License(&'a str),
    Account(&'a str),
}

impl Named<'_> {
    /// One query for both dialects (`$1` is a parameter in SQLite too).
    pub(crate) fn known_sql(&self) -> (&'static str, &str) {
        match *self {
            Named::License(license) => (
                "SELECT EXISTS (SELECT 1 FROM licenses WHERE license = $1)
                     OR EXISTS (SELECT 1 FROM issued_licenses WHERE license = $1)
                     OR EXISTS (SELECT 1 FROM revoked_licenses WHERE license = $1)",
                license,
            ),
            Named::Account(account) => (
                "SELECT EXISTS (SELECT 1 FROM licenses WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM issued_licenses WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM usage_records WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM usage_rollups WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM suspended_accounts WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM budgets WHERE account = $1)
                     OR EXISTS (SELECT 1 FROM invoices WHERE account = $1)",
                account,
            ),
        }
    }
}

/// A name nothing in the store has heard of: the CLI's error, the admin API's 404.
#[derive(Debug)]
pub struct UnknownName {
    /// `license` or `account`.
    pub kind: &'static str,
    pub message: String,
}

impl std::fmt::Display for UnknownName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UnknownName {}

/// Refuse a name the store has never heard of, unless the operator forces it (a license issued
/// elsewhere that no filter has served yet) where `force_hint` says how (`--force`,
/// `?force=true`).
pub fn require_known(
    store: &dyn Store,
    name: Named<'_>,
    force: bool,
    force_hint: Option<&str>,
) -> Result<()> {
    if force || store.is_known(&name)? {
        return Ok(());
    }
    let (kind, mut message) = match name {
        Named::License(license) => ("license", format!(
            "no license `{license}` is known here: it was not issued here and no filter has served it (`license list` shows the issued ones)"
        )),
        Named::Account(account) => ("account", format!(
            "no account `{account}` is known here: no license, usage, restriction or invoice names it"
        )),
    };
    if let Some(hint) = force_hint {
        message += &format!("; add {hint} to name it anyway (issued elsewhere)");
    }
    Err(UnknownName { kind, message }.into())
}

/// What one retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Retained {
    /// Raw usage records rolled up and deleted.
    pub records: u64,
    /// Their units (now in the aggregates).
    pub units: u64,
    /// Seats, client entries and sharing detections that ended before the cut-off, deleted.
    pub seats: u64,
    pub clients: u64,
    pub sharing_detections: u64,
}

impl Retained {
    pub fn add(&mut self, other: Retained) {
        self.records += other.records;
        self.units += other.units;
        self.seats += other.seats;
        self.clients += other.clients;
        self.sharing_detections += other.sharing_detections;
    }
}

/// Everything stored about an account or an end user: rows by table, each row by column.
pub type Export = BTreeMap<String, Vec<serde_json::Map<String, serde_json::Value>>>;

/// Rows deleted (or, for an end user's usage, unlinked), by table.
pub type Erased = BTreeMap<String, u64>;

/// Units to grant: what is asked, within what is left of the limit.
pub(crate) fn grant_size(want: u64, limit: u64, allocated: i64) -> i64 {
    let left = limit.saturating_sub(u64::try_from(allocated).unwrap_or(0));
    i64::try_from(want.min(left)).unwrap_or(i64::MAX)
}

pub(crate) fn grant_of(
    lease_id: &str,
    granted: i64,
    start: i64,
    end: i64,
    expires: i64,
    allocated: i64,
) -> LeaseGrant {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    LeaseGrant {
        lease_id: lease_id.to_string(),
        granted: u(granted),
        period_start_ms: u(start),
        period_end_ms: u(end),
        expires_ms: u(expires),
        allocated: u(allocated),
    }
}

pub(crate) fn parse_budget(period: &str, amount: &str) -> Result<Budget> {
    let period = match period {
        "hour" => Period::Hour,
        "day" => Period::Day,
        "month" => Period::Month,
        other => bail!("stored budget period `{other}` is not hour, day or month"),
    };
    let amount = amount
        .parse::<Decimal>()
        .with_context(|| format!("stored budget amount `{amount}`"))?;
    Ok(Budget { period, amount })
}
