//! PostgreSQL storage, for a cluster of collector replicas sharing one database: any replica
//! can take any batch, and the batch id's primary key keeps each batch stored once.

use crate::connections::{Connect, Connections};
use std::time::Duration;

use anyhow::{Context, Result};
use postgres::{Client, NoTls};
use tollgate_wire::UsageBatch;

use crate::privacy::{Erased, Export, Retained};
use crate::store::{
    event_of, invoice_of, Delivery, DeliveryOutcome, QuotaState, StoredInvoice, WebhookEvent,
    EVENT_COLUMNS, INVOICE_COLUMNS,
};
use crate::store::{
    grant_of, grant_size, license_of, now_ms, parse_budget, u64_of, BillableUsage, Budget,
    Granularity, Ingested, IssuedLicense, LeaseAsk, Restrictions, Store, StoredKey, StoredRecord,
    UsageQuery, UsageRow,
};
use crate::store::{ActiveUsers, SeatAsk, SeatUse, SharingDetection, StoreProbe};
use tollgate_wire::sync::{ClientsSeen, LeaseGrant, LicenseSeen, SeatAnswer};

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_usage.sql")),
    (2, include_str!("../migrations/postgres/0002_control.sql")),
    (3, include_str!("../migrations/postgres/0003_licensing.sql")),
    (4, include_str!("../migrations/postgres/0004_billing.sql")),
    (
        5,
        include_str!("../migrations/postgres/0005_ingest_drop_batch_index.sql"),
    ),
    (
        6,
        include_str!("../migrations/postgres/0006_users_seats_sharing.sql"),
    ),
    (7, include_str!("../migrations/postgres/0007_retention.sql")),
    (
        8,
        include_str!("../migrations/postgres/0008_one_invoice_per_period.sql"),
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
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
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
    fn prepared(&mut self, sql: &'static str) -> Result<postgres::Statement> {
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
        .downcast_ref::<postgres::Error>()
        .and_then(postgres::Error::code)
        .is_some_and(|code| *code == postgres::error::SqlState::DISK_FULL)
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
                let mut config: postgres::Config = self.url.parse().context("the database URL")?;
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
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>> {
        self.clients.with(|connection| {
            let statements = IngestStatements {
                batch: connection.prepared(INSERT_BATCH)?,
                records: connection.prepared(INSERT_RECORDS)?,
            };
            let mut tx = connection.client.transaction()?;
            let outcomes = batches
                .iter()
                .map(|(batch, received_ms)| ingest_in(&mut tx, &statements, batch, *received_ms))
                .collect::<Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(outcomes)
        })
    }

    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        self.with_client(|client| usage(client, query))
    }

    fn probe(&self) -> Box<dyn StoreProbe> {
        Box::new(PostgresProbe {
            url: self.url.clone(),
            client: None,
        })
    }

    fn grant_lease(&self, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant> {
        self.with_client(|client| grant_lease(client, ask, now_ms))
    }

    fn take_seat(&self, ask: &SeatAsk<'_>, now_ms: u64) -> Result<SeatAnswer> {
        let r = ask.request;
        let key = crate::seats::key_id(&r.user);
        let (kind, start, now) = (
            ask.kind(),
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("now_ms", now_ms)?,
        );
        let limit = i64::from(r.rule.limit());
        self.with_client(|client| {
            // Read committed (whatever the server's default): rows committed by the replica that
            // held the lock before are seen once the lock is ours.
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::ReadCommitted)
                .start()?;
            // One decision per license at a time, across every replica.
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('tollgate-seats:' || $1, 0))", &[&r.license])?;
            // Floating seats that freed are of no use: the table holds the live ones (named
            // seats stay, as the record of who held one in each period).
            tx.execute(
                "DELETE FROM seats WHERE license = $1 AND kind = 'floating' AND until_ms <= $2",
                &[&r.license, &now],
            )?;
            let held: Vec<crate::seats::SeatHolder> = tx
                .query(
                    "SELECT user_ref, until_ms FROM seats
                     WHERE license = $1 AND kind = $2 AND period_start_ms = $3 AND key_id = $4 AND until_ms > $5",
                    &[&r.license, &kind, &start, &key, &now],
                )?
                .iter()
                .map(|row| crate::seats::SeatHolder {
                    user_ref: row.get(0),
                    until_ms: u64_of(row.get(1)),
                })
                .collect();
            let decision = crate::seats::decide(r, &held, now_ms, ask.ttl_ms, ask.period_end_ms);
            if let Some(until) = decision.seat_until_ms {
                let until = to_i64("until_ms", until)?;
                tx.execute(
                    "INSERT INTO seats (license, account, kind, period_start_ms, user_ref, key_id, seat_limit, first_ms, last_ms, until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
                     ON CONFLICT (license, kind, period_start_ms, user_ref)
                     DO UPDATE SET seat_limit = excluded.seat_limit, last_ms = excluded.last_ms, until_ms = GREATEST(seats.until_ms, excluded.until_ms)",
                    &[&r.license, &r.account, &kind, &start, &r.user, &key, &limit, &now, &until],
                )?;
            }
            tx.commit()?;
            Ok(decision.answer.clone())
        })
    }

    fn note_clients(&self, seen: &ClientsSeen, now_ms: u64) -> Result<u32> {
        let now = to_i64("now_ms", now_ms)?;
        let since = to_i64("since", now_ms.saturating_sub(seen.window_ms))?;
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "INSERT INTO license_clients (license, account, client_ref, last_seen_ms)
                 SELECT $1, $2, c, $4 FROM UNNEST($3::TEXT[]) AS c
                 ON CONFLICT (license, client_ref) DO UPDATE SET last_seen_ms = GREATEST(license_clients.last_seen_ms, excluded.last_seen_ms)",
                &[&seen.license, &seen.account, &seen.clients, &now],
            )?;
            tx.execute(
                "DELETE FROM license_clients WHERE license = $1 AND last_seen_ms <= $2",
                &[&seen.license, &since],
            )?;
            let n: i64 = tx
                // Per pseudonym key (a key rotation would count every client twice): the
                // busiest. A ref without a key (no `.`) belongs to the key '' (as in store.rs).
                .query_one(
                    "SELECT COALESCE(MAX(n), 0)::BIGINT FROM (SELECT COUNT(*) AS n FROM license_clients WHERE license = $1
                     GROUP BY CASE WHEN strpos(client_ref, '.') > 0 THEN split_part(client_ref, '.', 1) ELSE '' END) AS per_key",
                    &[&seen.license],
                )?
                .get(0);
            tx.commit()?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    fn detect_sharing(&self, d: &SharingDetection) -> Result<bool> {
        let clients = i64::from(d.clients);
        let max_clients = i64::from(d.max_clients);
        let window = to_i64("window_ms", d.window_ms)?;
        let at = to_i64("detected_ms", d.detected_ms)?;
        let until = d
            .blocked_until_ms
            .map(|v| to_i64("blocked_until_ms", v))
            .transpose()?;
        self.with_client(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::ReadCommitted)
                .start()?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('tollgate-sharing:' || $1, 0))", &[&d.license])?;
            let last = tx.query_opt(
                "SELECT detected_ms, window_ms FROM sharing_detections WHERE license = $1",
                &[&d.license],
            )?;
            let new = last.is_none_or(|row| {
                u64_of(row.get(0)).saturating_add(u64_of(row.get(1))) <= d.detected_ms
            });
            if new {
                tx.execute(
                    "INSERT INTO sharing_detections (license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (license) DO UPDATE SET account = excluded.account, clients = excluded.clients, max_clients = excluded.max_clients,
                       window_ms = excluded.window_ms, detected_ms = excluded.detected_ms, blocked_until_ms = excluded.blocked_until_ms",
                    &[&d.license, &d.account, &clients, &max_clients, &window, &at, &until],
                )?;
            } else {
                tx.execute(
                    "UPDATE sharing_detections SET clients = GREATEST(clients, $2) WHERE license = $1",
                    &[&d.license, &clients],
                )?;
            }
            tx.commit()?;
            Ok(new)
        })
    }

    fn sharing_detections(&self, account: Option<&str>) -> Result<Vec<SharingDetection>> {
        self.with_client(|client| {
            Ok(client
                .query(
                    &format!("SELECT {SHARING_COLUMNS} FROM sharing_detections WHERE $1::TEXT IS NULL OR account = $1 ORDER BY detected_ms DESC, license"),
                    &[&account],
                )?
                .iter()
                .map(sharing_row)
                .collect())
        })
    }

    fn active_users(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<ActiveUsers> {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let cut = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let filter = "FROM usage_records WHERE account = $1 AND window_start_ms >= $2 AND window_start_ms < $3
                      AND user_ref <> '' AND outcome = 'allowed' AND meter = 'calls'
                      AND ($4::BIGINT IS NULL OR batch_id IN (SELECT batch_id FROM batches WHERE received_ms <= $4))";
        self.with_client(|client| {
            let users: i64 = client
                .query_one(
                    &format!("SELECT COUNT(DISTINCT user_ref) {filter}"),
                    &[&account, &from, &to, &cut],
                )?
                .get(0);
            let mut out = ActiveUsers {
                users: u64_of(users),
                ..ActiveUsers::default()
            };
            for (column, into) in [
                ("license", &mut out.by_license),
                ("feature", &mut out.by_feature),
            ] {
                for row in client.query(
                    &format!(
                        "SELECT {column}, COUNT(DISTINCT user_ref) {filter} GROUP BY {column}"
                    ),
                    &[&account, &from, &to, &cut],
                )? {
                    into.insert(row.get(0), u64_of(row.get(1)));
                }
            }
            Ok(out)
        })
    }

    fn seat_use(&self, account: &str, now_ms: u64) -> Result<Vec<SeatUse>> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            Ok(client
                .query(
                    "SELECT license, kind, MAX(seat_limit)::BIGINT, MAX(n)::BIGINT FROM (
                       SELECT license, kind, key_id, MAX(seat_limit) AS seat_limit, COUNT(*) AS n FROM seats
                       WHERE account = $1 AND until_ms > $2 GROUP BY license, kind, key_id) AS per_key
                     GROUP BY license, kind ORDER BY license, kind",
                    &[&account, &now],
                )?
                .iter()
                .map(|r| SeatUse {
                    license: r.get(0),
                    kind: r.get(1),
                    limit: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    in_use: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                })
                .collect())
        })
    }

    fn close_lease(&self, lease_id: &str, used: u64, now_ms: u64) -> Result<bool> {
        self.with_client(|client| close_lease(client, lease_id, used, now_ms))
    }

    fn is_known(&self, name: &crate::store::Named<'_>) -> Result<bool> {
        let (sql, value) = name.known_sql();
        self.with_client(|client| Ok(client.query_one(sql, &[&value])?.get(0)))
    }

    fn set_revoked(&self, license: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            match reason {
                Some(reason) => client.execute(
                    "INSERT INTO revoked_licenses (license, reason, revoked_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (license) DO UPDATE SET reason = excluded.reason, revoked_ms = excluded.revoked_ms",
                    &[&license, &reason, &now],
                )?,
                None => client.execute("DELETE FROM revoked_licenses WHERE license = $1", &[&license])?,
            };
            Ok(())
        })
    }

    fn set_suspended(&self, account: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            match reason {
                Some(reason) => client.execute(
                    "INSERT INTO suspended_accounts (account, reason, suspended_ms) VALUES ($1, $2, $3)
                     ON CONFLICT (account) DO UPDATE SET reason = excluded.reason, suspended_ms = excluded.suspended_ms",
                    &[&account, &reason, &now],
                )?,
                None => client.execute("DELETE FROM suspended_accounts WHERE account = $1", &[&account])?,
            };
            Ok(())
        })
    }

    fn set_budget(&self, account: &str, budget: Option<&Budget>, now_ms: u64) -> Result<()> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            match budget {
                Some(b) => client.execute(
                    "INSERT INTO budgets (account, period, amount, updated_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (account) DO UPDATE SET period = excluded.period, amount = excluded.amount, updated_ms = excluded.updated_ms",
                    &[&account, &b.period.as_str(), &b.amount.to_string(), &now],
                )?,
                None => client.execute("DELETE FROM budgets WHERE account = $1", &[&account])?,
            };
            Ok(())
        })
    }

    fn restrictions(&self, licenses: &[String], accounts: &[String]) -> Result<Restrictions> {
        // Every sync asks this: prepared statements (see [`Connection`]).
        self.clients.with(|connection| {
            let mut out = Restrictions::default();
            let revoked = connection
                .prepared("SELECT license, reason FROM revoked_licenses WHERE license = ANY($1)")?;
            let suspended = connection
                .prepared("SELECT account, reason FROM suspended_accounts WHERE account = ANY($1)")?;
            let budgets = connection
                .prepared("SELECT account, period, amount FROM budgets WHERE account = ANY($1)")?;
            // SHARING_COLUMNS written out: a prepared statement's key is a `&'static str`.
            let sharing = connection.prepared(
                "SELECT license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms
                 FROM sharing_detections WHERE license = ANY($1) AND blocked_until_ms IS NOT NULL",
            )?;
            let client = &mut connection.client;
            for row in client.query(&revoked, &[&licenses])? {
                out.revoked.insert(row.get(0), row.get(1));
            }
            for row in client.query(&suspended, &[&accounts])? {
                out.suspended.insert(row.get(0), row.get(1));
            }
            for row in client.query(&budgets, &[&accounts])? {
                let (account, period, amount): (String, String, String) =
                    (row.get(0), row.get(1), row.get(2));
                out.budgets.insert(account, parse_budget(&period, &amount)?);
            }
            for row in client.query(&sharing, &[&licenses])? {
                let detection = sharing_row(&row);
                out.sharing_blocks.insert(detection.license.clone(), detection);
            }
            Ok(out)
        })
    }

    fn record_licenses(&self, seen: &[LicenseSeen], now_ms: u64) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let now = to_i64("now_ms", now_ms)?;
        let license: Vec<&str> = seen.iter().map(|l| l.license.as_str()).collect();
        let account: Vec<&str> = seen.iter().map(|l| l.account.as_str()).collect();
        let plan: Vec<&str> = seen.iter().map(|l| l.plan.as_str()).collect();
        self.with_client(|client| {
            // DISTINCT ON: one row per license, or the upsert would touch a row twice.
            client.execute(
                "INSERT INTO licenses (license, account, plan, last_seen_ms)
                 SELECT DISTINCT ON (license) license, account, plan, $4
                 FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) AS s (license, account, plan)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan, last_seen_ms = excluded.last_seen_ms",
                &[&license, &account, &plan, &now],
            )?;
            Ok(())
        })
    }

    fn add_signing_key(&self, key: &StoredKey) -> Result<bool> {
        let (created, activates) = (
            to_i64("created_ms", key.created_ms)?,
            to_i64("activates_ms", key.activates_ms)?,
        );
        self.with_client(|client| {
            let added = client.execute(
                "INSERT INTO signing_keys (kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (kid) DO NOTHING",
                &[&key.kid, &key.alg, &key.private_pem, &key.public_jwk, &created, &activates],
            )?;
            Ok(added == 1)
        })
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms FROM signing_keys ORDER BY created_ms, kid",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| StoredKey {
                    kid: r.get(0),
                    alg: r.get(1),
                    private_pem: r.get(2),
                    public_jwk: r.get(3),
                    created_ms: u64_of(r.get(4)),
                    activates_ms: u64_of(r.get(5)),
                    retired_ms: r.get::<_, Option<i64>>(6).map(u64_of),
                })
                .collect())
        })
    }

    fn retire_signing_key(&self, kid: &str, now_ms: u64) -> Result<bool> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            let found = client.execute(
                "UPDATE signing_keys SET retired_ms = COALESCE(retired_ms, $1) WHERE kid = $2",
                &[&now, &kid],
            )?;
            Ok(found == 1)
        })
    }

    fn add_license(&self, l: &IssuedLicense) -> Result<bool> {
        let features = serde_json::to_string(&l.features)?;
        let limits = l.limits.as_ref().map(serde_json::to_string).transpose()?;
        let (nbf, exp, issued) = (
            to_i64("not_before_ms", l.not_before_ms)?,
            to_i64("expires_ms", l.expires_ms)?,
            to_i64("issued_ms", l.issued_ms)?,
        );
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let added = tx.execute(
                "INSERT INTO issued_licenses (license, account, plan, features, limits, not_before_ms, expires_ms, kid, issued_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (license) DO NOTHING",
                &[&l.license, &l.account, &l.plan, &features, &limits, &nbf, &exp, &l.kid, &issued],
            )?;
            if added == 1 {
                // The plan is known before any filter serves the license: its usage is priced.
                tx.execute(
                    "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES ($1, $2, $3, 0)
                     ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan",
                    &[&l.license, &l.account, &l.plan],
                )?;
            }
            tx.commit()?;
            Ok(added == 1)
        })
    }

    fn issued_licenses(&self, account: Option<&str>) -> Result<Vec<IssuedLicense>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT i.license, i.account, i.plan, i.features, i.limits, i.not_before_ms, i.expires_ms, i.kid, i.issued_ms, r.revoked_ms
                 FROM issued_licenses i LEFT JOIN revoked_licenses r ON r.license = i.license
                 WHERE ($1::TEXT IS NULL OR i.account = $1) ORDER BY i.license",
                &[&account],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    license_of((
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        r.get(8),
                        r.get(9),
                    ))
                })
                .collect())
        })
    }

    fn billable_usage(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>> {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let until = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        self.with_client(|client| {
            let rows = client.query(
                "SELECT r.license, COALESCE(l.plan, ''), r.feature, r.meter, SUM(r.units)::BIGINT FROM usage_facts r
                 LEFT JOIN licenses l ON l.license = r.license
                 WHERE r.account = $1 AND r.outcome = 'allowed' AND r.window_start_ms >= $2 AND r.window_start_ms < $3
                   AND ($4::BIGINT IS NULL OR r.received_ms <= $4)
                 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
                &[&account, &from, &to, &until],
            )?;
            Ok(rows.iter().map(billable_row).collect())
        })
    }

    fn late_usage(
        &self,
        account: &str,
        before_ms: u64,
        received_after_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<Vec<BillableUsage>> {
        let (before, after) = (
            to_i64("before_ms", before_ms)?,
            to_i64("received_after_ms", received_after_ms)?,
        );
        let until = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        self.with_client(|client| {
            let rows = client.query(
                "SELECT r.license, COALESCE(l.plan, ''), r.feature, r.meter, SUM(r.units)::BIGINT FROM usage_facts r
                 LEFT JOIN licenses l ON l.license = r.license
                 WHERE r.received_ms > $3 AND ($4::BIGINT IS NULL OR r.received_ms <= $4)
                   AND r.account = $1 AND r.outcome = 'allowed' AND r.window_start_ms < $2
                 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
                &[&account, &before, &after, &until],
            )?;
            Ok(rows.iter().map(billable_row).collect())
        })
    }

    fn first_usage_ms(&self, account: &str, from_ms: u64, to_ms: u64) -> Result<Option<u64>> {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        self.with_client(|client| {
            let row = client.query_one(
                "SELECT MIN(window_start_ms) FROM usage_facts WHERE account = $1 AND window_start_ms >= $2 AND window_start_ms < $3",
                &[&account, &from, &to],
            )?;
            Ok(row.get::<_, Option<i64>>(0).map(u64_of))
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
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let until = to_i64("received_until_ms", received_until_ms)?;
        let limit = i64::from(limit);
        self.with_client(|client| {
            let rows = client.query(
                "SELECT r.id, r.batch_id, r.account, r.license, r.feature, r.outcome, r.meter, r.units, r.window_start_ms, r.window_end_ms, r.user_ref
                 FROM usage_records r JOIN batches b ON b.batch_id = r.batch_id
                 WHERE r.window_start_ms >= $1 AND r.window_start_ms < $2 AND r.id > $3 AND b.received_ms <= $5
                 ORDER BY r.id LIMIT $4",
                &[&from, &to, &after_id, &limit, &until],
            )?;
            Ok(rows
                .iter()
                .map(|r| StoredRecord {
                    id: r.get(0),
                    batch_id: r.get(1),
                    account: r.get(2),
                    license: r.get(3),
                    feature: r.get(4),
                    outcome: r.get(5),
                    meter: r.get(6),
                    units: u64_of(r.get(7)),
                    window_start_ms: u64_of(r.get(8)),
                    window_end_ms: u64_of(r.get(9)),
                    user: r.get(10),
                })
                .collect())
        })
    }

    fn accounts(&self, from_ms: u64, to_ms: u64) -> Result<Vec<String>> {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        self.with_client(|client| {
            let rows = client.query(
                "SELECT account FROM usage_facts WHERE window_start_ms >= $1 AND window_start_ms < $2
                 UNION SELECT account FROM issued_licenses WHERE not_before_ms < $2 AND expires_ms > $1
                 ORDER BY 1",
                &[&from, &to],
            )?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }
    fn budgets(&self) -> Result<std::collections::BTreeMap<String, Budget>> {
        self.with_client(|client| {
            let mut out = std::collections::BTreeMap::new();
            for row in client.query("SELECT account, period, amount FROM budgets", &[])? {
                let (account, period, amount): (String, String, String) =
                    (row.get(0), row.get(1), row.get(2));
                out.insert(account, parse_budget(&period, &amount)?);
            }
            Ok(out)
        })
    }

    fn quotas(&self, account: &str, now_ms: u64) -> Result<Vec<QuotaState>> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            let rows = client.query(
                "SELECT a.license, a.meter, a.period_start_ms, a.period_end_ms,
                        (SELECT l.limit_units FROM leases l WHERE l.license = a.license AND l.meter = a.meter
                           AND l.period_start_ms = a.period_start_ms AND l.period_end_ms = a.period_end_ms
                         ORDER BY l.created_ms DESC LIMIT 1),
                        a.allocated
                 FROM quota_allocations a
                 WHERE a.period_end_ms > $2
                   AND a.license IN (SELECT license FROM leases WHERE account = $1)
                 ORDER BY 1, 2, 3",
                &[&account, &now],
            )?;
            Ok(rows
                .iter()
                .map(|r| QuotaState {
                    license: r.get(0),
                    meter: r.get(1),
                    period_start_ms: u64_of(r.get(2)),
                    period_end_ms: u64_of(r.get(3)),
                    limit: r.get::<_, Option<i64>>(4).map_or(0, u64_of),
                    allocated: u64_of(r.get(5)),
                })
                .collect())
        })
    }

    fn finalize_invoice(
        &self,
        invoice: &StoredInvoice,
        event: Option<&WebhookEvent>,
    ) -> Result<(StoredInvoice, bool)> {
        let (start, end, finalized) = (
            to_i64("period_start_ms", invoice.period_start_ms)?,
            to_i64("period_end_ms", invoice.period_end_ms)?,
            to_i64("finalized_ms", invoice.finalized_ms)?,
        );
        let cut = to_i64("cut_ms", invoice.cut_ms)?;
        let body = invoice.body.to_string();
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let added = tx.execute(
                "INSERT INTO invoices (invoice_id, account, period_start_ms, period_end_ms, currency, total, body, finalized_ms, cut_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[&invoice.invoice_id, &invoice.account, &start, &end, &invoice.currency, &invoice.total, &body, &finalized, &cut],
            )? == 1;
            if added {
                if let Some(event) = event {
                    insert_event(&mut tx, event)?;
                }
            }
            let row = tx.query_one(
                // By period, not id: an invoice of this period stored under another id is it.
                &format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE account = $1 AND period_start_ms = $2"),
                &[&invoice.account, &start],
            )?;
            tx.commit()?;
            Ok((invoice_row(&row), added))
        })
    }

    fn invoices(&self, account: Option<&str>) -> Result<Vec<StoredInvoice>> {
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {INVOICE_COLUMNS} FROM invoices WHERE ($1::TEXT IS NULL OR account = $1) ORDER BY period_start_ms, account"),
                &[&account],
            )?;
            Ok(rows.iter().map(invoice_row).collect())
        })
    }

    fn enqueue_event(&self, event: &WebhookEvent) -> Result<bool> {
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let added = insert_event(&mut tx, event)?;
            tx.commit()?;
            Ok(added)
        })
    }

    fn claim_events(&self, now_ms: u64, lease_ms: u64, limit: u32) -> Result<Vec<WebhookEvent>> {
        let (now, until) = (
            to_i64("now_ms", now_ms)?,
            to_i64("lease", now_ms.saturating_add(lease_ms))?,
        );
        let limit = i64::from(limit);
        self.with_client(|client| {
            // SKIP LOCKED: replicas claiming at once take different events.
            let rows = client.query(
                &format!(
                    "UPDATE webhook_events SET next_attempt_ms = $2
                     WHERE event_id IN (SELECT event_id FROM webhook_events
                                        WHERE delivered_ms IS NULL AND failed_ms IS NULL AND next_attempt_ms <= $1
                                        ORDER BY next_attempt_ms LIMIT $3 FOR UPDATE SKIP LOCKED)
                     RETURNING {EVENT_COLUMNS}"
                ),
                &[&now, &until, &limit],
            )?;
            let mut events: Vec<WebhookEvent> = rows.iter().map(event_row).collect();
            events.sort_by_key(|e| e.created_ms);
            Ok(events)
        })
    }

    fn record_delivery(&self, d: &Delivery, outcome: DeliveryOutcome) -> Result<()> {
        let (at, duration) = (
            to_i64("at_ms", d.at_ms)?,
            to_i64("duration_ms", d.duration_ms)?,
        );
        let attempt = i64::from(d.attempt);
        let status = d.status.map(i64::from);
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "INSERT INTO webhook_deliveries (event_id, attempt, at_ms, status, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&d.event_id, &attempt, &at, &status, &d.error, &duration],
            )?;
            match outcome {
                DeliveryOutcome::Delivered => tx.execute(
                    "UPDATE webhook_events SET attempts = $2, delivered_ms = $3 WHERE event_id = $1",
                    &[&d.event_id, &attempt, &at],
                )?,
                DeliveryOutcome::RetryAt(next) => tx.execute(
                    "UPDATE webhook_events SET attempts = $2, next_attempt_ms = $3 WHERE event_id = $1 AND delivered_ms IS NULL",
                    &[&d.event_id, &attempt, &to_i64("next_attempt_ms", next)?],
                )?,
                DeliveryOutcome::GaveUp => tx.execute(
                    "UPDATE webhook_events SET attempts = $2, failed_ms = $3 WHERE event_id = $1 AND delivered_ms IS NULL",
                    &[&d.event_id, &attempt, &at],
                )?,
            };
            tx.commit()?;
            Ok(())
        })
    }

    fn webhooks_due_now(&self, now_ms: u64) -> Result<u64> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            Ok(client.execute(
                "UPDATE webhook_events SET next_attempt_ms = $1
                 WHERE delivered_ms IS NULL AND failed_ms IS NULL AND next_attempt_ms > $1",
                &[&now],
            )?)
        })
    }

    fn webhook_events(&self, limit: u32) -> Result<Vec<WebhookEvent>> {
        let limit = i64::from(limit);
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {EVENT_COLUMNS} FROM webhook_events ORDER BY created_ms DESC, event_id LIMIT $1"),
                &[&limit],
            )?;
            Ok(rows.iter().map(event_row).collect())
        })
    }

    fn deliveries(&self, event_id: &str) -> Result<Vec<Delivery>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT event_id, attempt, at_ms, status, error, duration_ms FROM webhook_deliveries WHERE event_id = $1 ORDER BY attempt, id",
                &[&event_id],
            )?;
            Ok(rows
                .iter()
                .map(|r| Delivery {
                    event_id: r.get(0),
                    attempt: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                    at_ms: u64_of(r.get(2)),
                    status: r.get::<_, Option<i64>>(3).and_then(|s| u16::try_from(s).ok()),
                    error: r.get(4),
                    duration_ms: u64_of(r.get(5)),
                })
                .collect())
        })
    }

    fn apply_retention(&self, before_ms: u64, limit: u32) -> Result<Retained> {
        let before = to_i64("before_ms", before_ms)?;
        let limit = i64::from(limit);
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            // Only the rows this transaction deleted are rolled up (DELETE ... RETURNING), and
            // SKIP LOCKED leaves rows another replica is retiring to it: two replicas running
            // retention at once count each record once.
            let row = tx.query_one(
                "WITH gone AS (
                     DELETE FROM usage_records WHERE id IN (
                         SELECT id FROM usage_records WHERE window_start_ms < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING account, license, feature, outcome, meter, window_start_ms, units, batch_id),
                 rolled AS (
                     INSERT INTO usage_rollups (account, license, feature, outcome, meter, hour_start_ms, units, records, received_ms)
                     SELECT g.account, g.license, g.feature, g.outcome, g.meter, (g.window_start_ms / 3600000) * 3600000,
                            SUM(g.units)::BIGINT, COUNT(*)::BIGINT, MAX(b.received_ms)
                     FROM gone g JOIN batches b ON b.batch_id = g.batch_id
                     GROUP BY 1, 2, 3, 4, 5, 6
                     ON CONFLICT (account, license, feature, outcome, meter, hour_start_ms) DO UPDATE SET
                         units = usage_rollups.units + EXCLUDED.units,
                         records = usage_rollups.records + EXCLUDED.records,
                         received_ms = GREATEST(usage_rollups.received_ms, EXCLUDED.received_ms)
                     RETURNING 1)
                 SELECT COUNT(*)::BIGINT, COALESCE(SUM(units), 0)::BIGINT, (SELECT COUNT(*) FROM rolled)::BIGINT FROM gone",
                &[&before, &limit],
            )?;
            let seats = tx.execute("DELETE FROM seats WHERE until_ms < $1", &[&before])?;
            let clients = tx.execute(
                "DELETE FROM license_clients WHERE last_seen_ms < $1",
                &[&before],
            )?;
            let sharing = tx.execute(
                "DELETE FROM sharing_detections WHERE detected_ms < $1 AND COALESCE(blocked_until_ms, 0) < $1",
                &[&before],
            )?;
            tx.commit()?;
            Ok(Retained {
                records: u64_of(row.get(0)),
                units: u64_of(row.get(1)),
                seats,
                clients,
                sharing_detections: sharing,
            })
        })
    }

    fn export_account(&self, account: &str) -> Result<Export> {
        self.with_client(|client| {
            let licenses = pg_account_licenses(client, account)?;
            let mut export = Export::new();
            for (table, _) in crate::privacy::ACCOUNT_TABLES {
                let rows = pg_rows(client, table, "account", &[account.to_string()])?;
                export.insert((*table).to_string(), rows);
            }
            let licenses: Vec<String> = licenses.into_iter().collect();
            for table in crate::privacy::LICENSE_TABLES {
                let rows = pg_rows(client, table, "license", &licenses)?;
                export.insert((*table).to_string(), rows);
            }
            let events = pg_events_naming(client, account, &licenses)?;
            export.insert(
                "webhook_events".to_string(),
                pg_rows(client, "webhook_events", "event_id", &events)?,
            );
            export.insert(
                "webhook_deliveries".to_string(),
                pg_rows(client, "webhook_deliveries", "event_id", &events)?,
            );
            Ok(export)
        })
    }

    fn erase_account(&self, account: &str) -> Result<Erased> {
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let licenses: Vec<String> =
                pg_account_licenses(&mut tx, account)?.into_iter().collect();
            let events = pg_events_naming(&mut tx, account, &licenses)?;
            let mut erased = Erased::new();
            for (table, column, keys) in [
                ("webhook_deliveries", "event_id", &events),
                ("webhook_events", "event_id", &events),
            ] {
                let n = tx.execute(
                    &format!("DELETE FROM {table} WHERE {column} = ANY($1)"),
                    &[keys],
                )?;
                erased.insert(table.to_string(), n);
            }
            for table in crate::privacy::LICENSE_TABLES {
                let n = tx.execute(
                    &format!("DELETE FROM {table} WHERE license = ANY($1)"),
                    &[&licenses],
                )?;
                erased.insert((*table).to_string(), n);
            }
            for (table, _) in crate::privacy::ACCOUNT_TABLES {
                let n = tx.execute(
                    &format!("DELETE FROM {table} WHERE account = $1"),
                    &[&account],
                )?;
                erased.insert((*table).to_string(), n);
            }
            tx.commit()?;
            Ok(erased)
        })
    }

    fn export_subject(&self, subject: &str) -> Result<Export> {
        self.with_client(|client| {
            let mut export = Export::new();
            for (table, column) in crate::privacy::SUBJECT_TABLES {
                let rows = pg_rows(client, table, column, &[subject.to_string()])?;
                export.insert((*table).to_string(), rows);
            }
            Ok(export)
        })
    }

    fn erase_subject(&self, subject: &str) -> Result<Erased> {
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let mut erased = Erased::new();
            for (table, column) in crate::privacy::SUBJECT_TABLES {
                let sql = if *table == "usage_records" {
                    format!("UPDATE {table} SET {column} = '' WHERE {column} = $1")
                } else {
                    format!("DELETE FROM {table} WHERE {column} = $1")
                };
                erased.insert((*table).to_string(), tx.execute(&sql, &[&subject])?);
            }
            tx.commit()?;
            Ok(erased)
        })
    }
}

