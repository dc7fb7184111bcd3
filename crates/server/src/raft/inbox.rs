//! The inbox: where peers' AppendEntries, Vote and InstallSnapshot requests enter this
//! replica's openraft, each checked by the [`guard`] first.
//!
//! Owns the ordering that makes the guard's view exact, the assembly of snapshot
//! chunks, and the log line of refused requests (rate-limited). Must never hand openraft a request the guard refused, and never decide who
//! the sender is (the server layer authenticates peers and compares their identity
//! with `guard::sender`).
//!
//! Requests that change the log (AppendEntries, InstallSnapshot) pass one at a time:
//! under one lock the inbox reads the view (openraft's committed log id, inside its
//! core), checks, and hands the request to openraft; it releases the lock once openraft
//! has the request queued (openraft queues a request on the first poll of its call, and
//! handles queued requests in order), so the next request's view already includes this
//! one. (True of openraft 0.9: `RaftInner::call_core` sends before it awaits. Were a
//! later version to await first, a view could lag one request behind: the rules against
//! the committed log id would be weaker against forged messages, and would still never
//! refuse a correct one.) A follower's committed log id moves only through these requests. A leader's
//! moves on its own, so when a request would depose this replica as leader, the inbox
//! first hands openraft the request's vote alone (an AppendEntries without entries,
//! prev_log_id or leader_commit, which changes nothing but the vote), and reads the
//! view again as a follower. Votes need no lock: they never touch the log.
//!
//! Every request is handled in a task of its own, which runs to the end even when the
//! peer stops waiting (its deadline passed, or it went away): a heartbeat that arrived
//! must reach openraft, whose election timer only hears the requests it handles. The
//! leader's keep-alive heartbeats carry 25 ms deadlines (`network/append.rs`), which
//! tonic enforces on this side by dropping the handler; on a loaded machine every
//! heartbeat of half a second was dropped that way, while waiting for the inbox's lock
//! or openraft's core, and the follower started an election with its leader alive.
//!
//! Snapshots: openraft's own chunk receiver seeks an in-memory buffer to whatever
//! offset a chunk names, and hands the data to the state machine, which fails fatally on
//! bytes that do not decode. The inbox assembles chunks itself instead: contiguous from
//! offset 0 (a chunk at an earlier offset is a resend and overwrites; one past the end
//! is a mismatch, which makes the sender start over, as openraft's receiver does),
//! within `guard::MAX_SNAPSHOT_BYTES`, and checks that the assembled state decodes
//! before `Raft::install_full_snapshot`.

use std::cmp::Ordering;
use std::io::Cursor;
use std::task::Poll;
use std::time::{Duration, Instant};

use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Snapshot, SnapshotSegmentId};
use tokio::sync::Mutex;

use super::guard::{self, Refusal, View};
use super::{NodeId, Raft, TypeConfig};
use dispatcher_core::state::DispatcherState;

/// What openraft answered (its own `Result`, sent back to the peer as is), or why the
/// guard refused the request before openraft saw it.
pub type Answer<T, E = openraft::error::Infallible> =
    Result<Result<T, RaftError<NodeId, E>>, Refusal>;

/// A snapshot being received.
struct Receiving {
    id: String,
    data: Vec<u8>,
}

/// The inbox of one replica. Cheap to clone: clones share one inbox.
#[derive(Clone)]
pub struct PeerInbox {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    raft: Raft,
    local: NodeId,
    /// Serialises the requests that change the log; holds the snapshot being received.
    gate: Mutex<Option<Receiving>>,
    refusals: RefusalLog,
}

/// How often refusals are logged at most: a peer sending garbage must not flood the log.
pub const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Logs refused requests: the first at once, then at most one line per
/// [`REFUSAL_REPORT_INTERVAL`], with the number refused since the previous line.
#[derive(Default)]
struct RefusalLog {
    /// When the last line was logged, and refusals since.
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    fn observe(&self, kind: &'static str, sender: NodeId, refusal: &Refusal) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (last, count) = &mut *state;
        *count += 1;
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < REFUSAL_REPORT_INTERVAL) {
            return;
        }
        tracing::warn!(
            kind,
            sender,
            reason = %refusal,
            refused = *count,
            "refused a peer's Raft message"
        );
        *last = Some(now);
        *count = 0;
    }
}

