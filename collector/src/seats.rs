//! Seats and sharing, decided by the collector (it sees every Envoy): who may take a seat of a
//! license, and when a license is used from too many clients. The arithmetic is here, pure and
//! tested with a fake clock; the stores run it inside a transaction per license.

use tollgate_wire::sync::{SeatAnswer, SeatRequest, SeatRule};

/// How long a refusal is kept by filters before the user asks again, at most: an operator
/// may raise the limit, and floating seats free without notice.
pub const REFUSAL_RECHECK_MS: u64 = 60_000;

/// A seat taken: its user and when it frees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatHolder {
    pub user_ref: String,
    pub until_ms: u64,
}

/// What a seat request comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatDecision {
    pub answer: SeatAnswer,
    /// For a grant: when the user's seat frees if it is not renewed.
    pub seat_until_ms: Option<u64>,
}

/// The pseudonym key a user reference was made with (`<key id>.<hmac>`): seats are counted per
/// key, so a key rotation lets users take new seats instead of locking them out.
pub fn key_id(user_ref: &str) -> &str {
    user_ref.split_once('.').map_or("", |(id, _)| id)
}

/// Decide `request` at `now_ms`, given the seats `held` now (live, same license, rule kind,
/// period and key). `ttl_ms`: how long a filter may use a grant before it renews;
/// `period_end_ms`: the end of the named seats' period.
pub fn decide(
    request: &SeatRequest,
    held: &[SeatHolder],
    now_ms: u64,
    ttl_ms: u64,
    period_end_ms: u64,
) -> SeatDecision {
    let limit = request.rule.limit();
    let (seat_until, grant_until) = match request.rule {
        SeatRule::Named { .. } => (
            period_end_ms,
            now_ms.saturating_add(ttl_ms).min(period_end_ms),
        ),
        // A filter's grant never outlives the seat: the seat frees `window` after its last
        // grant, and a grant lasts at most the window.
        SeatRule::Floating { window_ms, .. } => (
            now_ms.saturating_add(window_ms),
            now_ms.saturating_add(ttl_ms.min(window_ms)),
        ),
    };
    let holds_one = held.iter().any(|h| h.user_ref == request.user);
    let in_use = u32::try_from(held.len()).unwrap_or(u32::MAX);
    if holds_one || in_use < limit {
        return SeatDecision {
            answer: SeatAnswer {
                license: request.license.clone(),
                user: request.user.clone(),
                granted: true,
                until_ms: grant_until,
                in_use: if holds_one {
                    in_use
                } else {
                    in_use.saturating_add(1)
                },
                limit,
            },
            seat_until_ms: Some(seat_until),
        };
    }
    // Refused until a seat may free: the period's end (named), the earliest holder's end
    // (floating); asked again sooner, in case the limit is raised.
    let frees = match request.rule {
        SeatRule::Named { .. } => period_end_ms,
        SeatRule::Floating { .. } => held.iter().map(|h| h.until_ms).min().unwrap_or(now_ms),
    };
    SeatDecision {
        answer: SeatAnswer {
            license: request.license.clone(),
            user: request.user.clone(),
            granted: false,
            until_ms: frees
                .min(now_ms.saturating_add(REFUSAL_RECHECK_MS))
                .max(now_ms.saturating_add(1)),
            in_use,
            limit,
        },
        seat_until_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_wire::sync::Period;

    const T0: u64 = 1_780_000_000_000;

    fn ask(user: &str, rule: SeatRule) -> SeatRequest {
        SeatRequest {
            account: "acme".into(),
            license: "lic".into(),
            user: format!("k1.{user}"),
            rule,
        }
    }

    /// Run a sequence of asks against an in-memory seat table, as the stores do.
    struct Table {
        seats: Vec<SeatHolder>,
    }

    impl Table {
        fn ask(&mut self, user: &str, rule: SeatRule, now: u64, period_end: u64) -> SeatAnswer {
            let request = ask(user, rule);
            let live: Vec<SeatHolder> = self
                .seats
                .iter()
                .filter(|s| s.until_ms > now)
                .cloned()
                .collect();
            let decision = decide(&request, &live, now, 10_000, period_end);
            if let Some(until) = decision.seat_until_ms {
                self.seats.retain(|s| s.user_ref != request.user);
                self.seats.push(SeatHolder {
                    user_ref: request.user.clone(),
                    until_ms: until,
                });
            }
            decision.answer
        }
    }

    #[test]
    fn named_seats_admit_n_distinct_users_per_period_and_keep_them() {
        let rule = SeatRule::Named {
            limit: 2,
            per: Period::Month,
        };
        let end = T0 + 30 * 86_400_000;
        let mut t = Table { seats: vec![] };
        assert!(t.ask("a", rule, T0, end).granted);
        assert!(t.ask("b", rule, T0 + 1, end).granted);
        let refused = t.ask("c", rule, T0 + 2, end);
        assert!(!refused.granted);
        assert_eq!((refused.in_use, refused.limit), (2, 2));
        assert_eq!(refused.until_ms, T0 + 2 + REFUSAL_RECHECK_MS);
        // The holders keep their seats all period, even after a long pause.
        let a = t.ask("a", rule, T0 + 20 * 86_400_000, end);
        assert!(a.granted);
        assert_eq!(a.until_ms, T0 + 20 * 86_400_000 + 10_000);
        assert!(!t.ask("c", rule, T0 + 29 * 86_400_000, end).granted);
        // The next period starts empty.
        let next_end = end + 30 * 86_400_000;
        assert!(t.ask("c", rule, end, next_end).granted);
        // A grant never outlives the period.
        assert_eq!(t.ask("d", rule, next_end - 5, next_end).until_ms, next_end);
    }

    #[test]
    fn floating_seats_free_a_window_after_their_last_grant() {
        let rule = SeatRule::Floating {
            limit: 2,
            window_ms: 60_000,
        };
        let mut t = Table { seats: vec![] };
        assert!(t.ask("a", rule, T0, 0).granted);
        assert!(t.ask("b", rule, T0, 0).granted);
        let refused = t.ask("c", rule, T0 + 1_000, 0);
        assert!(!refused.granted);
        // Refused until the earliest seat frees.
        assert_eq!(refused.until_ms, T0 + 60_000);
        // b keeps renewing; a stops.
        assert!(t.ask("b", rule, T0 + 30_000, 0).granted);
        assert!(!t.ask("c", rule, T0 + 59_999, 0).granted);
        // a's window is over: c takes its seat; a, back, is refused until b's frees.
        assert!(t.ask("c", rule, T0 + 60_000, 0).granted);
        let a = t.ask("a", rule, T0 + 60_001, 0);
        assert!(!a.granted);
        assert_eq!(a.until_ms, T0 + 90_000);
    }

    #[test]
    fn a_floating_grant_never_outlives_its_seat() {
        let rule = SeatRule::Floating {
            limit: 1,
            window_ms: 4_000,
        };
        let d = decide(&ask("a", rule), &[], T0, 10_000, 0);
        assert_eq!(d.answer.until_ms, T0 + 4_000);
        assert_eq!(d.seat_until_ms, Some(T0 + 4_000));
    }

    #[test]
    fn key_ids_come_from_the_pseudonym() {
        assert_eq!(key_id("k2026.00ff"), "k2026");
        assert_eq!(key_id("nokey"), "");
    }
}
