//! Storage of usage: one trait, a backend per database. A batch is stored atomically with its
//! idempotency key, so a retried batch is recognised and counts zero more.

use std::path::Path;
use std::sync::Mutex;

use std::collections::{BTreeMap, BTreeSet};

use crate::connections::{Connect, Connections};
use crate::privacy::{Erased, Export, Retained};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use rust_decimal::Decimal;
use serde::Serialize;
use tollgate_wire::sync::{
    ClientsSeen, LeaseGrant, LeaseRequest, LicenseSeen, Period, SeatAnswer, SeatRequest, SeatRule,
};
use tollgate_wire::UsageBatch;

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
        ) || crate::postgres_store::is_disk_full(cause)
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

/// Where usage, and the state filters obey, are kept.
pub trait Store: Send + Sync + 'static {
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
    /// A check of the store on a connection of its own (opened on first use, again after a
    /// failure): what `/readyz` reports, without waiting behind ingest for the store's
    /// connection.
    fn probe(&self) -> Box<dyn StoreProbe>;

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
    /// usage an invoice bills (see [`crate::billing`]).
    fn late_usage(
        &self,
        account: &str,
        before_ms: u64,
        received_after_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>>;
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
    /// Every account's budget.
    fn budgets(&self) -> Result<BTreeMap<String, Budget>>;
    /// The quotas of `account`'s licenses in periods that end after `now_ms`.
    fn quotas(&self, account: &str, now_ms: u64) -> Result<Vec<QuotaState>>;

    /// Store `invoice` and enqueue `event` in one transaction, unless the invoice was
    /// finalised before: then nothing changes. The stored invoice, and whether it is new.
    fn finalize_invoice(
        &self,
        invoice: &StoredInvoice,
        event: Option<&WebhookEvent>,
    ) -> Result<(StoredInvoice, bool)>;
    /// Finalised invoices, of one account or all, oldest period first.
    fn invoices(&self, account: Option<&str>) -> Result<Vec<StoredInvoice>>;
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

    /// Roll up to `limit` raw usage records whose window started before `before_ms` into the
    /// hourly aggregates and delete them, in one transaction; delete seats, client entries and
    /// sharing detections that ended before then. See [`crate::privacy`].
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

/// The limit in force is the latest lease's (a catalogue change applies to the next lease).
const QUOTAS_SQL_SQLITE: &str = "SELECT a.license, a.meter, a.period_start_ms, a.period_end_ms,
            (SELECT l.limit_units FROM leases l WHERE l.license = a.license AND l.meter = a.meter
               AND l.period_start_ms = a.period_start_ms AND l.period_end_ms = a.period_end_ms
             ORDER BY l.created_ms DESC LIMIT 1),
            a.allocated
     FROM quota_allocations a
     WHERE a.period_end_ms > ?2
       AND a.license IN (SELECT license FROM leases WHERE account = ?1)
     ORDER BY 1, 2, 3";

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
        DatabaseUrl::Sqlite(path) => Ok(Box::new(SqliteStore::open(path)?)),
        DatabaseUrl::Postgres(url) => {
            Ok(Box::new(crate::postgres_store::PostgresStore::open(url)?))
        }
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
            let conn =
                Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                    .with_context(|| format!("opening {}", path.display()))?;
            let tollgate: bool = conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations')",
                    [],
                    |r| r.get(0),
                )
                .with_context(|| format!("{} is not an SQLite database", path.display()))?;
            if !tollgate {
                bail!(
                    "{} is not a Tollgate database (it has no schema_migrations table)",
                    path.display()
                );
            }
            drop(conn);
            Ok(Box::new(SqliteStore::open(path)?))
        }
        DatabaseUrl::Postgres(url) => {
            crate::postgres_store::require_schema(url)?;
            Ok(Box::new(crate::postgres_store::PostgresStore::open(url)?))
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

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_usage.sql")),
    (2, include_str!("../migrations/sqlite/0002_control.sql")),
    (3, include_str!("../migrations/sqlite/0003_licensing.sql")),
    (4, include_str!("../migrations/sqlite/0004_billing.sql")),
    (
        5,
        include_str!("../migrations/sqlite/0005_ingest_drop_batch_index.sql"),
    ),
    (
        6,
        include_str!("../migrations/sqlite/0006_users_seats_sharing.sql"),
    ),
    (7, include_str!("../migrations/sqlite/0007_retention.sql")),
    (
        8,
        include_str!("../migrations/sqlite/0008_one_invoice_per_period.sql"),
    ),
];

/// SQLite in a file, WAL mode: the embedded default. One connection writes (SQLite takes one
/// writer at a time, and the store's read-then-write transactions rely on it); reads go to a
/// few reader connections, which in WAL mode see the last commit without waiting for the
/// writer, so a sync's or a dashboard's reads do not queue behind ingest.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    readers: Connections<SqliteReader>,
    path: std::path::PathBuf,
}

/// Reader connections: as many as the collector's threads read at once.
const SQLITE_READERS: usize = 4;

struct SqliteReader {
    path: std::path::PathBuf,
}

impl Connect for SqliteReader {
    type Connection = Connection;
    fn open(&self) -> Result<Connection> {
        // Never created: the writer made and migrated the file.
        let conn = Connection::open_with_flags(
            &self.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} to read", self.path.display()))?;
        // A write through a reader is a bug: refused by SQLite, not done outside the writer.
        conn.pragma_update(None, "query_only", "ON")?;
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }
}

/// [`StoreProbe`] for SQLite: a second connection to the file. In WAL mode a reader does not
/// wait for the writer, so the check answers while ingest holds the store's connection.
struct SqliteProbe {
    path: std::path::PathBuf,
    conn: Option<Connection>,
}

