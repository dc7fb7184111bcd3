//! The guard: what a peer's Raft message must satisfy before openraft sees it, and what a
//! peer's answer must satisfy before our network hands it to openraft.
//!
//! openraft trusts its input. It asserts (`assert!`, `unwrap`, and `debug_assert!`,
//! which are panics in debug builds and silent corruption in release builds) that
//! messages come from a correct Raft peer. One AppendEntries whose vote had term 2^64-1
//! made a follower persist that vote and then panic on `term + 1` when it next
//! campaigned (`Engine::elect`: the new vote is refused `ByVote` and unwrapped); the
//! leader, told of the higher vote in the answer, followed. This module decides at the
//! edge what is accepted, as pure functions of a decoded message and this replica's
//! [`View`]; `inbox` wires them in front of openraft, `network` checks answers.
//!
//! Owns: the bounds ([`MAX_TERM`], [`MAX_INDEX`], [`MAX_SNAPSHOT_BYTES`]) and every rule
//! below. Must never: change openraft's state, do I/O, or know gRPC. ([`View::read`]
//! only reads openraft's state.)
//!
//! # Requests (`check_*`)
//!
//! - **Sender.** The sender is the node id of the message's vote ([`sender`]). It must
//!   be a member of this replica's membership, effective or committed (voters and
//!   learners; during a change a leader being removed stays in the committed config
//!   until the change commits), must not be this replica itself (a forged message naming
//!   us as leader makes openraft take the Leader path and then the follower path:
//!   `debug_assert!(self.leader.is_none())` in `following_handler`), and is never 0
//!   (replica ids start at 1). A replica that has no membership yet (a learner being
//!   added receives AppendEntries before it knows any) accepts any other sender.
//!   Refusal: [`Refusal::NotMember`], [`Refusal::FromSelf`], both PERMISSION_DENIED.
//! - **Terms at most [`MAX_TERM`]** (2^48) in the vote and in every log id. The bound is
//!   absolute, not relative to the current term: a member cut off from the others
//!   campaigns every election timeout for as long as the partition lasts, and its term
//!   legitimately runs far ahead; a bound relative to our term would lock it out of the
//!   cluster forever once it healed. 2^48 elections, one every 100 ms, take 890,000
//!   years, and the bound leaves openraft room for its `term + 1`.
//! - **Indexes at most [`MAX_INDEX`]** (2^56) in `prev_log_id`, every entry's log id,
//!   `leader_commit`, a snapshot's last log id and membership log id, and a vote's
//!   `last_log_id`: openraft computes `index + 1` (`next_index`) and ranges such as
//!   `since..upto + 1` on them, which overflow at 2^64. At a million entries a second a
//!   log takes 2,000 years to reach the bound.
//! - **Stale votes.** A message whose vote is below this replica's is answered by
//!   openraft with its own vote, and nothing else is touched; its log content is only
//!   bounds-checked. (A deposed leader's replication keeps sending for a moment, and
//!   reads its successor's entries from the log they now share: entries of a leader
//!   above the message's own vote, in correct operation.) Every rule below about log
//!   content applies to messages whose vote is at least this replica's.
//! - **Committed flag.** AppendEntries and InstallSnapshot come from an elected leader
//!   and carry a committed vote; openraft asserts so (`update_accepted`:
//!   `debug_assert!(vote.is_committed())`, the first panic of the 15-byte message in a
//!   debug build). A Vote request carries a candidate's vote, never a committed one (a
//!   committed vote would make us follow a leader no quorum elected).
//! - **Entries.** Consecutive after `prev_log_id` (the first at `prev.index + 1`, each
//!   one more; `following_handler::append_entries` asserts it), leader ids
//!   non-decreasing along `prev_log_id` and the entries (`do_append_entries` asserts the
//!   first new entry is above the local last log id), none above the vote's leader id
//!   (a leader sends entries of its own term or older ones). Membership entries are
//!   well formed (below).
//! - **Against this replica's committed log id** `C` (exact, from openraft's own state):
//!   every log id `L` of the request (`prev_log_id`, entries, `leader_commit`, a
//!   snapshot's last log id and membership log id) is ordered with `C` the way two ids
//!   of one log are: below `C`'s index `L <= C`, at `C`'s index `L == C`, above it `L`'s
//!   leader id is not below `C`'s. openraft assumes every id at or below `C`'s index
//!   matches (`has_log_id`: `debug_assert!(log_id <= committed)`), never truncates below
//!   `C`, and commits `min(accepted, leader_commit)`: a `leader_commit` with a higher
//!   leader id at a lower index would move `committed` backwards (the apply range
//!   `since <= end` assertion, then indexing an empty batch), and a snapshot with a
//!   higher leader id at or below `C`'s index would leave `committed` above the last log
//!   id (the `RaftState` validation panics).
//! - **`leader_commit`** not above the vote's leader id, and ordered with the request's
//!   own chain (`prev_log_id` then the entries) as ids of one log are: equal to the
//!   entry at its index when the request carries one, not of a later leader than the
//!   first id when before it, not of an earlier leader than the last id when after it.
//!   Otherwise `min(accepted, leader_commit)` can name an index past the local log, and
//!   applying it fails the storage read: a fatal error that stops Raft on this replica.
//! - **Memberships** (membership entries, a snapshot's last membership): one or two
//!   configs (a joint config has two), none empty, every voter with a node, no node 0.
//!   openraft unwraps a voter's node when it replicates to it or asks it for a vote
//!   (`spawn_replication_stream`, `spawn_parallel_vote_requests`, the read barrier: panics
//!   in release builds too).
//! - **Snapshots.** The last log id's leader id not above the vote's; the membership's
//!   log id not above the last log id, and the membership equal to ours when its log id
//!   is one of our memberships' (`MembershipState::update_committed` asserts it); the
//!   snapshot id at most [`MAX_SNAPSHOT_ID_BYTES`]; `offset` and `offset + data.len()`
//!   at most [`MAX_SNAPSHOT_BYTES`], the most the codec will ever decode. openraft's own
//!   chunk receiver seeks its in-memory `Cursor<Vec<u8>>` to `offset` and writes there,
//!   which zero-fills up to the offset: an offset of 2^40 allocates a terabyte. We do
//!   not use it: `inbox` assembles chunks itself (contiguously, within this bound) and
//!   checks that the assembled state decodes before openraft installs it, because
//!   `StateMachineStore::install_snapshot` failing to decode is a storage error, fatal
//!   to openraft.
//!
//! # Answers (`check_*_response`)
//!
//! A peer we call answers too, and openraft trusts the answer as much:
//! - votes within [`MAX_TERM`] (a HigherVote of term 2^64-1 deposes the leader, with the
//!   same `term + 1` panic to come), log ids within the bounds;
//! - `HigherVote` above the vote we sent (`replication` and the read barrier assert it)
//!   and not naming this replica (only we can speak for our own leadership);
//! - `PartialSuccess(m)`: `prev_log_id <= m <= last sent` (asserted in `replication`
//!   and by `progress::Inflight::ack`), and never `PartialSuccess(None)`
//!   (`replication_handler::update_matching` asserts progress is never `None`);
//! - `Conflict` only to a request with a `prev_log_id` (`replication` unwraps it: a
//!   panic in release builds too).
//!
//! A refused answer is a network error to openraft: it retries, as after a broken call.
//! A follower that answers `Conflict` at or below what it acknowledged before (its log
//! went backwards) is re-replicated: the workspace enables openraft's
//! `loosen-follower-log-revert`, which turns those two assertions
//! (`ProgressEntry::update_conflicting`, `ReplicationCore::validate_matching`) into
//! warnings.
//!
//! # What the guard cannot do
//!
//! Raft is not Byzantine fault tolerant. A message that names a member, with a sane
//! term and a well-formed log consistent with ours, is what that member could send; the
//! guard cannot tell it from one forged in the member's name. Peer authentication (the
//! certificate of the member the vote names, checked against [`sender`]) closes that;
//! this module makes every other message harmless. Left to a lying member, and debug
//! assertions only: two uncommitted membership entries in one AppendEntries (a later
//! truncation of the first trips `MembershipState::truncate`), a `leader_commit` that
//! differs from our own log between our committed id and `prev_log_id`, and a replica
//! that wins an election and commits in the microseconds between the guard's read of
//! the committed id and the hand-over.
//!
//! The committed log id is read just before the request is handed over, under a lock
//! that serialises the requests that change the log (`inbox`). A follower's `committed`
//! moves only through those requests; a leader's moves on its own, so a leader first
//! steps down to the request's higher vote and reads again.
//!
//! A replica that missed the addition of the member that now leads (cut off while it
//! was added) refuses that leader until it learns the new membership from a leader it
//! knows.