/// The licenses an account has anywhere in the store.
fn pg_account_licenses(
    client: &mut impl postgres::GenericClient,
    account: &str,
) -> Result<std::collections::BTreeSet<String>> {
    let mut licenses = std::collections::BTreeSet::new();
    for table in crate::privacy::license_sources() {
        for row in client.query(
            &format!("SELECT DISTINCT license FROM {table} WHERE account = $1"),
            &[&account],
        )? {
            licenses.insert(row.get::<_, String>(0));
        }
    }
    Ok(licenses)
}

/// Webhook events whose payload names the account or one of its licenses.
fn pg_events_naming(
    client: &mut impl postgres::GenericClient,
    account: &str,
    licenses: &[String],
) -> Result<Vec<String>> {
    let mut names: std::collections::BTreeSet<String> = licenses.iter().cloned().collect();
    names.insert(account.to_string());
    let mut events = Vec::new();
    for row in client.query("SELECT event_id, payload::TEXT FROM webhook_events", &[])? {
        let (id, payload): (String, String) = (row.get(0), row.get(1));
        let payload: serde_json::Value =
            serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
        if crate::privacy::mentions(&payload, &names) {
            events.push(id);
        }
    }
    Ok(events)
}

/// The rows of `table` whose `column` is one of `keys`, as JSON objects by column name.
fn pg_rows(
    client: &mut impl postgres::GenericClient,
    table: &str,
    column: &str,
    keys: &[String],
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut out = Vec::new();
    for row in client.query(
        &format!("SELECT row_to_json(t)::TEXT FROM {table} t WHERE {column} = ANY($1)"),
        &[&keys],
    )? {
        let text: String = row.get(0);
        out.push(serde_json::from_str(&text)?);
    }
    Ok(out)
}

