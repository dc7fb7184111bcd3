//! The fault-injecting in-process network: links that a test cuts, heals, makes lossy or
//! slow, and the fate of every message, decided from the seed and written to the trace.
//!
//! Messages are encoded through the codec both ways, as on the wire, and handed to the
//! target replica's Raft directly.
//!
//! Drop decisions come from one random stream per *conversation* (initiator, target, RPC
//! kind), not from one stream for the whole cluster. A conversation is sequential
//! (openraft's replication to one follower sends the next request only after the previous
//! answer), so its n-th message meets the n-th draw whatever order the conversations
//! interleave in. The runtime already fixes that order ([`crate::simulate`]); the
//! streams keep a change in one conversation (a test that adds a write, an openraft
//! upgrade that sends one more heartbeat) from reshuffling the drops of all the others.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_core::codec;
use dispatcher_server::raft::replica::Replica;
use dispatcher_server::raft::{Node, NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::trace::{Event, Fate, Leg, Role, Trace};

/// The state of one directed link.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Link {
    pub(crate) cut: bool,
    pub(crate) drop_percent: u8,
    pub(crate) delay: Duration,
}

/// The three RPCs of Raft, each its own conversation between two replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rpc {
    /// AppendEntries, heartbeats included.
    Append,
    /// RequestVote.
    Vote,
    /// One InstallSnapshot chunk.
    Snapshot,
}

/// One conversation: who asks whom, what.
type Conversation = (NodeId, NodeId, Rpc);

/// The random stream of one conversation and how many requests it carried.
struct Stream {
    rng: StdRng,
    sent: u64,
}

/// The network shared by the replicas of a cluster.
pub struct Router {
    seed: u64,
    pub(crate) nodes: Mutex<BTreeMap<NodeId, Replica>>,
    pub(crate) links: Mutex<BTreeMap<(NodeId, NodeId), Link>>,
    streams: Mutex<BTreeMap<Conversation, Stream>>,
    pub(crate) trace: Arc<Trace>,
}

