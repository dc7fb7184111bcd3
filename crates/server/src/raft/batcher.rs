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
//! commands independently, and [`split`] hands each caller its own.
//!
//! The decisions are pure functions ([`gather`], [`split`]) and the loop is generic
//! over how a command is proposed, so the unit tests drive it without Raft.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::error::{write_error, WriteError};
use super::{Applied, Raft};
use dispatcher_core::state::{Command, Rejection, Response};

/// Most commands in one batch.
pub const MAX_BATCH_COMMANDS: usize = 512;
/// Most encoded bytes of commands in one batch (well under a Raft message's cap).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches proposed but not yet applied at once: the next batch's append overlaps the
/// previous batch's replication.
pub const MAX_IN_FLIGHT: usize = 2;

/// One command's answer and the log index it was applied at.
pub type Outcome = (Result<Response, Rejection>, u64);

type Reply = oneshot::Sender<Result<Outcome, WriteError>>;

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
        Self::spawn_with(move |command| {
            let raft = raft.clone();
            async move {
                let started = std::time::Instant::now();
                let written = raft.client_write(command).await;
                crate::timing::since("raft_write", started);
                written
                    .map(|r| (r.data, r.log_id.index))
                    .map_err(write_error)
            }
        })
    }

    /// Starts a batching task that proposes each entry with `propose` (Raft, or a stand-in
    /// in tests).
    fn spawn_with<P, F>(propose: P) -> Batcher
    where
        P: Fn(Command) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(Applied, u64), WriteError>> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(Arc::new(propose), rx));
        Batcher { tx }
    }

    /// Proposes `command` and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Outcome, WriteError> {
        let started = std::time::Instant::now();
        let bytes = size_of_command(&command);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending {
                command,
                bytes,
                reply,
            })
            .map_err(|_| WriteError::Fatal("the proposal queue is closed".into()))?;
        let outcome = rx
            .await
            .map_err(|_| WriteError::Fatal("the proposal was dropped (shutdown)".into()))?;
        crate::timing::since("propose", started);
        outcome
    }
}

/// The bytes a command counts for in a batch. Commands that are large by nature, and
/// batches, count as a whole batch, so they travel alone.
fn size_of_command(command: &Command) -> usize {
    match command {
        Command::RestoreState { .. } | Command::Batch(_) => MAX_BATCH_BYTES,
        c => dispatcher_core::codec::encode(c).map_or(MAX_BATCH_BYTES, |b| b.len()),
    }
}

/// The gathering step: starting from `first`, takes what `next` has ready (sizes by
/// `size`) until the batch is full by count or bytes. Returns the batch and the item
/// that did not fit, which starts the next batch. Never returns an empty batch.
pub fn gather<T>(
    first: T,
    size: impl Fn(&T) -> usize,
    mut next: impl FnMut() -> Option<T>,
) -> (Vec<T>, Option<T>) {
    let mut bytes = size(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
        match next() {
            Some(p) if bytes + size(&p) > MAX_BATCH_BYTES => return (batch, Some(p)),
            Some(p) => {
                bytes += size(&p);
                batch.push(p);
            }
            None => break,
        }
    }
    (batch, None)
}

/// Splits what a `Command::Batch` of `count` commands was applied as into each
/// command's own result. Anything but a batch answer of that length is a fault that
/// fails every caller alike.
pub fn split(
    count: usize,
    applied: Applied,
) -> Result<Vec<Result<Response, Rejection>>, WriteError> {
    match applied {
        Applied::Command(Ok(Response::Batch(results))) if results.len() == count => Ok(results),
        other => Err(WriteError::Internal(format!(
            "a batch of {count} commands was applied as {other:?}"
        ))),
    }
}

/// The one command's outcome, or a fault if Raft answered with an internal entry.
fn single(applied: Applied) -> Result<Result<Response, Rejection>, WriteError> {
    match applied {
        Applied::Command(outcome) => Ok(outcome),
        Applied::Internal => Err(WriteError::Internal(
            "a command was applied as an internal entry".into(),
        )),
    }
}

async fn run<P, F>(propose: Arc<P>, mut rx: mpsc::UnboundedReceiver<Pending>)
where
    P: Fn(Command) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(Applied, u64), WriteError>> + Send + 'static,
{
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
        let (batch, rest) = gather(first, |p| p.bytes, || rx.try_recv().ok());
        carry = rest;
        let propose = propose.clone();
        tokio::spawn(async move {
            propose_batch(&*propose, batch).await;
            drop(slot);
        });
    }
}

async fn propose_batch<P, F>(propose: &P, mut batch: Vec<Pending>)
where
    P: Fn(Command) -> F,
    F: Future<Output = Result<(Applied, u64), WriteError>>,
{
    if batch.len() == 1 {
        let p = batch.remove(0);
        let result = propose(p.command)
            .await
            .and_then(|(applied, index)| single(applied).map(|o| (o, index)));
        let _ = p.reply.send(result);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<Reply>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    let results = propose(Command::Batch(commands))
        .await
        .and_then(|(applied, index)| split(count, applied).map(|r| (r, index)));
    match results {
        Ok((results, index)) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok((result, index)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
