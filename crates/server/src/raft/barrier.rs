//! Coalesced read barriers.
//!
//! A linearizable read on the leader needs a barrier: a round of heartbeats that a
//! quorum answers, then waiting until everything committed before the read is applied.
//! With thousands of TaskManager heartbeats a second, one round per read would flood
//! the followers. This module runs at most one round at a time: reads that arrive while
//! a round is in flight wait for the next round, which starts after they arrived, so
//! each read is still ordered after every write acknowledged before it, and one round
//! serves them all.
//!
//! The rounds are generic over how a round is run, so the unit tests drive the
//! coalescing without Raft.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::error::{read_error, WriteError};
use super::Raft;

type Waiter = oneshot::Sender<Result<(), WriteError>>;
type RoundFuture = Pin<Box<dyn Future<Output = Result<(), WriteError>> + Send>>;
type RoundFn = Arc<dyn Fn() -> RoundFuture + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// A round is in flight.
    running: bool,
    /// Reads that arrived since the running round started: served by the next one.
    next: Vec<Waiter>,
}

/// Shared by every read path of a replica. Cheap to clone.
#[derive(Clone)]
pub struct Barrier {
    round: RoundFn,
    inner: Arc<Mutex<Inner>>,
}

impl Barrier {
    /// Barriers over `raft`: a round is openraft's `ensure_linearizable`.
    pub fn new(raft: Raft) -> Self {
        Self::with_round(move || {
            let raft = raft.clone();
            Box::pin(async move {
                raft.ensure_linearizable()
                    .await
                    .map(|_| ())
                    .map_err(read_error)
            })
        })
    }

    /// Barriers whose rounds are run by `round`.
    fn with_round(round: impl Fn() -> RoundFuture + Send + Sync + 'static) -> Self {
        Barrier {
            round: Arc::new(round),
            inner: Arc::default(),
        }
    }

    /// Waits until a read that arrives now may be served from this replica's state.
    pub async fn wait(&self) -> Result<(), WriteError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.next.push(tx);
            !std::mem::replace(&mut inner.running, true)
        };
        if start {
            tokio::spawn(rounds(self.round.clone(), self.inner.clone()));
        }
        rx.await
            .map_err(|_| WriteError::Fatal("the read barrier was dropped (shutdown)".into()))?
    }
}

/// Runs rounds until no read is waiting.
async fn rounds(round: RoundFn, inner: Arc<Mutex<Inner>>) {
    loop {
        let waiters = {
            let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.next.is_empty() {
                g.running = false;
                return;
            }
            std::mem::take(&mut g.next)
        };
        let result = round().await;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::Semaphore;

    use super::*;

    /// A barrier whose rounds each wait for one permit, and count themselves.
    fn gated() -> (Barrier, Arc<Semaphore>, Arc<AtomicUsize>) {
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (g, s) = (gate.clone(), started.clone());
        let barrier = Barrier::with_round(move || {
            let (g, s) = (g.clone(), s.clone());
            Box::pin(async move {
                s.fetch_add(1, Ordering::SeqCst);
                g.acquire()
                    .await
                    .map_err(|_| WriteError::Fatal("closed".into()))?
                    .forget();
                Ok(())
            })
        });
        (barrier, gate, started)
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn reads_during_a_round_share_the_next_round_not_the_running_one() {
        let (barrier, gate, started) = gated();
        let early = tokio::spawn({
            let b = barrier.clone();
            async move { b.wait().await }
        });
        until("the first round starts", || {
            started.load(Ordering::SeqCst) == 1
        })
        .await;
        // Ten reads arrive while round 1 is in flight.
        let late: Vec<_> = (0..10)
            .map(|_| {
                let b = barrier.clone();
                tokio::spawn(async move { b.wait().await })
            })
            .collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(late.iter().all(|h| !h.is_finished()));
        gate.add_permits(1);
        early.await.expect("task").expect("round 1");
        until("the second round starts", || {
            started.load(Ordering::SeqCst) == 2
        })
        .await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            late.iter().all(|h| !h.is_finished()),
            "a read that arrived during round 1 must not be served by it"
        );
        gate.add_permits(1);
        for h in late {
            h.await.expect("task").expect("round 2");
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "one round served all ten"
        );
    }

    #[tokio::test]
    async fn a_failed_round_fails_its_reads_and_the_next_read_starts_afresh() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let barrier = Barrier::with_round(move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    Err(WriteError::NotLeader { leader: None })
                } else {
                    Ok(())
                }
            })
        });
        assert!(matches!(
            barrier.wait().await,
            Err(WriteError::NotLeader { leader: None })
        ));
        barrier.wait().await.expect("a new round");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
