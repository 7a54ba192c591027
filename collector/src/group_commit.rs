//! Group commit of usage batches. Each replica has one committer task: a batch that arrives
//! while the store is busy with others waits in a queue, and the next transaction takes every
//! batch waiting (up to [`MAX_BATCHES`] batches or [`MAX_RECORDS`] records) and stores them
//! together: one commit, so one fsync of the write-ahead log, for all of them. Each batch is
//! acknowledged only once the transaction holding it has committed, so an acknowledgement still
//! means "stored", and a batch id stored earlier in the same group counts as a duplicate.
//!
//! A lone batch is stored at once (no waiting for company): the grouping comes from batches
//! arriving while a commit is in progress, so it costs no latency when the collector is idle
//! and grows with the load. If a group's transaction fails, nothing of it was stored and its
//! batches are stored one by one, so a batch the store refuses fails alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, Result};
use tokio::sync::{mpsc, oneshot};
use tollgate_wire::UsageBatch;

use crate::storage::{Ingested, Store, UsageStore};

/// What the committer needs of a store: [`Store`]'s two ingest methods (a trait of its own so
/// that the grouping is tested against a store that holds a commit open).
pub trait BatchStore: Send + Sync + 'static {
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>>;
    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested>;
}

impl<T: Store + ?Sized> BatchStore for T {
    fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>> {
        UsageStore::ingest_group(self, batches)
    }

    fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
        UsageStore::ingest(self, batch, received_ms)
    }
}

/// At most this many batches in one transaction.
pub const MAX_BATCHES: usize = 64;
/// A group stops taking batches once it holds this many records (a transaction holds the
/// store's writer for as long as it runs).
pub const MAX_RECORDS: usize = 50_000;
/// Batches that may wait for the committer; a request beyond them waits to be queued.
const QUEUE: usize = 4 * MAX_BATCHES;

struct Job {
    batch: Arc<UsageBatch>,
    received_ms: u64,
    reply: oneshot::Sender<Result<Ingested>>,
}

/// The committer of one collector replica, started on the first batch.
#[derive(Default)]
pub struct GroupCommit {
    queue: OnceLock<mpsc::Sender<Job>>,
    stats: Arc<GroupStats>,
}

