//! Group commit of proposals on the leader.
//!
//! openraft 0.9 appends and syncs each `client_write` on its own, one after the other,
//! so concurrent clients would each pay a log append, an fdatasync and a replication
//! round. The batcher owns the path from `Replica::propose` to `client_write`: it takes
//! the commands that arrived while earlier proposals were in flight and proposes them as
//! one `Command::Batch` entry (one append, one sync on every replica, one AppendEntries),
//! then hands each caller its own command's result. A lone command goes as itself, so an
//! idle cluster's latency is unchanged.
//!
//! It must never reorder one caller's commands (a caller waits for each result before
//! proposing again, so it cannot), never merge a batch into a batch, and never let one
//! command's rejection touch another's result: the state machine applies a batch's
//! commands independently.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::replica::{write_error, WriteError};
use super::{Applied, Raft};
use dispatcher_core::state::{Command, Response};

/// Most commands in one batch.
pub const MAX_BATCH_COMMANDS: usize = 512;
/// Most encoded bytes of commands in one batch (well under a Raft message's cap).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches proposed but not yet applied at once: the next batch's append overlaps the
/// previous batch's replication.
pub const MAX_IN_FLIGHT: usize = 2;

type Reply = oneshot::Sender<Result<(Applied, u64), WriteError>>;

struct Pending {
    command: Command,
    bytes: usize,
    reply: Reply,
}

/// The proposing side of a replica. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task for `raft`.
    pub fn spawn(raft: Raft) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    /// Proposes `command` and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<(Applied, u64), WriteError> {
        // Commands that are large by nature, and batches, travel alone.
        let bytes = match &command {
            Command::RestoreState { .. } | Command::Batch(_) => MAX_BATCH_BYTES,
            c => dispatcher_core::codec::encode(c).map_or(MAX_BATCH_BYTES, |b| b.len()),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                command,
                bytes,
                reply,
            })
            .map_err(|_| WriteError::Fatal("the proposal queue is closed".into()))?;
        rx.await
            .map_err(|_| WriteError::Fatal("the proposal was dropped (shutdown)".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Wait for an in-flight slot before gathering: what arrives meanwhile joins.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > MAX_BATCH_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(slot);
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let p = batch.remove(0);
        let result = raft
            .client_write(p.command)
            .await
            .map(|r| (r.data, r.log_id.index))
            .map_err(write_error);
        let _ = p.reply.send(result);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match raft.client_write(Command::Batch(commands)).await {
        Ok(r) => {
            let index = r.log_id.index;
            match r.data {
                Applied::Command(Ok(Response::Batch(results))) if results.len() == count => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok((Applied::Command(result), index)));
                    }
                }
                other => {
                    let e = WriteError::Fatal(format!(
                        "a batch of {count} commands was applied as {other:?}"
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        }
        Err(e) => {
            let e = write_error(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