impl StoreProbe for SqliteProbe {
    fn check(&mut self) -> Result<()> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            none => {
                // Never created: a file that went away is a store that is not there.
                let conn = Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .with_context(|| format!("opening {}", self.path.display()))?;
                conn.busy_timeout(std::time::Duration::from_millis(500))?;
                none.insert(conn)
            }
        };
        let checked = conn
            .query_row("SELECT count(*) FROM schema_migrations", [], |_| Ok(()))
            .map_err(anyhow::Error::from);
        if checked.is_err() {
            self.conn = None;
        }
        checked
    }
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // 16 KiB pages (for a new file; an existing one keeps its size): a batch's records
        // touch leaves of the per-account index all over it, and a commit writes every page
        // it dirtied to the WAL one by one, so fewer, larger pages make commits cheaper.
        conn.pragma_update(None, "page_size", 16384)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with synchronous=FULL: an acknowledged batch survives a power cut, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        // A 64 MiB page cache (the default is 2 MiB): with less, the indexes' pages are read
        // back from the file on every batch and dirty pages spill to the WAL mid-transaction.
        conn.pragma_update(None, "cache_size", -65536)?;
        // Checkpoint every 2,048 pages of WAL (32 MiB at 16 KiB pages, 8 MiB for a file made with
        // 4 KiB pages) instead of 1,000: pages that
        // consecutive batches dirty again (the indexes' leaves) are copied to the file once.
        conn.pragma_update(None, "wal_autocheckpoint", 2048)?;
        // Deleted rows (retention, erasure) are overwritten with zeros, not left in free pages.
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            readers: Connections::new(
                SqliteReader {
                    path: path.to_path_buf(),
                },
                SQLITE_READERS,
            ),
            path: path.to_path_buf(),
        })
    }

    /// Run `work` on a reader connection (see [`SqliteStore`]).
    fn read<T>(&self, work: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        self.readers.with(work)
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| anyhow::anyhow!("the database connection was poisoned"))
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)",
    )?;
    for (version, sql) in SQLITE_MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .optional()?;
        if done.is_none() {
            tx.execute_batch(sql)
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
                params![version, now_ms()],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn to_i64(field: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .with_context(|| format!("{field} {value} does not fit a signed 64-bit integer"))
}

fn bucket_expression(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Hour => "strftime('%Y-%m-%dT%H:00:00Z', window_start_ms / 1000, 'unixepoch')",
        Granularity::Day => "strftime('%Y-%m-%dT00:00:00Z', window_start_ms / 1000, 'unixepoch')",
        Granularity::Month => "strftime('%Y-%m-01T00:00:00Z', window_start_ms / 1000, 'unixepoch')",
    }
}

/// Store one batch inside `tx` (see [`Store::ingest_group`]): nothing is committed here.
fn ingest_in(
    tx: &rusqlite::Transaction<'_>,
    batch: &UsageBatch,
    received_ms: u64,
) -> Result<Ingested> {
    let records = u64::try_from(batch.records.len()).unwrap_or(u64::MAX);
    let inserted = tx.execute(
        "INSERT INTO batches (batch_id, instance, sequence, records, created_ms, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (batch_id) DO NOTHING",
        params![
            batch.batch_id,
            batch.source.instance,
            to_i64("sequence", batch.sequence)?,
            to_i64("records", records)?,
            to_i64("created_ms", batch.created_ms)?,
            to_i64("received_ms", received_ms)?,
        ],
    )?;
    if inserted == 0 {
        let first: i64 = tx.query_row(
            "SELECT records FROM batches WHERE batch_id = ?1",
            [&batch.batch_id],
            |r| r.get(0),
        )?;
        return Ok(Ingested::Duplicate {
            records: u64::try_from(first).unwrap_or(0),
        });
    }
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms, user_ref)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for r in &batch.records {
            insert.execute(params![
                batch.batch_id,
                r.account,
                r.license,
                r.feature,
                r.outcome,
                r.meter.as_str(),
                to_i64("units", r.units)?,
                to_i64("window_start_ms", r.window_start_ms)?,
                to_i64("window_end_ms", r.window_end_ms)?,
                r.user,
            ])?;
        }
    }
    Ok(Ingested::Accepted { records })
}

