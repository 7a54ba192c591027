//! Seats: which users of a license may be served. The collector decides (it sees every
//! Envoy); a filter holds what it granted. Every worker of one Envoy shares a [`SeatEntry`] per
//! license and user in proxy-wasm shared data, updated with compare-and-swap, holding:
//!
//! - a grant, used until it expires and renewed (in its second half) while the user is active,
//!   so a floating seat stays taken while its user works and frees once the user stops;
//! - a refusal, kept until the collector said a seat may free (so a refused user costs no
//!   sync per request);
//! - an ask in flight, so the workers of one Envoy ask once per user.
//!
//! Pure logic with an injected clock; the gate carries the asks in its syncs.

use tollgate_wire::sync::SeatAnswer;

use crate::quota::{update_blob, SharedBlobs};
use crate::ratelimit::StoreError;

/// How long an ask may stay unanswered before another request asks again.
pub const SEAT_ASK_TIMEOUT_MS: u64 = 3_000;
/// Bytes of an encoded [`SeatEntry`].
const ENCODED_LEN: usize = 1 + 8 + 8 + 8 + 4 + 4;

/// What an Envoy knows of one user's seat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeatState {
    /// Nothing known (never asked, or the last answer expired).
    #[default]
    Unknown,
    Granted,
    Refused,
}

/// One user's seat of one license, as this Envoy holds it (one shared-data value per license
/// and user: a request reads and writes a few dozen bytes, whatever the number of users).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeatEntry {
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

impl SeatEntry {
    fn asking(&self, now_ms: u64) -> bool {
        self.asked_ms != 0 && now_ms.saturating_sub(self.asked_ms) < SEAT_ASK_TIMEOUT_MS
    }

    /// Check the user at `now_ms`, noting an ask (or renewal) this request must send.
    pub fn check(&mut self, now_ms: u64) -> SeatCheck {
        let live = now_ms < self.until_ms;
        match self.state {
            SeatState::Granted if live => {
                let renew = now_ms >= self.renew_from_ms && !self.asking(now_ms);
                if renew {
                    self.asked_ms = now_ms.max(1);
                }
                SeatCheck::Held { renew }
            }
            SeatState::Refused if live => SeatCheck::Refused {
                until_ms: self.until_ms,
                in_use: self.in_use,
                limit: self.limit,
            },
            _ if self.asking(now_ms) => SeatCheck::Waiting,
            _ => {
                self.state = SeatState::Unknown;
                self.asked_ms = now_ms.max(1);
                SeatCheck::Ask
            }
        }
    }

    /// The collector answered an ask for this user.
    pub fn apply(&mut self, answer: &SeatAnswer, now_ms: u64) {
        self.asked_ms = 0;
        if !answer.granted && self.state == SeatState::Granted && now_ms < self.until_ms {
            // A refusal that answers an older ask (two workers asked at once) or a renewal
            // refused: the grant in hand is used until it expires, then the user asks again.
            return;
        }
        self.state = if answer.granted {
            SeatState::Granted
        } else {
            SeatState::Refused
        };
        self.until_ms = answer.until_ms;
        self.renew_from_ms = now_ms.saturating_add(answer.until_ms.saturating_sub(now_ms) / 2);
        self.in_use = answer.in_use;
        self.limit = answer.limit;
    }

    /// The ask got no answer (the sync failed): the next request asks again.
    pub fn unanswered(&mut self) {
        self.asked_ms = 0;
    }

    /// 33 bytes, little-endian: state, until, renew from, asked, in use, limit. Fixed-size
    /// binary, because every request of a seat-counted license decodes one.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ENCODED_LEN);
        out.push(match self.state {
            SeatState::Unknown => 0,
            SeatState::Granted => 1,
            SeatState::Refused => 2,
        });
        out.extend_from_slice(&self.until_ms.to_le_bytes());
        out.extend_from_slice(&self.renew_from_ms.to_le_bytes());
        out.extend_from_slice(&self.asked_ms.to_le_bytes());
        out.extend_from_slice(&self.in_use.to_le_bytes());
        out.extend_from_slice(&self.limit.to_le_bytes());
        out
    }

    /// A damaged value reads as nothing known: the user asks the collector again, which knows.
    pub fn decode(bytes: &[u8]) -> SeatEntry {
        if bytes.len() != ENCODED_LEN {
            return SeatEntry::default();
        }
        let u64_at = |at: usize| {
            bytes
                .get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_le_bytes)
        };
        let u32_at = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_le_bytes)
        };
        let state = match bytes.first() {
            Some(1) => SeatState::Granted,
            Some(2) => SeatState::Refused,
            _ => SeatState::Unknown,
        };
        SeatEntry {
            state,
            until_ms: u64_at(1),
            renew_from_ms: u64_at(9),
            asked_ms: u64_at(17),
            in_use: u32_at(25),
            limit: u32_at(29),
        }
    }
}