/// What `/metrics` tells of the grouping.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Transactions that stored batches (groups, and the one-by-one retries of failed groups).
    pub commits: AtomicU64,
    /// Batches those transactions held.
    pub batches: AtomicU64,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("started", &self.queue.get().is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl GroupCommit {
    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Batches waiting for the next group.
    pub fn waiting(&self) -> usize {
        self.queue
            .get()
            .map_or(0, |queue| queue.max_capacity() - queue.capacity())
    }

    /// Store `batch` in the next group and wait until that group has committed. Must be called
    /// on the Tokio runtime (the committer is spawned on it the first time).
    pub async fn ingest<S: BatchStore + ?Sized>(
        &self,
        store: &Arc<S>,
        batch: Arc<UsageBatch>,
        received_ms: u64,
    ) -> Result<Ingested> {
        let queue = self.queue.get_or_init(|| {
            let (sender, jobs) = mpsc::channel(QUEUE);
            tokio::spawn(run(Arc::clone(store), jobs, Arc::clone(&self.stats)));
            sender
        });
        let (reply, answer) = oneshot::channel();
        queue
            .send(Job {
                batch,
                received_ms,
                reply,
            })
            .await
            .map_err(|_| anyhow!("the ingest committer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow!("the ingest committer stopped before storing the batch"))?
    }
}

async fn run<S: BatchStore + ?Sized>(
    store: Arc<S>,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<GroupStats>,
) {
    while let Some(first) = jobs.recv().await {
        let mut records = first.batch.records.len();
        let mut group = vec![first];
        while group.len() < MAX_BATCHES && records < MAX_RECORDS {
            match jobs.try_recv() {
                Ok(job) => {
                    records += job.batch.records.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        let store = Arc::clone(&store);
        let stats = Arc::clone(&stats);
        let stored = tokio::task::spawn_blocking(move || {
            let outcomes = store_group(store.as_ref(), &group, &stats);
            (group, outcomes)
        })
        .await;
        // A panic in the store: its batches' requests see the committer's channel closed
        // (their batches were not acknowledged, so the filters send them again).
        let Ok((group, outcomes)) = stored else {
            continue;
        };
        for (job, outcome) in group.into_iter().zip(outcomes) {
            // The client may have gone; its batch is stored all the same and its retry will
            // be a duplicate.
            let _ = job.reply.send(outcome);
        }
    }
}

fn store_group<S: BatchStore + ?Sized>(
    store: &S,
    group: &[Job],
    stats: &GroupStats,
) -> Vec<Result<Ingested>> {
    let batches: Vec<(&UsageBatch, u64)> = group
        .iter()
        .map(|job| (job.batch.as_ref(), job.received_ms))
        .collect();
    let counted = |batches: usize| {
        stats.commits.fetch_add(1, Ordering::Relaxed);
        stats.batches.fetch_add(batches as u64, Ordering::Relaxed);
    };
    match store.ingest_group(&batches) {
        Ok(outcomes) if outcomes.len() == batches.len() => {
            counted(batches.len());
            outcomes.into_iter().map(Ok).collect()
        }
        Ok(_) => batches
            .iter()
            .map(|_| {
                Err(anyhow!(
                    "the store answered a group with the wrong number of outcomes"
                ))
            })
            .collect(),
        Err(e) if batches.len() == 1 => vec![Err(e)],
        // Nothing of the group was stored: each batch on its own, so that one the store
        // refuses does not take the others down with it.
        Err(_) => batches
            .iter()
            .map(|(batch, received_ms)| {
                let outcome = store.ingest(batch, *received_ms);
                if outcome.is_ok() {
                    counted(1);
                }
                outcome
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use tollgate_wire::Source;

    use super::*;

    /// Stores nothing: records the groups it was given, holds its first commit open until the
    /// test lets it go, and refuses every group holding the batch `bad`.
    struct HeldStore {
        groups: Mutex<Vec<Vec<String>>>,
        entered: Mutex<std::sync::mpsc::Sender<()>>,
        release: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl BatchStore for HeldStore {
        fn ingest_group(&self, batches: &[(&UsageBatch, u64)]) -> Result<Vec<Ingested>> {
            let ids: Vec<String> = batches.iter().map(|(b, _)| b.batch_id.clone()).collect();
            let first = {
                let mut groups = self.groups.lock().unwrap();
                groups.push(ids.clone());
                groups.len() == 1
            };
            if first {
                self.entered.lock().unwrap().send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
            }
            if ids.iter().any(|id| id == "bad") {
                anyhow::bail!("refused");
            }
            Ok(batches
                .iter()
                .map(|(b, _)| Ingested::Accepted {
                    records: b.records.len() as u64,
                })
                .collect())
        }

        fn ingest(&self, batch: &UsageBatch, received_ms: u64) -> Result<Ingested> {
            let mut one = self.ingest_group(&[(batch, received_ms)])?;
            Ok(one.pop().unwrap())
        }
    }

    fn batch(id: &str) -> Arc<UsageBatch> {
        Arc::new(UsageBatch {
            version: 1,
            batch_id: id.into(),
            source: Source {
                instance: "test".into(),
                vm_started_ms: 0,
            },
            sequence: 0,
            created_ms: 0,
            records: Vec::new(),
        })
    }

    #[test]
    fn batches_that_wait_for_a_commit_share_the_next_and_a_refused_one_fails_alone() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (entered, on_entered) = std::sync::mpsc::channel();
        let (release, on_release) = std::sync::mpsc::channel();
        let store = Arc::new(HeldStore {
            groups: Mutex::default(),
            entered: Mutex::new(entered),
            release: Mutex::new(on_release),
        });
        let commit = Arc::new(GroupCommit::default());
        let send = |id: &str| {
            let (commit, store, batch) = (Arc::clone(&commit), Arc::clone(&store), batch(id));
            runtime.spawn(async move { commit.ingest(&store, batch, 0).await })
        };
        let lone = send("a");
        on_entered.recv_timeout(Duration::from_secs(10)).unwrap();
        // The first commit is open: these five wait, and go together in the next one.
        let waiting: Vec<_> = ["b", "c", "d", "bad", "e"]
            .iter()
            .map(|id| send(id))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while commit.waiting() < 5 {
            assert!(Instant::now() < deadline, "{} waiting", commit.waiting());
            std::thread::sleep(Duration::from_millis(5));
        }
        release.send(()).unwrap();
        let lone = runtime.block_on(lone).unwrap();
        assert!(matches!(lone, Ok(Ingested::Accepted { .. })));
        let outcomes: Vec<bool> = waiting
            .into_iter()
            .map(|h| runtime.block_on(h).unwrap().is_ok())
            .collect();
        assert_eq!(outcomes, [true, true, true, false, true]);
        // (The five were queued by tasks on two threads: in any order.)
        let mut groups = store.groups.lock().unwrap().clone();
        groups.iter_mut().for_each(|g| g.sort());
        groups[2..].sort();
        assert_eq!(
            groups,
            [
                vec!["a"],
                vec!["b", "bad", "c", "d", "e"],
                // The group was refused: each batch on its own.
                vec!["b"],
                vec!["bad"],
                vec!["c"],
                vec!["d"],
                vec!["e"],
            ]
        );
        // The lone commit and the four batches stored alone after their group failed.
        assert_eq!(commit.stats().commits.load(Ordering::Relaxed), 5);
        assert_eq!(commit.stats().batches.load(Ordering::Relaxed), 5);
    }
}
