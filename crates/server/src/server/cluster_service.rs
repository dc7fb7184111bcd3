//! `ClusterService`: every replica's view of the cluster (Status), membership changes
//! (AddNode, RemoveNode; forwarded to the leader) and a consistent snapshot of the
//! replicated state (Snapshot, for backups).

use std::time::Duration;

use openraft::ServerState;
use tonic::Request;

use super::auth::AUTHORIZATION;
use super::edge::{BoxStream, Caller, Edge};
use super::forward::Forwarder;
use super::status::ApiError;
use crate::raft::replica::Replica;
use crate::raft::NodeId;
use dispatcher_core::state::{self, hash_secret, Command, Response, Role, Token};
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::cluster_service_client::ClusterServiceClient;
use dispatcher_proto::v1::cluster_service_server::ClusterService;
use dispatcher_proto::v1::{
    AddNodeRequest, AddNodeResponse, Member, RemoveNodeRequest, RemoveNodeResponse, ReplicaRole,
    ReplicaStatus, SnapshotChunk, SnapshotRequest, StatusRequest, StatusResponse,
};

/// How long Status waits for each peer's own view.
const PEER_STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// The same with the digest, which hashes the whole state (a second or more at 100k jobs).
const PEER_DIGEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of one Snapshot stream message.
const SNAPSHOT_CHUNK: usize = 1 << 20;

edge_service! {
    ClusterService for ClusterServer, forward with ClusterServiceClient {
        type SnapshotStream = BoxStream<pb::SnapshotChunk>;
        rpc status(StatusRequest) -> StatusResponse: Local, Read => status(caller);
        rpc add_node(AddNodeRequest) -> AddNodeResponse: Leader, Admin => add_node;
        rpc remove_node(RemoveNodeRequest) -> RemoveNodeResponse: Leader, Admin => remove_node;
        rpc snapshot(SnapshotRequest) -> Self::SnapshotStream: Linearizable, Admin => snapshot [stream];
        rpc create_token(CreateTokenRequest) -> pb::CreateTokenResponse: Leader, Admin => create_token;
        rpc list_tokens(ListTokensRequest) -> pb::ListTokensResponse: Linearizable, Admin => list_tokens;
        rpc revoke_token(RevokeTokenRequest) -> pb::RevokeTokenResponse: Leader, Admin => revoke_token;
    }
}

/// Serves `ClusterService` for one replica.
pub struct ClusterServer {
    replica: Replica,
    forwarder: Forwarder,
    edge: Edge,
}

impl ClusterServer {
    /// A server for `replica`.
    pub fn new(edge: Edge) -> Self {
        ClusterServer {
            replica: edge.replica.clone(),
            forwarder: edge.forwarder.clone(),
            edge,
        }
    }

    /// Draws a secret, proposes its hash, and returns the secret once.
    async fn create_token(
        &self,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, ApiError> {
        let role = role_from_pb(req.role)?;
        let secret = new_secret();
        let token = Token {
            name: req.name,
            role,
            hash: hash_secret(&secret),
            task_managers: req.task_managers,
            created_at: crate::leader::wall_clock_ms(),
        };
        state::validate_token(&token)?;
        let info = token_info(&token);
        match self
            .replica
            .propose(Command::CreateToken {
                token,
                bootstrap: false,
            })
            .await??
        {
            Response::TokenCreated { .. } => {}
            other => return Err(ApiError::Internal(format!("unexpected response {other:?}"))),
        }
        tracing::info!(token = %info.name, role = %role, "token created");
        Ok(pb::CreateTokenResponse {
            token: Some(info),
            secret,
        })
    }

    async fn list_tokens(
        &self,
        _req: pb::ListTokensRequest,
    ) -> Result<pb::ListTokensResponse, ApiError> {
        let g = self.replica.state.read();
        Ok(pb::ListTokensResponse {
            tokens: g.state.tokens().values().map(token_info).collect(),
        })
    }

    async fn revoke_token(
        &self,
        req: pb::RevokeTokenRequest,
    ) -> Result<pb::RevokeTokenResponse, ApiError> {
        self.replica
            .propose(Command::RevokeToken {
                name: req.name.clone(),
            })
            .await??;
        tracing::info!(token = %req.name, "token revoked");
        Ok(pb::RevokeTokenResponse {})
    }

    fn members(&self) -> Vec<Member> {
        let m = self.replica.metrics();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| Member {
                id: *id,
                address: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect()
    }

    /// This replica's own status: O(1) from the Raft metrics, without the state lock,
    /// unless the digest is asked for.
    async fn local_status(&self, with_digest: bool) -> ReplicaStatus {
        let (applied, digest) = if with_digest {
            self.replica.state.digest().await
        } else {
            (None, String::new())
        };
        // Read after the digest: the role and term answered are this moment's, not those
        // from before a long computation.
        let m = self.replica.metrics();
        let applied = applied.or(m.last_applied.map(|l| l.index));
        let leader = crate::raft::replica::reported_leader(&m, self.replica.id);
        let role = match m.state {
            // Not confirmed by a quorum in its term yet: still campaigning, in effect.
            ServerState::Leader if leader != Some(self.replica.id) => ReplicaRole::Candidate,
            ServerState::Leader => ReplicaRole::Leader,
            ServerState::Follower => ReplicaRole::Follower,
            ServerState::Candidate => ReplicaRole::Candidate,
            ServerState::Learner => ReplicaRole::Learner,
            ServerState::Shutdown => ReplicaRole::Shutdown,
        };
        ReplicaStatus {
            id: self.replica.id,
            address: m
                .membership_config
                .membership()
                .get_node(&self.replica.id)
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
            role: role as i32,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: applied.unwrap_or(0),
            leader_id: leader.unwrap_or(0),
            state_digest: digest,
            reachable: true,
            // Each replica reports its own pid; peers' pids arrive through their local
            // status (`peer_status`), never guessed by the answering replica.
            pid: std::process::id(),
        }
    }

    /// A peer's own status, asked with the caller's token (the peer authorizes it).
    async fn peer_status(
        &self,
        member: &Member,
        caller: &Caller,
        with_digest: bool,
    ) -> ReplicaStatus {
        let unreachable = ReplicaStatus {
            id: member.id,
            address: member.address.clone(),
            role: ReplicaRole::Unreachable as i32,
            reachable: false,
            ..ReplicaStatus::default()
        };
        let Ok(channel) = self.forwarder.channel(member.id, &member.address) else {
            return unreachable;
        };
        let mut req = Request::new(StatusRequest {
            local_only: true,
            with_digest,
        });
        if let Some(token) = caller.authorization() {
            req.metadata_mut().insert(AUTHORIZATION, token.clone());
        }
        let timeout = if with_digest {
            PEER_DIGEST_TIMEOUT
        } else {
            PEER_STATUS_TIMEOUT
        };
        req.set_timeout(timeout);
        let mut client = ClusterServiceClient::new(channel);
        let call = client.status(req);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(resp)) => resp
                .into_inner()
                .replicas
                .into_iter()
                .find(|r| r.id == member.id)
                .unwrap_or(unreachable),
            _ => unreachable,
        }
    }
}

