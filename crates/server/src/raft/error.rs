//! Why a proposal or a read barrier failed, in the replica's own terms: the layers
//! above map these to RPC errors, and never see openraft's error types.
//!
//! Lives apart from `replica` so that the batcher and the barrier, which `replica`
//! owns, need not import `replica` back.

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};

use super::{Node, NodeId};

/// Why a write did not commit.
#[derive(Clone, Debug, thiserror::Error)]
pub enum WriteError {
    /// This replica is not the leader; `leader` is the leader's id and address if known.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, when known.
        leader: Option<(NodeId, String)>,
    },
    /// Raft stopped (shutdown or a fatal storage error).
    #[error("raft stopped: {0}")]
    Fatal(String),
    /// A fault of this replica's own making (an answer of the wrong shape): not worth a
    /// retry elsewhere.
    #[error("internal error: {0}")]
    Internal(String),
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
}

/// "Not the leader", with the leader's id and address when openraft knows them.
/// Maps openraft's write errors to ours.
pub(crate) fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> WriteError {
    if let Some(f) = e.forward_to_leader() {
        return not_leader(f);
    }
    match e {
        RaftError::APIError(ClientWriteError::ChangeMembershipError(m)) => {
            WriteError::Membership(m.to_string())
        }
        other => WriteError::Fatal(other.to_string()),
    }
}

/// Maps openraft's read-barrier errors to ours.
pub(crate) fn read_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> WriteError {
    if let Some(f) = e.forward_to_leader() {
        return not_leader(f);
    }
    WriteError::Fatal(e.to_string())
}

fn not_leader(f: &openraft::error::ForwardToLeader<NodeId, Node>) -> WriteError {
    WriteError::NotLeader {
        leader: f.leader_id.map(|id| {
            let addr = f
                .leader_node
                .as_ref()
                .map(|n| n.addr.clone())
                .unwrap_or_default();
            (id, addr)
        }),
    }
}