use std::collections::BTreeSet;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, Membership, ServerState};

use super::{LogId, Node, NodeId, Raft, StoredMembership, TypeConfig};
use dispatcher_core::codec::MAX_DECODE_BYTES;

/// A vote as peers send it.
pub type Vote = openraft::Vote<NodeId>;
type LeaderId = openraft::LeaderId<NodeId>;

/// Largest term accepted in a vote or a log id (2^48). See the module doc for why the
/// bound is absolute.
pub const MAX_TERM: u64 = 1 << 48;

/// Largest log index accepted (2^56).
pub const MAX_INDEX: u64 = 1 << 56;

/// Largest snapshot accepted, in bytes: the most the codec decodes.
pub const MAX_SNAPSHOT_BYTES: u64 = MAX_DECODE_BYTES as u64;

/// Longest snapshot id accepted, in bytes (ours look like `T3-N1-1200-7`).
pub const MAX_SNAPSHOT_ID_BYTES: usize = 256;

/// This replica as the guard sees it when a message arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// This replica's id.
    pub local: NodeId,
    /// Ids of the effective and the committed membership, voters and learners. Empty
    /// while this replica has no membership yet.
    pub members: BTreeSet<NodeId>,
    /// The effective and the committed membership with their log ids.
    pub memberships: Vec<StoredMembership>,
    /// This replica's current vote.
    pub vote: Vote,
    /// This replica's committed log id.
    pub committed: Option<LogId>,
    /// Whether this replica leads (its committed log id may move on its own).
    pub leading: bool,
}

impl View {
    /// The view from openraft's own state, read inside its core: exact at that moment.
    pub async fn read(raft: &Raft, local: NodeId) -> Result<View, openraft::error::Fatal<NodeId>> {
        raft.with_raft_state(move |st| {
            let ms = &st.membership_state;
            let memberships: Vec<StoredMembership> = [ms.effective(), ms.committed()]
                .iter()
                .map(|m| StoredMembership::new(*m.log_id(), m.membership().clone()))
                .collect();
            let members = memberships
                .iter()
                .flat_map(|m| m.membership().nodes().map(|(id, _)| *id))
                .collect();
            View {
                local,
                members,
                memberships,
                vote: *st.vote_ref(),
                committed: st.committed,
                leading: st.server_state == ServerState::Leader,
            }
        })
        .await
    }

    /// Whether openraft refuses `vote` as below this replica's own: it then answers with
    /// its vote and touches nothing else, so the message's log content does not matter.
    pub fn outvotes(&self, vote: &Vote) -> bool {
        !matches!(
            vote.partial_cmp(&self.vote),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        )
    }

