//! Billing, in SQLite: [`BillingStore`] for [`SqliteStore`].

use super::*;

impl BillingStore for SqliteStore {
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
