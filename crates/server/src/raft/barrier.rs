//! Coalesced read barriers.
//!
//! A linearizable read on the leader needs a barrier: a round of heartbeats that a
//! quorum answers, then waiting until everything committed before the read is applied.
//! With thousands of TaskManager heartbeats a second, one round per read would flood
//! the followers. This module runs at most one round at a time: reads that arrive while
//! a round is in flight wait for the next round, which starts after they arrived, so
//! each read is still ordered after every write acknowledged before it, and one round
//! serves them all.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::replica::{read_error, WriteError};
use super::Raft;

type Waiter = oneshot::Sender<Result<(), WriteError>>;

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
    raft: Raft,
    inner: Arc<Mutex<Inner>>,
}

impl Barrier {
    /// Barriers over `raft`.
    pub fn new(raft: Raft) -> Self {
        Barrier {
            raft,
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
            tokio::spawn(rounds(self.raft.clone(), self.inner.clone()));
        }
        rx.await
            .map_err(|_| WriteError::Fatal("the read barrier was dropped (shutdown)".into()))?
    }
}

/// Runs rounds until no read is waiting.
async fn rounds(raft: Raft, inner: Arc<Mutex<Inner>>) {
    loop {
        let waiters = {
            let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.next.is_empty() {
                g.running = false;
                return;
            }
            std::mem::take(&mut g.next)
        };
        let result = raft
            .ensure_linearizable()
            .await
            .map(|_| ())
            .map_err(read_error);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}
