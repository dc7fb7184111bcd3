//! The transport to peers: openraft's `RaftNetwork` over the generated `RaftService`
//! gRPC client, with payloads encoded by the codec module.
//!
//! One lazily connected channel per peer address, created on first use and reused:
//! openraft asks for a network client for every heartbeat and vote, so creating one must
//! not connect. A refused or broken connection becomes `Unreachable` (openraft backs off
//! before retrying); an append batch whose encoding exceeds the message limit becomes a
//! `PayloadTooLarge` hint so openraft sends fewer entries at a time. Snapshots travel
//! chunk by chunk (openraft's chunked transfer), each chunk one `InstallSnapshot` call.
//! Every answer passes the guard (`guard::check_*_response`) before openraft sees it: an
//! answer no correct peer gives (a vote of an absurd term, a matching log id outside
//! what was sent) is a network error, never handed over.
//!
//! This module is where a failing peer is logged. openraft reports every failed call
//! several times over, some at ERROR, and a leader retries a dead follower every
//! 500 ms; the log filter (`crate::logging`) drops openraft's reports of unreachable
//! and timed-out peers, and [`PeerLog`] turns the outcomes of the calls into at most one
//! WARN per peer per [`PEER_REPORT_INTERVAL`] with the count of failed calls, and an
//! INFO when the peer answers again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::identity::ClusterIdentity;
use super::{guard, LogId, Node, NodeId, TypeConfig};

pub mod append;
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
    /// TLS to peers (this replica's certificate, the cluster CA); `None` for plain text.
    pub tls: Option<crate::tls::PeerTls>,
    /// Most encoded bytes of log entries in one AppendEntries call (a larger single
    /// entry goes alone); see [`append`].
    pub max_append_bytes: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            connect_timeout: Duration::from_millis(500),
            peer_addresses: Default::default(),
            tls: None,
            max_append_bytes: append::DEFAULT_MAX_APPEND_BYTES,
        }
    }
}

/// How often a leader retries a peer it cannot connect to (openraft's default is
/// 500 ms). Short, so that a restarted follower hears from its leader before its
/// election grace runs out (`replica::RESTART_ELECTION_GRACE`); a refused connection
/// costs next to nothing.
pub const PEER_RETRY: Duration = Duration::from_millis(200);

/// How often a peer whose calls keep failing is logged again.
pub const PEER_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// Creates network clients for openraft, sharing one channel per peer address.
#[derive(Clone)]
pub struct GrpcNetwork {
    /// This replica's id (openraft's `Timeout` error names both ends).
    id: NodeId,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    peers: Peers,
    in_flight: append::InFlights,
    config: NetworkConfig,
    identity: Option<ClusterIdentity>,
    longer_log: LongerLog,
}

/// The highest term in which a vote of this replica was refused by a voter whose log is
/// longer than its own (then that voter, not this one, can win: `super::succession`).
pub type LongerLog = Arc<std::sync::atomic::AtomicU64>;

/// The log state of every peer, shared by all clients (openraft makes a new client for
/// every heartbeat and vote, so the state cannot live in one).
type Peers = Arc<Mutex<HashMap<NodeId, PeerLog>>>;

impl GrpcNetwork {
    /// The network of replica `id`, with no connections yet.
    pub fn new(id: NodeId, config: NetworkConfig) -> Self {
        GrpcNetwork {
            id,
            channels: Arc::new(Mutex::new(HashMap::new())),
            peers: Arc::default(),
            in_flight: Arc::default(),
            config,
            identity: None,
            longer_log: Arc::default(),
        }
    }

    /// Where vote answers showing a longer log than this replica's are recorded.
    pub fn longer_log(&self) -> LongerLog {
        self.longer_log.clone()
    }

    /// Sends this replica's cluster id with every message and checks the peers' ids in
    /// their answers (see [`super::identity`]).
    pub fn with_identity(mut self, identity: ClusterIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    fn channel(&self, target: NodeId, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::peer_endpoint(target, addr, self.config.tls.as_ref())?
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
            id: self.id,
            target,
            node: node.clone(),
            channel: self.channel(target, &addr),
            addr,
            peers: self.peers.clone(),
            in_flight: self.in_flight.clone(),
            max_append_bytes: self.config.max_append_bytes,
            identity: self.identity.clone(),
            longer_log: self.longer_log.clone(),
        }
    }
}

