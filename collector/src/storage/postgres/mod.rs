//! PostgreSQL storage, for a cluster of collector replicas sharing one database: any replica
//! can take any batch, and the batch id's primary key keeps each batch stored once. This module
//! connects, migrates and probes; each domain's SQL is in a module of its own below.

mod billing;
mod control;
mod licensing;
mod privacy;
mod seats;
mod usage;
mod webhooks;

use std::time::Duration;

use ::postgres::{Client, NoTls};
use anyhow::{Context, Result};
use tollgate_wire::sync::{ClientsSeen, LeaseGrant, LicenseSeen, SeatAnswer};
use tollgate_wire::UsageBatch;

use super::connections::{Connect, Connections};
use super::*;

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_usage.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_control.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_licensing.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/postgres/0004_billing.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/postgres/0005_ingest_drop_batch_index.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/postgres/0006_users_seats_sharing.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/postgres/0007_retention.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/postgres/0008_one_invoice_per_period.sql"),
    ),
];

/// Any number to serialise migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// One connection, reopened when it breaks (the database restarted, a network cut): the batch
/// that met the broken connection gets a 503 and is retried by its filter; the next one finds a
/// new connection.
pub struct PostgresStore {
    url: String,
    /// A few connections, so that a sync or a read does not wait for an ingest transaction.
    clients: Connections<PostgresConnect>,
}

/// Connections per replica: what its request threads use at once, far below PostgreSQL's
/// default `max_connections` of 100 also with a dozen replicas.
const CONNECTIONS: usize = 4;

struct PostgresConnect {
    url: String,
}

impl Connect for PostgresConnect {
    type Connection = Connection;
    fn open(&self) -> Result<Connection> {
        Ok(Connection::new(
            Client::connect(&self.url, NoTls).context("reconnecting to PostgreSQL")?,
        ))
    }
    fn is_broken(&self, connection: &Connection) -> bool {
        connection.client.is_closed()
    }
}

/// A connection and the statements prepared on it. `query` with SQL text parses and plans it
/// on every call, a round trip more each time; a filter's sync runs the same four reads
/// thousands of times a second, and every batch the same two inserts, so those are
/// prepared once per connection.
struct Connection {
    client: Client,
    prepared: std::collections::HashMap<&'static str, ::postgres::Statement>,
}

impl Connection {
    fn new(client: Client) -> Self {
        Connection {
            client,
            prepared: std::collections::HashMap::new(),
        }
    }

    /// `sql` prepared on this connection (a cheap handle: the first call prepares it).
    /// Only for fixed SQL: each distinct text stays prepared for the connection's life.
    fn prepared(&mut self, sql: &'static str) -> Result<::postgres::Statement> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }
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
        let clients = Connections::new(
            PostgresConnect {
                url: url.to_string(),
            },
            CONNECTIONS,
        );
        clients.adopt(Connection::new(client));
        Ok(PostgresStore {
            url: url.to_string(),
            clients,
        })
    }

    /// Run `work` on one of this replica's connections, reconnecting first if it broke.
    fn with_client<T>(&self, work: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        self.clients.with(|connection| work(&mut connection.client))
    }
}

/// Refuse a database Tollgate never set up: reading commands must not create a store.
pub(crate) fn require_schema(url: &str) -> Result<()> {
    let mut client = Client::connect(url, NoTls).context("connecting to PostgreSQL")?;
    let tollgate: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
        .get(0);
    if !tollgate {
        anyhow::bail!("this PostgreSQL database is not a Tollgate database (it has no schema_migrations table): `tollgate-collector serve` or `init` sets one up");
    }
    Ok(())
}

/// True for PostgreSQL's `disk_full` (SQLSTATE 53100).
pub(crate) fn is_disk_full(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause
        .downcast_ref::<::postgres::Error>()
        .and_then(::postgres::Error::code)
        .is_some_and(|code| *code == ::postgres::error::SqlState::DISK_FULL)
}

/// [`StoreProbe`] for PostgreSQL: a connection of its own, with timeouts short enough that a
/// database that stopped answering fails the check instead of hanging it (the readiness state
/// also goes stale when a check hangs).
struct PostgresProbe {
    url: String,
    client: Option<Client>,
}

impl StoreProbe for PostgresProbe {
    fn check(&mut self) -> Result<()> {
        let client = match &mut self.client {
            Some(client) if !client.is_closed() => client,
            slot => {
                let mut config: ::postgres::Config =
                    self.url.parse().context("the database URL")?;
                if config.get_connect_timeout().is_none() {
                    config.connect_timeout(Duration::from_secs(1));
                }
                config.tcp_user_timeout(Duration::from_secs(2));
                slot.insert(config.connect(NoTls).context("connecting to PostgreSQL")?)
            }
        };
        let checked = client
            .simple_query("SELECT count(*) FROM schema_migrations")
            .map(drop)
            .context("querying PostgreSQL");
        if checked.is_err() {
            self.client = None;
        }
        checked
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
            tracing::warn!(
                setting,
                "PostgreSQL runs with {setting}=off: a database crash can lose usage batches the collector has acknowledged"
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
    fn probe(&self) -> Box<dyn StoreProbe> {
        Box::new(PostgresProbe {
            url: self.url.clone(),
            client: None,
        })
    }
}

const SHARING_COLUMNS: &str =
    "license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms";

fn sharing_row(r: &::postgres::Row) -> SharingDetection {
    SharingDetection {
        license: r.get(0),
        account: r.get(1),
        clients: u32::try_from(r.get::<_, i64>(2)).unwrap_or(u32::MAX),
        max_clients: u32::try_from(r.get::<_, i64>(3)).unwrap_or(u32::MAX),
        window_ms: u64_of(r.get(4)),
        detected_ms: u64_of(r.get(5)),
        blocked_until_ms: r.get::<_, Option<i64>>(6).map(u64_of),
    }
}

fn insert_event(tx: &mut ::postgres::Transaction<'_>, event: &WebhookEvent) -> Result<bool> {
    let (created, next) = (
        to_i64("created_ms", event.created_ms)?,
        to_i64("next_attempt_ms", event.next_attempt_ms)?,
    );
    let added = tx.execute(
        "INSERT INTO webhook_events (event_id, type, payload, created_ms, next_attempt_ms, attempts) VALUES ($1, $2, $3, $4, $5, 0)
         ON CONFLICT (event_id) DO NOTHING",
        &[&event.event_id, &event.event_type, &event.payload.to_string(), &created, &next],
    )?;
    Ok(added == 1)
}

/// A batch's two inserts, prepared on the connection (see [`Connection`]).
struct IngestStatements {
    batch: ::postgres::Statement,
    records: ::postgres::Statement,
}

fn usage(client: &mut Client, query: &UsageQuery) -> Result<Vec<UsageRow>> {
    let bucket = bucket_expression(query.granularity.unwrap_or(Granularity::Day));
    let sql = format!(
            "SELECT {bucket} AS period, account, license, feature, outcome, meter, SUM(units)::BIGINT
             FROM usage_facts
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
