//! Billing, in PostgreSQL: [`BillingStore`] for [`PostgresStore`].

use super::*;

impl BillingStore for PostgresStore {
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
}

fn billable_row(r: &::postgres::Row) -> BillableUsage {
    BillableUsage {
        license: r.get(0),
        plan: r.get(1),
        feature: r.get(2),
        meter: r.get(3),
        units: u64_of(r.get(4)),
    }
}

fn invoice_row(r: &::postgres::Row) -> StoredInvoice {
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
