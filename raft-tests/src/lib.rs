//! In-process Raft clusters of dispatcher replicas with a network whose links each test
//! controls (cut, heal, isolate, drop a share of messages, delay), for the tests of
//! election, replication, snapshots, membership and restarts in `tests/`.
//!
//! Each replica is the real thing (`Replica` over the sled log store and the
//! state-machine store in its own temporary directory); only the transport is replaced:
//! messages are encoded through the codec, as on the wire, and handed to the target
//! replica's Raft directly. Every random choice (which message is dropped) comes from one
//! seed, printed at the start of each test, so a failure can be replayed with
//! `RAFT_TEST_SEED=<seed>`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_core::codec;
use dispatcher_core::state::{
    ClusterConfig, Command, JobId, JobSpec, RestartStrategy, TaskSpec, VertexSpec,
};
use dispatcher_server::raft::replica::{RaftSettings, Replica, ReplicaOptions, WriteError};
use dispatcher_server::raft::{Node, NodeId, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, ServerState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

/// The state of one directed link.
#[derive(Clone, Copy, Debug, Default)]
struct Link {
    cut: bool,
    drop_percent: u8,
    delay: Duration,
}

/// The fault-injecting in-process network shared by the replicas of a cluster.
pub struct Router {
    nodes: Mutex<BTreeMap<NodeId, Replica>>,
    links: Mutex<BTreeMap<(NodeId, NodeId), Link>>,
    rng: Mutex<StdRng>,
}

impl Router {
    fn new(seed: u64) -> Arc<Self> {
        Arc::new(Router {
            nodes: Mutex::new(BTreeMap::new()),
            links: Mutex::new(BTreeMap::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    fn link(&self, from: NodeId, to: NodeId) -> Link {
        self.links
            .lock()
            .expect("links")
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }

    /// Decides the fate of one message: `Err` if it is lost, after its delay.
    async fn pass(&self, from: NodeId, to: NodeId) -> Result<Replica, AnyError> {
        let link = self.link(from, to);
        if link.cut {
            return Err(AnyError::error(format!("link {from}->{to} is cut")));
        }
        if link.drop_percent > 0 {
            let roll: u8 = self.rng.lock().expect("rng").gen_range(0..100);
            if roll < link.drop_percent {
                return Err(AnyError::error(format!("message {from}->{to} dropped")));
            }
        }
        if !link.delay.is_zero() {
            tokio::time::sleep(link.delay).await;
        }
        self.nodes
            .lock()
            .expect("nodes")
            .get(&to)
            .cloned()
            .ok_or_else(|| AnyError::error(format!("replica {to} is down")))
    }
}

/// The network factory of one replica.
#[derive(Clone)]
pub struct RouterNetwork {
    from: NodeId,
    router: Arc<Router>,
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

/// Sends through the codec both ways, as the gRPC transport does.
fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    codec::decode(&codec::encode(v).expect("encodes")).expect("decodes")
}

impl RouterClient {
    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new(self.to, e))
    }
}

impl RaftNetwork<TypeConfig> for RouterClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let target = self
            .router
            .pass(self.from, self.to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::from(e)))?;
        let resp = target.raft.append_entries(wire(&rpc)).await;
        // The reply crosses the link back too.
        self.router
            .pass(self.to, self.from)
            .await
            .map_err(|e| RPCError::Network(NetworkError::from(e)))?;
        wire(&resp).map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let target = self
            .router
            .pass(self.from, self.to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::from(e)))?;
        let resp = target.raft.install_snapshot(wire(&rpc)).await;
        self.router
            .pass(self.to, self.from)
            .await
            .map_err(|e| RPCError::Network(NetworkError::from(e)))?;
        wire(&resp).map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let target = self
            .router
            .pass(self.from, self.to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::from(e)))?;
        let resp = target.raft.vote(wire(&rpc)).await;
        self.router
            .pass(self.to, self.from)
            .await
            .map_err(|e| RPCError::Network(NetworkError::from(e)))?;
        wire(&resp).map_err(|e| self.remote(e))
    }
}

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of voters to start with (ids 1..=n).
    pub voters: u64,
    /// Raft settings (fast defaults for tests).
    pub raft: RaftSettings,
}

impl ClusterOptions {
    /// `n` voters with test timings.
    pub fn voters(n: u64) -> Self {
        ClusterOptions {
            voters: n,
            raft: RaftSettings {
                heartbeat_ms: 50,
                election_timeout_min_ms: 300,
                election_timeout_max_ms: 600,
                ..RaftSettings::default()
            },
        }
    }
}

/// An in-process cluster.
pub struct Cluster {
    /// The network.
    pub router: Arc<Router>,
    /// The seed of every random choice.
    pub seed: u64,
    dirs: BTreeMap<NodeId, TempDir>,
    options: ClusterOptions,
    members: BTreeMap<NodeId, String>,
    next_job: Mutex<u64>,
}