/// A client of one peer.
#[derive(Clone)]
pub struct PeerClient {
    id: NodeId,
    target: NodeId,
    node: Node,
    channel: Result<Channel, String>,
    /// The address actually dialled (an override, or the advertised one), for the log.
    addr: String,
    peers: Peers,
    in_flight: append::InFlights,
    max_append_bytes: usize,
    identity: Option<ClusterIdentity>,
    longer_log: LongerLog,
}

/// The ways a call can fail before the peer's Raft answers. Each carries the error for
/// openraft and a one-line description for our log.
#[derive(Clone, Debug)]
pub enum CallError {
    /// No connection to the peer.
    Unreachable(AnyError, String),
    /// The request's deadline passed (tonic's client timeout, or the peer's).
    Timeout(String),
    /// Any other failure of the call.
    Network(AnyError, String),
    /// The request exceeds the message limit.
    TooLarge(usize),
}

impl CallError {
    /// How this failure is logged (`TooLarge` is no failure of the peer: openraft
    /// retries with fewer entries).
    fn failure(&self) -> Option<(Failure, &str)> {
        match self {
            CallError::Unreachable(_, why) => Some((Failure::Unreachable, why)),
            CallError::Timeout(why) => Some((Failure::Timeout, why)),
            CallError::Network(_, why) => Some((Failure::Error, why)),
            CallError::TooLarge(_) => None,
        }
    }
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
        // openraft wraps each call in its own timeout and drops it when that fires, so a
        // peer that never answers shows up here only as a dropped call.
        let mut watch = CallWatch {
            client: self,
            started: Instant::now(),
            timeout,
            finished: false,
        };
        let result = self.call_once(kind, req, timeout).await;
        watch.finished = true;
        match &result {
            Err(e) => {
                if let Some((failure, why)) = e.failure() {
                    self.record(Outcome::Failed(failure), why);
                }
            }
            Ok(_) => self.record(Outcome::Answered, ""),
        }
        result
    }

    async fn call_once<Req, Resp, E>(
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
            .map_err(|e| CallError::Unreachable(AnyError::error(e), e.clone()))?
            .clone();
        let payload = codec::encode(req).map_err(|e| {
            CallError::Network(AnyError::new(&e), format!("cannot encode the request: {e}"))
        })?;
        if payload.len() > MAX_RAFT_MESSAGE {
            return Err(CallError::TooLarge(payload.len()));
        }
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE);
        let cluster_id = self.identity.as_ref().map(|i| i.wire()).unwrap_or_default();
        let mut request = tonic::Request::new(RaftMessage {
            payload,
            cluster_id,
        });
        request.set_timeout(timeout);
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| classify(&status))?.into_inner();
        if let Some(identity) = &self.identity {
            // A replica without an id takes its followers' (an upgraded cluster's new
            // leader); a different one makes the answer a network error to openraft.
            let may_adopt = matches!(kind, RpcKind::Append);
            identity
                .check(self.target, &reply.cluster_id, may_adopt)
                .map_err(|e| CallError::Network(AnyError::new(&e), e.to_string()))?;
        }
        codec::decode::<Result<Resp, E>>(&reply.payload).map_err(|e| {
            CallError::Network(AnyError::new(&e), format!("cannot decode the answer: {e}"))
        })
    }

    /// Feeds one call's outcome to this peer's [`PeerLog`] and logs the line it asks for.
    fn record(&self, outcome: Outcome, why: &str) {
        let line = {
            let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let log = peers.entry(self.target).or_default();
            log.observe(outcome, Instant::now(), PEER_REPORT_INTERVAL)
        };
        let (peer, addr) = (self.target, &self.addr);
        match line {
            None => {}
            Some(PeerLine::Failing {
                failure,
                first: true,
                failed_calls,
                ..
            }) => tracing::warn!(
                peer,
                addr,
                reason = failure.as_str(),
                error = why,
                failed_calls,
                "cannot reach peer"
            ),
            Some(PeerLine::Failing {
                failure,
                first: false,
                failed_calls,
                failing_for,
            }) => tracing::warn!(
                peer,
                addr,
                reason = failure.as_str(),
                error = why,
                failed_calls,
                failing_for = ?Rounded(failing_for),
                "still cannot reach peer"
            ),
            Some(PeerLine::Recovered {
                failed_calls,
                after,
            }) => tracing::info!(
                peer,
                addr,
                failed_calls,
                after = ?Rounded(after),
                "peer reachable again"
            ),
        }
    }
}

