//! Webhook events, in SQLite: [`EventStore`] for [`SqliteStore`].

use super::*;

impl EventStore for SqliteStore {
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