/// The seed of a test: `RAFT_TEST_SEED` if set, else the test's default. Printed.
pub fn seed(default: u64) -> u64 {
    let seed = std::env::var("RAFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    println!("seed {seed} (replay with RAFT_TEST_SEED={seed})");
    seed
}

/// Initialises test logging once (`RUST_LOG` to see it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Waits until `cond` returns `Some`, polling, or panics after `timeout` with `why`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, why: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {why}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A job spec for writes.
pub fn small_job(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        vertices: vec![VertexSpec {
            name: "v".into(),
            parallelism: 1,
            task: TaskSpec::Sleep { duration_ms: 1 },
            node_selector: BTreeMap::new(),
        }],
        edges: vec![],
        priority: 0,
        restart: RestartStrategy::NoRestart,
        placement: None,
        labels: BTreeMap::new(),
    }
}

impl Cluster {
    /// Starts the voters 1..=n and waits for a leader.
    pub async fn start(options: ClusterOptions, seed: u64) -> Cluster {
        init_logging();
        let members: BTreeMap<NodeId, String> = (1..=options.voters)
            .map(|id| (id, format!("node-{id}")))
            .collect();
        let mut cluster = Cluster {
            router: Router::new(seed),
            seed,
            dirs: BTreeMap::new(),
            options,
            members,
            next_job: Mutex::new(0),
        };
        for id in 1..=cluster.options.voters {
            cluster.dirs.insert(id, TempDir::new().expect("tempdir"));
            cluster.boot(id, true).await;
        }
        cluster
            .leader(Duration::from_secs(10), "the first election")
            .await;
        cluster
    }

