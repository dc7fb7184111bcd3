//! `RaftService`: peers' AppendEntries, Vote and InstallSnapshot calls, handed to the
//! local openraft instance. Payloads are codec bytes; the reply carries openraft's own
//! `Result`, so a remote Raft error reaches the caller as such. Served here, never
//! forwarded; like every service it passes through the edge.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::edge::{Caller, Edge};
use super::status::ApiError;
use crate::raft::{NodeId, Raft, TypeConfig};
use dispatcher_core::codec;
use dispatcher_proto::v1::raft_service_client::RaftServiceClient;
use dispatcher_proto::v1::raft_service_server::RaftService;
use dispatcher_proto::v1::RaftMessage;

/// Serves the Raft RPCs of one replica.
pub struct RaftServer {
    edge: Edge,
    raft: Raft,
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
        let raft = edge.replica.raft.clone();
        RaftServer { edge, raft }
    }

    async fn append_entries(
        &self,
        caller: Caller,
        message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let rpc: openraft::raft::AppendEntriesRequest<TypeConfig> = decode(message)?;
        caller.check_peer(rpc.vote.leader_id().voted_for().unwrap_or_default())?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, caller: Caller, message: RaftMessage) -> Result<RaftMessage, ApiError> {
        let rpc: openraft::raft::VoteRequest<NodeId> = decode(message)?;
        caller.check_peer(rpc.vote.leader_id().voted_for().unwrap_or_default())?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        caller: Caller,
        message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let rpc: openraft::raft::InstallSnapshotRequest<TypeConfig> = decode(message)?;
        caller.check_peer(rpc.vote.leader_id().voted_for().unwrap_or_default())?;
        reply(&self.raft.install_snapshot(rpc).await)
    }
}
