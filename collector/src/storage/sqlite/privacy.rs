//! Personal data, in SQLite: [`PrivacyStore`] for [`SqliteStore`].

use super::*;

impl PrivacyStore for SqliteStore {
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
            for (table, _) in super::schema::ACCOUNT_TABLES {
                let rows = sqlite_rows(
                    &conn,
                    &format!("SELECT * FROM {table} WHERE account = ?1"),
                    &[&account],
                )?;
                export.insert((*table).to_string(), rows);
            }
            for table in super::schema::LICENSE_TABLES {
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
        for table in super::schema::LICENSE_TABLES {
            let mut deleted = 0;
            for license in &licenses {
                deleted += tx.execute(
                    &format!("DELETE FROM {table} WHERE license = ?1"),
                    [license],
                )?;
            }
            erased.insert((*table).to_string(), deleted as u64);
        }
        for (table, _) in super::schema::ACCOUNT_TABLES {
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
            for (table, column) in super::schema::SUBJECT_TABLES {
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
        for (table, column) in super::schema::SUBJECT_TABLES {
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
    for table in super::schema::license_sources() {
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
        if super::schema::mentions(&payload, &names) {
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
