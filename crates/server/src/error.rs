//! What can go wrong serving a request, in the server's own terms: the services, the
//! watch and the TaskManager protocol return [`ApiError`], and only
//! `server::status` turns it into a gRPC `Status`.

use crate::raft::error::WriteError;
use crate::raft::guard::Refusal;
use crate::raft::NodeId;
use dispatcher_core::state::Rejection;

/// Why an RPC failed, in the server's own terms.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The state machine (or the input check before proposing) refused the request.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The write or read barrier did not go through Raft.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// Something the request names does not exist (other than a job or TaskManager,
    /// which are rejections).
    #[error("{0}")]
    NotFound(String),
    /// This replica cannot serve now (shutting down); another replica may.
    #[error("{0}")]
    Unavailable(String),
    /// A follower could not get the leader's answer to a call it forwarded: the leader
    /// refused the connection, reset it, or did not answer in the time it was given.
    /// `leader` is the leader this replica knows when it gives up, if any (the hint).
    #[error("{cause}")]
    ForwardFailed {
        /// The leader known when the follower gave up.
        leader: Option<(NodeId, String)>,
        /// What went wrong, for people.
        cause: String,
    },
    /// The caller's deadline passed before this replica had an answer.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The call carries no token, or one the cluster does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not make this call (a role without the right, a
    /// peer message from a replica that is not a member or not the sender).
    #[error("{0}")]
    PermissionDenied(String),
    /// The request cannot be served in this replica's state (a peer of another cluster).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound of this replica is reached (the message names it); retry later or elsewhere.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A fault of this replica, not of the request.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Bad input: the field and the reason.
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        ApiError::Rejected(Rejection::invalid(field, reason.to_string()))
    }
}

/// A peer's Raft message refused by the guard: about its sender, PERMISSION_DENIED;
/// about its content, INVALID_ARGUMENT naming the field.
impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        if r.is_about_sender() {
            ApiError::PermissionDenied(format!("raft message refused: {r}"))
        } else {
            ApiError::invalid("raft message", r)
        }
    }
}
