//! AppendEntries that fit openraft 0.9's timeout, whatever the size of the entries.
//!
//! openraft 0.9 wraps every AppendEntries in a timeout equal to the heartbeat interval
//! (50 ms by default) and, when it fires, sends the same range again: a batch that does
//! not fit in one interval (a lagging follower fed 48 MB of 4 MB specs) is retried as
//! it is forever, the follower hears nothing, starts elections, and the cluster
//! livelocks. Two things here prevent that:
//!
//! - **A byte budget.** [`fit_budget`] keeps the longest prefix of the entries whose
//!   encoding fits in `max_append_bytes` (at least one entry), and the answer to the
//!   shortened call is reported as `PartialSuccess` up to the last entry sent, so
//!   openraft sends the rest at once in the next call.
//! - **Calls that outlive openraft's timeout.** A call carrying entries runs in its own
//!   task with a timeout sized to its bytes ([`call_timeout`]). When openraft gives up
//!   on it and asks for the same entries again (same vote, same `prev_log_id`), the new
//!   call attaches to the one still running instead of sending the bytes again; if that
//!   does not finish within half the interval, a real heartbeat (no entries, same
//!   `prev_log_id`) goes to the follower, which keeps its election timer quiet, and its
//!   answer is reported as progress up to `prev_log_id` (`PartialSuccess(prev)`): true,
//!   fresh, and no claim about the entries still on their way.
//!
//! Must never report a matching log id the follower did not confirm in this vote: every
//! `Success`/`PartialSuccess` handed to openraft comes from an answer to a request with
//! the same vote and `prev_log_id`, vetted by the guard against the request actually
//! sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::Vote;
use tokio::sync::watch;

use super::{CallError, NodeId, TypeConfig};
use crate::raft::LogId;
use dispatcher_core::codec::{self, CodecError};
use openraft::error::RaftError;

/// Default of `NetworkConfig::max_append_bytes`: on loopback or a LAN this is a few
/// milliseconds of transfer and fsync, far inside a 50 ms interval.
pub const DEFAULT_MAX_APPEND_BYTES: usize = 1 << 20;

/// The longest prefix of `rpc`'s entries whose encoding fits in `budget` bytes (always
/// at least one entry, however large). Returns the request to send and whether entries
/// were left out.
pub fn fit_budget(
    mut rpc: AppendEntriesRequest<TypeConfig>,
    budget: usize,
) -> Result<(AppendEntriesRequest<TypeConfig>, bool), CodecError> {
    let mut used = 0usize;
    let mut keep = 0usize;
    for entry in &rpc.entries {
        let len = usize::try_from(codec::encoded_len(entry)?).unwrap_or(usize::MAX);
        if keep > 0 && used.saturating_add(len) > budget {
            break;
        }
        used = used.saturating_add(len);
        keep += 1;
    }
    let cut = keep < rpc.entries.len();
    rpc.entries.truncate(keep);
    Ok((rpc, cut))
}

/// The timeout of a call carrying `bytes`: never less than openraft's interval, and
/// enough for the bytes at a pessimistic 8 MiB/s plus a second of fsync and scheduling.
pub fn call_timeout(interval: Duration, bytes: usize) -> Duration {
    let transfer = Duration::from_secs_f64(bytes as f64 / f64::from(8u32 << 20));
    interval.max(Duration::from_secs(1) + transfer)
}

/// A vetted answer to an AppendEntries call, or why the call failed.
pub type Answer = Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, CallError>;

/// Where a call's answer appears when it ends.
pub type Done = watch::Receiver<Option<Arc<Answer>>>;

/// What identifies the entries of a call: a later call with the same key asks for the
/// same entries (a leader never rewrites its log within its vote), possibly more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// The leader's vote.
    pub vote: Vote<NodeId>,
    /// The entry the follower must already have.
    pub prev: Option<LogId>,
}

impl Key {
    /// The key of a request.
    pub fn of(rpc: &AppendEntriesRequest<TypeConfig>) -> Key {
        Key {
            vote: rpc.vote,
            prev: rpc.prev_log_id,
        }
    }
}

/// A call still running (or finished and not yet collected) for one peer.
pub struct InFlight {
    /// Its key.
    pub key: Key,
    /// The last entry it carries.
    pub last: Option<LogId>,
    /// Becomes `Some` when it ends.
    pub done: Done,
    /// Cancels it (a newer vote or another `prev_log_id` makes it useless).
    pub task: tokio::task::AbortHandle,
}

/// The running calls, one per peer at most, shared by all clients of a network.
pub type InFlights = Arc<Mutex<std::collections::HashMap<NodeId, InFlight>>>;

/// Whether a running call with `key` carrying entries up to `last` already covers the
/// beginning of `rpc`, so that `rpc` can wait for it instead of sending them again.
pub fn covers(key: &Key, last: Option<LogId>, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
    *key == Key::of(rpc)
        && rpc
            .entries
            .last()
            .is_some_and(|e| Some(e.log_id) >= last && last.is_some())
}

/// Waits for a call's answer; `None` if it was cancelled.
pub async fn answer(mut done: Done) -> Option<Arc<Answer>> {
    let answer = done.wait_for(Option::is_some).await.ok()?.clone();
    answer
}

/// A copy of an answer (openraft 0.9's type is not `Clone`; several calls may wait for
/// one).
pub fn copy(answer: &AppendEntriesResponse<NodeId>) -> AppendEntriesResponse<NodeId> {
    match answer {
        AppendEntriesResponse::Success => AppendEntriesResponse::Success,
        AppendEntriesResponse::PartialSuccess(m) => AppendEntriesResponse::PartialSuccess(*m),
        AppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
        AppendEntriesResponse::HigherVote(v) => AppendEntriesResponse::HigherVote(*v),
    }
}

