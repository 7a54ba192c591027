//! Personal data, in PostgreSQL: [`PrivacyStore`] for [`PostgresStore`].

use super::*;

impl PrivacyStore for PostgresStore {
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
            for (table, _) in super::schema::ACCOUNT_TABLES {
                let rows = pg_rows(client, table, "account", &[account.to_string()])?;
                export.insert((*table).to_string(), rows);
            }
            let licenses: Vec<String> = licenses.into_iter().collect();
            for table in super::schema::LICENSE_TABLES {
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
            for table in super::schema::LICENSE_TABLES {
                let n = tx.execute(
                    &format!("DELETE FROM {table} WHERE license = ANY($1)"),
                    &[&licenses],
                )?;
                erased.insert((*table).to_string(), n);
            }
            for (table, _) in super::schema::ACCOUNT_TABLES {
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
            for (table, column) in super::schema::SUBJECT_TABLES {
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
            for (table, column) in super::schema::SUBJECT_TABLES {
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
    client: &mut impl ::postgres::GenericClient,
    account: &str,
) -> Result<std::collections::BTreeSet<String>> {
    let mut licenses = std::collections::BTreeSet::new();
    for table in super::schema::license_sources() {
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
    client: &mut impl ::postgres::GenericClient,
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
        if super::schema::mentions(&payload, &names) {
            events.push(id);
        }
    }
    Ok(events)
}

/// The rows of `table` whose `column` is one of `keys`, as JSON objects by column name.
fn pg_rows(
    client: &mut impl ::postgres::GenericClient,
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