    /// Whether this replica knows any membership yet.
    pub fn initialised(&self) -> bool {
        !self.members.is_empty()
    }

    /// Whether `id` may send us Raft messages: a member, or anyone but ourselves while
    /// we know no membership.
    pub fn accepts_sender(&self, id: NodeId) -> Result<(), Refusal> {
        if id == 0 {
            return Err(Refusal::NotMember {
                sender: id,
                members: self.members.clone(),
            });
        }
        if id == self.local {
            return Err(Refusal::FromSelf { sender: id });
        }
        if self.initialised() && !self.members.contains(&id) {
            return Err(Refusal::NotMember {
                sender: id,
                members: self.members.clone(),
            });
        }
        Ok(())
    }
}

/// Why a message (or an answer) was refused, naming the field and the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The sender is not a member of this replica's cluster.
    #[error("sender {sender} is not a member of this replica's cluster (members: {members:?})")]
    NotMember {
        /// The vote's node id.
        sender: NodeId,
        /// The members this replica knows.
        members: BTreeSet<NodeId>,
    },
    /// The sender claims to be this replica.
    #[error("sender {sender} is this replica itself")]
    FromSelf {
        /// The vote's node id.
        sender: NodeId,
    },
    /// A term above [`MAX_TERM`].
    #[error("{field}: term {term} is above the bound {MAX_TERM}")]
    Term {
        /// Where.
        field: String,
        /// The term.
        term: u64,
    },
    /// An index above [`MAX_INDEX`].
    #[error("{field}: index {index} is above the bound {MAX_INDEX}")]
    Index {
        /// Where.
        field: String,
        /// The index.
        index: u64,
    },
    /// A vote committed where it must not be, or not committed where it must.
    #[error("vote: {0}")]
    VoteFlag(&'static str),
    /// Entries not consecutive after `prev_log_id`.
    #[error("{field}: index {found}, expected {expected} (entries follow prev_log_id one by one)")]
    NotConsecutive {
        /// Where.
        field: String,
        /// The index expected.
        expected: u64,
        /// The index found.
        found: u64,
    },
    /// A log id whose leader id is below the one before it.
    #[error("{field}: leader {found} is below the leader {previous} of the log id before it")]
    LeaderDecreases {
        /// Where.
        field: String,
        /// Its leader id.
        found: String,
        /// The previous one.
        previous: String,
    },
    /// A log id above the vote of the message.
    #[error("{field}: leader {found} is above the message's vote {vote}")]
    AboveVote {
        /// Where.
        field: String,
        /// Its leader id.
        found: String,
        /// The vote's leader id.
        vote: String,
    },
    /// A log id that contradicts this replica's committed log id.
    #[error("{field}: log id {found} contradicts this replica's committed log id {committed}")]
    Committed {
        /// Where.
        field: String,
        /// The log id.
        found: String,
        /// The committed log id.
        committed: String,
    },
    /// `leader_commit` that cannot be an id of the log the message carries.
    #[error("leader_commit: {0}")]
    LeaderCommit(String),
    /// A malformed membership.
    #[error("{field}: {reason}")]
    Membership {
        /// Where.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot chunk out of bounds or inconsistent.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// An answer that a correct peer cannot give to the request we sent.
    #[error("answer: {0}")]
    Answer(String),
}

impl Refusal {
    /// Whether the refusal is about who sent the message (PERMISSION_DENIED) rather
    /// than what it says (INVALID_ARGUMENT).
    pub fn is_about_sender(&self) -> bool {
        matches!(self, Refusal::NotMember { .. } | Refusal::FromSelf { .. })
    }
}

/// A request a peer sends: each carries the vote of the replica that sends it.
pub trait PeerRequest {
    /// The sender's vote.
    fn vote(&self) -> &Vote;
}

impl PeerRequest for AppendEntriesRequest<TypeConfig> {
    fn vote(&self) -> &Vote {
        &self.vote
    }
}

impl PeerRequest for VoteRequest<NodeId> {
    fn vote(&self) -> &Vote {
        &self.vote
    }
}

impl PeerRequest for InstallSnapshotRequest<TypeConfig> {
    fn vote(&self) -> &Vote {
        &self.vote
    }
}

/// The replica a request comes from: the node id of its vote (the leader for
/// AppendEntries and InstallSnapshot, the candidate for Vote). An authenticated peer
/// must be this replica.
pub fn sender(req: &impl PeerRequest) -> NodeId {
    req.vote().leader_id.node_id
}

fn leader_text(l: &LeaderId) -> String {
    l.to_string()
}

fn check_vote_bounds(field: &str, vote: &Vote) -> Result<(), Refusal> {
    if vote.leader_id.term > MAX_TERM {
        return Err(Refusal::Term {
            field: field.to_string(),
            term: vote.leader_id.term,
        });
    }
    Ok(())
}

fn check_log_id(field: &str, id: &LogId) -> Result<(), Refusal> {
    if id.leader_id.term > MAX_TERM {
        return Err(Refusal::Term {
            field: field.to_string(),
            term: id.leader_id.term,
        });
    }
    if id.index > MAX_INDEX {
        return Err(Refusal::Index {
            field: field.to_string(),
            index: id.index,
        });
    }
    Ok(())
}

fn check_not_above_vote(field: &str, id: &LogId, vote: &Vote) -> Result<(), Refusal> {
    if id.leader_id > vote.leader_id {
        return Err(Refusal::AboveVote {
            field: field.to_string(),
            found: leader_text(&id.leader_id),
            vote: leader_text(&vote.leader_id),
        });
    }
    Ok(())
}

/// `id` ordered with `committed` as two ids of one log are.
fn check_against_committed(
    field: &str,
    id: &LogId,
    committed: Option<&LogId>,
) -> Result<(), Refusal> {
    let Some(c) = committed else {
        return Ok(());
    };
    let consistent = match id.index.cmp(&c.index) {
        std::cmp::Ordering::Less => id.leader_id <= c.leader_id,
        std::cmp::Ordering::Equal => id == c,
        std::cmp::Ordering::Greater => id.leader_id >= c.leader_id,
    };
    if consistent {
        Ok(())
    } else {
        Err(Refusal::Committed {
            field: field.to_string(),
            found: id.to_string(),
            committed: c.to_string(),
        })
    }
}

/// Bounds, not above the vote, consistent with our committed id.
fn check_carried_id(field: &str, id: &LogId, vote: &Vote, view: &View) -> Result<(), Refusal> {
    check_log_id(field, id)?;
    check_not_above_vote(field, id, vote)?;
    check_against_committed(field, id, view.committed.as_ref())
}

fn check_membership(field: &str, m: &Membership<NodeId, Node>) -> Result<(), Refusal> {
    let bad = |reason: String| Refusal::Membership {
        field: field.to_string(),
        reason,
    };
    let configs = m.get_joint_config();
    if configs.is_empty() || configs.len() > 2 {
        return Err(bad(format!(
            "{} configs; a membership has one, or two while joint",
            configs.len()
        )));
    }
    if configs.iter().any(|c| c.is_empty()) {
        return Err(bad("a config without voters".into()));
    }
    let nodes: BTreeSet<NodeId> = m.nodes().map(|(id, _)| *id).collect();
    if let Some(v) = m.voter_ids().find(|v| !nodes.contains(v)) {
        return Err(bad(format!("voter {v} has no node (address)")));
    }
    if let Some(id) = nodes.iter().find(|id| **id == 0) {
        return Err(bad(format!("node id {id}: replica ids start at 1")));
    }
    Ok(())
}

fn check_sender_vote(view: &View, vote: &Vote, committed: bool) -> Result<(), Refusal> {
    view.accepts_sender(vote.leader_id.node_id)?;
    check_vote_bounds("vote", vote)?;
    match (committed, vote.committed) {
        (true, false) => Err(Refusal::VoteFlag(
            "a leader's message carries a committed vote",
        )),
        (false, true) => Err(Refusal::VoteFlag(
            "a candidate's vote request carries an uncommitted vote",
        )),
        _ => Ok(()),
    }
}

/// Checks an AppendEntries against `view` (see the module doc for the rules).
pub fn check_append_entries(
    view: &View,
    req: &AppendEntriesRequest<TypeConfig>,
) -> Result<(), Refusal> {
    check_sender_vote(view, &req.vote, true)?;
    let vote = &req.vote;
    if view.outvotes(vote) {
        // A deposed leader's replication may still be sending, and reads its successor's
        // entries from the log they share now: openraft answers it with the higher vote
        // and touches nothing, so only the bounds apply.
        let ids = req
            .prev_log_id
            .iter()
            .map(|p| ("prev_log_id".to_string(), p))
            .chain(
                req.entries
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("entries[{i}].log_id"), &e.log_id)),
            )
            .chain(
                req.leader_commit
                    .iter()
                    .map(|c| ("leader_commit".to_string(), c)),
            );
        for (field, id) in ids {
            check_log_id(&field, id)?;
        }
        return Ok(());
    }

    // The chain the message carries: prev_log_id, then the entries.
    let mut previous: Option<LogId> = None;
    if let Some(prev) = &req.prev_log_id {
        check_carried_id("prev_log_id", prev, vote, view)?;
        previous = Some(*prev);
    }
    let mut expected = req.prev_log_id.map_or(0, |p| p.index + 1);
    for (i, entry) in req.entries.iter().enumerate() {
        let field = format!("entries[{i}].log_id");
        let id = &entry.log_id;
        check_log_id(&field, id)?;
        if id.index != expected {
            return Err(Refusal::NotConsecutive {
                field,
                expected,
                found: id.index,
            });
        }
        if let Some(p) = &previous {
            if id.leader_id < p.leader_id {
                return Err(Refusal::LeaderDecreases {
                    field,
                    found: leader_text(&id.leader_id),
                    previous: leader_text(&p.leader_id),
                });
            }
        }
        check_not_above_vote(&field, id, vote)?;
        check_against_committed(&field, id, view.committed.as_ref())?;
        if let EntryPayload::Membership(m) = &entry.payload {
            check_membership(&format!("entries[{i}].membership"), m)?;
        }
        previous = Some(*id);
        expected = id.index + 1;
    }

    if let Some(lc) = &req.leader_commit {
        check_carried_id("leader_commit", lc, vote, view)?;
        check_leader_commit(lc, req.prev_log_id.as_ref(), &req.entries)?;
    }
    Ok(())
}

