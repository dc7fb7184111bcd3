//! The transport to peers: openraft's `RaftNetwork` over the generated `RaftService`
//! gRPC client, with payloads encoded by the codec module.
//!
//! One lazily connected channel per peer address, created on first use and reused:
//! openraft asks for a network client for every heartbeat and vote, so creating one must
//! not connect. A refused or broken connection becomes `Unreachable` (openraft backs off
//! before retrying); an append batch whose encoding exceeds the message limit becomes a
//! `PayloadTooLarge` hint so openraft sends fewer entries at a time. Snapshots travel
//! chunk by chunk (openraft's chunked transfer), each chunk one `InstallSnapshot` call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::{Node, NodeId, TypeConfig};
use dispatcher_core::codec;
use dispatcher_proto::v1::raft_service_client::RaftServiceClient;
use dispatcher_proto::v1::RaftMessage;

/// Largest gRPC message a replica sends or accepts on the Raft service. Snapshot chunks
/// (`snapshot_max_chunk_size`) and append batches stay below it.
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;

/// Connection settings for peers.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    /// How long to wait for a TCP connection to a peer.
    pub connect_timeout: Duration,
    /// Addresses this replica uses to reach given peers instead of their advertised
    /// ones (a NAT or port forward between replicas, or the chaos harness's proxies).
    pub peer_addresses: std::collections::BTreeMap<NodeId, String>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            connect_timeout: Duration::from_millis(500),
            peer_addresses: Default::default(),
        }
    }
}

/// Creates network clients for openraft, sharing one channel per peer address.
#[derive(Clone)]
pub struct GrpcNetwork {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    config: NetworkConfig,
}

impl GrpcNetwork {
    /// A network with no connections yet.
    pub fn new(config: NetworkConfig) -> Self {
        GrpcNetwork {
            channels: Arc::new(Mutex::new(HashMap::new())),
            config,
        }
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr:?}: {e}"))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        let addr = self
            .config
            .peer_addresses
            .get(&target)
            .unwrap_or(&node.addr)
            .clone();
        PeerClient {
            target,
            node: node.clone(),
            channel: self.channel(&addr),
        }
    }
}

/// A client of one peer.
pub struct PeerClient {
    target: NodeId,
    node: Node,
    channel: Result<Channel, String>,
}

/// The ways a call can fail before the peer's Raft answers.
enum CallError {
    Unreachable(AnyError),
    Network(AnyError),
    TooLarge(usize),
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        kind: RpcKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, E>, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned,
    {
        let channel = self
            .channel
            .as_ref()
            .map_err(|e| CallError::Unreachable(AnyError::error(e)))?
            .clone();
        let payload = codec::encode(req).map_err(|e| CallError::Network(AnyError::new(&e)))?;
        if payload.len() > MAX_RAFT_MESSAGE {
            return Err(CallError::TooLarge(payload.len()));
        }
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        let mut request = tonic::Request::new(RaftMessage { payload });
        request.set_timeout(timeout);
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| classify(&status))?;
        codec::decode::<Result<Resp, E>>(&reply.into_inner().payload)
            .map_err(|e| CallError::Network(AnyError::new(&e)))
    }
}

#[derive(Clone, Copy)]
enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

/// Connection-level failures (refused, reset, no route, timed out connecting) mean the
/// peer is unreachable; anything else is a network error openraft retries at once.
fn classify(status: &tonic::Status) -> CallError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Unknown if is_transport(status) => {
            CallError::Unreachable(AnyError::error(status.to_string()))
        }
        Code::Unavailable => CallError::Unreachable(AnyError::error(status.to_string())),
        Code::ResourceExhausted | Code::OutOfRange => CallError::TooLarge(0),
        _ => CallError::Network(AnyError::error(status.to_string())),
    }
}

fn is_transport(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("transport") || m.contains("connect") || m.contains("refused")
}

impl PeerClient {
    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        entries: usize,
    ) -> RPCError<NodeId, Node, E> {
        match e {
            CallError::Unreachable(e) => RPCError::Unreachable(Unreachable::from(e)),
            CallError::Network(e) => RPCError::Network(NetworkError::from(e)),
            CallError::TooLarge(bytes) => {
                if entries > 1 {
                    RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(
                        (entries / 2) as u64,
                    ))
                } else {
                    RPCError::Network(NetworkError::from(AnyError::error(format!(
                        "message of {bytes} bytes exceeds the {MAX_RAFT_MESSAGE}-byte limit"
                    ))))
                }
            }
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        match self.call(RpcKind::Append, &rpc, option.hard_ttl()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, entries)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(RpcKind::Snapshot, &rpc, option.hard_ttl()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, 0)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcKind::Vote, &rpc, option.hard_ttl()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, 0)),
        }
    }
}