impl Store for SqliteStore {
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let outcomes = batches
            .iter()
            .map(|(batch, received_ms)| ingest_in(&tx, batch, *received_ms))
            .collect::<Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(outcomes)
    }

    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let bucket = bucket_expression(query.granularity.unwrap_or(Granularity::Day));
        let sql = format!(
            "SELECT {bucket} AS period, account, license, feature, outcome, meter, SUM(units)
             FROM usage_facts
             WHERE (?1 IS NULL OR account = ?1) AND (?2 IS NULL OR license = ?2)
               AND (?3 IS NULL OR feature = ?3) AND (?4 IS NULL OR meter = ?4)
               AND (?5 IS NULL OR outcome = ?5)
               AND (?6 IS NULL OR window_start_ms >= ?6) AND (?7 IS NULL OR window_start_ms < ?7)
             GROUP BY period, account, license, feature, outcome, meter
             ORDER BY period, account, license, feature, outcome, meter"
        );
        let from = query.from_ms.map(|v| to_i64("from_ms", v)).transpose()?;
        let to = query.to_ms.map(|v| to_i64("to_ms", v)).transpose()?;
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(
                params![
                    query.account,
                    query.license,
                    query.feature,
                    query.meter,
                    query.outcome,
                    from,
                    to
                ],
                |r| {
                    Ok(UsageRow {
                        period: r.get(0)?,
                        account: r.get(1)?,
                        license: r.get(2)?,
                        feature: r.get(3)?,
                        outcome: r.get(4)?,
                        meter: r.get(5)?,
                        units: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn probe(&self) -> Box<dyn StoreProbe> {
        Box::new(SqliteProbe {
            path: self.path.clone(),
            conn: None,
        })
    }

    fn take_seat(&self, ask: &SeatAsk<'_>, now_ms: u64) -> Result<SeatAnswer> {
        let r = ask.request;
        let key = crate::seats::key_id(&r.user);
        let (kind, start, now) = (
            ask.kind(),
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("now_ms", now_ms)?,
        );
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Floating seats that freed are of no use: the table holds the live ones (named seats
        // stay, as the record of who held one in each period).
        tx.execute(
            "DELETE FROM seats WHERE license = ?1 AND kind = 'floating' AND until_ms <= ?2",
            params![r.license, now],
        )?;
        let held = {
            let mut query = tx.prepare_cached(
                "SELECT user_ref, until_ms FROM seats
                 WHERE license = ?1 AND kind = ?2 AND period_start_ms = ?3 AND key_id = ?4 AND until_ms > ?5",
            )?;
            let rows = query.query_map(params![r.license, kind, start, key, now], |row| {
                Ok(crate::seats::SeatHolder {
                    user_ref: row.get(0)?,
                    until_ms: u64_of(row.get(1)?),
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let decision = crate::seats::decide(r, &held, now_ms, ask.ttl_ms, ask.period_end_ms);
        if let Some(until) = decision.seat_until_ms {
            tx.execute(
                "INSERT INTO seats (license, account, kind, period_start_ms, user_ref, key_id, seat_limit, first_ms, last_ms, until_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                 ON CONFLICT (license, kind, period_start_ms, user_ref)
                 DO UPDATE SET seat_limit = excluded.seat_limit, last_ms = excluded.last_ms, until_ms = MAX(seats.until_ms, excluded.until_ms)",
                params![r.license, r.account, kind, start, r.user, key, r.rule.limit(), now, to_i64("until_ms", until)?],
            )?;
        }
        tx.commit()?;
        Ok(decision.answer)
    }

    fn note_clients(&self, seen: &ClientsSeen, now_ms: u64) -> Result<u32> {
        let now = to_i64("now_ms", now_ms)?;
        let since = to_i64("since", now_ms.saturating_sub(seen.window_ms))?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO license_clients (license, account, client_ref, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (license, client_ref) DO UPDATE SET last_seen_ms = MAX(license_clients.last_seen_ms, excluded.last_seen_ms)",
            )?;
            for client in &seen.clients {
                upsert.execute(params![seen.license, seen.account, client, now])?;
            }
        }
        tx.execute(
            "DELETE FROM license_clients WHERE license = ?1 AND last_seen_ms <= ?2",
            params![seen.license, since],
        )?;
        // Per pseudonym key (a key rotation would count every client twice): the busiest. A
        // ref without a key (no `.`) belongs to the key '' (as in postgres_store.rs).
        let n: i64 = tx.query_row(
            "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM license_clients WHERE license = ?1
             GROUP BY CASE WHEN instr(client_ref, '.') > 0 THEN substr(client_ref, 1, instr(client_ref, '.') - 1) ELSE '' END)",
            [&seen.license],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn detect_sharing(&self, d: &SharingDetection) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: Option<(i64, i64)> = tx
            .query_row(
                "SELECT detected_ms, window_ms FROM sharing_detections WHERE license = ?1",
                [&d.license],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let new = last
            .is_none_or(|(at, window)| u64_of(at).saturating_add(u64_of(window)) <= d.detected_ms);
        if new {
            tx.execute(
                "INSERT INTO sharing_detections (license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, clients = excluded.clients, max_clients = excluded.max_clients,
                   window_ms = excluded.window_ms, detected_ms = excluded.detected_ms, blocked_until_ms = excluded.blocked_until_ms",
                params![d.license, d.account, d.clients, d.max_clients, to_i64("window_ms", d.window_ms)?, to_i64("detected_ms", d.detected_ms)?,
                        d.blocked_until_ms.map(|v| to_i64("blocked_until_ms", v)).transpose()?],
            )?;
        } else {
            tx.execute(
                "UPDATE sharing_detections SET clients = MAX(clients, ?2) WHERE license = ?1",
                params![d.license, d.clients],
            )?;
        }
        tx.commit()?;
        Ok(new)
    }

    fn sharing_detections(&self, account: Option<&str>) -> Result<Vec<SharingDetection>> {
        self.read(|conn| {
        let mut query = conn.prepare_cached(
            "SELECT license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms FROM sharing_detections
             WHERE ?1 IS NULL OR account = ?1 ORDER BY detected_ms DESC, license",
        )?;
        let rows = query.query_map([account], sharing_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn active_users(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<ActiveUsers> {
        self.read(|conn| {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let cut = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let filter = "FROM usage_records WHERE account = ?1 AND window_start_ms >= ?2 AND window_start_ms < ?3
                      AND user_ref <> '' AND outcome = 'allowed' AND meter = 'calls'
                      AND (?4 IS NULL OR batch_id IN (SELECT batch_id FROM batches WHERE received_ms <= ?4))";
        let users: i64 = conn.query_row(
            &format!("SELECT COUNT(DISTINCT user_ref) {filter}"),
            params![account, from, to, cut],
            |r| r.get(0),
        )?;
        let mut out = ActiveUsers {
            users: u64_of(users),
            ..ActiveUsers::default()
        };
        for (column, into) in [
            ("license", &mut out.by_license),
            ("feature", &mut out.by_feature),
        ] {
            let mut query = conn.prepare_cached(&format!(
                "SELECT {column}, COUNT(DISTINCT user_ref) {filter} GROUP BY {column}"
            ))?;
            let rows = query.query_map(params![account, from, to, cut], |r| {
                Ok((r.get::<_, String>(0)?, u64_of(r.get(1)?)))
            })?;
            for row in rows {
                let (name, n) = row?;
                into.insert(name, n);
            }
        }
        Ok(out)
        })
    }

    fn seat_use(&self, account: &str, now_ms: u64) -> Result<Vec<SeatUse>> {
        self.read(|conn| {
            let mut query = conn.prepare_cached(
                "SELECT license, kind, MAX(seat_limit), MAX(n) FROM (
               SELECT license, kind, key_id, MAX(seat_limit) AS seat_limit, COUNT(*) AS n FROM seats
               WHERE account = ?1 AND until_ms > ?2 GROUP BY license, kind, key_id)
             GROUP BY license, kind ORDER BY license, kind",
            )?;
            let rows = query.query_map(params![account, to_i64("now_ms", now_ms)?], |r| {
                Ok(SeatUse {
                    license: r.get(0)?,
                    kind: r.get(1)?,
                    limit: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    in_use: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn grant_lease(&self, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant> {
        let r = ask.request;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = tx
            .query_row(
                "SELECT granted, period_start_ms, period_end_ms, expires_ms, allocated_after, closed_ms IS NOT NULL FROM leases WHERE lease_id = ?1",
                [&r.lease_id],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?, row.get::<_, i64>(3)?, row.get::<_, i64>(4)?, row.get::<_, bool>(5)?)),
            )
            .optional()?;
        if let Some((granted, start, end, expires, allocated, closed)) = stored {
            tx.commit()?;
            // A retried request gets its grant again, but not once the lease was returned:
            // those units are back in the quota (or used).
            let granted = if closed { 0 } else { granted };
            return Ok(grant_of(
                &r.lease_id,
                granted,
                start,
                end,
                expires,
                allocated,
            ));
        }
        let (start, end) = (
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("period_end_ms", ask.period_end_ms)?,
        );
        let allocated: i64 = tx
            .query_row(
                "SELECT allocated FROM quota_allocations WHERE license = ?1 AND meter = ?2 AND period_start_ms = ?3 AND period_end_ms = ?4",
                params![r.license, r.meter.as_str(), start, end],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let granted = grant_size(r.want, ask.limit, allocated);
        let after = allocated.saturating_add(granted);
        tx.execute(
            "INSERT INTO quota_allocations (license, meter, period_start_ms, period_end_ms, allocated) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (license, meter, period_start_ms, period_end_ms) DO UPDATE SET allocated = excluded.allocated",
            params![r.license, r.meter.as_str(), start, end, after],
        )?;
        let expires = to_i64("expires_ms", ask.expires_ms)?;
        tx.execute(
            "INSERT INTO leases (lease_id, holder, account, license, meter, period_start_ms, period_end_ms, limit_units, granted, allocated_after, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![r.lease_id, ask.holder, r.account, r.license, r.meter.as_str(), start, end, to_i64("limit", ask.limit)?, granted, after, expires, to_i64("now_ms", now_ms)?],
        )?;
        tx.commit()?;
        Ok(grant_of(&r.lease_id, granted, start, end, expires, after))
    }

    fn close_lease(&self, lease_id: &str, used: u64, now_ms: u64) -> Result<bool> {
        let used = to_i64("used", used)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let closed = tx
            .query_row(
                "UPDATE leases SET used = ?1, closed_ms = ?2 WHERE lease_id = ?3 AND closed_ms IS NULL
                 RETURNING license, meter, period_start_ms, period_end_ms, granted",
                params![used, to_i64("now_ms", now_ms)?, lease_id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?, row.get::<_, i64>(3)?, row.get::<_, i64>(4)?)),
            )
            .optional()?;
        let known = match closed {
            Some((license, meter, start, end, granted)) => {
                tx.execute(
                    "UPDATE quota_allocations SET allocated = MAX(0, allocated + ?1 - ?2)
                     WHERE license = ?3 AND meter = ?4 AND period_start_ms = ?5 AND period_end_ms = ?6",
                    params![used, granted, license, meter, start, end],
                )?;
                true
            }
            None => tx
                .query_row(
                    "SELECT 1 FROM leases WHERE lease_id = ?1",
                    [lease_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some(),
        };
        tx.commit()?;
        Ok(known)
    }

    fn set_revoked(&self, license: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match reason {
            Some(reason) => conn.execute(
                "INSERT INTO revoked_licenses (license, reason, revoked_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (license) DO UPDATE SET reason = excluded.reason, revoked_ms = excluded.revoked_ms",
                params![license, reason, to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM revoked_licenses WHERE license = ?1", [license])?,
        };
        Ok(())
    }

    fn set_suspended(&self, account: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match reason {
            Some(reason) => conn.execute(
                "INSERT INTO suspended_accounts (account, reason, suspended_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account) DO UPDATE SET reason = excluded.reason, suspended_ms = excluded.suspended_ms",
                params![account, reason, to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM suspended_accounts WHERE account = ?1", [account])?,
        };
        Ok(())
    }

    fn set_budget(&self, account: &str, budget: Option<&Budget>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match budget {
            Some(b) => conn.execute(
                "INSERT INTO budgets (account, period, amount, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account) DO UPDATE SET period = excluded.period, amount = excluded.amount, updated_ms = excluded.updated_ms",
                params![account, b.period.as_str(), b.amount.to_string(), to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM budgets WHERE account = ?1", [account])?,
        };
        Ok(())
    }

    fn is_known(&self, name: &Named<'_>) -> Result<bool> {
        let (sql, value) = name.known_sql();
        self.read(|conn| Ok(conn.query_row(sql, [value], |r| r.get(0))?))
    }

    fn restrictions(&self, licenses: &[String], accounts: &[String]) -> Result<Restrictions> {
        self.read(|conn| {
        let mut out = Restrictions::default();
        for license in licenses {
            if let Some(reason) = conn
                .query_row(
                    "SELECT reason FROM revoked_licenses WHERE license = ?1",
                    [license],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                out.revoked.insert(license.clone(), reason);
            }
        }
        for license in licenses {
            let detection = conn
                .query_row(
                    "SELECT license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms FROM sharing_detections
                     WHERE license = ?1 AND blocked_until_ms IS NOT NULL",
                    [license],
                    sharing_row,
                )
                .optional()?;
            if let Some(detection) = detection {
                out.sharing_blocks.insert(license.clone(), detection);
            }
        }
        for account in accounts {
            if let Some(reason) = conn
                .query_row(
                    "SELECT reason FROM suspended_accounts WHERE account = ?1",
                    [account],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                out.suspended.insert(account.clone(), reason);
            }
            if let Some((period, amount)) = conn
                .query_row(
                    "SELECT period, amount FROM budgets WHERE account = ?1",
                    [account],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?
            {
                out.budgets
                    .insert(account.clone(), parse_budget(&period, &amount)?);
            }
        }
        Ok(out)
        })
    }

    fn record_licenses(&self, seen: &[LicenseSeen], now_ms: u64) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan, last_seen_ms = excluded.last_seen_ms",
            )?;
            for l in seen {
                upsert.execute(params![
                    l.license,
                    l.account,
                    l.plan,
                    to_i64("now_ms", now_ms)?
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn add_signing_key(&self, key: &StoredKey) -> Result<bool> {
        let conn = self.conn()?;
        let added = conn.execute(
            "INSERT INTO signing_keys (kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL) ON CONFLICT (kid) DO NOTHING",
            params![key.kid, key.alg, key.private_pem, key.public_jwk, to_i64("created_ms", key.created_ms)?, to_i64("activates_ms", key.activates_ms)?],
        )?;
        Ok(added == 1)
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms FROM signing_keys ORDER BY created_ms, kid",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(StoredKey {
                kid: r.get(0)?,
                alg: r.get(1)?,
                private_pem: r.get(2)?,
                public_jwk: r.get(3)?,
                created_ms: u64_of(r.get(4)?),
                activates_ms: u64_of(r.get(5)?),
                retired_ms: r.get::<_, Option<i64>>(6)?.map(u64_of),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn retire_signing_key(&self, kid: &str, now_ms: u64) -> Result<bool> {
        let conn = self.conn()?;
        let found = conn.execute(
            "UPDATE signing_keys SET retired_ms = COALESCE(retired_ms, ?1) WHERE kid = ?2",
            params![to_i64("now_ms", now_ms)?, kid],
        )?;
        Ok(found == 1)
    }

    fn add_license(&self, l: &IssuedLicense) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = tx.execute(
            "INSERT INTO issued_licenses (license, account, plan, features, limits, not_before_ms, expires_ms, kid, issued_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (license) DO NOTHING",
            params![
                l.license,
                l.account,
                l.plan,
                serde_json::to_string(&l.features)?,
                l.limits.as_ref().map(serde_json::to_string).transpose()?,
                to_i64("not_before_ms", l.not_before_ms)?,
                to_i64("expires_ms", l.expires_ms)?,
                l.kid,
                to_i64("issued_ms", l.issued_ms)?,
            ],
        )?;
        if added == 1 {
            // The plan is known before any filter serves the license: its usage is priced.
            tx.execute(
                "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES (?1, ?2, ?3, 0)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan",
                params![l.license, l.account, l.plan],
            )?;
        }
        tx.commit()?;
        Ok(added == 1)
    }

    fn issued_licenses(&self, account: Option<&str>) -> Result<Vec<IssuedLicense>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT i.license, i.account, i.plan, i.features, i.limits, i.not_before_ms, i.expires_ms, i.kid, i.issued_ms, r.revoked_ms
             FROM issued_licenses i LEFT JOIN revoked_licenses r ON r.license = i.license
             WHERE (?1 IS NULL OR i.account = ?1) ORDER BY i.license",
        )?;
        let rows = statement.query_map(params![account], |r| {
            Ok(license_of((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            )))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn billable_usage(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT r.license, COALESCE(l.plan, ''), r.feature, r.meter, SUM(r.units) FROM usage_facts r
             LEFT JOIN licenses l ON l.license = r.license
             WHERE r.account = ?1 AND r.outcome = 'allowed' AND r.window_start_ms >= ?2 AND r.window_start_ms < ?3
               AND (?4 IS NULL OR r.received_ms <= ?4)
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        )?;
        let until = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let rows = statement.query_map(
            params![
                account,
                to_i64("from_ms", from_ms)?,
                to_i64("to_ms", to_ms)?,
                until
            ],
            billable_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn late_usage(
        &self,
        account: &str,
        before_ms: u64,
        received_after_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT r.license, COALESCE(l.plan, ''), r.feature, r.meter, SUM(r.units) FROM usage_facts r
             LEFT JOIN licenses l ON l.license = r.license
             WHERE r.received_ms > ?3 AND (?4 IS NULL OR r.received_ms <= ?4)
               AND r.account = ?1 AND r.outcome = 'allowed' AND r.window_start_ms < ?2
             GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        )?;
        let until = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let rows = statement.query_map(
            params![
                account,
                to_i64("before_ms", before_ms)?,
                to_i64("received_after_ms", received_after_ms)?,
                until
            ],
            billable_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn first_usage_ms(&self, account: &str, from_ms: u64, to_ms: u64) -> Result<Option<u64>> {
        self.read(|conn| {
        let first: Option<i64> = conn.query_row(
            "SELECT MIN(window_start_ms) FROM usage_facts WHERE account = ?1 AND window_start_ms >= ?2 AND window_start_ms < ?3",
            params![account, to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?],
            |r| r.get(0),
        )?;
        Ok(first.map(u64_of))
        })
    }

    fn records(
        &self,
        from_ms: u64,
        to_ms: u64,
        after_id: i64,
        limit: u32,
        received_until_ms: u64,
    ) -> Result<Vec<StoredRecord>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT r.id, r.batch_id, r.account, r.license, r.feature, r.outcome, r.meter, r.units, r.window_start_ms, r.window_end_ms, r.user_ref
             FROM usage_records r JOIN batches b ON b.batch_id = r.batch_id
             WHERE r.window_start_ms >= ?1 AND r.window_start_ms < ?2 AND r.id > ?3 AND b.received_ms <= ?5
             ORDER BY r.id LIMIT ?4",
        )?;
        let rows = statement.query_map(
            params![
                to_i64("from_ms", from_ms)?,
                to_i64("to_ms", to_ms)?,
                after_id,
                limit,
                to_i64("received_until_ms", received_until_ms)?
            ],
            |r| {
                Ok(StoredRecord {
                    id: r.get(0)?,
                    batch_id: r.get(1)?,
                    account: r.get(2)?,
                    license: r.get(3)?,
                    feature: r.get(4)?,
                    outcome: r.get(5)?,
                    meter: r.get(6)?,
                    units: u64_of(r.get(7)?),
                    window_start_ms: u64_of(r.get(8)?),
                    window_end_ms: u64_of(r.get(9)?),
                    user: r.get(10)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn accounts(&self, from_ms: u64, to_ms: u64) -> Result<Vec<String>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
            "SELECT account FROM usage_facts WHERE window_start_ms >= ?1 AND window_start_ms < ?2
             UNION SELECT account FROM issued_licenses WHERE not_before_ms < ?2 AND expires_ms > ?1
             ORDER BY 1",
        )?;
            let rows = statement.query_map(
                params![to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?],
                |r| r.get(0),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
    fn budgets(&self) -> Result<BTreeMap<String, Budget>> {
        self.read(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT account, period, amount FROM budgets")?;
            let rows = statement.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (account, period, amount) = row?;
                out.insert(account, parse_budget(&period, &amount)?);
            }
            Ok(out)
        })
    }

    fn quotas(&self, account: &str, now_ms: u64) -> Result<Vec<QuotaState>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(QUOTAS_SQL_SQLITE)?;
            let rows = statement.query_map(params![account, to_i64("now_ms", now_ms)?], |r| {
                Ok(QuotaState {
                    license: r.get(0)?,
                    meter: r.get(1)?,
                    period_start_ms: u64_of(r.get(2)?),
                    period_end_ms: u64_of(r.get(3)?),
                    limit: r.get::<_, Option<i64>>(4)?.map_or(0, u64_of),
                    allocated: u64_of(r.get(5)?),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn finalize_invoice(
        &self,
        invoice: &StoredInvoice,
        event: Option<&WebhookEvent>,
    ) -> Result<(StoredInvoice, bool)> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = tx.execute(
            "INSERT INTO invoices (invoice_id, account, period_start_ms, period_end_ms, currency, total, body, finalized_ms, cut_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
            params![
                invoice.invoice_id,
                invoice.account,
                to_i64("period_start_ms", invoice.period_start_ms)?,
                to_i64("period_end_ms", invoice.period_end_ms)?,
                invoice.currency,
                invoice.total,
                invoice.body.to_string(),
                to_i64("finalized_ms", invoice.finalized_ms)?,
                to_i64("cut_ms", invoice.cut_ms)?,
            ],
        )? == 1;
        if added {
            if let Some(event) = event {
                insert_event(&tx, event)?;
            }
        }
        let stored = tx.query_row(
            // By period, not id: an invoice of this period stored under another id is the one.
            &format!(
                "SELECT {INVOICE_COLUMNS} FROM invoices WHERE account = ?1 AND period_start_ms = ?2"
            ),
            params![
                invoice.account,
                to_i64("period_start_ms", invoice.period_start_ms)?
            ],
            |r| {
                Ok(invoice_of((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                )))
            },
        )?;
        tx.commit()?;
        Ok((stored, added))
    }

    fn invoices(&self, account: Option<&str>) -> Result<Vec<StoredInvoice>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(&format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE (?1 IS NULL OR account = ?1) ORDER BY period_start_ms, account"
        ))?;
        let rows = statement.query_map(params![account], |r| {
            Ok(invoice_of((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
            )))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn enqueue_event(&self, event: &WebhookEvent) -> Result<bool> {
        let conn = self.conn()?;
        insert_event(&conn, event)
    }

    fn claim_events(&self, now_ms: u64, lease_ms: u64, limit: u32) -> Result<Vec<WebhookEvent>> {
        let conn = self.conn()?;
        let mut statement = conn.prepare_cached(&format!(
            "UPDATE webhook_events SET next_attempt_ms = ?2
             WHERE event_id IN (SELECT event_id FROM webhook_events
                                WHERE delivered_ms IS NULL AND failed_ms IS NULL AND next_attempt_ms <= ?1
                                ORDER BY next_attempt_ms LIMIT ?3)
             RETURNING {EVENT_COLUMNS}"
        ))?;
        let rows = statement.query_map(
            params![
                to_i64("now_ms", now_ms)?,
                to_i64("lease", now_ms.saturating_add(lease_ms))?,
                limit
            ],
            event_row,
        )?;
        let mut events = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        events.sort_by_key(|e| e.created_ms);
        Ok(events)
    }

    fn record_delivery(&self, d: &Delivery, outcome: DeliveryOutcome) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO webhook_deliveries (event_id, attempt, at_ms, status, error, duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![d.event_id, d.attempt, to_i64("at_ms", d.at_ms)?, d.status, d.error, to_i64("duration_ms", d.duration_ms)?],
        )?;
        let at = to_i64("at_ms", d.at_ms)?;
        match outcome {
            DeliveryOutcome::Delivered => tx.execute(
                "UPDATE webhook_events SET attempts = ?2, delivered_ms = ?3 WHERE event_id = ?1",
                params![d.event_id, d.attempt, at],
            )?,
            DeliveryOutcome::RetryAt(next) => tx.execute(
                "UPDATE webhook_events SET attempts = ?2, next_attempt_ms = ?3 WHERE event_id = ?1 AND delivered_ms IS NULL",
                params![d.event_id, d.attempt, to_i64("next_attempt_ms", next)?],
            )?,
            DeliveryOutcome::GaveUp => tx.execute(
                "UPDATE webhook_events SET attempts = ?2, failed_ms = ?3 WHERE event_id = ?1 AND delivered_ms IS NULL",
                params![d.event_id, d.attempt, at],
            )?,
        };
        tx.commit()?;
        Ok(())
    }

    fn webhooks_due_now(&self, now_ms: u64) -> Result<u64> {
        let moved = self.conn()?.execute(
            "UPDATE webhook_events SET next_attempt_ms = ?1
             WHERE delivered_ms IS NULL AND failed_ms IS NULL AND next_attempt_ms > ?1",
            [to_i64("now_ms", now_ms)?],
        )?;
        Ok(moved as u64)
    }

    fn webhook_events(&self, limit: u32) -> Result<Vec<WebhookEvent>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM webhook_events ORDER BY created_ms DESC, event_id LIMIT ?1"
        ))?;
            let rows = statement.query_map([limit], event_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn deliveries(&self, event_id: &str) -> Result<Vec<Delivery>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT event_id, attempt, at_ms, status, error, duration_ms FROM webhook_deliveries WHERE event_id = ?1 ORDER BY attempt, id",
        )?;
        let rows = statement.query_map([event_id], |r| {
            Ok(Delivery {
                event_id: r.get(0)?,
                attempt: r.get(1)?,
                at_ms: u64_of(r.get(2)?),
                status: r.get(3)?,
                error: r.get(4)?,
                duration_ms: u64_of(r.get(5)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn apply_retention(&self, before_ms: u64, limit: u32) -> Result<Retained> {
        let before = to_i64("before_ms", before_ms)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch("CREATE TEMP TABLE IF NOT EXISTS retiring (id INTEGER PRIMARY KEY); DELETE FROM temp.retiring;")?;
        tx.execute(
            "INSERT INTO temp.retiring (id) SELECT id FROM usage_records WHERE window_start_ms < ?1 LIMIT ?2",
            params![before, limit],
        )?;
        let (records, units): (i64, i64) = tx.query_row(
            "SELECT COUNT(*), COALESCE(SUM(units), 0) FROM usage_records WHERE id IN (SELECT id FROM temp.retiring)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            "INSERT INTO usage_rollups (account, license, feature, outcome, meter, hour_start_ms, units, records, received_ms)
             SELECT r.account, r.license, r.feature, r.outcome, r.meter, (r.window_start_ms / 3600000) * 3600000,
                    SUM(r.units), COUNT(*), MAX(b.received_ms)
             FROM usage_records r JOIN batches b ON b.batch_id = r.batch_id
             WHERE r.id IN (SELECT id FROM temp.retiring)
             GROUP BY 1, 2, 3, 4, 5, 6
             ON CONFLICT (account, license, feature, outcome, meter, hour_start_ms) DO UPDATE SET
                 units = units + excluded.units, records = records + excluded.records,
                 received_ms = MAX(received_ms, excluded.received_ms)",
            [],
        )?;
        tx.execute(
            "DELETE FROM usage_records WHERE id IN (SELECT id FROM temp.retiring)",
            [],
        )?;
        tx.execute("DELETE FROM temp.retiring", [])?;
        let seats = tx.execute("DELETE FROM seats WHERE until_ms < ?1", [before])?;
        let clients = tx.execute(
            "DELETE FROM license_clients WHERE last_seen_ms < ?1",
            [before],
        )?;
        let sharing = tx.execute(
            "DELETE FROM sharing_detections WHERE detected_ms < ?1 AND COALESCE(blocked_until_ms, 0) < ?1",
            [before],
        )?;
        tx.commit()?;
        let retained = Retained {
            records: u64_of(records),
            units: u64_of(units),
            seats: seats as u64,
            clients: clients as u64,
            sharing_detections: sharing as u64,
        };
        if retained != Retained::default() {
            scrub_wal(&conn)?;
        }
        Ok(retained)
    }

    fn export_account(&self, account: &str) -> Result<Export> {
        self.read(|conn| {
            // One snapshot for every table, as the writer's lock gave before.
            let conn = conn.transaction()?;
            let licenses = sqlite_account_licenses(&conn, account)?;
            let mut export = Export::new();
            for (table, _) in crate::privacy::ACCOUNT_TABLES {
                let rows = sqlite_rows(
                    &conn,
                    &format!("SELECT * FROM {table} WHERE account = ?1"),
                    &[&account],
                )?;
                export.insert((*table).to_string(), rows);
            }
            for table in crate::privacy::LICENSE_TABLES {
                let mut rows = Vec::new();
                for license in &licenses {
                    rows.extend(sqlite_rows(
                        &conn,
                        &format!("SELECT * FROM {table} WHERE license = ?1"),
                        &[license],
                    )?);
                }
                export.insert((*table).to_string(), rows);
            }
            let events = sqlite_events_naming(&conn, account, &licenses)?;
            let mut event_rows = Vec::new();
            let mut delivery_rows = Vec::new();
            for id in &events {
                event_rows.extend(sqlite_rows(
                    &conn,
                    "SELECT * FROM webhook_events WHERE event_id = ?1",
                    &[id],
                )?);
                delivery_rows.extend(sqlite_rows(
                    &conn,
                    "SELECT * FROM webhook_deliveries WHERE event_id = ?1 ORDER BY id",
                    &[id],
                )?);
            }
            export.insert("webhook_events".to_string(), event_rows);
            export.insert("webhook_deliveries".to_string(), delivery_rows);
            Ok(export)
        })
    }

    fn erase_account(&self, account: &str) -> Result<Erased> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let licenses = sqlite_account_licenses(&tx, account)?;
        let events = sqlite_events_naming(&tx, account, &licenses)?;
        let mut erased = Erased::new();
        let mut deliveries = 0;
        let mut events_deleted = 0;
        for id in &events {
            deliveries += tx.execute("DELETE FROM webhook_deliveries WHERE event_id = ?1", [id])?;
            events_deleted += tx.execute("DELETE FROM webhook_events WHERE event_id = ?1", [id])?;
        }
        erased.insert("webhook_deliveries".to_string(), deliveries as u64);
        erased.insert("webhook_events".to_string(), events_deleted as u64);
        for table in crate::privacy::LICENSE_TABLES {
            let mut deleted = 0;
            for license in &licenses {
                deleted += tx.execute(
                    &format!("DELETE FROM {table} WHERE license = ?1"),
                    [license],
                )?;
            }
            erased.insert((*table).to_string(), deleted as u64);
        }
        for (table, _) in crate::privacy::ACCOUNT_TABLES {
            let deleted = tx.execute(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )?;
            erased.insert((*table).to_string(), deleted as u64);
        }
        tx.commit()?;
        scrub_wal(&conn)?;
        Ok(erased)
    }

    fn export_subject(&self, subject: &str) -> Result<Export> {
        self.read(|conn| {
            let mut export = Export::new();
            for (table, column) in crate::privacy::SUBJECT_TABLES {
                let rows = sqlite_rows(
                    conn,
                    &format!("SELECT * FROM {table} WHERE {column} = ?1"),
                    &[&subject],
                )?;
                export.insert((*table).to_string(), rows);
            }
            Ok(export)
        })
    }

    fn erase_subject(&self, subject: &str) -> Result<Erased> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut erased = Erased::new();
        for (table, column) in crate::privacy::SUBJECT_TABLES {
            let sql = if *table == "usage_records" {
                format!("UPDATE {table} SET {column} = '' WHERE {column} = ?1")
            } else {
                format!("DELETE FROM {table} WHERE {column} = ?1")
            };
            let changed = tx.execute(&sql, [subject])?;
            erased.insert((*table).to_string(), changed as u64);
        }
        tx.commit()?;
        scrub_wal(&conn)?;
        Ok(erased)
    }
}

/// Deleted rows are zeroed in the file (`secure_delete`, set at open); the WAL still holds
/// earlier images of the pages they were on until a checkpoint copies the WAL back and
/// truncates it. Busy readers can keep a checkpoint from finishing: then the next erasure or
/// retention round (or SQLite's own checkpoints) finishes the job.
fn scrub_wal(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// The licenses an account has anywhere in the store.
fn sqlite_account_licenses(conn: &Connection, account: &str) -> Result<BTreeSet<String>> {
    let mut licenses = BTreeSet::new();
    for table in crate::privacy::license_sources() {
        let mut statement = conn.prepare(&format!(
            "SELECT DISTINCT license FROM {table} WHERE account = ?1"
        ))?;
        let rows = statement.query_map([account], |r| r.get::<_, String>(0))?;
        for license in rows {
            licenses.insert(license?);
        }
    }
    Ok(licenses)
}

/// Webhook events whose payload names the account or one of its licenses.
fn sqlite_events_naming(
    conn: &Connection,
    account: &str,
    licenses: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let mut names = licenses.clone();
    names.insert(account.to_string());
    let mut statement = conn.prepare("SELECT event_id, payload FROM webhook_events")?;
    let rows = statement.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut events = Vec::new();
    for row in rows {
        let (id, payload) = row?;
        let payload: serde_json::Value =
            serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
        if crate::privacy::mentions(&payload, &names) {
            events.push(id);
        }
    }
    Ok(events)
}

/// Rows as JSON objects by column name, whatever the table.
fn sqlite_rows(
    conn: &Connection,
    sql: &str,
    values: &[&dyn rusqlite::ToSql],
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    use rusqlite::types::ValueRef;
    let mut statement = conn.prepare(sql)?;
    let names: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut rows = statement.query(values)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut object = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let value = match row.get_ref(i)? {
                ValueRef::Null => serde_json::Value::Null,
                ValueRef::Integer(v) => v.into(),
                ValueRef::Real(v) => serde_json::json!(v),
                ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                ValueRef::Blob(b) => serde_json::json!(b),
            };
            object.insert(name.clone(), value);
        }
        out.push(object);
    }
    Ok(out)
}

fn sharing_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SharingDetection> {
    Ok(SharingDetection {
        license: r.get(0)?,
        account: r.get(1)?,
        clients: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
        max_clients: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
        window_ms: u64_of(r.get(4)?),
        detected_ms: u64_of(r.get(5)?),
        blocked_until_ms: r.get::<_, Option<i64>>(6)?.map(u64_of),
    })
}

fn billable_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BillableUsage> {
    Ok(BillableUsage {
        license: r.get(0)?,
        plan: r.get(1)?,
        feature: r.get(2)?,
        meter: r.get(3)?,
        units: u64_of(r.get(4)?),
    })
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WebhookEvent> {
    Ok(event_of((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    )))
}

fn insert_event(conn: &Connection, event: &WebhookEvent) -> Result<bool> {
    let added = conn.execute(
        "INSERT INTO webhook_events (event_id, type, payload, created_ms, next_attempt_ms, attempts) VALUES (?1, ?2, ?3, ?4, ?5, 0)
         ON CONFLICT (event_id) DO NOTHING",
        params![
            event.event_id,
            event.event_type,
            event.payload.to_string(),
            to_i64("created_ms", event.created_ms)?,
            to_i64("next_attempt_ms", event.next_attempt_ms)?,
        ],
    )?;
    Ok(added == 1)
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::{SqliteStore, Store};

    #[test]
    fn both_backends_have_every_migration() {
        let versions = |m: &[(i64, &str)]| m.iter().map(|(v, _)| *v).collect::<Vec<_>>();
        assert_eq!(
            versions(super::SQLITE_MIGRATIONS),
            versions(crate::postgres_store::MIGRATIONS)
        );
        let files = |dir: &str| {
            std::fs::read_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        assert_eq!(files("migrations/sqlite"), super::SQLITE_MIGRATIONS.len());
        assert_eq!(files("migrations/postgres"), super::SQLITE_MIGRATIONS.len());
    }

    fn temp_store(name: &str) -> (std::path::PathBuf, SqliteStore) {
        let dir =
            std::env::temp_dir().join(format!("tollgate-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("usage.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn sqlite_reads_answer_while_the_writer_is_held_and_see_its_last_commit() {
        let (dir, store) = temp_store("readers");
        store.set_suspended("acme", Some("unpaid"), 1_000).unwrap();
        let store = std::sync::Arc::new(store);
        let writer = store.conn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reading = std::sync::Arc::clone(&store);
        std::thread::spawn(move || {
            let _ = tx.send(reading.restrictions(&[], &["acme".to_string()]));
        });
        // A read through the writer would wait for this guard for ever.
        let read = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the read answered while the writer was held")
            .unwrap();
        drop(writer);
        assert_eq!(
            read.suspended.get("acme").map(String::as_str),
            Some("unpaid")
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_write_through_a_sqlite_reader_is_refused() {
        let (dir, store) = temp_store("query-only");
        let refused = store
            .read(|conn| Ok(conn.execute("DELETE FROM licenses", [])?))
            .unwrap_err();
        assert!(format!("{refused:#}").contains("readonly"), "{refused:#}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