/// `leader_commit` ordered with the message's chain as ids of one log are.
fn check_leader_commit(
    lc: &LogId,
    prev: Option<&LogId>,
    entries: &[openraft::Entry<TypeConfig>],
) -> Result<(), Refusal> {
    let chain: Vec<&LogId> = prev
        .into_iter()
        .chain(entries.iter().map(|e| &e.log_id))
        .collect();
    let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
        return Ok(());
    };
    if lc.index < first.index {
        if lc.leader_id > first.leader_id {
            return Err(Refusal::LeaderCommit(format!(
                "{lc} is before {first} but of a later leader"
            )));
        }
    } else if lc.index > last.index {
        if lc.leader_id < last.leader_id {
            return Err(Refusal::LeaderCommit(format!(
                "{lc} is after {last} but of an earlier leader"
            )));
        }
    } else {
        // Consecutive chain: the id at lc.index is chain[lc.index - first.index].
        let at = chain[(lc.index - first.index) as usize];
        if at != lc {
            return Err(Refusal::LeaderCommit(format!(
                "{lc} differs from the message's own log id {at} at that index"
            )));
        }
    }
    Ok(())
}

/// Checks a Vote request against `view`.
pub fn check_vote(view: &View, req: &VoteRequest<NodeId>) -> Result<(), Refusal> {
    check_sender_vote(view, &req.vote, false)?;
    if let Some(last) = &req.last_log_id {
        check_log_id("last_log_id", last)?;
        check_not_above_vote("last_log_id", last, &req.vote)?;
    }
    Ok(())
}

