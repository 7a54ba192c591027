//! Storage of usage: one trait, a backend per database. A batch is stored atomically with its
//! idempotency key, so a retried batch is recognised and counts zero more.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
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

/// Where usage is kept.
pub trait Store: Send + Sync + 'static {
    /// Store `batch` unless its id was stored before, in one transaction.
    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested>;
    /// Sum usage by calendar bucket, account, license, feature, outcome and meter.
    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>>;
    /// The store answers.
    fn ping(&self) -> Result<()>;
}

/// Open the store a URL names: `sqlite://<path>` (or a bare path), or `postgres://...`.
pub fn open(url: &str) -> Result<Box<dyn Store>> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        return Ok(Box::new(SqliteStore::open(Path::new(path))?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Box::new(crate::postgres_store::PostgresStore::open(url)?));
    }
    if url.contains("://") {
        bail!("unknown database URL `{url}`: use sqlite://<path> or postgres://user@host:port/db");
    }
    Ok(Box::new(SqliteStore::open(Path::new(url))?))
}

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
const SQLITE_MIGRATIONS: &[(i64, &str)] =
    &[(1, include_str!("../migrations/sqlite/0001_usage.sql"))];

/// SQLite in a file, WAL mode: the embedded default.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn =
            Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // WAL with synchronous=FULL: an acknowledged batch survives a power cut, not just a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
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

impl Store for SqliteStore {
    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
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
            tx.commit()?;
            return Ok(Ingested::Duplicate {
                records: u64::try_from(first).unwrap_or(0),
            });
        }
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
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
                ])?;
            }
        }
        tx.commit()?;
        Ok(Ingested::Accepted { records })
    }

    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let bucket = bucket_expression(query.granularity.unwrap_or(Granularity::Day));
        let sql = format!(
            "SELECT {bucket} AS period, account, license, feature, outcome, meter, SUM(units)
             FROM usage_records
             WHERE (?1 IS NULL OR account = ?1) AND (?2 IS NULL OR license = ?2)
               AND (?3 IS NULL OR feature = ?3) AND (?4 IS NULL OR meter = ?4)
               AND (?5 IS NULL OR outcome = ?5)
               AND (?6 IS NULL OR window_start_ms >= ?6) AND (?7 IS NULL OR window_start_ms < ?7)
             GROUP BY period, account, license, feature, outcome, meter
             ORDER BY period, account, license, feature, outcome, meter"
        );
        let from = query.from_ms.map(|v| to_i64("from_ms", v)).transpose()?;
        let to = query.to_ms.map(|v| to_i64("to_ms", v)).transpose()?;
        let conn = self.conn()?;
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
    }

    fn ping(&self) -> Result<()> {
        self.conn()?.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }
}
