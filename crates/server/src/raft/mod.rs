//! Replication: the openraft type configuration, the sled log store, the state-machine
//! store, the transport to peers, and the replica that ties them together.
//!
//! Architecture invariant: this module knows no gRPC *service*. It talks to peers
//! through the generated `RaftService` client only (in `network`), and exposes the Raft
//! handle and the applied state for the server layer to serve.

pub mod barrier;
pub mod batcher;
pub mod error;
pub mod guard;
pub mod identity;
pub mod inbox;
pub mod integrity;
pub mod log_store;
pub mod network;
pub mod replica;
pub mod sm_store;
pub mod succession;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use dispatcher_core::state::{Command, Rejection, Response};

/// Replica ids, as in `--initial-cluster 1=host:port,...`.
pub type NodeId = u64;

/// A replica's address, as carried in the Raft membership.
pub type Node = openraft::BasicNode;

/// What `apply` returns for one log entry. Only the raft layer sees the `Internal`
/// case: [`replica::Replica::propose`] hands callers the command's own outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// A state-machine command and its outcome.
    Command(Result<Response, Rejection>),
    /// A blank or membership entry (Raft's own): nothing for the dispatcher state.
    Internal,
}

openraft::declare_raft_types!(
    /// The dispatcher's Raft types: the log carries state-machine commands.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a replica.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// Membership as stored with the state.
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// Raft metrics.
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;