/// A new token secret: 256 bits from the operating system's generator, in hex.
pub fn new_secret() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn role_from_pb(raw: i32) -> Result<Role, ApiError> {
    match pb::TokenRole::try_from(raw) {
        Ok(pb::TokenRole::Admin) => Ok(Role::Admin),
        Ok(pb::TokenRole::Submit) => Ok(Role::Submit),
        Ok(pb::TokenRole::Read) => Ok(Role::Read),
        Ok(pb::TokenRole::TaskManager) => Ok(Role::TaskManager),
        _ => Err(ApiError::invalid(
            "role",
            "must be ADMIN, SUBMIT, READ or TASK_MANAGER",
        )),
    }
}

fn token_info(t: &Token) -> pb::TokenInfo {
    let role = match t.role {
        Role::Admin => pb::TokenRole::Admin,
        Role::Submit => pb::TokenRole::Submit,
        Role::Read => pb::TokenRole::Read,
        Role::TaskManager => pb::TokenRole::TaskManager,
    };
    pb::TokenInfo {
        name: t.name.clone(),
        role: role as i32,
        task_managers: t.task_managers.clone(),
        created_at_ms: t.created_at,
    }
}

fn check_address(field: &str, addr: &str) -> Result<(), ApiError> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(ApiError::invalid(
            field,
            format!("{addr:?} is not HOST:PORT"),
        )),
    }
}

impl ClusterServer {
    async fn status(&self, caller: Caller, req: StatusRequest) -> Result<StatusResponse, ApiError> {
        let local = self.local_status(req.with_digest).await;
        let leader = self.replica.leader();
        let mut replicas = vec![];
        let members = self.members();
        if req.local_only {
            replicas.push(local);
        } else {
            let others = members.iter().filter(|m| m.id != self.replica.id);
            let mut fetched = futures::future::join_all(
                others.map(|m| self.peer_status(m, &caller, req.with_digest)),
            )
            .await;
            replicas.push(local);
            replicas.append(&mut fetched);
            replicas.sort_by_key(|r| r.id);
        }
        Ok(StatusResponse {
            replicas,
            leader_id: leader.as_ref().map_or(0, |(id, _)| *id),
            leader_address: leader.map(|(_, a)| a).unwrap_or_default(),
            responder_id: self.replica.id,
            membership: members,
        })
    }

    async fn add_node(&self, req: AddNodeRequest) -> Result<AddNodeResponse, ApiError> {
        if req.node_id == 0 {
            return Err(ApiError::invalid("node_id", "replica ids start at 1"));
        }
        check_address("address", &req.address)?;
        self.replica
            .add_node(req.node_id, req.address, req.promote)
            .await?;
        Ok(AddNodeResponse {
            membership: self.members(),
        })
    }

    async fn remove_node(&self, req: RemoveNodeRequest) -> Result<RemoveNodeResponse, ApiError> {
        if !self.members().iter().any(|m| m.id == req.node_id) {
            return Err(ApiError::NotFound(format!(
                "replica {} is not a member",
                req.node_id
            )));
        }
        self.replica.remove_node(req.node_id).await?;
        Ok(RemoveNodeResponse {
            membership: self.members(),
        })
    }

    /// A consistent copy of the state, served by the leader after a read barrier (a
    /// follower relays the leader's stream).
    async fn snapshot(&self, _req: SnapshotRequest) -> Result<BoxStream<SnapshotChunk>, ApiError> {
        let (bytes, last) = {
            let g = self.replica.state.read();
            let bytes = g
                .state
                .encode()
                .map_err(|e| ApiError::Internal(format!("cannot encode the state: {e}")))?;
            (bytes, g.last_applied)
        };
        let (index, term) = last.map_or((0, 0), |l| (l.index, l.leader_id.term));
        // Chunks are copied out one at a time as the client reads them, not all at once.
        let count = bytes.len().div_ceil(SNAPSHOT_CHUNK);
        let chunks = (0..count).map(move |i| {
            let start = i * SNAPSHOT_CHUNK;
            let end = (start + SNAPSHOT_CHUNK).min(bytes.len());
            Ok(SnapshotChunk {
                data: bytes[start..end].to_vec(),
                last_log_index: index,
                last_log_term: term,
            })
        });
        Ok(Box::pin(tokio_stream::iter(chunks)))
    }
}
