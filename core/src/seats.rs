//! Seats: which users of a license may be served. The collector decides (it sees every
//! Envoy); a filter holds what it granted. Every worker of one Envoy shares a [`SeatBook`] per
//! license in proxy-wasm shared data, updated with compare-and-swap, holding per user:
//!
//! - a grant, used until it expires and renewed (in its second half) while the user is active,
//!   so a floating seat stays taken while its user works and frees once the user stops;
//! - a refusal, kept until the collector said a seat may free (so a refused user costs no
//!   sync per request);
//! - an ask in flight, so the workers of one Envoy ask once per user.
//!
//! Pure logic with an injected clock; the gate carries the asks in its syncs.

use serde::{Deserialize, Serialize};
use tollgate_wire::sync::SeatAnswer;

use crate::quota::{update_blob, SharedBlobs};
use crate::ratelimit::StoreError;

/// How long an ask may stay unanswered before another request asks again.
pub const SEAT_ASK_TIMEOUT_MS: u64 = 3_000;
/// A book keeps at most this many users; beyond it, the entries that expired longest ago go.
/// (A license with more seats than this still works: users dropped from the book ask again.)
pub const MAX_BOOK_USERS: usize = 4_096;

/// What a book says of one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatState {
    /// Nothing known (never asked, or the last answer expired).
    Unknown,
    Granted,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatEntry {
    pub user: String,
    pub state: SeatState,
    /// The grant or refusal holds until this time.
    pub until_ms: u64,
    /// A grant is renewed from this time on (half its life).
    pub renew_from_ms: u64,
    /// An ask in flight since this time (0: none).
    pub asked_ms: u64,
    /// From the collector's last answer, for the refusal's message.
    pub in_use: u32,
    pub limit: u32,
}

/// The seats one Envoy holds for one license.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatBook {
    pub users: Vec<SeatEntry>,
}

/// What a request of a user finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatCheck {
    /// The user holds a seat; `renew`: this request should ask to renew it (once per Envoy).
    Held { renew: bool },
    /// No seat for the user until `until_ms`.
    Refused {
        until_ms: u64,
        in_use: u32,
        limit: u32,
    },
    /// Nothing held: this request asks the collector (and waits for the answer).
    Ask,
    /// Another request asked already: wait for its answer.
    Waiting,
}

impl SeatBook {
    fn entry(&mut self, user: &str) -> Option<&mut SeatEntry> {
        self.users.iter_mut().find(|e| e.user == user)
    }

    /// Check `user` at `now_ms`, noting an ask (or renewal) this request must send.
    pub fn check(&mut self, user: &str, now_ms: u64) -> SeatCheck {
        let asking = |e: &SeatEntry| {
            e.asked_ms != 0 && now_ms.saturating_sub(e.asked_ms) < SEAT_ASK_TIMEOUT_MS
        };
        if let Some(entry) = self.entry(user) {
            let live = now_ms < entry.until_ms;
            match entry.state {
                SeatState::Granted if live => {
                    let renew = now_ms >= entry.renew_from_ms && !asking(entry);
                    if renew {
                        entry.asked_ms = now_ms.max(1);
                    }
                    return SeatCheck::Held { renew };
                }
                SeatState::Refused if live => {
                    return SeatCheck::Refused {
                        until_ms: entry.until_ms,
                        in_use: entry.in_use,
                        limit: entry.limit,
                    }
                }
                _ if asking(entry) => return SeatCheck::Waiting,
                _ => {
                    entry.state = SeatState::Unknown;
                    entry.asked_ms = now_ms.max(1);
                    return SeatCheck::Ask;
                }
            }
        }
        self.make_room(now_ms);
        self.users.push(SeatEntry {
            user: user.to_string(),
            state: SeatState::Unknown,
            until_ms: 0,
            renew_from_ms: 0,
            asked_ms: now_ms.max(1),
            in_use: 0,
            limit: 0,
        });
        SeatCheck::Ask
    }

    /// The collector answered an ask for `answer.user`.
    pub fn apply(&mut self, answer: &SeatAnswer, now_ms: u64) {
        self.make_room(now_ms);
        let entry = match self.entry(&answer.user) {
            Some(entry) => entry,
            None => {
                self.users.push(SeatEntry {
                    user: answer.user.clone(),
                    state: SeatState::Unknown,
                    until_ms: 0,
                    renew_from_ms: 0,
                    asked_ms: 0,
                    in_use: 0,
                    limit: 0,
                });
                let Some(entry) = self.users.last_mut() else {
                    return;
                };
                entry
            }
        };
        entry.state = if answer.granted {
            SeatState::Granted
        } else {
            SeatState::Refused
        };
        entry.until_ms = answer.until_ms;
        entry.renew_from_ms = now_ms.saturating_add(answer.until_ms.saturating_sub(now_ms) / 2);
        entry.asked_ms = 0;
        entry.in_use = answer.in_use;
        entry.limit = answer.limit;
    }

    /// The ask for `user` got no answer (the sync failed): the next request asks again.
    pub fn unanswered(&mut self, user: &str) {
        if let Some(entry) = self.entry(user) {
            entry.asked_ms = 0;
        }
    }