/// Records a call that openraft dropped after (about) its timeout as a timed-out call.
/// A call dropped early was cancelled (a leader stepping down, a shutdown), which says
/// nothing about the peer.
struct CallWatch<'a> {
    client: &'a PeerClient,
    started: Instant,
    timeout: Duration,
    finished: bool,
}

impl Drop for CallWatch<'_> {
    fn drop(&mut self) {
        if !self.finished && self.started.elapsed() >= self.timeout * 3 / 4 {
            let why = format!("no answer within {:?}", self.timeout);
            self.client.record(Outcome::Failed(Failure::Timeout), &why);
        }
    }
}

/// A duration printed to a tenth of a second ("30.2s"), enough for a log line.
struct Rounded(Duration);

impl std::fmt::Debug for Rounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1}s", self.0.as_secs_f64())
    }
}

/// Why a call to a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection (refused, reset, no route).
    Unreachable,
    /// No answer in time.
    Timeout,
    /// Any other failure of the call (a status, an undecodable answer).
    Error,
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::Timeout => "timeout",
            Failure::Error => "error",
        }
    }
}

/// The outcome of one call to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The peer's Raft answered (even with a refusal).
    Answered,
    /// The call failed.
    Failed(Failure),
}

/// A line to log about a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerLine {
    /// Calls are failing.
    Failing {
        /// Why the latest call failed.
        failure: Failure,
        /// The first line of this run of failures ("cannot reach peer"); otherwise a
        /// reminder ("still cannot reach peer").
        first: bool,
        /// Failed calls since the previous `Failing` line (this one included).
        failed_calls: u64,
        /// Since the first failure of this run.
        failing_for: Duration,
    },
    /// The peer answered after a run of failures that was logged.
    Recovered {
        /// Failed calls in that run.
        failed_calls: u64,
        /// How long the run lasted.
        after: Duration,
    },
}

/// What to log about one peer, from the outcomes of the calls to it: at most one
/// `Failing` line per interval (the first failure is logged at once, the rest are
/// counted into the next line), and one `Recovered` line when a logged run of failures
/// ends. A peer that flaps within an interval costs one line, not one per flap. Pure:
/// the caller passes the time.
#[derive(Debug, Default)]
pub struct PeerLog {
    /// When the current run of failures began.
    failing_since: Option<Instant>,
    /// Failures in the current run.
    run: u64,
    /// Whether the current run has been logged.
    run_logged: bool,
    /// Failures not yet counted in a `Failing` line.
    unlogged: u64,
    /// When the last `Failing` line was logged.
    last_line: Option<Instant>,
}

