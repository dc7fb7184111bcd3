//! `RaftService`: peers' AppendEntries, Vote and InstallSnapshot calls, handed to the
//! local openraft instance through the inbox, which checks each one with the guard
//! (`crate::raft::guard`) first. Payloads are codec bytes; the reply carries openraft's
//! own `Result`, so a remote Raft error reaches the caller as such. A message the guard
//! refuses never reaches openraft: PERMISSION_DENIED when its sender is not a member
//! (or is this replica), INVALID_ARGUMENT when its content is out of bounds or
//! malformed. Served here, never forwarded; like every service it passes through the
//! edge.
//!
//! Each handler decodes, then names the sender (`guard::sender`: the node id of
//! the message's vote) before handing over; that is where an authenticated peer's
//! identity is compared with the replica the message claims to come from.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::edge::{Caller, Edge};
use super::status::ApiError;
use crate::raft::guard::sender;
use crate::raft::inbox::PeerInbox;
use crate::raft::TypeConfig;
use dispatcher_core::codec;
use dispatcher_proto::v1::raft_service_client::RaftServiceClient;
use dispatcher_proto::v1::raft_service_server::RaftService;
use dispatcher_proto::v1::RaftMessage;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

/// Serves the Raft RPCs of one replica.
pub struct RaftServer {
    edge: Edge,
    inbox: PeerInbox,
}

edge_service! {
    RaftService for RaftServer, forward with RaftServiceClient {
        rpc append_entries(RaftMessage) -> RaftMessage: Local, Peer => append_entries(caller);
        rpc vote(RaftMessage) -> RaftMessage: Local, Peer => vote(caller);
        rpc install_snapshot(RaftMessage) -> RaftMessage: Local, Peer => install_snapshot(caller);
    }
}

fn decode<T: DeserializeOwned>(message: RaftMessage) -> Result<T, ApiError> {
    codec::decode(&message.payload).map_err(|e| ApiError::invalid("payload", e))
}

fn reply<T: Serialize>(value: &T) -> Result<RaftMessage, ApiError> {
    let payload = codec::encode(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(RaftMessage { payload })
}

impl RaftServer {
    /// A server for the replica behind `edge`.
    pub fn new(edge: Edge) -> Self {
        let inbox = PeerInbox::new(edge.replica.raft.clone(), edge.replica.id);
        RaftServer { edge, inbox }
    }

    // The sender's certificate is checked first (it must name the member the message
    // claims to come from); then the guard checks the content against this replica's view.
    async fn append_entries(
        &self,
        caller: Caller,
        message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        reply(&self.inbox.append_entries(rpc).await?)
    }

    async fn vote(&self, caller: Caller, message: RaftMessage) -> Result<RaftMessage, ApiError> {
        let rpc: VoteRequest<crate::raft::NodeId> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        reply(&self.inbox.vote(rpc).await?)
    }

    async fn install_snapshot(
        &self,
        caller: Caller,
        message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        reply(&self.inbox.install_snapshot(rpc).await?)
    }
}