    async fn boot(&self, id: NodeId, initial: bool) {
        let dir = self
            .dirs
            .get(&id)
            .expect("a directory per replica")
            .path()
            .to_path_buf();
        let opts = ReplicaOptions {
            id,
            data_dir: dir,
            cluster: "raft-tests".into(),
            initial_cluster: if initial {
                self.members.clone()
            } else {
                BTreeMap::new()
            },
            raft: self.options.raft.clone(),
            state_config: ClusterConfig::default(),
            peer_addresses: BTreeMap::new(),
        };
        let network = RouterNetwork {
            from: id,
            router: self.router.clone(),
        };
        // A replica that was just stopped may still hold its sled lock for a moment.
        let replica = wait_for(
            Duration::from_secs(10),
            &format!("replica {id} to open its data directory"),
            || {
                let (opts, network) = (opts.clone(), network.clone());
                async move {
                    match Replica::start_with_network(opts, network).await {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::info!("replica {id} not started yet: {e}");
                            None
                        }
                    }
                }
            },
        )
        .await;
        self.router.nodes.lock().expect("nodes").insert(id, replica);
    }

    /// The running replica `id`.
    pub fn replica(&self, id: NodeId) -> Replica {
        self.router
            .nodes
            .lock()
            .expect("nodes")
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("replica {id} is not running"))
    }

    /// Ids of the running replicas.
    pub fn running(&self) -> Vec<NodeId> {
        self.router
            .nodes
            .lock()
            .expect("nodes")
            .keys()
            .copied()
            .collect()
    }

    /// Waits for a leader that the running replicas it can reach agree on.
    pub async fn leader(&self, timeout: Duration, why: &str) -> NodeId {
        wait_for(timeout, &format!("a leader ({why})"), || async {
            let running = self.running();
            let leaders: Vec<NodeId> = running
                .iter()
                .filter(|id| self.replica(**id).metrics().state == ServerState::Leader)
                .copied()
                .collect();
            // With partitions several may think they lead in different terms; take the
            // one with the highest term that a majority follows.
            let best = leaders
                .iter()
                .max_by_key(|id| self.replica(**id).metrics().current_term)?;
            let followers = running
                .iter()
                .filter(|id| self.replica(**id).metrics().current_leader == Some(*best))
                .count();
            (followers * 2 > self.voter_count()).then_some(*best)
        })
        .await
    }

    fn voter_count(&self) -> usize {
        let any = self.running()[0];
        self.replica(any)
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .count()
    }

    /// A new job id, unique in this cluster.
    pub fn next_job_id(&self) -> JobId {
        let mut n = self.next_job.lock().expect("counter");
        *n += 1;
        JobId::parse(&format!("00000000-0000-4000-8000-{:012}", *n)).expect("uuid")
    }

    /// Submits a job through whichever replica leads, retrying until `timeout`.
    /// Returns the job id and the log index it committed at.
    pub async fn submit(&self, timeout: Duration) -> (JobId, u64) {
        let id = self.next_job_id();
        let index = self
            .propose(
                Command::SubmitJob {
                    job_id: id.clone(),
                    spec: small_job("j"),
                    now: 1,
                },
                timeout,
            )
            .await;
        (id, index)
    }

    /// Proposes a command through the leader, retrying until `timeout`.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> u64 {
        wait_for(timeout, &format!("{} to commit", cmd.name()), || {
            let cmd = cmd.clone();
            async move {
                // A deposed leader cut off from the others may still think it leads: take
                // the one with the newest term.
                let leader = self
                    .running()
                    .into_iter()
                    .filter(|id| self.replica(*id).metrics().state == ServerState::Leader)
                    .max_by_key(|id| self.replica(*id).metrics().current_term)?;
                // A leader cut off from its quorum never answers: give up on it after a
                // while and look for the leader again.
                let attempt = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.replica(leader).propose_indexed(cmd),
                )
                .await;
                match attempt {
                    Err(_) => None,
                    Ok(Ok((Ok(_), index))) => Some(index),
                    Ok(Ok((Err(rejection), _))) => panic!("command rejected: {rejection:?}"),
                    Ok(Err(WriteError::NotLeader { .. })) | Ok(Err(WriteError::Fatal(_))) => None,
                    Ok(Err(e)) => panic!("write failed: {e}"),
                }
            }
        })
        .await
    }

    /// Tries one write through `via` without retrying: whether it committed.
    pub async fn try_submit_via(&self, via: NodeId, timeout: Duration) -> Result<JobId, String> {
        let id = self.next_job_id();
        let cmd = Command::SubmitJob {
            job_id: id.clone(),
            spec: small_job("j"),
            now: 1,
        };
        match tokio::time::timeout(timeout, self.replica(via).propose(cmd)).await {
            Ok(Ok(_)) => Ok(id),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Stops a replica (its data directory stays).
    pub async fn stop(&self, id: NodeId) {
        let replica = self.router.nodes.lock().expect("nodes").remove(&id);
        if let Some(r) = replica {
            r.shutdown().await;
        }
    }

    /// Restarts a stopped replica from its data directory.
    pub async fn restart(&self, id: NodeId) {
        self.boot(id, false).await;
    }

    /// Adds a new replica (fresh directory) to the running set, not yet a member.
    pub async fn spawn_new(&mut self, id: NodeId) {
        self.dirs.insert(id, TempDir::new().expect("tempdir"));
        self.boot(id, false).await;
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut links = self.router.links.lock().expect("links");
        links.entry((a, b)).or_default().cut = true;
        links.entry((b, a)).or_default().cut = true;
    }

    /// Cuts `id` off from every other replica.
    pub fn isolate(&self, id: NodeId) {
        for other in self.all_ids() {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Makes every link drop `percent` of messages (seeded).
    pub fn set_loss(&self, percent: u8) {
        let mut links = self.router.links.lock().expect("links");
        for a in self.all_ids() {
            for b in self.all_ids() {
                if a != b {
                    links.entry((a, b)).or_default().drop_percent = percent;
                }
            }
        }
    }

    /// Delays every message on the link from `a` to `b`.
    pub fn set_delay(&self, a: NodeId, b: NodeId, delay: Duration) {
        self.router
            .links
            .lock()
            .expect("links")
            .entry((a, b))
            .or_default()
            .delay = delay;
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.router.links.lock().expect("links").clear();
    }

    fn all_ids(&self) -> BTreeSet<NodeId> {
        self.dirs.keys().copied().collect()
    }

    /// Waits until every running replica applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration, why: &str) {
        wait_for(
            timeout,
            &format!("every replica to apply {index} ({why})"),
            || async {
                self.running()
                    .iter()
                    .all(|id| {
                        self.replica(*id)
                            .state
                            .read()
                            .last_applied
                            .map(|l| l.index)
                            .unwrap_or(0)
                            >= index
                    })
                    .then_some(())
            },
        )
        .await
    }

    /// Waits until every running replica has applied the same index with the same digest,
    /// and returns that index. This is the check every test ends with.
    pub async fn assert_converged(&self, timeout: Duration, why: &str) -> u64 {
        wait_for(
            timeout,
            &format!("all replicas to converge on one digest ({why})"),
            || async {
                let views: Vec<(Option<u64>, String)> = self
                    .running()
                    .iter()
                    .map(|id| self.replica(*id).state.digest())
                    .collect();
                let first = views.first()?.clone();
                views
                    .iter()
                    .all(|v| *v == first)
                    .then_some(first.0.unwrap_or(0))
            },
        )
        .await
    }

    /// Whether replica `id` has the job in its applied state.
    pub fn has_job(&self, id: NodeId, job: &JobId) -> bool {
        self.replica(id).state.read().state.job(job).is_some()
    }

    /// Stops every replica.
    pub async fn shutdown(&self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }
}
