//! SQLite in a file, WAL mode: the embedded default. This module opens, migrates and probes the
//! file; each domain's SQL is in a module of its own below.

mod billing;
mod control;
mod licensing;
mod privacy;
mod seats;
mod usage;
mod webhooks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use tollgate_wire::sync::{ClientsSeen, LeaseGrant, LicenseSeen, SeatAnswer};
use tollgate_wire::UsageBatch;

use super::connections::{Connect, Connections};
use super::*;

/// Migrations, in order; each runs once, recorded in `schema_migrations`.
const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../../migrations/sqlite/0001_usage.sql")),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_control.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/sqlite/0003_licensing.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/sqlite/0004_billing.sql"),
    ),
    (
        5,
        include_str!("../../../migrations/sqlite/0005_ingest_drop_batch_index.sql"),
    ),
    (
        6,
        include_str!("../../../migrations/sqlite/0006_users_seats_sharing.sql"),
    ),
    (
        7,
        include_str!("../../../migrations/sqlite/0007_retention.sql"),
    ),
    (
        8,
        include_str!("../../../migrations/sqlite/0008_one_invoice_per_period.sql"),
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

fn to_i64(field: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .with_context(|| format!("{field} {value} does not fit a signed 64-bit integer"))
}

impl Store for SqliteStore {
    fn probe(&self) -> Box<dyn StoreProbe> {
        Box::new(SqliteProbe {
            path: self.path.clone(),
            conn: None,
        })
    }
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

/// Refuse a file that is not a Tollgate database (before the writer would migrate it).
pub(crate) fn require_schema(path: &Path) -> Result<()> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
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
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::SqliteStore;
    use crate::storage::ControlStore;

    #[test]
    fn both_backends_have_every_migration() {
        let versions = |m: &[(i64, &str)]| m.iter().map(|(v, _)| *v).collect::<Vec<_>>();
        assert_eq!(
            versions(super::SQLITE_MIGRATIONS),
            versions(super::super::postgres::MIGRATIONS)
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
