//! PostgreSQL storage, for a cluster of collector replicas sharing one database: any replica
//! can take any batch, and the batch id's primary key keeps each batch stored once.

use std::sync::Mutex;

use anyhow::{Context, Result};
use postgres::{Client, NoTls};
use tollgate_wire::UsageBatch;

use crate::store::{now_ms, Granularity, Ingested, Store, UsageQuery, UsageRow};

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../migrations/postgres/0001_usage.sql"))];

/// Any number to serialise migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// One connection, reopened when it breaks (the database restarted, a network cut): the batch
/// that met the broken connection gets a 503 and is retried by its filter; the next one finds a
/// new connection.
pub struct PostgresStore {
    url: String,
    client: Mutex<Option<Client>>,
}

fn to_i64(field: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .with_context(|| format!("{field} {value} does not fit a signed 64-bit integer"))
}

impl PostgresStore {
    /// Connect to `url` (`postgres://user:password@host:port/db`) and migrate.
    pub fn open(url: &str) -> Result<PostgresStore> {
        let mut client = Client::connect(url, NoTls).context("connecting to PostgreSQL")?;
        migrate(&mut client)?;
        warn_if_not_durable(&mut client);
        Ok(PostgresStore {
            url: url.to_string(),
            client: Mutex::new(Some(client)),
        })
    }

    /// Run `work` on the connection, reconnecting first if the last one broke.
    fn with_client<T>(&self, work: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut guard = self
            .client
            .lock()
            .map_err(|_| anyhow::anyhow!("the database connection was poisoned"))?;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(Client::connect(&self.url, NoTls).context("reconnecting to PostgreSQL")?);
        }
        let client = guard.as_mut().context("no database connection")?;
        work(client)
    }
}

/// An acknowledged batch must survive a crash of the database: with `fsync` or
/// `synchronous_commit` off, a crash can lose batches the collector already acknowledged (the
/// filters have dropped them). Say so loudly at start.
fn warn_if_not_durable(client: &mut Client) {
    for setting in ["fsync", "synchronous_commit"] {
        let value: Option<String> = client
            .query_one(&format!("SHOW {setting}"), &[])
            .ok()
            .map(|row| row.get(0));
        if value.as_deref() == Some("off") {
            eprintln!(
                "{}",
                serde_json::json!({"level": "warn", "msg": format!("PostgreSQL runs with {setting}=off: a database crash can lose usage batches the collector has acknowledged")})
            );
        }
    }
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )?;
    for (version, sql) in MIGRATIONS {
        let done = tx.query_opt(
            "SELECT version FROM schema_migrations WHERE version = $1",
            &[version],
        )?;
        if done.is_none() {
            tx.batch_execute(sql)
                .with_context(|| format!("migration {version}"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                &[version, &now_ms()],
            )?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn bucket_expression(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Hour => "to_char(to_timestamp(window_start_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')",
        Granularity::Day => "to_char(to_timestamp(window_start_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T00:00:00Z\"')",
        Granularity::Month => "to_char(to_timestamp(window_start_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-\"01T00:00:00Z\"')",
    }
}

impl Store for PostgresStore {
    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
        self.with_client(|client| ingest(client, batch, received_ms))
    }

    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.with_client(|client| usage(client, query))
    }

    fn ping(&self) -> Result<()> {
        self.with_client(|client| {
            client.simple_query("SELECT 1")?;
            Ok(())
        })
    }
}

fn ingest(client: &mut Client, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
    let mut tx = client.transaction()?;
    let records = to_i64(
        "records",
        u64::try_from(batch.records.len()).unwrap_or(u64::MAX),
    )?;
    let inserted = tx.execute(
        "INSERT INTO batches (batch_id, instance, sequence, records, created_ms, received_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING",
        &[
            &batch.batch_id,
            &batch.source.instance,
            &to_i64("sequence", batch.sequence)?,
            &records,
            &to_i64("created_ms", batch.created_ms)?,
            &to_i64("received_ms", received_ms)?,
        ],
    )?;
    if inserted == 0 {
        let first: i64 = tx
            .query_one(
                "SELECT records FROM batches WHERE batch_id = $1",
                &[&batch.batch_id],
            )?
            .get(0);
        tx.commit()?;
        return Ok(Ingested::Duplicate {
            records: u64::try_from(first).unwrap_or(0),
        });
    }
    // One statement for the whole batch (columns as arrays, UNNEST into rows): one round
    // trip instead of one per record.
    let n = batch.records.len();
    let (mut account, mut license, mut feature, mut outcome, mut meter) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut units, mut start, mut end) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in &batch.records {
        account.push(r.account.as_str());
        license.push(r.license.as_str());
        feature.push(r.feature.as_str());
        outcome.push(r.outcome.as_str());
        meter.push(r.meter.as_str());
        units.push(to_i64("units", r.units)?);
        start.push(to_i64("window_start_ms", r.window_start_ms)?);
        end.push(to_i64("window_end_ms", r.window_end_ms)?);
    }
    tx.execute(
            "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms)
             SELECT $1, * FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[])",
            &[
                &batch.batch_id,
                &account,
                &license,
                &feature,
                &outcome,
                &meter,
                &units,
                &start,
                &end,
            ],
        )?;
    tx.commit()?;
    Ok(Ingested::Accepted {
        records: u64::try_from(records).unwrap_or(0),
    })
}

fn usage(client: &mut Client, query: &UsageQuery) -> Result<Vec<UsageRow>> {
    let bucket = bucket_expression(query.granularity.unwrap_or(Granularity::Day));
    let sql = format!(
            "SELECT {bucket} AS period, account, license, feature, outcome, meter, SUM(units)::BIGINT
             FROM usage_records
             WHERE ($1::TEXT IS NULL OR account = $1) AND ($2::TEXT IS NULL OR license = $2)
               AND ($3::TEXT IS NULL OR feature = $3) AND ($4::TEXT IS NULL OR meter = $4)
               AND ($5::TEXT IS NULL OR outcome = $5)
               AND ($6::BIGINT IS NULL OR window_start_ms >= $6) AND ($7::BIGINT IS NULL OR window_start_ms < $7)
             GROUP BY period, account, license, feature, outcome, meter
             ORDER BY period, account, license, feature, outcome, meter"
        );
    let from = query.from_ms.map(|v| to_i64("from_ms", v)).transpose()?;
    let to = query.to_ms.map(|v| to_i64("to_ms", v)).transpose()?;
    let rows = client.query(
        &sql,
        &[
            &query.account,
            &query.license,
            &query.feature,
            &query.meter,
            &query.outcome,
            &from,
            &to,
        ],
    )?;
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            period: r.get(0),
            account: r.get(1),
            license: r.get(2),
            feature: r.get(3),
            outcome: r.get(4),
            meter: r.get(5),
            units: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
        })
        .collect())
}
