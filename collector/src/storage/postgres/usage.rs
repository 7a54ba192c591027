//! Usage, in PostgreSQL: [`UsageStore`] for [`PostgresStore`].

use super::*;

impl UsageStore for PostgresStore {
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
}

/// Store one batch inside `tx` (see [`Store::ingest_group`]): nothing is committed here.
const INSERT_BATCH: &str =
    "INSERT INTO batches (batch_id, instance, sequence, records, created_ms, received_ms)
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (batch_id) DO NOTHING";

const INSERT_RECORDS: &str =
    "INSERT INTO usage_records (batch_id, account, license, feature, outcome, meter, units, window_start_ms, window_end_ms, user_ref)
     SELECT $1, * FROM UNNEST($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[], $9::BIGINT[], $10::TEXT[])";

fn ingest_in(
    tx: &mut ::postgres::Transaction<'_>,
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
