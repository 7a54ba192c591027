//! Webhook events, in PostgreSQL: [`EventStore`] for [`PostgresStore`].

use super::*;

impl EventStore for PostgresStore {
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
}

fn event_row(r: &::postgres::Row) -> WebhookEvent {
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