/// Polls `call` once (which queues the request in openraft), releases `gate`, then waits
/// for openraft's answer.
async fn queue_then_wait<F: std::future::Future, G>(call: F, gate: G) -> F::Output {
    let mut call = std::pin::pin!(call);
    let first = futures::poll!(call.as_mut());
    drop(gate);
    match first {
        Poll::Ready(out) => out,
        Poll::Pending => call.await,
    }
}

impl PeerInbox {
    /// The inbox of replica `local`.
    pub fn new(raft: Raft, local: NodeId) -> Self {
        PeerInbox {
            inner: std::sync::Arc::new(Inner {
                raft,
                local,
                gate: Mutex::new(None),
                refusals: RefusalLog::default(),
            }),
        }
    }

    /// An AppendEntries from a peer.
    pub async fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Answer<AppendEntriesResponse<NodeId>> {
        let (started, entries) = (std::time::Instant::now(), req.entries.len());
        let inner = self.inner.clone();
        let answer = detached(async move { inner.append_entries(req).await }).await;
        if entries > 0 {
            crate::timing::entries_since("follower_append", entries, started);
        }
        answer
    }

    /// A Vote request from a peer.
    pub async fn vote(&self, req: VoteRequest<NodeId>) -> Answer<VoteResponse<NodeId>> {
        let inner = self.inner.clone();
        detached(async move { inner.vote(req).await }).await
    }

    /// One InstallSnapshot chunk from a peer.
    pub async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Answer<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let inner = self.inner.clone();
        detached(async move { inner.install_snapshot(req).await }).await
    }
}

/// Runs `work` in a task of its own, which goes on if the caller stops waiting.
async fn detached<T, E>(
    work: impl std::future::Future<Output = Answer<T, E>> + Send + 'static,
) -> Answer<T, E>
where
    T: Send + 'static,
    E: std::error::Error + Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(answer) => answer,
        // The task panicked: a bug, answered as a failed core.
        Err(e) => {
            tracing::error!(error = %e, "handling a peer's Raft message failed");
            Ok(Err(RaftError::Fatal(Fatal::Panicked)))
        }
    }
}

impl Inner {
    fn noted<T, E>(
        &self,
        kind: &'static str,
        sender: NodeId,
        answer: Answer<T, E>,
    ) -> Answer<T, E> {
        if let Err(refusal) = &answer {
            self.refusals.observe(kind, sender, refusal);
        }
        answer
    }

    async fn view(&self) -> Result<View, Fatal<NodeId>> {
        View::read(&self.raft, self.local).await
    }

