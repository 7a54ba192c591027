//! A fixed set of database connections, each opened on first use and opened again after it
//! broke: SQLite's readers beside its one writer, and PostgreSQL's connections per replica.
//!
//! Why not r2d2: a pool that cannot connect retries until its checkout timeout, so a database
//! that is down would hold every request for that long; here a call that needs a new
//! connection tries once and fails at once, and the caller's answer (a 503 the filter retries)
//! is as prompt as with one connection. Nor does a checkout cost a validation round trip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::Result;

/// How a set opens its connections and tells a broken one.
pub(crate) trait Connect {
    type Connection;
    fn open(&self) -> Result<Self::Connection>;
    /// True if `connection` can no longer be used (the next call opens another).
    fn is_broken(&self, _connection: &Self::Connection) -> bool {
        false
    }
}

/// `size` connections; a call takes a free one, or waits for one if all are busy.
pub(crate) struct Connections<C: Connect> {
    connect: C,
    slots: Vec<Mutex<Option<C::Connection>>>,
    /// Where the next call starts looking, so that calls spread over the slots.
    next: AtomicUsize,
}

impl<C: Connect> Connections<C> {
    pub(crate) fn new(connect: C, size: usize) -> Self {
        Connections {
            connect,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Add a connection opened elsewhere (the one `open` migrated with) to a free slot.
    pub(crate) fn adopt(&self, connection: C::Connection) {
        for slot in &self.slots {
            let mut slot = lock(slot);
            if slot.is_none() {
                *slot = Some(connection);
                return;
            }
        }
    }

    /// Run `work` on a connection: a free one if there is one, else the next in turn when it
    /// is free. A connection that is broken afterwards, or was in use when a call panicked,
    /// is dropped (rolling back what it had open) and opened again by the next call.
    pub(crate) fn with<T>(&self, work: impl FnOnce(&mut C::Connection) -> Result<T>) -> Result<T> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let free = (0..n).find_map(|i| {
            let slot = self.slots.get((start + i) % n)?;
            match slot.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(reset(slot, poisoned)),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        });
        let mut guard = match free {
            Some(guard) => guard,
            None => match self.slots.get(start % n) {
                Some(slot) => lock(slot),
                None => anyhow::bail!("no database connection slot"),
            },
        };
        if guard
            .as_ref()
            .is_none_or(|connection| self.connect.is_broken(connection))
        {
            *guard = None;
            *guard = Some(self.connect.open()?);
        }
        let Some(connection) = guard.as_mut() else {
            anyhow::bail!("no database connection");
        };
        let result = work(connection);
        if self.connect.is_broken(connection) {
            *guard = None;
        }
        result
    }
}

fn lock<T>(slot: &Mutex<Option<T>>) -> MutexGuard<'_, Option<T>> {
    slot.lock().unwrap_or_else(|poisoned| reset(slot, poisoned))
}

/// A call panicked holding this slot: its connection may be mid-transaction, so it goes.
fn reset<'a, T>(
    slot: &'a Mutex<Option<T>>,
    poisoned: PoisonError<MutexGuard<'a, Option<T>>>,
) -> MutexGuard<'a, Option<T>> {
    let mut guard = poisoned.into_inner();
    *guard = None;
    slot.clear_poison();
    guard
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::{Arc, Barrier};

    /// Connections are numbers; `broken` marks one that must be opened again.
    struct Numbers {
        opened: AtomicU32,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Connect for Numbers {
        type Connection = (u32, bool);
        fn open(&self) -> Result<(u32, bool)> {
            if self.fail.load(Ordering::SeqCst) {
                anyhow::bail!("refused");
            }
            Ok((self.opened.fetch_add(1, Ordering::SeqCst), false))
        }
        fn is_broken(&self, connection: &(u32, bool)) -> bool {
            connection.1
        }
    }

    fn numbers() -> Numbers {
        Numbers {
            opened: AtomicU32::new(0),
            fail: false.into(),
        }
    }

    #[test]
    fn calls_at_the_same_time_get_different_connections_and_reuse_them() {
        let set = Arc::new(Connections::new(numbers(), 2));
        let both_in = Arc::new(Barrier::new(2));
        let used: Vec<u32> = (0..2)
            .map(|_| {
                let (set, both_in) = (Arc::clone(&set), Arc::clone(&both_in));
                std::thread::spawn(move || {
                    set.with(|c| {
                        // Both calls hold a connection at once: the set gave two.
                        both_in.wait();
                        Ok(c.0)
                    })
                    .unwrap()
                })
            })
            // Both threads start before either is joined.
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert_ne!(used[0], used[1]);
        for _ in 0..10 {
            set.with(|_| Ok(())).unwrap();
        }
        assert_eq!(set.connect.opened.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_broken_connection_is_opened_again_and_a_refusal_fails_at_once() {
        let set = Connections::new(numbers(), 1);
        set.with(|c| {
            c.1 = true;
            Ok(())
        })
        .unwrap();
        assert_eq!(set.with(|c| Ok(c.0)).unwrap(), 1, "a new connection");
        set.with(|c| {
            c.1 = true;
            Ok(())
        })
        .unwrap();
        set.connect.fail.store(true, Ordering::SeqCst);
        let refused = set.with(|_| Ok(())).unwrap_err();
        assert_eq!(refused.to_string(), "refused");
        set.connect.fail.store(false, Ordering::SeqCst);
        assert_eq!(set.with(|c| Ok(c.0)).unwrap(), 2);
    }

    #[test]
    fn a_panic_drops_the_connection_it_held() {
        let set = Arc::new(Connections::new(numbers(), 1));
        let panicking = Arc::clone(&set);
        let joined = std::thread::spawn(move || {
            let _ = panicking.with(|_| -> Result<()> { panic!("in a call") });
        })
        .join();
        assert!(joined.is_err());
        assert_eq!(set.with(|c| Ok(c.0)).unwrap(), 1, "opened again");
    }

    #[test]
    fn an_adopted_connection_is_used_first() {
        let set = Connections::new(numbers(), 2);
        set.adopt((99, false));
        let seen: Vec<u32> = (0..4).map(|_| set.with(|c| Ok(c.0)).unwrap()).collect();
        assert!(seen.contains(&99), "{seen:?}");
    }
}