/// The shared-data key of a user's seat of a license (the license length-prefixed like every
/// license key; a pseudonym has no `/`).
pub fn seat_key(license: &str, user: &str) -> String {
    format!("tollgate/seat/{}:{license}/{user}", license.len())
}

/// Read, change and write back a user's seat with compare-and-swap.
pub fn update_seat<T>(
    shared: &impl SharedBlobs,
    license: &str,
    user: &str,
    change: impl FnMut(&mut SeatEntry) -> T,
) -> Result<T, StoreError> {
    update_blob(
        shared,
        &seat_key(license, user),
        SeatEntry::decode,
        SeatEntry::encode,
        change,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_780_000_000_000;

    fn answer(granted: bool, until_ms: u64) -> SeatAnswer {
        SeatAnswer {
            license: "lic".into(),
            user: "k1.u".into(),
            granted,
            until_ms,
            in_use: 2,
            limit: 2,
        }
    }

    #[test]
    fn a_new_user_asks_once_and_others_wait_for_the_answer() {
        let mut seat = SeatEntry::default();
        assert_eq!(seat.check(T0), SeatCheck::Ask);
        assert_eq!(seat.check(T0 + 10), SeatCheck::Waiting);
        // Unanswered past the timeout: the next request asks again.
        assert_eq!(seat.check(T0 + SEAT_ASK_TIMEOUT_MS), SeatCheck::Ask);
        // A failed sync: ask again at once.
        seat.unanswered();
        assert_eq!(seat.check(T0 + SEAT_ASK_TIMEOUT_MS + 1), SeatCheck::Ask);
    }

    #[test]
    fn a_grant_is_used_renewed_in_its_second_half_and_asked_again_once_expired() {
        let mut seat = SeatEntry::default();
        seat.check(T0);
        seat.apply(&answer(true, T0 + 10_000), T0);
        assert_eq!(seat.check(T0 + 1), SeatCheck::Held { renew: false });
        assert_eq!(seat.check(T0 + 4_999), SeatCheck::Held { renew: false });
        // Second half: one request renews, the others of this Envoy do not.
        assert_eq!(seat.check(T0 + 5_000), SeatCheck::Held { renew: true });
        assert_eq!(seat.check(T0 + 5_001), SeatCheck::Held { renew: false });
        // The renewal answered: a new life.
        seat.apply(&answer(true, T0 + 15_000), T0 + 5_010);
        assert_eq!(seat.check(T0 + 9_000), SeatCheck::Held { renew: false });
        // Expired without renewal (the user was idle): ask again, and wait meanwhile.
        assert_eq!(seat.check(T0 + 15_000), SeatCheck::Ask);
        assert_eq!(seat.check(T0 + 15_001), SeatCheck::Waiting);
    }

    #[test]
    fn a_refusal_holds_until_its_time_then_the_user_asks_again() {
        let mut seat = SeatEntry::default();
        seat.check(T0);
        seat.apply(&answer(false, T0 + 60_000), T0);
        assert_eq!(
            seat.check(T0 + 59_999),
            SeatCheck::Refused {
                until_ms: T0 + 60_000,
                in_use: 2,
                limit: 2
            }
        );
        assert_eq!(seat.check(T0 + 60_000), SeatCheck::Ask);
    }

    #[test]
    fn a_late_refusal_does_not_take_a_live_grant_away() {
        let mut seat = SeatEntry::default();
        seat.check(T0);
        seat.apply(&answer(true, T0 + 10_000), T0);
        // An older ask's refusal arrives after the grant (or a renewal is refused): the grant
        // in hand is used until it expires, then the user asks again.
        seat.apply(&answer(false, T0 + 60_000), T0 + 100);
        assert_eq!(seat.check(T0 + 200), SeatCheck::Held { renew: false });
        assert_eq!(seat.check(T0 + 10_000), SeatCheck::Ask);
        seat.apply(&answer(false, T0 + 60_000), T0 + 10_010);
        assert!(matches!(seat.check(T0 + 10_020), SeatCheck::Refused { .. }));
    }

    #[test]
    fn entries_are_small_and_survive_a_round_trip() {
        let mut seat = SeatEntry::default();
        seat.check(T0);
        seat.apply(&answer(true, T0 + 10_000), T0);
        seat.in_use = 7;
        seat.limit = u32::MAX;
        let bytes = seat.encode();
        assert_eq!(bytes.len(), 33);
        assert_eq!(SeatEntry::decode(&bytes), seat);
        assert_eq!(SeatEntry::decode(b"garbage"), SeatEntry::default());
        assert_eq!(SeatEntry::decode(&[]), SeatEntry::default());
        let mut refused = SeatEntry::default();
        refused.apply(&answer(false, T0 + 1), T0);
        assert_eq!(SeatEntry::decode(&refused.encode()), refused);
        assert_ne!(seat_key("a", "k1.b"), seat_key("a/k1", "b"));
    }
}