/// splitmix64's finaliser: turns related inputs (a seed and small ids) into unrelated
/// seeds, so neighbouring conversations get independent streams.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Router {
    pub(crate) fn new(seed: u64, trace: Arc<Trace>) -> Arc<Self> {
        Arc::new(Router {
            seed,
            nodes: Mutex::new(BTreeMap::new()),
            links: Mutex::new(BTreeMap::new()),
            streams: Mutex::new(BTreeMap::new()),
            trace,
        })
    }

    fn roles(&self) -> Vec<(NodeId, Role)> {
        let nodes = self.nodes.lock().expect("nodes");
        nodes
            .iter()
            .map(|(id, r)| {
                let m = r.raft.metrics().borrow().clone();
                (*id, (m.current_term, m.state, m.current_leader))
            })
            .collect()
    }

    /// Records `event`, after any role change since the last record.
    fn record(&self, event: impl FnOnce(u64) -> Event) {
        self.trace.sample_roles(self.roles());
        self.trace.record(event);
    }

    /// Records a harness action or observation, after any role change.
    pub fn note(&self, what: impl Into<String>) {
        self.trace.sample_roles(self.roles());
        self.trace.note(what);
    }

    fn link(&self, from: NodeId, to: NodeId) -> Link {
        self.links
            .lock()
            .expect("links")
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }

    /// Numbers a new request of `conv`.
    fn next_seq(&self, conv: Conversation) -> u64 {
        let mut streams = self.streams.lock().expect("streams");
        let s = self.stream(&mut streams, conv);
        s.sent += 1;
        s.sent
    }

    fn stream<'a>(
        &self,
        streams: &'a mut BTreeMap<Conversation, Stream>,
        conv: Conversation,
    ) -> &'a mut Stream {
        let (a, b, rpc) = conv;
        streams.entry(conv).or_insert_with(|| Stream {
            rng: StdRng::seed_from_u64(mix(mix(mix(self.seed ^ a) ^ b) ^ rpc as u64)),
            sent: 0,
        })
    }

    /// Decides the fate of one leg of a message of `conv` (crossing `from` -> `to`),
    /// records it, and waits out the link's delay. The target if delivered.
    async fn pass(
        &self,
        conv: Conversation,
        seq: u64,
        leg: Leg,
        from: NodeId,
        to: NodeId,
    ) -> Result<Replica, AnyError> {
        let link = self.link(from, to);
        let fate = if link.cut {
            Fate::Cut
        } else if link.drop_percent > 0 {
            let mut streams = self.streams.lock().expect("streams");
            let roll: u8 = self.stream(&mut streams, conv).rng.gen_range(0..100);
            if roll < link.drop_percent {
                Fate::Dropped
            } else {
                Fate::Delivered
            }
        } else {
            Fate::Delivered
        };
        let target = if fate == Fate::Delivered {
            if !link.delay.is_zero() {
                tokio::time::sleep(link.delay).await;
            }
            self.nodes.lock().expect("nodes").get(&to).cloned()
        } else {
            None
        };
        let fate = match (&target, fate) {
            (None, Fate::Delivered) => Fate::Down,
            (_, f) => f,
        };
        self.record(|at_ms| Event::Message {
            at_ms,
            from: conv.0,
            to: conv.1,
            rpc: conv.2,
            seq,
            leg,
            fate,
        });
        target.ok_or_else(|| AnyError::error(format!("message {from}->{to} {fate:?}")))
    }

    /// Carries one request of `rpc` from `from` to `to` and its answer back: a lost
    /// request is `Unreachable` (openraft backs off), a lost answer a network error.
    async fn call<Req, Resp, E, Fut>(
        &self,
        from: NodeId,
        to: NodeId,
        rpc: Rpc,
        req: Req,
        handle: impl FnOnce(Replica, Req) -> Fut,
    ) -> Result<Resp, RPCError<NodeId, Node, E>>
    where
        Fut: std::future::Future<Output = Result<Resp, E>>,
        Req: serde::Serialize + serde::de::DeserializeOwned,
        Resp: serde::Serialize + serde::de::DeserializeOwned,
        E: std::error::Error + serde::Serialize + serde::de::DeserializeOwned,
    {
        let conv = (from, to, rpc);
        let seq = self.next_seq(conv);
        let target = self
            .pass(conv, seq, Leg::Request, from, to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::from(e)))?;
        let resp = handle(target, wire(&req)).await;
        self.pass(conv, seq, Leg::Reply, to, from)
            .await
            .map_err(|e| RPCError::Network(NetworkError::from(e)))?;
        wire(&resp).map_err(|e| RPCError::RemoteError(RemoteError::new(to, e)))
    }
}

/// Sends through the codec, as the gRPC transport does.
fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    codec::decode(&codec::encode(v).expect("encodes")).expect("decodes")
}

/// The network factory of one replica.
#[derive(Clone)]
pub struct RouterNetwork {
    pub(crate) from: NodeId,
    pub(crate) router: Arc<Router>,
}

impl RaftNetworkFactory<TypeConfig> for RouterNetwork {
    type Network = RouterClient;

    async fn new_client(&mut self, target: NodeId, _node: &Node) -> RouterClient {
        RouterClient {
            from: self.from,
            to: target,
            router: self.router.clone(),
        }
    }
}

/// A client from one replica to another.
pub struct RouterClient {
    from: NodeId,
    to: NodeId,
    router: Arc<Router>,
}

impl RaftNetwork<TypeConfig> for RouterClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.router
            .call(self.from, self.to, Rpc::Append, rpc, |r, req| async move {
                r.raft.append_entries(req).await
            })
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.router
            .call(
                self.from,
                self.to,
                Rpc::Snapshot,
                rpc,
                |r, req| async move { r.raft.install_snapshot(req).await },
            )
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.router
            .call(self.from, self.to, Rpc::Vote, rpc, |r, req| async move {
                r.raft.vote(req).await
            })
            .await
    }
}
