//! Users, seats and sharing, in SQLite: [`SeatStore`] for [`SqliteStore`].

use super::*;

impl SeatStore for SqliteStore {
    fn take_seat(&self, ask: &SeatAsk<'_>, now_ms: u64) -> Result<SeatAnswer> {
        let r = ask.request;
        let key = crate::seats::key_id(&r.user);
        let (kind, start, now) = (
            ask.kind(),
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("now_ms", now_ms)?,
        );
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Floating seats that freed are of no use: the table holds the live ones (named seats
        // stay, as the record of who held one in each period).
        tx.execute(
            "DELETE FROM seats WHERE license = ?1 AND kind = 'floating' AND until_ms <= ?2",
            params![r.license, now],
        )?;
        let held = {
            let mut query = tx.prepare_cached(
                "SELECT user_ref, until_ms FROM seats
                 WHERE license = ?1 AND kind = ?2 AND period_start_ms = ?3 AND key_id = ?4 AND until_ms > ?5",
            )?;
            let rows = query.query_map(params![r.license, kind, start, key, now], |row| {
                Ok(crate::seats::SeatHolder {
                    user_ref: row.get(0)?,
                    until_ms: u64_of(row.get(1)?),
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let decision = crate::seats::decide(r, &held, now_ms, ask.ttl_ms, ask.period_end_ms);
        if let Some(until) = decision.seat_until_ms {
            tx.execute(
                "INSERT INTO seats (license, account, kind, period_start_ms, user_ref, key_id, seat_limit, first_ms, last_ms, until_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
                 ON CONFLICT (license, kind, period_start_ms, user_ref)
                 DO UPDATE SET seat_limit = excluded.seat_limit, last_ms = excluded.last_ms, until_ms = MAX(seats.until_ms, excluded.until_ms)",
                params![r.license, r.account, kind, start, r.user, key, r.rule.limit(), now, to_i64("until_ms", until)?],
            )?;
        }
        tx.commit()?;
        Ok(decision.answer)
    }

    fn note_clients(&self, seen: &ClientsSeen, now_ms: u64) -> Result<u32> {
        let now = to_i64("now_ms", now_ms)?;
        let since = to_i64("since", now_ms.saturating_sub(seen.window_ms))?;
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO license_clients (license, account, client_ref, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (license, client_ref) DO UPDATE SET last_seen_ms = MAX(license_clients.last_seen_ms, excluded.last_seen_ms)",
            )?;
            for client in &seen.clients {
                upsert.execute(params![seen.license, seen.account, client, now])?;
            }
        }
        tx.execute(
            "DELETE FROM license_clients WHERE license = ?1 AND last_seen_ms <= ?2",
            params![seen.license, since],
        )?;
        // Per pseudonym key (a key rotation would count every client twice): the busiest. A
        // ref without a key (no `.`) belongs to the key '' (as in postgres/seats.rs).
        let n: i64 = tx.query_row(
            "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM license_clients WHERE license = ?1
             GROUP BY CASE WHEN instr(client_ref, '.') > 0 THEN substr(client_ref, 1, instr(client_ref, '.') - 1) ELSE '' END)",
            [&seen.license],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn detect_sharing(&self, d: &SharingDetection) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let last: Option<(i64, i64)> = tx
            .query_row(
                "SELECT detected_ms, window_ms FROM sharing_detections WHERE license = ?1",
                [&d.license],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let new = last
            .is_none_or(|(at, window)| u64_of(at).saturating_add(u64_of(window)) <= d.detected_ms);
        if new {
            tx.execute(
                "INSERT INTO sharing_detections (license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, clients = excluded.clients, max_clients = excluded.max_clients,
                   window_ms = excluded.window_ms, detected_ms = excluded.detected_ms, blocked_until_ms = excluded.blocked_until_ms",
                params![d.license, d.account, d.clients, d.max_clients, to_i64("window_ms", d.window_ms)?, to_i64("detected_ms", d.detected_ms)?,
                        d.blocked_until_ms.map(|v| to_i64("blocked_until_ms", v)).transpose()?],
            )?;
        } else {
            tx.execute(
                "UPDATE sharing_detections SET clients = MAX(clients, ?2) WHERE license = ?1",
                params![d.license, d.clients],
            )?;
        }
        tx.commit()?;
        Ok(new)
    }

    fn sharing_detections(&self, account: Option<&str>) -> Result<Vec<SharingDetection>> {
        self.read(|conn| {
        let mut query = conn.prepare_cached(
            "SELECT license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms FROM sharing_detections
             WHERE ?1 IS NULL OR account = ?1 ORDER BY detected_ms DESC, license",
        )?;
        let rows = query.query_map([account], sharing_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn active_users(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<ActiveUsers> {
        self.read(|conn| {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let cut = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let filter = "FROM usage_records WHERE account = ?1 AND window_start_ms >= ?2 AND window_start_ms < ?3
                      AND user_ref <> '' AND outcome = 'allowed' AND meter = 'calls'
                      AND (?4 IS NULL OR batch_id IN (SELECT batch_id FROM batches WHERE received_ms <= ?4))";
        let users: i64 = conn.query_row(
            &format!("SELECT COUNT(DISTINCT user_ref) {filter}"),
            params![account, from, to, cut],
            |r| r.get(0),
        )?;
        let mut out = ActiveUsers {
            users: u64_of(users),
            ..ActiveUsers::default()
        };
        for (column, into) in [
            ("license", &mut out.by_license),
            ("feature", &mut out.by_feature),
        ] {
            let mut query = conn.prepare_cached(&format!(
                "SELECT {column}, COUNT(DISTINCT user_ref) {filter} GROUP BY {column}"
            ))?;
            let rows = query.query_map(params![account, from, to, cut], |r| {
                Ok((r.get::<_, String>(0)?, u64_of(r.get(1)?)))
            })?;
            for row in rows {
                let (name, n) = row?;
                into.insert(name, n);
            }
        }
        Ok(out)
        })
    }

    fn seat_use(&self, account: &str, now_ms: u64) -> Result<Vec<SeatUse>> {
        self.read(|conn| {
            let mut query = conn.prepare_cached(
                "SELECT license, kind, MAX(seat_limit), MAX(n) FROM (
               SELECT license, kind, key_id, MAX(seat_limit) AS seat_limit, COUNT(*) AS n FROM seats
               WHERE account = ?1 AND until_ms > ?2 GROUP BY license, kind, key_id)
             GROUP BY license, kind ORDER BY license, kind",
            )?;
            let rows = query.query_map(params![account, to_i64("now_ms", now_ms)?], |r| {
                Ok(SeatUse {
                    license: r.get(0)?,
                    kind: r.get(1)?,
                    limit: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                    in_use: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}