impl PeerLog {
    /// Takes one call's outcome at `now`; returns the line to log, if any.
    pub fn observe(
        &mut self,
        outcome: Outcome,
        now: Instant,
        interval: Duration,
    ) -> Option<PeerLine> {
        match outcome {
            Outcome::Answered => {
                let since = self.failing_since.take()?;
                let line = self.run_logged.then_some(PeerLine::Recovered {
                    failed_calls: self.run,
                    after: now.saturating_duration_since(since),
                });
                self.run = 0;
                self.run_logged = false;
                line
            }
            Outcome::Failed(failure) => {
                let since = *self.failing_since.get_or_insert(now);
                self.run += 1;
                self.unlogged += 1;
                let due = self
                    .last_line
                    .is_none_or(|t| now.saturating_duration_since(t) >= interval);
                if !due {
                    return None;
                }
                let line = PeerLine::Failing {
                    failure,
                    first: !self.run_logged,
                    failed_calls: std::mem::take(&mut self.unlogged),
                    failing_for: now.saturating_duration_since(since),
                };
                self.last_line = Some(now);
                self.run_logged = true;
                Some(line)
            }
        }
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
    let error = || AnyError::error(status.to_string());
    if status.code() == Code::DeadlineExceeded || is_timeout(status) {
        return CallError::Timeout(describe(status));
    }
    match status.code() {
        Code::Unavailable | Code::Unknown if is_transport(status) => {
            CallError::Unreachable(error(), describe(status))
        }
        Code::Unavailable => CallError::Unreachable(error(), describe(status)),
        // We never cancel a peer call ourselves (a call we give up on is dropped, and
        // yields no status): CANCELLED is hyper telling us the connection closed under
        // the call, as when the peer stops. That peer is unreachable, not misbehaving.
        Code::Cancelled => CallError::Unreachable(error(), describe(status)),
        Code::ResourceExhausted | Code::OutOfRange => CallError::TooLarge(0),
        _ => CallError::Network(error(), describe(status)),
    }
}

/// A status in one short line: its message and the root cause of its source
/// ("tcp connect error: Connection refused (os error 111)"), instead of tonic's nested
/// debug rendering.
fn describe(status: &tonic::Status) -> String {
    with_root_cause(status).unwrap_or_else(|| format!("{:?}: {}", status.code(), status.message()))
}

/// A status's message and the root cause of its source, if it has a source its
/// message does not already name.
pub fn with_root_cause(status: &tonic::Status) -> Option<String> {
    let mut root: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(next) = root.and_then(|e| e.source()) {
        root = Some(next);
    }
    root.map(|cause| cause.to_string())
        .filter(|cause| !status.message().contains(cause.as_str()))
        .map(|cause| format!("{}: {cause}", status.message()))
}

/// tonic reports its own client-side timeout as CANCELLED with a `TimeoutExpired`
/// source: a peer that did not answer in time, not a broken call.
fn is_timeout(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn is_transport(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("transport") || m.contains("connect") || m.contains("refused")
}

impl PeerClient {
    fn rpc_error<E: std::error::Error>(
        &self,
        e: CallError,
        kind: RpcKind,
        timeout: Duration,
        entries: usize,
    ) -> RPCError<NodeId, Node, E> {
        match e {
            CallError::Unreachable(e, _) => RPCError::Unreachable(Unreachable::from(e)),
            // openraft treats a Timeout as it treats a NetworkError (no backoff, try again
            // with the next heartbeat), and logs it as what it is.
            CallError::Timeout(_) => RPCError::Timeout(Timeout {
                action: match kind {
                    RpcKind::Append => RPCTypes::AppendEntries,
                    RpcKind::Vote => RPCTypes::Vote,
                    RpcKind::Snapshot => RPCTypes::InstallSnapshot,
                },
                id: self.id,
                target: self.target,
                timeout,
            }),
            CallError::Network(e, _) => RPCError::Network(NetworkError::from(e)),
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

    /// An answer the guard refuses is a failed call to openraft (a network error, which
    /// it retries), never handed to it; the peer is logged as failing.
    fn vet(&self, checked: Result<(), guard::Refusal>) -> Result<(), NetworkError> {
        checked.map_err(|refusal| {
            let why = format!("refused its answer: {refusal}");
            self.record(Outcome::Failed(Failure::Error), &why);
            NetworkError::from(AnyError::error(why))
        })
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

/// The AppendEntries paths (see [`append`]).
impl PeerClient {
    /// One call, answered within `ttl` or dropped by openraft.
    async fn append_now(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        match self.call(RpcKind::Append, &rpc, ttl).await {
            Ok(Ok(resp)) => {
                self.vet(guard::check_append_entries_response(self.id, &rpc, &resp))
                    .map_err(RPCError::Network)?;
                Ok(resp)
            }
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, RpcKind::Append, ttl, entries)),
        }
    }

    /// The running call that already carries the beginning of `rpc`, if any; a running
    /// call for anything else is cancelled.
    fn attach(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> Option<(append::Done, Option<LogId>)> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let running = in_flight.get(&self.target)?;
        if append::covers(&running.key, running.last, rpc) {
            return Some((running.done.clone(), running.last));
        }
        if let Some(stale) = in_flight.remove(&self.target) {
            stale.task.abort();
        }
        None
    }

    /// Sends `rpc` in a task of its own, with a timeout sized to its bytes, so that it
    /// goes on when openraft stops waiting.
    fn start(&self, rpc: AppendEntriesRequest<TypeConfig>, interval: Duration) -> append::Done {
        let bytes = codec::encoded_len(&rpc)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(MAX_RAFT_MESSAGE);
        let timeout = append::call_timeout(interval, bytes);
        let (tx, rx) = watch::channel(None);
        let key = append::Key::of(&rpc);
        let last = rpc.entries.last().map(|e| e.log_id);
        let client = self.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let called = client.call(RpcKind::Append, &rpc, timeout).await;
            crate::timing::entries_since("append_entries", rpc.entries.len(), started);
            let answer = match called {
                Ok(Ok(resp)) => {
                    match client.vet(guard::check_append_entries_response(client.id, &rpc, &resp)) {
                        Ok(()) => Ok(Ok(resp)),
                        Err(e) => Err(CallError::Network(AnyError::new(&e), e.to_string())),
                    }
                }
                other => other,
            };
            tx.send_replace(Some(Arc::new(answer)));
        });
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stale) = in_flight.insert(
            self.target,
            append::InFlight {
                key,
                last,
                done: rx.clone(),
                task: task.abort_handle(),
            },
        ) {
            stale.task.abort();
        }
        rx
    }

    /// Forgets the finished call that carried entries up to `last`.
    fn collect(&self, last: Option<LogId>) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let finished = in_flight
            .get(&self.target)
            .is_some_and(|r| r.last == last && r.done.borrow().is_some());
        if finished {
            in_flight.remove(&self.target);
        }
    }

