//! What filters obey, in SQLite: [`ControlStore`] for [`SqliteStore`].

use super::*;

impl ControlStore for SqliteStore {
    fn grant_lease(&self, ask: &LeaseAsk<'_>, now_ms: u64) -> Result<LeaseGrant> {
        let r = ask.request;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = tx
            .query_row(
                "SELECT granted, period_start_ms, period_end_ms, expires_ms, allocated_after, closed_ms IS NOT NULL FROM leases WHERE lease_id = ?1",
                [&r.lease_id],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?, row.get::<_, i64>(3)?, row.get::<_, i64>(4)?, row.get::<_, bool>(5)?)),
            )
            .optional()?;
        if let Some((granted, start, end, expires, allocated, closed)) = stored {
            tx.commit()?;
            // A retried request gets its grant again, but not once the lease was returned:
            // those units are back in the quota (or used).
            let granted = if closed { 0 } else { granted };
            return Ok(grant_of(
                &r.lease_id,
                granted,
                start,
                end,
                expires,
                allocated,
            ));
        }
        let (start, end) = (
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("period_end_ms", ask.period_end_ms)?,
        );
        let allocated: i64 = tx
            .query_row(
                "SELECT allocated FROM quota_allocations WHERE license = ?1 AND meter = ?2 AND period_start_ms = ?3 AND period_end_ms = ?4",
                params![r.license, r.meter.as_str(), start, end],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let granted = grant_size(r.want, ask.limit, allocated);
        let after = allocated.saturating_add(granted);
        tx.execute(
            "INSERT INTO quota_allocations (license, meter, period_start_ms, period_end_ms, allocated) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (license, meter, period_start_ms, period_end_ms) DO UPDATE SET allocated = excluded.allocated",
            params![r.license, r.meter.as_str(), start, end, after],
        )?;
        let expires = to_i64("expires_ms", ask.expires_ms)?;
        tx.execute(
            "INSERT INTO leases (lease_id, holder, account, license, meter, period_start_ms, period_end_ms, limit_units, granted, allocated_after, expires_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![r.lease_id, ask.holder, r.account, r.license, r.meter.as_str(), start, end, to_i64("limit", ask.limit)?, granted, after, expires, to_i64("now_ms", now_ms)?],
        )?;
        tx.commit()?;
        Ok(grant_of(&r.lease_id, granted, start, end, expires, after))
    }

    fn close_lease(&self, lease_id: &str, used: u64, now_ms: u64) -> Result<bool> {
        let used = to_i64("used", used)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let closed = tx
            .query_row(
                "UPDATE leases SET used = ?1, closed_ms = ?2 WHERE lease_id = ?3 AND closed_ms IS NULL
                 RETURNING license, meter, period_start_ms, period_end_ms, granted",
                params![used, to_i64("now_ms", now_ms)?, lease_id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?, row.get::<_, i64>(3)?, row.get::<_, i64>(4)?)),
            )
            .optional()?;
        let known = match closed {
            Some((license, meter, start, end, granted)) => {
                tx.execute(
                    "UPDATE quota_allocations SET allocated = MAX(0, allocated + ?1 - ?2)
                     WHERE license = ?3 AND meter = ?4 AND period_start_ms = ?5 AND period_end_ms = ?6",
                    params![used, granted, license, meter, start, end],
                )?;
                true
            }
            None => tx
                .query_row(
                    "SELECT 1 FROM leases WHERE lease_id = ?1",
                    [lease_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some(),
        };
        tx.commit()?;
        Ok(known)
    }

    fn set_revoked(&self, license: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match reason {
            Some(reason) => conn.execute(
                "INSERT INTO revoked_licenses (license, reason, revoked_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (license) DO UPDATE SET reason = excluded.reason, revoked_ms = excluded.revoked_ms",
                params![license, reason, to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM revoked_licenses WHERE license = ?1", [license])?,
        };
        Ok(())
    }

    fn set_suspended(&self, account: &str, reason: Option<&str>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match reason {
            Some(reason) => conn.execute(
                "INSERT INTO suspended_accounts (account, reason, suspended_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account) DO UPDATE SET reason = excluded.reason, suspended_ms = excluded.suspended_ms",
                params![account, reason, to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM suspended_accounts WHERE account = ?1", [account])?,
        };
        Ok(())
    }

    fn set_budget(&self, account: &str, budget: Option<&Budget>, now_ms: u64) -> Result<()> {
        let conn = self.conn()?;
        match budget {
            Some(b) => conn.execute(
                "INSERT INTO budgets (account, period, amount, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account) DO UPDATE SET period = excluded.period, amount = excluded.amount, updated_ms = excluded.updated_ms",
                params![account, b.period.as_str(), b.amount.to_string(), to_i64("now_ms", now_ms)?],
            )?,
            None => conn.execute("DELETE FROM budgets WHERE account = ?1", [account])?,
        };
        Ok(())
    }

    fn is_known(&self, name: &Named<'_>) -> Result<bool> {
        let (sql, value) = name.known_sql();
        self.read(|conn| Ok(conn.query_row(sql, [value], |r| r.get(0))?))
    }

    fn restrictions(&self, licenses: &[String], accounts: &[String]) -> Result<Restrictions> {
        self.read(|conn| {
        let mut out = Restrictions::default();
        for license in licenses {
            if let Some(reason) = conn
                .query_row(
                    "SELECT reason FROM revoked_licenses WHERE license = ?1",
                    [license],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                out.revoked.insert(license.clone(), reason);
            }
        }
        for license in licenses {
            let detection = conn
                .query_row(
                    "SELECT license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms FROM sharing_detections
                     WHERE license = ?1 AND blocked_until_ms IS NOT NULL",
                    [license],
                    sharing_row,
                )
                .optional()?;
            if let Some(detection) = detection {
                out.sharing_blocks.insert(license.clone(), detection);
            }
        }
        for account in accounts {
            if let Some(reason) = conn
                .query_row(
                    "SELECT reason FROM suspended_accounts WHERE account = ?1",
                    [account],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                out.suspended.insert(account.clone(), reason);
            }
            if let Some((period, amount)) = conn
                .query_row(
                    "SELECT period, amount FROM budgets WHERE account = ?1",
                    [account],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()?
            {
                out.budgets
                    .insert(account.clone(), parse_budget(&period, &amount)?);
            }
        }
        Ok(out)
        })
    }

    fn record_licenses(&self, seen: &[LicenseSeen], now_ms: u64) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan, last_seen_ms = excluded.last_seen_ms",
            )?;
            for l in seen {
                upsert.execute(params![
                    l.license,
                    l.account,
                    l.plan,
                    to_i64("now_ms", now_ms)?
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn budgets(&self) -> Result<BTreeMap<String, Budget>> {
        self.read(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT account, period, amount FROM budgets")?;
            let rows = statement.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (account, period, amount) = row?;
                out.insert(account, parse_budget(&period, &amount)?);
            }
            Ok(out)
        })
    }

    fn quotas(&self, account: &str, now_ms: u64) -> Result<Vec<QuotaState>> {
        self.read(|conn| {
            let mut statement = conn.prepare_cached(QUOTAS_SQL_SQLITE)?;
            let rows = statement.query_map(params![account, to_i64("now_ms", now_ms)?], |r| {
                Ok(QuotaState {
                    license: r.get(0)?,
                    meter: r.get(1)?,
                    period_start_ms: u64_of(r.get(2)?),
                    period_end_ms: u64_of(r.get(3)?),
                    limit: r.get::<_, Option<i64>>(4)?.map_or(0, u64_of),
                    allocated: u64_of(r.get(5)?),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

/// The limit in force is the latest lease's (a catalogue change applies to the next lease).
const QUOTAS_SQL_SQLITE: &str = "SELECT a.license, a.meter, a.period_start_ms, a.period_end_ms,
            (SELECT l.limit_units FROM leases l WHERE l.license = a.license AND l.meter = a.meter
               AND l.period_start_ms = a.period_start_ms AND l.period_end_ms = a.period_end_ms
             ORDER BY l.created_ms DESC LIMIT 1),
            a.allocated
     FROM quota_allocations a
     WHERE a.period_end_ms > ?2
       AND a.license IN (SELECT license FROM leases WHERE account = ?1)
     ORDER BY 1, 2, 3";
