//! `RaftService`: peers' AppendEntries, Vote and InstallSnapshot calls, handed to the
//! local openraft instance through the inbox, which checks each one with the guard
//! (`crate::raft::guard`) first. Payloads are codec bytes; the reply carries openraft's
//! own `Result`, so a remote Raft error reaches the caller as such. A message the guard
//! refuses never reaches openraft: PERMISSION_DENIED when its sender is not a member
//! (or is this replica), INVALID_ARGUMENT when its content is out of bounds or
//! malformed. Served here, never forwarded; like every service it passes through the
//! edge.
//!
//! Every message carries the sender's cluster id, checked (and, from a leader,
//! adopted by a replica without one) by `crate::raft::identity`: a replica of another
//! cluster is refused with FAILED_PRECONDITION. `Identify` tells a replica starting
//! with an empty data directory what this one knows of the cluster.
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
use dispatcher_proto::v1::{IdentifyRequest, IdentifyResponse, RaftMessage};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};

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
        rpc identify(IdentifyRequest) -> IdentifyResponse: Local, Peer => identify(caller);
    }
}

fn decode<T: DeserializeOwned>(message: RaftMessage) -> Result<T, ApiError> {
    codec::decode(&message.payload).map_err(|e| ApiError::invalid("payload", e))
}

fn reply<T: Serialize>(value: &T, cluster_id: String) -> Result<RaftMessage, ApiError> {
    let payload = codec::encode(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(RaftMessage {
        payload,
        cluster_id,
    })
}

impl RaftServer {
    /// A server for the replica behind `edge`.
    pub fn new(edge: Edge) -> Self {
        let inbox = PeerInbox::new(edge.replica.raft.clone(), edge.replica.id);
        RaftServer { edge, inbox }
    }

    /// Checks the cluster id a peer's message carries (`crate::raft::identity`); a
    /// leader's AppendEntries or InstallSnapshot hands a replica without one its id.
    fn check_cluster(
        &self,
        sender: crate::raft::NodeId,
        cluster_id: &str,
        from_leader: bool,
    ) -> Result<(), ApiError> {
        self.edge
            .replica
            .identity
            .check(sender, cluster_id, from_leader)
            .map_err(|e| ApiError::FailedPrecondition(e.to_string()))
    }

    fn ours(&self) -> String {
        self.edge.replica.identity.wire()
    }

    /// What this replica knows of the cluster, for a replica starting with an empty
    /// data directory.
    async fn identify(
        &self,
        caller: Caller,
        req: IdentifyRequest,
    ) -> Result<IdentifyResponse, ApiError> {
        caller.check_peer(req.node_id)?;
        let replica = &self.edge.replica;
        let metrics = replica.metrics();
        let membership = metrics.membership_config.membership();
        // The latest config: during a joint change, the one it moves to.
        let voters: Vec<u64> = membership
            .get_joint_config()
            .last()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default();
        let learners: Vec<u64> = membership.learner_ids().collect();
        let has_data =
            metrics.last_log_index.is_some() || metrics.snapshot.is_some() || !voters.is_empty();
        Ok(IdentifyResponse {
            node_id: replica.id,
            cluster_id: replica.identity.wire(),
            has_data,
            voters,
            learners,
            seen_with_data: replica.identity.seen_with_data(),
        })
    }

    // The sender's certificate is checked first (it must name the member the message
    // claims to come from); then the guard checks the content against this replica's view.
    async fn append_entries(
        &self,
        caller: Caller,
        mut message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let cluster_id = std::mem::take(&mut message.cluster_id);
        let rpc: AppendEntriesRequest<TypeConfig> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        self.check_cluster(sender(&rpc), &cluster_id, true)?;
        let leader = sender(&rpc);
        let answer = self.inbox.append_entries(rpc).await?;
        if matches!(answer, Ok(AppendEntriesResponse::Success)) {
            // Where the leader's messages come from (once openraft took them as the
            // leader's): if that connection closes and the leader's port refuses, its
            // process is gone (`raft::succession`).
            self.edge.replica.succession.heard(leader, caller.remote());
        }
        reply(&answer, self.ours())
    }

    async fn vote(
        &self,
        caller: Caller,
        mut message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let cluster_id = std::mem::take(&mut message.cluster_id);
        let rpc: VoteRequest<crate::raft::NodeId> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        self.check_cluster(sender(&rpc), &cluster_id, false)?;
        reply(&self.inbox.vote(rpc).await?, self.ours())
    }

    async fn install_snapshot(
        &self,
        caller: Caller,
        mut message: RaftMessage,
    ) -> Result<RaftMessage, ApiError> {
        let cluster_id = std::mem::take(&mut message.cluster_id);
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(message)?;
        caller.check_peer(sender(&rpc))?;
        self.check_cluster(sender(&rpc), &cluster_id, true)?;
        reply(&self.inbox.install_snapshot(rpc).await?, self.ours())
    }
}