fn billable_row(r: &postgres::Row) -> BillableUsage {
    BillableUsage {
        license: r.get(0),
        plan: r.get(1),
        feature: r.get(2),
        meter: r.get(3),
        units: u64_of(r.get(4)),
    }
}

fn invoice_row(r: &postgres::Row) -> StoredInvoice {
    invoice_of((
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
    ))
}

const SHARING_COLUMNS: &str =
    "license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms";

fn sharing_row(r: &postgres::Row) -> SharingDetection {
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

fn event_row(r: &postgres::Row) -> WebhookEvent {
    event_of((
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
    ))
}

fn insert_event(tx: &mut postgres::Transaction<'_>, event: &WebhookEvent) -> Result<bool> {
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

/// The allocation row is locked (`FOR UPDATE`) for the transaction, so replicas granting from
/// one quota at once take turns; a lease id raced by two replicas fails its second insert on the
/// primary key and is retried by its filter, which then gets the stored grant.
fn grant_lease(client: &mut Client, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant> {
    let r = ask.request;
    let mut tx = client.transaction()?;
    if let Some(row) = tx.query_opt(
        "SELECT granted, period_start_ms, period_end_ms, expires_ms, allocated_after, closed_ms IS NOT NULL FROM leases WHERE lease_id = $1",
        &[&r.lease_id],
    )? {
        tx.commit()?;
        // A retried request gets its grant again, but not once the lease was returned.
        let closed: bool = row.get(5);
        let granted: i64 = if closed { 0 } else { row.get(0) };
        return Ok(grant_of(&r.lease_id, granted, row.get(1), row.get(2), row.get(3), row.get(4)));
    }
    let (start, end) = (
        to_i64("period_start_ms", ask.period_start_ms)?,
        to_i64("period_end_ms", ask.period_end_ms)?,
    );
    let meter = r.meter.as_str();
    tx.execute(
        "INSERT INTO quota_allocations (license, meter, period_start_ms, period_end_ms, allocated) VALUES ($1, $2, $3, $4, 0)
         ON CONFLICT DO NOTHING",
        &[&r.license, &meter, &start, &end],
    )?;
    let allocated: i64 = tx
        .query_one(
            "SELECT allocated FROM quota_allocations WHERE license = $1 AND meter = $2 AND period_start_ms = $3 AND period_end_ms = $4 FOR UPDATE",
            &[&r.license, &meter, &start, &end],
        )?
        .get(0);
    let granted = grant_size(r.want, ask.limit, allocated);
    let after = allocated.saturating_add(granted);
    tx.execute(
        "UPDATE quota_allocations SET allocated = $5 WHERE license = $1 AND meter = $2 AND period_start_ms = $3 AND period_end_ms = $4",
        &[&r.license, &meter, &start, &end, &after],
    )?;
    let expires = to_i64("expires_ms", ask.expires_ms)?;
    tx.execute(
        "INSERT INTO leases (lease_id, holder, account, license, meter, period_start_ms, period_end_ms, limit_units, granted, allocated_after, expires_ms, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        &[&r.lease_id, &ask.holder, &r.account, &r.license, &meter, &start, &end, &to_i64("limit", ask.limit)?, &granted, &after, &expires, &to_i64("now_ms", now_ms)?],
    )?;
    tx.commit()?;
    Ok(grant_of(&r.lease_id, granted, start, end, expires, after))
}

fn close_lease(client: &mut Client, lease_id: &str, used: u64, now_ms: u64) -> Result<bool> {
    let used = to_i64("used", used)?;
    let mut tx = client.transaction()?;
    let closed = tx.query_opt(
        "UPDATE leases SET used = $1, closed_ms = $2 WHERE lease_id = $3 AND closed_ms IS NULL
         RETURNING license, meter, period_start_ms, period_end_ms, granted",
        &[&used, &to_i64("now_ms", now_ms)?, &lease_id],
    )?;
    let known = match closed {
        Some(row) => {
            let (license, meter, start, end, granted): (String, String, i64, i64, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            tx.execute(
                "UPDATE quota_allocations SET allocated = GREATEST(0, allocated + $1 - $2)
                 WHERE license = $3 AND meter = $4 AND period_start_ms = $5 AND period_end_ms = $6",
                &[&used, &granted, &license, &meter, &start, &end],
            )?;
            true
        }
        None => tx
            .query_opt("SELECT 1 FROM leases WHERE lease_id = $1", &[&lease_id])?
            .is_some(),
    };
    tx.commit()?;
    Ok(known)
}

/// Store one batch inside `tx` (see [`Store::ingest_group`]): nothing is committed here.
const INSERT_BATCH: &str =
    "INSERT INTO batches (batch_id, instance, sequence, records, created_ms, received_ms)
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING";
const INSERT_RECORDS: &str =
    "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms, user_ref)
     SELECT $1, * FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::TEXT[])";

/// A batch's two inserts, prepared on the connection (see [`Connection`]).
struct IngestStatements {
    batch: postgres::Statement,
    records: postgres::Statement,
}

fn ingest_in(
    tx: &mut postgres::Transaction<'_>,
    statements: &IngestStatements,
    batch: &UsageBatch,
    received_ms: u64,
) -> Result<Ingested> {
    let records = to_i64(
        "records",
        u64::try_from(batch.records.len()).unwrap_or(u64::MAX),
    )?;
    let inserted = tx.execute(
        &statements.batch,
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
        return Ok(Ingested::Duplicate {
            records: u64::try_from(first).unwrap_or(0),
        });
    }
    // One statement for the whole batch (columns as arrays, UNNEST into rows): one round
    // trip instead of one per record.
    let n = batch.records.len();
    let (mut account, mut license, mut feature, mut outcome, mut meter, mut user) = (
        Vec::with_capacity(n),
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
        user.push(r.user.as_str());
        units.push(to_i64("units", r.units)?);
        start.push(to_i64("window_start_ms", r.window_start_ms)?);
        end.push(to_i64("window_end_ms", r.window_end_ms)?);
    }
    tx.execute(
        &statements.records,
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
            &user,
        ],
    )?;
    Ok(Ingested::Accepted {
        records: u64::try_from(records).unwrap_or(0),
    })
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