    /// Drop expired entries nobody is asking for once the book is full.
    fn make_room(&mut self, now_ms: u64) {
        if self.users.len() < MAX_BOOK_USERS {
            return;
        }
        self.users
            .retain(|e| now_ms < e.until_ms || (e.asked_ms != 0 && e.state == SeatState::Unknown));
        if self.users.len() >= MAX_BOOK_USERS {
            // Every entry is live: the ones ending soonest go (they ask again if used).
            self.users.sort_by_key(|e| std::cmp::Reverse(e.until_ms));
            self.users.truncate(MAX_BOOK_USERS - 1);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A damaged value reads as an empty book: users ask the collector again, which knows.
    pub fn decode(bytes: &[u8]) -> SeatBook {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

/// The shared-data key of a license's seat book (length-prefixed like every license key).
pub fn book_key(license: &str) -> String {
    format!("tollgate/seats/{}:{license}", license.len())
}

/// Read, change and write back a license's book with compare-and-swap.
pub fn update_book<T>(
    shared: &impl SharedBlobs,
    license: &str,
    change: impl FnMut(&mut SeatBook) -> T,
) -> Result<T, StoreError> {
    update_blob(
        shared,
        &book_key(license),
        SeatBook::decode,
        SeatBook::encode,
        change,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const T0: u64 = 1_780_000_000_000;

    fn answer(user: &str, granted: bool, until_ms: u64) -> SeatAnswer {
        SeatAnswer {
            license: "lic".into(),
            user: user.into(),
            granted,
            until_ms,
            in_use: 2,
            limit: 2,
        }
    }

    #[test]
    fn a_new_user_asks_once_and_others_wait_for_the_answer() {
        let mut book = SeatBook::default();
        assert_eq!(book.check("u1", T0), SeatCheck::Ask);
        assert_eq!(book.check("u1", T0 + 10), SeatCheck::Waiting);
        // Unanswered past the timeout: the next request asks again.
        assert_eq!(book.check("u1", T0 + SEAT_ASK_TIMEOUT_MS), SeatCheck::Ask);
        // A failed sync: ask again at once.
        book.unanswered("u1");
        assert_eq!(
            book.check("u1", T0 + SEAT_ASK_TIMEOUT_MS + 1),
            SeatCheck::Ask
        );
    }

    #[test]
    fn a_grant_is_used_renewed_in_its_second_half_and_asked_again_once_expired() {
        let mut book = SeatBook::default();
        book.check("u1", T0);
        book.apply(&answer("u1", true, T0 + 10_000), T0);
        assert_eq!(book.check("u1", T0 + 1), SeatCheck::Held { renew: false });
        assert_eq!(
            book.check("u1", T0 + 4_999),
            SeatCheck::Held { renew: false }
        );
        // Second half: one request renews, the others of this Envoy do not.
        assert_eq!(
            book.check("u1", T0 + 5_000),
            SeatCheck::Held { renew: true }
        );
        assert_eq!(
            book.check("u1", T0 + 5_001),
            SeatCheck::Held { renew: false }
        );
        // The renewal answered: a new life.
        book.apply(&answer("u1", true, T0 + 15_000), T0 + 5_010);
        assert_eq!(
            book.check("u1", T0 + 9_000),
            SeatCheck::Held { renew: false }
        );
        // Expired without renewal (the user was idle): ask again, and wait meanwhile.
        assert_eq!(book.check("u1", T0 + 15_000), SeatCheck::Ask);
        assert_eq!(book.check("u1", T0 + 15_001), SeatCheck::Waiting);
    }

    #[test]
    fn a_refusal_holds_until_its_time_then_the_user_asks_again() {
        let mut book = SeatBook::default();
        book.check("u3", T0);
        book.apply(&answer("u3", false, T0 + 60_000), T0);
        assert_eq!(
            book.check("u3", T0 + 59_999),
            SeatCheck::Refused {
                until_ms: T0 + 60_000,
                in_use: 2,
                limit: 2
            }
        );
        assert_eq!(book.check("u3", T0 + 60_000), SeatCheck::Ask);
        // A renewal refused (the seat was taken by then): refused from now on.
        book.apply(&answer("u3", true, T0 + 70_000), T0 + 60_001);
        book.apply(&answer("u3", false, T0 + 90_000), T0 + 65_000);
        assert!(matches!(
            book.check("u3", T0 + 66_000),
            SeatCheck::Refused { .. }
        ));
    }

    #[test]
    fn the_book_stays_bounded_and_survives_a_round_trip() {
        let mut book = SeatBook::default();
        for i in 0..(MAX_BOOK_USERS + 100) {
            let user = format!("u{i}");
            book.check(&user, T0);
            book.apply(&answer(&user, true, T0 + 1_000 + i as u64), T0);
        }
        assert!(book.users.len() <= MAX_BOOK_USERS);
        // The newest grants survive.
        let last = format!("u{}", MAX_BOOK_USERS + 99);
        assert_eq!(book.check(&last, T0 + 1), SeatCheck::Held { renew: false });
        assert_eq!(SeatBook::decode(&book.encode()), book);
        assert_eq!(SeatBook::decode(b"garbage"), SeatBook::default());
    }
}