    /// While `rpc`'s entries are still on their way: a heartbeat with its vote,
    /// `prev_log_id` and commit index, reported as progress up to `prev_log_id`.
    async fn heartbeat_instead(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        ttl: Duration,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let heartbeat = AppendEntriesRequest {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
            entries: vec![],
        };
        let answer = self.append_now(heartbeat, ttl).await?;
        append::heartbeat_progress(answer, rpc.prev_log_id).ok_or_else(|| {
            // The follower heard its leader, but there is no progress to report yet.
            let why = "its entries are still on their way".to_string();
            self.rpc_error(CallError::Timeout(why), RpcKind::Append, ttl, 1)
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(PEER_RETRY))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let ttl = option.hard_ttl();
        if rpc.entries.is_empty() {
            return self.append_now(rpc, ttl).await;
        }
        let want = rpc.entries.last().map(|e| e.log_id);
        let running = self.attach(&rpc);
        let (done, sent) = match running {
            Some(running) => {
                // The entries are already on their way: wait half the interval for them,
                // then make sure the follower hears from its leader in this interval.
                let waited = tokio::time::timeout(ttl / 2, append::answer(running.0)).await;
                match waited {
                    Ok(Some(answer)) => (Some(answer), running.1),
                    _ => return self.heartbeat_instead(&rpc, ttl / 2).await,
                }
            }
            None => {
                let (rpc, _) = append::fit_budget(rpc, self.max_append_bytes).map_err(|e| {
                    RPCError::Network(NetworkError::from(AnyError::error(format!(
                        "cannot size the entries: {e}"
                    ))))
                })?;
                let sent = rpc.entries.last().map(|e| e.log_id);
                (append::answer(self.start(rpc, ttl)).await, sent)
            }
        };
        let Some(answer) = done else {
            return Err(RPCError::Network(NetworkError::from(AnyError::error(
                "the call was cancelled",
            ))));
        };
        self.collect(sent);
        match answer.as_ref() {
            Ok(Ok(resp)) => Ok(append::progress(append::copy(resp), sent, want)),
            Ok(Err(remote)) => Err(self.remote(remote.clone())),
            Err(e) => Err(self.rpc_error(e.clone(), RpcKind::Append, ttl, 1)),
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
        let (kind, ttl) = (RpcKind::Snapshot, option.hard_ttl());
        match self.call(kind, &rpc, ttl).await {
            Ok(Ok(resp)) => {
                self.vet(guard::check_install_snapshot_response(self.id, &rpc, &resp))
                    .map_err(RPCError::Network)?;
                Ok(resp)
            }
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, kind, ttl, 0)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let (kind, ttl) = (RpcKind::Vote, option.hard_ttl());
        match self.call(kind, &rpc, ttl).await {
            Ok(Ok(resp)) => {
                self.vet(guard::check_vote_response(&resp))
                    .map_err(RPCError::Network)?;
                if resp.last_log_id > rpc.last_log_id {
                    self.longer_log.fetch_max(
                        rpc.vote.leader_id().term,
                        std::sync::atomic::Ordering::AcqRel,
                    );
                }
                Ok(resp)
            }
            Ok(Err(remote)) => Err(self.remote(remote)),
            Err(e) => Err(self.rpc_error(e, kind, ttl, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(30);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    /// A follower down for 65 s and back: the leader retries every 500 ms, and the log
    /// gets three lines about it (at 0 s, 30 s and 60 s) and one when it is back.
    #[test]
    fn a_dead_peer_is_logged_once_per_interval_with_counts_and_once_when_back() {
        let t0 = Instant::now();
        let mut log = PeerLog::default();
        let mut lines = vec![];
        for ms in (0..65_000).step_by(500) {
            if let Some(line) =
                log.observe(Outcome::Failed(Failure::Unreachable), at(t0, ms), INTERVAL)
            {
                lines.push((ms, line));
            }
        }
        if let Some(line) = log.observe(Outcome::Answered, at(t0, 65_000), INTERVAL) {
            lines.push((65_000, line));
        }
        let failing = |first, failed_calls, s| PeerLine::Failing {
            failure: Failure::Unreachable,
            first,
            failed_calls,
            failing_for: Duration::from_secs(s),
        };
        assert_eq!(
            lines,
            vec![
                (0, failing(true, 1, 0)),
                (30_000, failing(false, 60, 30)),
                (60_000, failing(false, 60, 60)),
                (
                    65_000,
                    PeerLine::Recovered {
                        failed_calls: 130,
                        after: Duration::from_secs(65)
                    }
                ),
            ]
        );
        // Answers from a healthy peer log nothing.
        assert_eq!(
            log.observe(Outcome::Answered, at(t0, 66_000), INTERVAL),
            None
        );
    }

    /// A peer that fails and recovers every second: the first failure and recovery are
    /// logged, then one line per interval counts the failures in between, and a
    /// recovery is logged only after a run that was.
    #[test]
    fn a_flapping_peer_costs_at_most_two_lines_per_interval() {
        let t0 = Instant::now();
        let mut log = PeerLog::default();
        let mut lines = vec![];
        for s in 0..61u64 {
            let outcome = if s % 2 == 0 {
                Outcome::Failed(Failure::Timeout)
            } else {
                Outcome::Answered
            };
            if let Some(line) = log.observe(outcome, at(t0, s * 1000), INTERVAL) {
                lines.push((s, line));
            }
        }
        let kinds: Vec<(u64, bool, u64)> = lines
            .iter()
            .map(|(s, l)| match l {
                PeerLine::Failing { failed_calls, .. } => (*s, true, *failed_calls),
                PeerLine::Recovered { failed_calls, .. } => (*s, false, *failed_calls),
            })
            .collect();
        // Failures at 0, 2, ..., 60: logged at 0 (1 call), 30 (15 calls: 2..=30) and 60
        // (15 calls: 32..=60); each logged run's recovery follows one second later.
        assert_eq!(
            kinds,
            vec![
                (0, true, 1),
                (1, false, 1),
                (30, true, 15),
                (31, false, 1),
                (60, true, 15)
            ]
        );
        assert!(matches!(lines[2].1, PeerLine::Failing { first: true, .. }));
    }

    #[test]
    fn tonic_timeouts_are_timeouts_and_refusals_are_unreachable() {
        let expired = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(matches!(classify(&expired), CallError::Timeout(_)));
        let deadline = tonic::Status::deadline_exceeded("deadline");
        assert!(matches!(classify(&deadline), CallError::Timeout(_)));
        let refused = tonic::Status::unavailable("tcp connect error");
        assert!(matches!(classify(&refused), CallError::Unreachable(..)));
        let internal = tonic::Status::internal("boom");
        assert!(matches!(classify(&internal), CallError::Network(..)));
        // What a heartbeat in flight gets when the peer stops (seen in CI as an ERROR
        // from openraft during a clean stop).
        let closed = tonic::Status::cancelled("operation was canceled");
        assert!(matches!(classify(&closed), CallError::Unreachable(..)));
    }

    #[test]
    fn a_refused_connection_is_described_in_one_line() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = tonic::Status::from_error(Box::new(refused));
        let text = describe(&status);
        assert!(!text.contains('\n') && text.contains("refused"), "{text}");
        let plain = tonic::Status::unavailable("tcp connect error");
        assert_eq!(describe(&plain), "Unavailable: tcp connect error");
    }
}