    /// If this replica leads and `vote` would depose it, lets openraft take the vote
    /// alone, and returns the view as it is afterwards; otherwise returns `view`.
    async fn step_down_first(&self, view: View, vote: guard::Vote) -> Result<View, Fatal<NodeId>> {
        if !(view.leading && vote > view.vote) {
            return Ok(view);
        }
        let vote_only = AppendEntriesRequest {
            vote,
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
        if let Err(RaftError::Fatal(f)) = self.raft.append_entries(vote_only).await {
            return Err(f);
        }
        self.view().await
    }

    async fn append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Answer<AppendEntriesResponse<NodeId>> {
        let sender = guard::sender(&req);
        let answer = self.checked_append_entries(req).await;
        self.noted("AppendEntries", sender, answer)
    }

    async fn checked_append_entries(
        &self,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Answer<AppendEntriesResponse<NodeId>> {
        let gate = self.gate.lock().await;
        let view = match self.view().await {
            Ok(v) => v,
            Err(f) => return Ok(Err(RaftError::Fatal(f))),
        };
        guard::check_append_entries(&view, &req)?;
        let view = match self.step_down_first(view, req.vote).await {
            Ok(v) => v,
            Err(f) => return Ok(Err(RaftError::Fatal(f))),
        };
        guard::check_append_entries(&view, &req)?;
        Ok(queue_then_wait(self.raft.append_entries(req), gate).await)
    }

    async fn vote(&self, req: VoteRequest<NodeId>) -> Answer<VoteResponse<NodeId>> {
        let sender = guard::sender(&req);
        let answer = self.checked_vote(req).await;
        self.noted("Vote", sender, answer)
    }

    async fn checked_vote(&self, req: VoteRequest<NodeId>) -> Answer<VoteResponse<NodeId>> {
        let view = match self.view().await {
            Ok(v) => v,
            Err(f) => return Ok(Err(RaftError::Fatal(f))),
        };
        guard::check_vote(&view, &req)?;
        Ok(self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Answer<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let sender = guard::sender(&req);
        let answer = self.checked_install_snapshot(req).await;
        self.noted("InstallSnapshot", sender, answer)
    }

    async fn checked_install_snapshot(
        &self,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Answer<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let mut gate = self.gate.lock().await;
        let view = match self.view().await {
            Ok(v) => v,
            Err(f) => return Ok(Err(RaftError::Fatal(f))),
        };
        guard::check_install_snapshot(&view, &req)?;
        // As openraft's receiver: a chunk of a stale leader is answered with our vote,
        // which tells it to step down, and not kept.
        let current = matches!(
            req.vote.partial_cmp(&view.vote),
            Some(Ordering::Greater | Ordering::Equal)
        );
        if !current {
            return Ok(Ok(InstallSnapshotResponse { vote: view.vote }));
        }

        let id = &req.meta.snapshot_id;
        let mismatch = |expect: u64| {
            Ok(Err(RaftError::APIError(
                InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: SnapshotSegmentId {
                        id: id.clone(),
                        offset: expect,
                    },
                    got: SnapshotSegmentId {
                        id: id.clone(),
                        offset: req.offset,
                    },
                }),
            )))
        };
        if gate.as_ref().map(|r| &r.id) != Some(id) {
            if req.offset != 0 {
                return mismatch(0);
            }
            *gate = Some(Receiving {
                id: id.clone(),
                data: Vec::new(),
            });
        }
        let Some(receiving) = gate.as_mut() else {
            return mismatch(0);
        };
        let len = receiving.data.len() as u64;
        if req.offset > len {
            return mismatch(len);
        }
        // Within MAX_SNAPSHOT_BYTES (guard), so the offset fits in memory.
        receiving.data.truncate(req.offset as usize);
        receiving.data.extend_from_slice(&req.data);
        if !req.done {
            return Ok(Ok(InstallSnapshotResponse { vote: view.vote }));
        }

        let data = gate.take().map(|r| r.data).unwrap_or_default();
        // Decoding and hashing hundreds of MB takes seconds: off the runtime's threads,
        // which openraft's core shares.
        let meta = req.meta.clone();
        let (checked, data) = tokio::task::spawn_blocking(move || {
            let checked = match DispatcherState::restore(&data) {
                Err(e) => Err(format!(
                    "the assembled snapshot {} ({} bytes) does not decode: {e}",
                    meta.snapshot_id,
                    data.len()
                )),
                Ok(_) => super::sm_store::check_named_digest(&meta, &data)
                    .map(|_| ())
                    .map_err(|e| format!("the assembled snapshot: {e}")),
            };
            (checked, data)
        })
        .await
        .map_err(|e| Refusal::Snapshot(format!("checking the assembled snapshot failed: {e}")))?;
        checked.map_err(Refusal::Snapshot)?;
        let view = match self.step_down_first(view, req.vote).await {
            Ok(v) => v,
            Err(f) => return Ok(Err(RaftError::Fatal(f))),
        };
        guard::check_install_snapshot(&view, &req)?;
        let snapshot = Snapshot {
            meta: req.meta,
            snapshot: Box::new(Cursor::new(data)),
        };
        let installed =
            queue_then_wait(self.raft.install_full_snapshot(req.vote, snapshot), gate).await;
        Ok(match installed {
            Ok(resp) => Ok(InstallSnapshotResponse { vote: resp.vote }),
            Err(f) => Err(RaftError::Fatal(f)),
        })
    }
}
