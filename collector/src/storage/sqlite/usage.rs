//! Usage, in SQLite: [`UsageStore`] for [`SqliteStore`].

use super::*;

impl UsageStore for SqliteStore {
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let outcomes = batches
            .iter()
            .map(|(batch, received_ms)| ingest_in(&tx, batch, *received_ms))
            .collect::<Result<Vec<_>>>()?;
        tx.commit()?;
        Ok(outcomes)
    }

    fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>> {
        let bucket = bucket_expression(query.granularity.unwrap_or(Granularity::Day));
        let sql = format!(
            "SELECT {bucket} AS period, account, license, feature, outcome, meter, SUM(units)
             FROM usage_facts
             WHERE (?1 IS NULL OR account = ?1) AND (?2 IS NULL OR license = ?2)
               AND (?3 IS NULL OR feature = ?3) AND (?4 IS NULL OR meter = ?4)
               AND (?5 IS NULL OR outcome = ?5)
               AND (?6 IS NULL OR window_start_ms >= ?6) AND (?7 IS NULL OR window_start_ms < ?7)
             GROUP BY period, account, license, feature, outcome, meter
             ORDER BY period, account, license, feature, outcome, meter"
        );
        let from = query.from_ms.map(|v| to_i64("from_ms", v)).transpose()?;
        let to = query.to_ms.map(|v| to_i64("to_ms", v)).transpose()?;
        self.read(|conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let rows = statement.query_map(
                params![
                    query.account,
                    query.license,
                    query.feature,
                    query.meter,
                    query.outcome,
                    from,
                    to
                ],
                |r| {
                    Ok(UsageRow {
                        period: r.get(0)?,
                        account: r.get(1)?,
                        license: r.get(2)?,
                        feature: r.get(3)?,
                        outcome: r.get(4)?,
                        meter: r.get(5)?,
                        units: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn first_usage_ms(&self, account: &str, from_ms: u64, to_ms: u64) -> Result<Option<u64>> {
        self.read(|conn| {
        let first: Option<i64> = conn.query_row(
            "SELECT MIN(window_start_ms) FROM usage_facts WHERE account = ?1 AND window_start_ms >= ?2 AND window_start_ms < ?3",
            params![account, to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?],
            |r| r.get(0),
        )?;
        Ok(first.map(u64_of))
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
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT r.id, r.batch_id, r.account, r.license, r.feature, r.outcome, r.meter, r.units, r.window_start_ms, r.window_end_ms, r.user_ref
             FROM usage_records r JOIN batches b ON b.batch_id = r.batch_id
             WHERE r.window_start_ms >= ?1 AND r.window_start_ms < ?2 AND r.id > ?3 AND b.received_ms <= ?5
             ORDER BY r.id LIMIT ?4",
        )?;
        let rows = statement.query_map(
            params![
                to_i64("from_ms", from_ms)?,
                to_i64("to_ms", to_ms)?,
                after_id,
                limit,
                to_i64("received_until_ms", received_until_ms)?
            ],
            |r| {
                Ok(StoredRecord {
                    id: r.get(0)?,
                    batch_id: r.get(1)?,
                    account: r.get(2)?,
                    license: r.get(3)?,
                    feature: r.get(4)?,
                    outcome: r.get(5)?,
                    meter: r.get(6)?,
                    units: u64_of(r.get(7)?),
                    window_start_ms: u64_of(r.get(8)?),
                    window_end_ms: u64_of(r.get(9)?),
                    user: r.get(10)?,
                })
            },
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn accounts(&self, from_ms: u64, to_ms: u64) -> Result<Vec<String>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(
            "SELECT account FROM usage_facts WHERE window_start_ms >= ?1 AND window_start_ms < ?2
             UNION SELECT account FROM issued_licenses WHERE not_before_ms < ?2 AND expires_ms > ?1
             ORDER BY 1",
        )?;
            let rows = statement.query_map(
                params![to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?],
                |r| r.get(0),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

fn bucket_expression(granularity: Granularity) -> &'static str {
    match granularity {
        Granularity::Hour => "strftime('%Y-%m-%dT%H:00:00Z', window_start_ms / 1000, 'unixepoch')",
        Granularity::Day => "strftime('%Y-%m-%dT00:00:00Z', window_start_ms / 1000, 'unixepoch')",
        Granularity::Month => "strftime('%Y-%m-01T00:00:00Z', window_start_ms / 1000, 'unixepoch')",
    }
}

/// Store one batch inside `tx` (see [`Store::ingest_group`]): nothing is committed here.
fn ingest_in(
    tx: &rusqlite::Transaction<'_>,
    batch: &UsageBatch,
    received_ms: u64,
) -> Result<Ingested> {
    let records = u64::try_from(batch.records.len()).unwrap_or(u64::MAX);
    let inserted = tx.execute(
        "INSERT INTO batches (batch_id, instance, sequence, records, created_ms, received_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (batch_id) DO NOTHING",
        params![
            batch.batch_id,
            batch.source.instance,
            to_i64("sequence", batch.sequence)?,
            to_i64("records", records)?,
            to_i64("created_ms", batch.created_ms)?,
            to_i64("received_ms", received_ms)?,
        ],
    )?;
    if inserted == 0 {
        let first: i64 = tx.query_row(
            "SELECT records FROM batches WHERE batch_id = ?1",
            [&batch.batch_id],
            |r| r.get(0),
        )?;
        return Ok(Ingested::Duplicate {
            records: u64::try_from(first).unwrap_or(0),
        });
    }
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms, user_ref)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for r in &batch.records {
            insert.execute(params![
                batch.batch_id,
                r.account,
                r.license,
                r.feature,
                r.outcome,
                r.meter.as_str(),
                to_i64("units", r.units)?,
                to_i64("window_start_ms", r.window_start_ms)?,
                to_i64("window_end_ms", r.window_end_ms)?,
                r.user,
            ])?;
        }
    }
    Ok(Ingested::Accepted { records })
}
