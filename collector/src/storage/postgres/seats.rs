//! Users, seats and sharing, in PostgreSQL: [`SeatStore`] for [`PostgresStore`].

use super::*;

impl SeatStore for PostgresStore {
    fn take_seat(&self, ask: &SeatAsk<'_>, now_ms: u64) -> Result<SeatAnswer> {
        let r = ask.request;
        let key = crate::seats::key_id(&r.user);
        let (kind, start, now) = (
            ask.kind(),
            to_i64("period_start_ms", ask.period_start_ms)?,
            to_i64("now_ms", now_ms)?,
        );
        let limit = i64::from(r.rule.limit());
        self.with_client(|client| {
            // Read committed (whatever the server's default): rows committed by the replica that
            // held the lock before are seen once the lock is ours.
            let mut tx = client
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::ReadCommitted)
                .start()?;
            // One decision per license at a time, across every replica.
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('tollgate-seats:' || $1, 0))", &[&r.license])?;
            // Floating seats that freed are of no use: the table holds the live ones (named
            // seats stay, as the record of who held one in each period).
            tx.execute(
                "DELETE FROM seats WHERE license = $1 AND kind = 'floating' AND until_ms <= $2",
                &[&r.license, &now],
            )?;
            let held: Vec<crate::seats::SeatHolder> = tx
                .query(
                    "SELECT user_ref, until_ms FROM seats
                     WHERE license = $1 AND kind = $2 AND period_start_ms = $3 AND key_id = $4 AND until_ms > $5",
                    &[&r.license, &kind, &start, &key, &now],
                )?
                .iter()
                .map(|row| crate::seats::SeatHolder {
                    user_ref: row.get(0),
                    until_ms: u64_of(row.get(1)),
                })
                .collect();
            let decision = crate::seats::decide(r, &held, now_ms, ask.ttl_ms, ask.period_end_ms);
            if let Some(until) = decision.seat_until_ms {
                let until = to_i64("until_ms", until)?;
                tx.execute(
                    "INSERT INTO seats (license, account, kind, period_start_ms, user_ref, key_id, seat_limit, first_ms, last_ms, until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
                     ON CONFLICT (license, kind, period_start_ms, user_ref)
                     DO UPDATE SET seat_limit = excluded.seat_limit, last_ms = excluded.last_ms, until_ms = GREATEST(seats.until_ms, excluded.until_ms)",
                    &[&r.license, &r.account, &kind, &start, &r.user, &key, &limit, &now, &until],
                )?;
            }
            tx.commit()?;
            Ok(decision.answer.clone())
        })
    }

    fn note_clients(&self, seen: &ClientsSeen, now_ms: u64) -> Result<u32> {
        let now = to_i64("now_ms", now_ms)?;
        let since = to_i64("since", now_ms.saturating_sub(seen.window_ms))?;
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "INSERT INTO license_clients (license, account, client_ref, last_seen_ms)
                 SELECT $1, $2, c, $4 FROM UNNEST($3::TEXT[]) AS c
                 ON CONFLICT (license, client_ref) DO UPDATE SET last_seen_ms = GREATEST(license_clients.last_seen_ms, excluded.last_seen_ms)",
                &[&seen.license, &seen.account, &seen.clients, &now],
            )?;
            tx.execute(
                "DELETE FROM license_clients WHERE license = $1 AND last_seen_ms <= $2",
                &[&seen.license, &since],
            )?;
            let n: i64 = tx
                // Per pseudonym key (a key rotation would count every client twice): the
                // busiest. A ref without a key (no `.`) belongs to the key '' (as in sqlite/seats.rs).
                .query_one(
                    "SELECT COALESCE(MAX(n), 0)::BIGINT FROM (SELECT COUNT(*) AS n FROM license_clients WHERE license = $1
                     GROUP BY CASE WHEN strpos(client_ref, '.') > 0 THEN split_part(client_ref, '.', 1) ELSE '' END) AS per_key",
                    &[&seen.license],
                )?
                .get(0);
            tx.commit()?;
            Ok(u32::try_from(n).unwrap_or(u32::MAX))
        })
    }

    fn detect_sharing(&self, d: &SharingDetection) -> Result<bool> {
        let clients = i64::from(d.clients);
        let max_clients = i64::from(d.max_clients);
        let window = to_i64("window_ms", d.window_ms)?;
        let at = to_i64("detected_ms", d.detected_ms)?;
        let until = d
            .blocked_until_ms
            .map(|v| to_i64("blocked_until_ms", v))
            .transpose()?;
        self.with_client(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::ReadCommitted)
                .start()?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('tollgate-sharing:' || $1, 0))", &[&d.license])?;
            let last = tx.query_opt(
                "SELECT detected_ms, window_ms FROM sharing_detections WHERE license = $1",
                &[&d.license],
            )?;
            let new = last.is_none_or(|row| {
                u64_of(row.get(0)).saturating_add(u64_of(row.get(1))) <= d.detected_ms
            });
            if new {
                tx.execute(
                    "INSERT INTO sharing_detections (license, account, clients, max_clients, window_ms, detected_ms, blocked_until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (license) DO UPDATE SET account = excluded.account, clients = excluded.clients, max_clients = excluded.max_clients,
                       window_ms = excluded.window_ms, detected_ms = excluded.detected_ms, blocked_until_ms = excluded.blocked_until_ms",
                    &[&d.license, &d.account, &clients, &max_clients, &window, &at, &until],
                )?;
            } else {
                tx.execute(
                    "UPDATE sharing_detections SET clients = GREATEST(clients, $2) WHERE license = $1",
                    &[&d.license, &clients],
                )?;
            }
            tx.commit()?;
            Ok(new)
        })
    }

    fn sharing_detections(&self, account: Option<&str>) -> Result<Vec<SharingDetection>> {
        self.with_client(|client| {
            Ok(client
                .query(
                    &format!("SELECT {SHARING_COLUMNS} FROM sharing_detections WHERE $1::TEXT IS NULL OR account = $1 ORDER BY detected_ms DESC, license"),
                    &[&account],
                )?
                .iter()
                .map(sharing_row)
                .collect())
        })
    }

    fn active_users(
        &self,
        account: &str,
        from_ms: u64,
        to_ms: u64,
        received_until_ms: Option<u64>,
    ) -> Result<ActiveUsers> {
        let (from, to) = (to_i64("from_ms", from_ms)?, to_i64("to_ms", to_ms)?);
        let cut = received_until_ms
            .map(|v| to_i64("received_until_ms", v))
            .transpose()?;
        let filter = "FROM usage_records WHERE account = $1 AND window_start_ms >= $2 AND window_start_ms < $3
                      AND user_ref <> '' AND outcome = 'allowed' AND meter = 'calls'
                      AND ($4::BIGINT IS NULL OR batch_id IN (SELECT batch_id FROM batches WHERE received_ms <= $4))";
        self.with_client(|client| {
            let users: i64 = client
                .query_one(
                    &format!("SELECT COUNT(DISTINCT user_ref) {filter}"),
                    &[&account, &from, &to, &cut],
                )?
                .get(0);
            let mut out = ActiveUsers {
                users: u64_of(users),
                ..ActiveUsers::default()
            };
            for (column, into) in [
                ("license", &mut out.by_license),
                ("feature", &mut out.by_feature),
            ] {
                for row in client.query(
                    &format!(
                        "SELECT {column}, COUNT(DISTINCT user_ref) {filter} GROUP BY {column}"
                    ),
                    &[&account, &from, &to, &cut],
                )? {
                    into.insert(row.get(0), u64_of(row.get(1)));
                }
            }
            Ok(out)
        })
    }

    fn seat_use(&self, account: &str, now_ms: u64) -> Result<Vec<SeatUse>> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            Ok(client
                .query(
                    "SELECT license, kind, MAX(seat_limit)::BIGINT, MAX(n)::BIGINT FROM (
                       SELECT license, kind, key_id, MAX(seat_limit) AS seat_limit, COUNT(*) AS n FROM seats
                       WHERE account = $1 AND until_ms > $2 GROUP BY license, kind, key_id) AS per_key
                     GROUP BY license, kind ORDER BY license, kind",
                    &[&account, &now],
                )?
                .iter()
                .map(|r| SeatUse {
                    license: r.get(0),
                    kind: r.get(1),
                    limit: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    in_use: u32::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                })
                .collect())
        })
    }
}