/// Checks one InstallSnapshot chunk against `view`. Whether the chunk continues the
/// snapshot being received is the receiver's business (`inbox`).
pub fn check_install_snapshot(
    view: &View,
    req: &InstallSnapshotRequest<TypeConfig>,
) -> Result<(), Refusal> {
    check_sender_vote(view, &req.vote, true)?;
    let vote = &req.vote;
    let meta = &req.meta;
    if meta.snapshot_id.len() > MAX_SNAPSHOT_ID_BYTES {
        return Err(Refusal::Snapshot(format!(
            "snapshot id of {} bytes; at most {MAX_SNAPSHOT_ID_BYTES}",
            meta.snapshot_id.len()
        )));
    }
    let end = req.offset.checked_add(req.data.len() as u64);
    if end.is_none_or(|end| end > MAX_SNAPSHOT_BYTES) {
        return Err(Refusal::Snapshot(format!(
            "chunk at offset {} of {} bytes ends past the {MAX_SNAPSHOT_BYTES}-byte bound",
            req.offset,
            req.data.len()
        )));
    }
    if view.outvotes(vote) {
        // Answered with our vote and not kept (`inbox`): only the bounds apply.
        for (field, id) in [
            ("meta.last_log_id", meta.last_log_id.as_ref()),
            (
                "meta.last_membership.log_id",
                meta.last_membership.log_id().as_ref(),
            ),
        ] {
            if let Some(id) = id {
                check_log_id(field, id)?;
            }
        }
        return Ok(());
    }
    if let Some(last) = &meta.last_log_id {
        check_carried_id("meta.last_log_id", last, vote, view)?;
    }
    if let Some(m) = meta.last_membership.log_id() {
        check_carried_id("meta.last_membership.log_id", m, vote, view)?;
        if Some(m) > meta.last_log_id.as_ref() {
            return Err(Refusal::Snapshot(format!(
                "membership log id {m} is past the snapshot's last log id"
            )));
        }
    }
    check_membership("meta.last_membership", meta.last_membership.membership())?;
    // openraft asserts that one log id means one membership (`MembershipState::
    // update_committed`).
    let same_id = view
        .memberships
        .iter()
        .find(|m| m.log_id() == meta.last_membership.log_id());
    if same_id.is_some_and(|m| m.membership() != meta.last_membership.membership()) {
        return Err(Refusal::Membership {
            field: "meta.last_membership".into(),
            reason: "differs from this replica's membership of the same log id".into(),
        });
    }
    Ok(())
}

/// Checks a peer's answer to our AppendEntries.
pub fn check_append_entries_response(
    local: NodeId,
    req: &AppendEntriesRequest<TypeConfig>,
    resp: &AppendEntriesResponse<NodeId>,
) -> Result<(), Refusal> {
    match resp {
        AppendEntriesResponse::Success => Ok(()),
        AppendEntriesResponse::PartialSuccess(matching) => {
            let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
            // openraft asserts that progress never goes to None
            // (`replication_handler::update_matching`), even for an empty follower.
            let Some(m) = matching else {
                return Err(Refusal::Answer("PartialSuccess(None)".into()));
            };
            check_log_id("PartialSuccess", m)?;
            let within = matching.as_ref() >= req.prev_log_id.as_ref()
                && matching.as_ref() <= last.as_ref()
                && matching.map(|m| m.index) >= req.prev_log_id.map(|p| p.index)
                && matching.map(|m| m.index) <= last.map(|l| l.index);
            if within {
                Ok(())
            } else {
                Err(Refusal::Answer(format!(
                    "PartialSuccess({matching:?}) outside the ids sent ({:?}..={last:?})",
                    req.prev_log_id
                )))
            }
        }
        AppendEntriesResponse::HigherVote(v) => check_higher_vote(local, &req.vote, v),
        AppendEntriesResponse::Conflict => {
            if req.prev_log_id.is_none() {
                return Err(Refusal::Answer(
                    "Conflict to a request without prev_log_id".into(),
                ));
            }
            Ok(())
        }
    }
}

fn check_higher_vote(local: NodeId, sent: &Vote, higher: &Vote) -> Result<(), Refusal> {
    check_vote_bounds("HigherVote", higher)?;
    if higher <= sent {
        return Err(Refusal::Answer(format!(
            "HigherVote {higher} is not above the vote sent {sent}"
        )));
    }
    if higher.leader_id.node_id == local {
        return Err(Refusal::Answer(format!(
            "HigherVote {higher} names this replica"
        )));
    }
    Ok(())
}

/// Checks a peer's answer to our Vote request.
pub fn check_vote_response(resp: &VoteResponse<NodeId>) -> Result<(), Refusal> {
    check_vote_bounds("vote", &resp.vote)?;
    if let Some(last) = &resp.last_log_id {
        check_log_id("last_log_id", last)?;
    }
    Ok(())
}