/// What to tell openraft for a call whose entries ended at `want` when the answer came
/// from a call carrying entries up to `sent`: `Success` only when all were carried.
pub fn progress(
    answer: AppendEntriesResponse<NodeId>,
    sent: Option<LogId>,
    want: Option<LogId>,
) -> AppendEntriesResponse<NodeId> {
    match answer {
        AppendEntriesResponse::Success if sent == want => AppendEntriesResponse::Success,
        AppendEntriesResponse::Success => AppendEntriesResponse::PartialSuccess(sent),
        other => other,
    }
}

/// What to tell openraft when a heartbeat stood in for a call whose entries follow
/// `prev`: its `Success` is progress up to `prev`, and nothing when `prev` is `None`
/// (the follower's log was empty): openraft 0.9 panics on progress to `None`
/// (`replication_handler` "a valid update can never set matching to None"; caught by
/// the backup e2e test on a loaded machine, where the first append to an empty
/// follower outlived the interval).
pub fn heartbeat_progress(
    answer: AppendEntriesResponse<NodeId>,
    prev: Option<LogId>,
) -> Option<AppendEntriesResponse<NodeId>> {
    match answer {
        AppendEntriesResponse::Success => {
            prev.map(|p| AppendEntriesResponse::PartialSuccess(Some(p)))
        }
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispatcher_core::state::Command;
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(index: u64, bytes: usize) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Command::Batch(vec![Command::RevokeToken {
                name: "x".repeat(bytes),
            }])),
        }
    }

    fn request(prev: u64, sizes: &[usize]) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(1, prev)),
            leader_commit: None,
            entries: sizes
                .iter()
                .enumerate()
                .map(|(i, &b)| entry(prev + 1 + i as u64, b))
                .collect(),
        }
    }

    #[test]
    fn a_batch_over_budget_is_cut_to_the_prefix_that_fits() {
        let (rpc, cut) = fit_budget(request(4, &[400, 400, 400, 400]), 1000).expect("fit");
        assert!(cut);
        assert_eq!(rpc.entries.len(), 2);
        assert_eq!(rpc.prev_log_id, Some(log_id(1, 4)));
        let (rpc, cut) = fit_budget(request(4, &[10, 10, 10]), 1000).expect("fit");
        assert!(!cut);
        assert_eq!(rpc.entries.len(), 3);
    }

    #[test]
    fn an_entry_larger_than_the_budget_goes_alone() {
        let (rpc, cut) = fit_budget(request(0, &[5000, 10]), 1000).expect("fit");
        assert!(cut);
        assert_eq!(rpc.entries.len(), 1);
        let (rpc, cut) = fit_budget(request(0, &[]), 1000).expect("fit");
        assert!(!cut);
        assert!(rpc.entries.is_empty());
    }

    #[test]
    fn a_call_is_waited_for_only_by_a_request_for_the_same_entries() {
        let running = request(4, &[10, 10]);
        let (key, last) = (Key::of(&running), Some(log_id(1, 6)));
        assert!(covers(&key, last, &running));
        // The same entries and more behind them.
        assert!(covers(&key, last, &request(4, &[10, 10, 10])));
        // Fewer entries than are on their way: not covered (the answer would claim more).
        assert!(!covers(&key, last, &request(4, &[10])));
        // Another starting point or another vote: a different call.
        assert!(!covers(&key, last, &request(5, &[10, 10])));
        let mut newer = request(4, &[10, 10]);
        newer.vote = Vote::new_committed(2, 1);
        assert!(!covers(&key, last, &newer));
        // A heartbeat carries nothing to wait for.
        assert!(!covers(&key, last, &request(4, &[])));
    }

    #[test]
    fn success_is_reported_only_up_to_what_was_carried() {
        let (sent, want) = (Some(log_id(1, 6)), Some(log_id(1, 9)));
        assert_eq!(
            progress(AppendEntriesResponse::Success, sent, want),
            AppendEntriesResponse::PartialSuccess(sent)
        );
        assert_eq!(
            progress(AppendEntriesResponse::Success, want, want),
            AppendEntriesResponse::Success
        );
        assert_eq!(
            progress(AppendEntriesResponse::Conflict, sent, want),
            AppendEntriesResponse::Conflict
        );
    }

    #[test]
    fn a_heartbeat_never_reports_progress_to_nothing() {
        let prev = Some(log_id(1, 4));
        assert_eq!(
            heartbeat_progress(AppendEntriesResponse::Success, prev),
            Some(AppendEntriesResponse::PartialSuccess(prev))
        );
        assert_eq!(
            heartbeat_progress(AppendEntriesResponse::Success, None),
            None
        );
        let higher = AppendEntriesResponse::HigherVote(Vote::new_committed(2, 2));
        assert_eq!(heartbeat_progress(copy(&higher), None), Some(higher));
        assert_eq!(
            heartbeat_progress(AppendEntriesResponse::Conflict, prev),
            Some(AppendEntriesResponse::Conflict)
        );
    }

    #[test]
    fn the_timeout_grows_with_the_bytes() {
        let interval = Duration::from_millis(50);
        assert_eq!(call_timeout(interval, 0), Duration::from_secs(1));
        assert!(call_timeout(interval, 64 << 20) >= Duration::from_secs(8));
        assert_eq!(
            call_timeout(Duration::from_secs(5), 1 << 20),
            Duration::from_secs(5)
        );
    }
}
