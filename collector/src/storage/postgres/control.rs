//! What filters obey, in PostgreSQL: [`ControlStore`] for [`PostgresStore`].

use super::*;

impl ControlStore for PostgresStore {
    fn grant_lease(&self, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant> {
        self.with_client(|client| grant_lease(client, ask, now_ms))
    }

    fn close_lease(&self, lease_id: &str, used: u64, now_ms: u64) -> Result<bool> {
        self.with_client(|client| close_lease(client, lease_id, used, now_ms))
    }

    fn is_known(&self, name: &crate::storage::Named<'_>) -> Result<bool> {
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