/// Checks a peer's answer to our InstallSnapshot chunk.
pub fn check_install_snapshot_response(
    local: NodeId,
    req: &InstallSnapshotRequest<TypeConfig>,
    resp: &InstallSnapshotResponse<NodeId>,
) -> Result<(), Refusal> {
    check_vote_bounds("vote", &resp.vote)?;
    // An equal (or lower) vote is the follower's acknowledgement; only a higher one must
    // not name us.
    if resp.vote > req.vote && resp.vote.leader_id.node_id == local {
        return Err(Refusal::Answer(format!(
            "vote {} names this replica",
            resp.vote
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::{CommittedLeaderId, Entry, SnapshotMeta};

    use super::*;

    fn lid(term: u64, node: NodeId, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    fn vote(term: u64, node: NodeId, committed: bool) -> Vote {
        if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        }
    }

    /// Replica 1 of {1, 2, 3}, following 2 in term 5, committed at (5, 2, 10).
    fn view() -> View {
        View {
            local: 1,
            members: [1, 2, 3].into(),
            memberships: vec![StoredMembership::new(
                Some(lid(1, 1, 0)),
                members(&[1, 2, 3]),
            )],
            vote: vote(5, 2, true),
            committed: Some(lid(5, 2, 10)),
            leading: false,
        }
    }

    fn blank(id: LogId) -> Entry<TypeConfig> {
        Entry {
            log_id: id,
            payload: EntryPayload::Blank,
        }
    }

    fn append(
        v: Vote,
        prev: Option<LogId>,
        ids: &[LogId],
        commit: Option<LogId>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: v,
            prev_log_id: prev,
            entries: ids.iter().map(|i| blank(*i)).collect(),
            leader_commit: commit,
        }
    }

    /// A heartbeat of the current leader: accepted.
    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        append(
            vote(5, 2, true),
            Some(lid(5, 2, 12)),
            &[lid(5, 2, 13)],
            Some(lid(5, 2, 12)),
        )
    }

    fn members(voters: &[NodeId]) -> Membership<NodeId, Node> {
        let nodes: BTreeMap<NodeId, Node> = voters
            .iter()
            .map(|id| {
                (
                    *id,
                    Node {
                        addr: format!("127.0.0.1:700{id}"),
                    },
                )
            })
            .collect();
        Membership::new(vec![voters.iter().copied().collect()], nodes)
    }

    fn snapshot(offset: u64, data: Vec<u8>) -> InstallSnapshotRequest<TypeConfig> {
        InstallSnapshotRequest {
            vote: vote(5, 2, true),
            meta: SnapshotMeta {
                last_log_id: Some(lid(5, 2, 20)),
                last_membership: StoredMembership::new(Some(lid(1, 1, 0)), members(&[1, 2, 3])),
                snapshot_id: "T5-N2-20-1".into(),
            },
            offset,
            data,
            done: false,
        }
    }

    #[test]
    fn the_current_leaders_messages_pass() {
        let v = view();
        assert_eq!(check_append_entries(&v, &heartbeat()), Ok(()));
        assert_eq!(
            check_install_snapshot(&v, &snapshot(0, vec![1; 10])),
            Ok(())
        );
        let candidate = VoteRequest::new(vote(6, 3, false), Some(lid(5, 2, 12)));
        assert_eq!(check_vote(&v, &candidate), Ok(()));
        assert_eq!(sender(&heartbeat()), 2);
        assert_eq!(sender(&candidate), 3);
    }

    #[test]
    fn senders_must_be_other_members() {
        let v = view();
        for (node, about_sender) in [(99, true), (0, true), (1, true), (3, false)] {
            let mut req = heartbeat();
            req.vote = vote(6, node, true);
            let r = check_append_entries(&v, &req);
            assert_eq!(r.is_err(), about_sender, "sender {node}: {r:?}");
            if let Err(e) = r {
                assert!(e.is_about_sender(), "{e}");
            }
            let vr = VoteRequest::new(vote(6, node, false), None);
            assert_eq!(check_vote(&v, &vr).is_err(), about_sender);
        }
        // Before it knows any membership a replica accepts any other sender, not itself.
        let fresh = View {
            members: BTreeSet::new(),
            memberships: vec![],
            committed: None,
            vote: Vote::default(),
            ..view()
        };
        let mut req = append(vote(1, 99, true), None, &[lid(1, 99, 0)], None);
        assert_eq!(check_append_entries(&fresh, &req), Ok(()));
        req.vote = vote(1, 1, true);
        assert!(matches!(
            check_append_entries(&fresh, &req),
            Err(Refusal::FromSelf { sender: 1 })
        ));
    }

    #[test]
    fn terms_and_indexes_are_bounded() {
        let v = view();
        for term in [u64::MAX, MAX_TERM + 1] {
            let mut req = heartbeat();
            req.vote = vote(term, 2, true);
            assert!(matches!(
                check_append_entries(&v, &req),
                Err(Refusal::Term { .. })
            ));
            let vr = VoteRequest::new(vote(term, 3, false), None);
            assert!(matches!(check_vote(&v, &vr), Err(Refusal::Term { .. })));
        }
        let mut req = heartbeat();
        req.vote = vote(MAX_TERM, 2, true);
        assert_eq!(check_append_entries(&v, &req), Ok(()));

        let far = append(vote(5, 2, true), Some(lid(5, 2, u64::MAX)), &[], None);
        assert!(matches!(
            check_append_entries(&v, &far),
            Err(Refusal::Index { .. })
        ));
        let vr = VoteRequest::new(vote(6, 3, false), Some(lid(5, 2, MAX_INDEX + 1)));
        assert!(matches!(check_vote(&v, &vr), Err(Refusal::Index { .. })));
    }

    /// A deposed leader's stream, still sending its successor's entries: openraft
    /// answers it with the higher vote, so only the bounds are checked.
    #[test]
    fn a_stale_leaders_message_is_only_bounds_checked() {
        let v = view();
        let stale = append(
            vote(4, 3, true),
            Some(lid(5, 2, 12)),
            &[lid(5, 2, 13)],
            Some(lid(5, 2, 13)),
        );
        assert_eq!(check_append_entries(&v, &stale), Ok(()));
        let far = append(vote(4, 3, true), Some(lid(5, 2, u64::MAX)), &[], None);
        assert!(matches!(
            check_append_entries(&v, &far),
            Err(Refusal::Index { .. })
        ));
        let mut s = snapshot(0, vec![]);
        s.vote = vote(4, 3, true);
        s.meta.last_log_id = Some(lid(6, 3, 3));
        assert_eq!(check_install_snapshot(&v, &s), Ok(()));
        s.offset = u64::MAX;
        assert!(matches!(
            check_install_snapshot(&v, &s),
            Err(Refusal::Snapshot(_))
        ));
    }

    #[test]
    fn vote_flags_match_the_message_kind() {
        let v = view();
        let mut req = heartbeat();
        req.vote = vote(6, 2, false);
        assert!(matches!(
            check_append_entries(&v, &req),
            Err(Refusal::VoteFlag(_))
        ));
        let vr = VoteRequest::new(vote(6, 3, true), None);
        assert!(matches!(check_vote(&v, &vr), Err(Refusal::VoteFlag(_))));
    }

    #[test]
    fn entries_follow_prev_log_id_one_by_one_under_the_vote() {
        let v = view();
        let vt = vote(6, 3, true);
        let gap = append(vt, Some(lid(5, 2, 12)), &[lid(6, 3, 14)], None);
        assert!(matches!(
            check_append_entries(&v, &gap),
            Err(Refusal::NotConsecutive {
                expected: 13,
                found: 14,
                ..
            })
        ));
        let from_start = append(vt, None, &[lid(5, 2, 1)], None);
        assert!(matches!(
            check_append_entries(&v, &from_start),
            Err(Refusal::NotConsecutive { expected: 0, .. })
        ));
        let down = append(
            vt,
            Some(lid(5, 2, 12)),
            &[lid(6, 3, 13), lid(5, 2, 14)],
            None,
        );
        assert!(matches!(
            check_append_entries(&v, &down),
            Err(Refusal::LeaderDecreases { .. })
        ));
        let above = append(vt, Some(lid(5, 2, 12)), &[lid(7, 1, 13)], None);
        assert!(matches!(
            check_append_entries(&v, &above),
            Err(Refusal::AboveVote { .. })
        ));
        // Same term, higher node id: also above (leader ids order by term, then node).
        let above = append(
            vote(6, 2, true),
            Some(lid(5, 2, 12)),
            &[lid(6, 3, 13)],
            None,
        );
        assert!(matches!(
            check_append_entries(&v, &above),
            Err(Refusal::AboveVote { .. })
        ));
    }

    #[test]
    fn log_ids_agree_with_the_committed_one() {
        let v = view();
        let vt = vote(6, 3, true);
        // Below the committed index, a later leader than the committed one's.
        let below = append(vt, Some(lid(6, 3, 9)), &[], None);
        assert!(matches!(
            check_append_entries(&v, &below),
            Err(Refusal::Committed { .. })
        ));
        // At the committed index, another id.
        let at = append(vt, Some(lid(4, 1, 9)), &[lid(4, 1, 10)], None);
        assert!(matches!(
            check_append_entries(&v, &at),
            Err(Refusal::Committed { .. })
        ));
        // Above it, an earlier leader.
        let above = append(vt, Some(lid(4, 1, 11)), &[], None);
        assert!(matches!(
            check_append_entries(&v, &above),
            Err(Refusal::Committed { .. })
        ));
        // A new leader overwriting the uncommitted tail with its own entries: fine.
        let overwrite = append(
            vt,
            Some(lid(5, 2, 10)),
            &[lid(6, 3, 11)],
            Some(lid(5, 2, 10)),
        );
        assert_eq!(check_append_entries(&v, &overwrite), Ok(()));
        // A snapshot at the committed index must be the committed id.
        let mut s = snapshot(0, vec![]);
        s.meta.last_log_id = Some(lid(6, 3, 10));
        s.vote = vt;
        assert!(matches!(
            check_install_snapshot(&v, &s),
            Err(Refusal::Committed { .. })
        ));
    }

    #[test]
    fn leader_commit_is_an_id_of_the_carried_log() {
        let v = view();
        let vt = vote(6, 3, true);
        let chain = [lid(6, 3, 13), lid(6, 3, 14)];
        let with = |lc| append(vt, Some(lid(5, 2, 12)), &chain, Some(lc));
        // Within the chain: must be the entry there.
        assert_eq!(check_append_entries(&v, &with(lid(6, 3, 14))), Ok(()));
        assert!(matches!(
            check_append_entries(&v, &with(lid(5, 2, 14))),
            Err(Refusal::LeaderCommit(_))
        ));
        // Past the chain: not of an earlier leader (it would point past our log).
        assert_eq!(check_append_entries(&v, &with(lid(6, 3, 1000))), Ok(()));
        assert!(matches!(
            check_append_entries(&v, &with(lid(5, 2, 1_000_000))),
            Err(Refusal::LeaderCommit(_))
        ));
        // Before the chain: not of a later leader than its first id.
        assert_eq!(check_append_entries(&v, &with(lid(5, 2, 11))), Ok(()));
        assert!(matches!(
            check_append_entries(&v, &with(lid(6, 1, 11))),
            Err(Refusal::LeaderCommit(_))
        ));
        // Never above the vote, never against the committed id.
        assert!(matches!(
            check_append_entries(&v, &with(lid(7, 1, 1000))),
            Err(Refusal::AboveVote { .. })
        ));
        assert!(matches!(
            check_append_entries(&v, &with(lid(6, 3, 3))),
            Err(Refusal::Committed { .. })
        ));
    }

    /// The layout of `openraft::Membership`, to write ones its constructor would fix.
    #[derive(serde::Serialize)]
    struct RawMembership {
        configs: Vec<BTreeSet<NodeId>>,
        nodes: BTreeMap<NodeId, Node>,
    }

    fn raw(configs: Vec<Vec<NodeId>>, nodes: &[NodeId]) -> Membership<NodeId, Node> {
        let m = RawMembership {
            configs: configs
                .into_iter()
                .map(|c| c.into_iter().collect())
                .collect(),
            nodes: nodes
                .iter()
                .map(|id| {
                    (
                        *id,
                        Node {
                            addr: "127.0.0.1:1".into(),
                        },
                    )
                })
                .collect(),
        };
        let bytes = dispatcher_core::codec::encode(&m).expect("encode");
        dispatcher_core::codec::decode(&bytes).expect("same layout")
    }

    #[test]
    fn memberships_are_well_formed() {
        let v = view();
        let cases = [
            (raw(vec![], &[]), false),
            (raw(vec![vec![]], &[1]), false),
            (raw(vec![vec![1, 2, 3]], &[1, 2]), false),
            (raw(vec![vec![1], vec![2], vec![3]], &[1, 2, 3]), false),
            (raw(vec![vec![1, 2, 3]], &[1, 2, 3, 4]), true),
            (raw(vec![vec![1, 2, 3], vec![1, 2, 4]], &[1, 2, 3, 4]), true),
        ];
        for (m, ok) in cases {
            let mut req = heartbeat();
            req.entries[0].payload = EntryPayload::Membership(m.clone());
            let r = check_append_entries(&v, &req);
            assert_eq!(r.is_ok(), ok, "{m:?}: {r:?}");
            let mut s = snapshot(0, vec![]);
            s.meta.last_membership = StoredMembership::new(Some(lid(5, 2, 15)), m.clone());
            assert_eq!(check_install_snapshot(&v, &s).is_ok(), ok, "{m:?}");
        }
    }

    #[test]
    fn snapshot_chunks_stay_within_the_bound() {
        let v = view();
        assert_eq!(
            check_install_snapshot(&v, &snapshot(MAX_SNAPSHOT_BYTES - 4, vec![0; 4])),
            Ok(())
        );
        for (offset, len) in [(u64::MAX, 1), (MAX_SNAPSHOT_BYTES - 3, 4), (1 << 40, 0)] {
            assert!(
                matches!(
                    check_install_snapshot(&v, &snapshot(offset, vec![0; len])),
                    Err(Refusal::Snapshot(_))
                ),
                "offset {offset}"
            );
        }
        let mut s = snapshot(0, vec![]);
        s.meta.snapshot_id = "x".repeat(MAX_SNAPSHOT_ID_BYTES + 1);
        assert!(matches!(
            check_install_snapshot(&v, &s),
            Err(Refusal::Snapshot(_))
        ));
        let mut s = snapshot(0, vec![]);
        s.meta.last_membership = StoredMembership::new(Some(lid(5, 2, 21)), members(&[1, 2, 3]));
        assert!(matches!(
            check_install_snapshot(&v, &s),
            Err(Refusal::Snapshot(_))
        ));
    }

    #[test]
    fn answers_no_correct_peer_gives_are_refused() {
        let req = heartbeat();
        let ok = |r: &AppendEntriesResponse<NodeId>| check_append_entries_response(2, &req, r);
        assert_eq!(ok(&AppendEntriesResponse::Success), Ok(()));
        assert_eq!(ok(&AppendEntriesResponse::Conflict), Ok(()));
        assert_eq!(
            ok(&AppendEntriesResponse::PartialSuccess(Some(lid(5, 2, 12)))),
            Ok(())
        );
        assert_eq!(
            ok(&AppendEntriesResponse::HigherVote(vote(6, 3, false))),
            Ok(())
        );
        for bad in [
            AppendEntriesResponse::HigherVote(vote(u64::MAX, 3, false)),
            AppendEntriesResponse::HigherVote(vote(4, 3, true)),
            AppendEntriesResponse::HigherVote(vote(7, 2, false)),
            AppendEntriesResponse::PartialSuccess(Some(lid(5, 2, 14))),
            AppendEntriesResponse::PartialSuccess(Some(lid(5, 2, 11))),
            AppendEntriesResponse::PartialSuccess(None),
        ] {
            assert!(ok(&bad).is_err(), "{bad:?}");
        }
        let no_prev = append(vote(5, 2, true), None, &[], None);
        assert!(
            check_append_entries_response(2, &no_prev, &AppendEntriesResponse::Conflict).is_err()
        );
        assert!(check_append_entries_response(
            2,
            &no_prev,
            &AppendEntriesResponse::PartialSuccess(None)
        )
        .is_err());
        let vr = VoteResponse::new(vote(u64::MAX, 3, false), None, false);
        assert!(check_vote_response(&vr).is_err());
        let vr = VoteResponse::new(vote(6, 1, false), Some(lid(5, 2, 12)), true);
        assert_eq!(check_vote_response(&vr), Ok(()));
        let s = snapshot(0, vec![]);
        let high = InstallSnapshotResponse {
            vote: vote(MAX_TERM + 1, 3, true),
        };
        assert!(check_install_snapshot_response(2, &s, &high).is_err());
        let me = InstallSnapshotResponse {
            vote: vote(6, 2, true),
        };
        assert!(check_install_snapshot_response(2, &s, &me).is_err());
        let ack = InstallSnapshotResponse { vote: s.vote };
        assert_eq!(check_install_snapshot_response(2, &s, &ack), Ok(()));
    }
}
