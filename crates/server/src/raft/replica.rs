//! A replica's Raft side: opens its storage, starts openraft, bootstraps a new cluster
//! exactly once, and proposes commands.
//!
//! Storage layout under the data directory:
//! - `raft/`: the sled database of the log store (entries, vote, committed, identity);
//! - `snapshot/current.snap`: the current snapshot of the state machine;
//! - `cluster-id`: the cluster id and the peers seen with data (`identity`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{Config, SnapshotPolicy};

use super::barrier::Barrier;
use super::batcher::Batcher;
use super::identity::{self, ClusterIdentity, Decision, IdentityError, InitialClusterState};
use super::integrity;
use super::log_store::{Identity, LogStore, OpenError};
use super::network::{GrpcNetwork, LongerLog, NetworkConfig};
use super::sm_store::{SharedState, StateMachineStore};
use super::succession::{self, Succession};
use super::{Node, NodeId, Raft, RaftMetrics, TypeConfig};
use dispatcher_core::state::{ClusterConfig, Command, Rejection, Response};

use super::error::write_error;
pub use super::error::WriteError;

/// Raft timing and snapshot settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftSettings {
    /// Leader heartbeat period; also openraft's timeout for one AppendEntries call.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomised election timeout.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, so slightly lagging followers catch up from
    /// the log rather than a snapshot.
    pub logs_kept_after_snapshot: u64,
    /// Largest snapshot chunk sent in one InstallSnapshot call.
    pub snapshot_chunk_bytes: u64,
    /// Timeout of one snapshot chunk (the last one includes the follower's install).
    pub snapshot_chunk_timeout_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            // openraft 0.9 lets a follower that had a leader start an election only after
            // the leader lease (= the max timeout) plus its own timeout drawn once in
            // [min, max]: 500-600 ms of silence with these. 100-160 ms (260-320 ms of
            // silence) gave an election every few minutes with both cores saturated by
            // other processes; stability first (issue 14, docs/architecture.md). The
            // heartbeat stays at 50 ms: AppendEntries that do not fit in it go on in the
            // background (raft/network/append.rs).
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 300,
            snapshot_after_logs: 10_000,
            logs_kept_after_snapshot: 1_000,
            snapshot_chunk_bytes: 4 << 20,
            // The last chunk's answer waits for the follower to check and install the
            // whole snapshot (decode and SHA-256 twice, encode, write): 2 s was too short
            // for tens of MB in a debug build under chaos, and openraft then sent the
            // snapshot again from the start, forever (chaos seed 8, 2026-11-28). Only a
            // stalled follower's snapshot stream waits this long.
            snapshot_chunk_timeout_ms: 10_000,
        }
    }
}

impl RaftSettings {
    /// The snapshot interval of replica `id`: `snapshot_after_logs` plus `id mod 4`
    /// eighths of it, so that the replicas of a cluster, which apply the same entries
    /// at about the same moment, do not all build a snapshot at once (a 200 MB state
    /// takes seconds of a core to encode).
    pub fn snapshot_interval(&self, id: NodeId) -> u64 {
        let n = self.snapshot_after_logs;
        n.saturating_add(n / 8 * (id % 4))
    }

    /// The openraft configuration of replica `id`, validated.
    pub fn to_openraft(&self, cluster: &str, id: NodeId) -> Result<Config, String> {
        let snapshot_interval = self.snapshot_interval(id);
        Config {
            cluster_name: cluster.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_interval),
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            install_snapshot_timeout: self.snapshot_chunk_timeout_ms,
            // Purging costs a sync; do it in batches of a tenth of the snapshot interval.
            purge_batch_size: (snapshot_interval / 10).max(1),
            ..Config::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory cannot be used.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The data directory could not be created or written.
    #[error("data directory {path} is not writable: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Storage failed while starting.
    #[error("storage: {0}")]
    Storage(#[from] openraft::StorageError<NodeId>),
    /// Invalid Raft settings.
    #[error("invalid raft settings: {0}")]
    Settings(String),
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
    /// The cluster identity file cannot be used.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// An empty data directory must not start (see `identity::decide`).
    #[error("{0}")]
    Refused(String),
}

/// How long a restarted replica stays out of elections unless it hears from a leader
/// first: more than a leader's retry interval to an unreachable peer (see
/// `network::PEER_RETRY`), so the leader that kept running reaches it before it times
/// out. Without this, a follower restarted behind a live leader starts an election at
/// once, loses it (its log is behind), but its higher term deposes the leader: a
/// needless election on every restart (openraft 0.9 has no pre-vote).
pub const RESTART_ELECTION_GRACE: Duration = Duration::from_millis(1000);

/// The leader replica `me` reports (Status, health, hints, forwarding): another
/// replica as openraft knows it (a follower learns of a leader only from its
/// AppendEntries, which a quorum's votes made leader), but itself only once a quorum
/// acknowledged it in its current term. openraft makes a restarted leader whose vote was
/// committed leader again at once, at its old term, before anyone answered it; without
/// this it reports LEADER for the moments until a higher term deposes it.
pub fn reported_leader(m: &RaftMetrics, me: NodeId) -> Option<NodeId> {
    match m.current_leader {
        Some(id) if id == me => {
            let confirmed =
                m.state == openraft::ServerState::Leader && m.millis_since_quorum_ack.is_some();
            confirmed.then_some(id)
        }
        other => other,
    }
}

/// How long `add_node` waits for a learner to catch up before promoting it.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// How long an empty data directory waits for each peer's `Identify` answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a replica needs to start.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// This replica's id.
    pub id: NodeId,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Cluster name, recorded in the data directory.
    pub cluster: String,
    /// Members of a new cluster; used only if the data directory is new.
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Whether an empty data directory may bootstrap (see `identity::decide`).
    pub initial_cluster_state: InitialClusterState,
    /// Raft timing.
    pub raft: RaftSettings,
    /// State-machine limits for a new cluster.
    pub state_config: ClusterConfig,
    /// Addresses to reach given peers at instead of their advertised ones.
    pub peer_addresses: BTreeMap<NodeId, String>,
    /// TLS to peers, if the cluster runs TLS.
    pub peer_tls: Option<crate::tls::PeerTls>,
}

/// A running Raft replica.
#[derive(Clone)]
pub struct Replica {
    /// This replica's id.
    pub id: NodeId,
    /// The openraft handle.
    pub raft: Raft,
    /// The applied state, for reads.
    pub state: SharedState,
    /// The cluster id and the peers seen with data.
    pub identity: ClusterIdentity,
    /// Acts when the leader's process is seen to die (see `succession`).
    pub succession: Succession,
    log: LogStore,
    batcher: Batcher,
    barrier: Barrier,
}

/// Opens the storage of a data directory (log store and state-machine store), creating
/// it if needed. Returns the stores and whether the directory was new.
pub async fn open_storage(
    data_dir: &Path,
    identity: &Identity,
    state_config: ClusterConfig,
) -> Result<(LogStore, StateMachineStore, bool), StartError> {
    std::fs::create_dir_all(data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.to_path_buf(),
        source,
    })?;
    // Probe writability up front for a clear message rather than a storage error later.
    let probe = data_dir.join(".write-probe");
    std::fs::write(&probe, b"ok")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|source| StartError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
    // Everything read back is checked before openraft sees it (integrity.rs).
    let raft_dir = data_dir.join("raft");
    let (mut log, fresh) = integrity::open_log(&raft_dir, identity).await?;
    let sm = StateMachineStore::open(&data_dir.join("snapshot"), state_config).await?;
    integrity::check_committed_held(&raft_dir, &mut log, &sm).await?;
    Ok((log, sm, fresh))
}

impl Replica {
    /// Opens storage and starts Raft with the gRPC network. A new data directory
    /// bootstraps the cluster if this replica is the lowest id of `initial_cluster`;
    /// a directory with data never re-initialises.
    pub async fn start(opts: ReplicaOptions) -> Result<Replica, StartError> {
        let identity = ClusterIdentity::load(&opts.data_dir)?;
        let network = GrpcNetwork::new(
            opts.id,
            NetworkConfig {
                peer_addresses: opts.peer_addresses.clone(),
                tls: opts.peer_tls.clone(),
                ..NetworkConfig::default()
            },
        )
        .with_identity(identity.clone());
        let longer_log = network.longer_log();
        Self::start_inner(opts, network, identity, true, longer_log).await
    }

    /// As [`Replica::start`], with any network (the raft tests use an in-process one).
    pub async fn start_with_network<N>(
        opts: ReplicaOptions,
        network: N,
    ) -> Result<Replica, StartError>
    where
        N: openraft::RaftNetworkFactory<TypeConfig>,
    {
        let identity = ClusterIdentity::load(&opts.data_dir)?;
        Self::start_inner(opts, network, identity, false, LongerLog::default()).await
    }

    /// Starts the replica; `probe`: ask the peers of `initial_cluster` before an empty
    /// data directory bootstraps (over gRPC; the in-process raft tests cannot).
    async fn start_inner<N>(
        opts: ReplicaOptions,
        network: N,
        identity: ClusterIdentity,
        probe: bool,
        longer_log: LongerLog,
    ) -> Result<Replica, StartError>
    where
        N: openraft::RaftNetworkFactory<TypeConfig>,
    {
        let config = opts
            .raft
            .to_openraft(&opts.cluster, opts.id)
            .map_err(StartError::Settings)?;
        let directory = Identity {
            cluster: opts.cluster.clone(),
            node_id: opts.id,
        };
        let (mut log, sm, _) =
            open_storage(&opts.data_dir, &directory, opts.state_config.clone()).await?;
        let pristine = log.is_pristine().await? && sm.shared().read().last_applied.is_none();
        let decision = match pristine && identity.id().is_none() {
            true => Some(Self::decide_empty_start(&opts, probe).await?),
            false => None,
        };
        let state = sm.shared();
        let raft = Raft::new(opts.id, Arc::new(config), network, log.clone(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let batcher = Batcher::spawn(raft.clone());
        let barrier = Barrier::new(raft.clone());
        let succession = {
            let (overrides, metrics_of) = (opts.peer_addresses.clone(), raft.clone());
            let resolve: succession::Resolve = Arc::new(move |id| {
                overrides.get(&id).cloned().or_else(|| {
                    let metrics = metrics_of.metrics();
                    let m = metrics.borrow();
                    m.membership_config
                        .membership()
                        .get_node(&id)
                        .map(|n| n.addr.clone())
                })
            });
            let heartbeat = Duration::from_millis(opts.raft.heartbeat_ms);
            Succession::new(raft.clone(), opts.id, resolve, longer_log, heartbeat)
        };
        let replica = Replica {
            id: opts.id,
            raft,
            state,
            identity: identity.clone(),
            succession,
            log,
            batcher,
            barrier,
        };
        if identity.id().is_none() {
            identity::draw_when_leading(
                replica.raft.clone(),
                identity.clone(),
                opts.id,
                Duration::from_millis(opts.raft.heartbeat_ms),
            );
        }
        if decision == Some(Decision::Bootstrap) {
            let cluster_id = identity.draw()?;
            let members: BTreeMap<NodeId, Node> = opts
                .initial_cluster
                .iter()
                .map(|(id, addr)| (*id, Node { addr: addr.clone() }))
                .collect();
            match replica.raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(members = ?opts.initial_cluster, %cluster_id, "initialised a new cluster")
                }
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::info!("cluster already initialised")
                }
                Err(e) => return Err(StartError::Raft(e.to_string())),
            }
        } else if let Some(Decision::Wait(why)) = decision {
            tracing::info!("new data directory: {why}");
        } else if pristine {
            tracing::info!("new data directory: waiting for the cluster to contact this replica");
        } else {
            tracing::info!("restarting from existing data; not initialising");
            replica.hold_elections_after_restart(RESTART_ELECTION_GRACE);
        }
        Ok(replica)
    }

    /// What an empty data directory does: bootstrap, wait, or refuse (an error).
    async fn decide_empty_start(
        opts: &ReplicaOptions,
        probe: bool,
    ) -> Result<Decision, StartError> {
        let mut peers = opts.initial_cluster.clone();
        peers.extend(opts.peer_addresses.clone());
        let answers = match probe {
            true => identity::probe(opts.id, &peers, opts.peer_tls.as_ref(), PROBE_TIMEOUT).await,
            false => Vec::new(),
        };
        let address = opts
            .initial_cluster
            .get(&opts.id)
            .map_or("ADDR", String::as_str);
        for a in &answers {
            tracing::info!(
                peer = a.node_id,
                cluster_id = %a.cluster_id,
                has_data = a.has_data,
                voters = ?a.voters,
                learners = ?a.learners,
                seen_with_data = ?a.seen_with_data,
                "a peer's view of the cluster"
            );
        }
        let bootstrapper = opts.initial_cluster.keys().next() == Some(&opts.id);
        match identity::decide(
            opts.id,
            address,
            opts.initial_cluster_state,
            bootstrapper,
            &answers,
        ) {
            Decision::Refuse(why) => Err(StartError::Refused(why)),
            other => Ok(other),
        }
    }

    /// Keeps this replica from starting an election until it has heard from a leader or
    /// `grace` has passed.
    fn hold_elections_after_restart(&self, grace: Duration) {
        self.raft.runtime_config().elect(false);
        let raft = self.raft.clone();
        tokio::spawn(async move {
            let heard = raft
                .wait(Some(grace))
                .metrics(|m| m.current_leader.is_some(), "a leader is known")
                .await;
            if heard.is_err() {
                tracing::info!(
                    grace = ?grace,
                    "no leader heard since the restart; taking part in elections"
                );
            }
            raft.runtime_config().elect(true);
        });
    }

    /// Proposes a command and waits until it is committed and applied here; returns the
    /// state machine's answer. Concurrent proposals share log entries (see
    /// [`super::batcher`]).
    pub async fn propose(
        &self,
        command: Command,
    ) -> Result<Result<Response, Rejection>, WriteError> {
        self.batcher
            .propose(command)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// [`Self::propose`], also returning the log index the command was applied at (for
    /// callers that wait for other replicas to apply it).
    pub async fn propose_indexed(
        &self,
        command: Command,
    ) -> Result<(Result<Response, Rejection>, u64), WriteError> {
        self.batcher.propose(command).await
    }

    /// Waits until this replica may serve a linearizable read: it is the leader, a
    /// quorum confirmed it, and it applied everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), WriteError> {
        self.barrier.wait().await
    }

    /// Adds a replica as a learner and, if `promote`, makes it a voter once it caught up.
    /// Not caught up within [`CATCH_UP_WAIT`]: refused (it stays a learner; call again).
    pub async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        promote: bool,
    ) -> Result<(), WriteError> {
        // Not openraft's blocking add: it counts a learner within
        // `replication_lag_threshold` (5000 entries) of the leader as caught up, even one
        // that never answered, so a small cluster would promote an empty, unstarted
        // replica at once (a voter without the log: what replace-node must avoid).
        let added = self
            .raft
            .add_learner(id, Node { addr }, false)
            .await
            .map_err(write_error)?;
        if promote {
            self.wait_caught_up(id, added.log_id.index, CATCH_UP_WAIT)
                .await?;
            let mut voters: std::collections::BTreeSet<NodeId> = self
                .metrics()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            voters.insert(id);
            self.raft
                .change_membership(voters, false)
                .await
                .map_err(write_error)?;
        }
        Ok(())
    }

    /// Waits until this leader has replicated to `id` everything up to `index` (the
    /// entry that added it: the whole log as of then), at most `wait`.
    async fn wait_caught_up(
        &self,
        id: NodeId,
        index: u64,
        wait: Duration,
    ) -> Result<(), WriteError> {
        let mut metrics = self.raft.metrics();
        let mut matched = None;
        let waited = tokio::time::timeout(wait, async {
            loop {
                {
                    let m = metrics.borrow_and_update();
                    let Some(replication) = &m.replication else {
                        return Err(WriteError::NotLeader { leader: None });
                    };
                    matched = replication.get(&id).cloned().flatten().map(|l| l.index);
                    if matched.is_some_and(|i| i >= index) {
                        return Ok(());
                    }
                }
                if metrics.changed().await.is_err() {
                    return Err(WriteError::Fatal("the Raft core stopped".into()));
                }
            }
        })
        .await;
        match waited {
            Ok(result) => result,
            Err(_) => Err(WriteError::Membership(format!(
                "replica {id} is a learner but has not caught up yet (it has {} of {index} entries after {}s): is it running and reachable? Call again to promote it",
                matched.map_or("none".to_string(), |i| i.to_string()),
                wait.as_secs()
            ))),
        }
    }

    /// Removes a replica from the cluster: a voter through joint consensus (removed
    /// voters are not kept as learners), a learner directly.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), WriteError> {
        let membership = self.metrics().membership_config.membership().clone();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            let rest: std::collections::BTreeSet<NodeId> =
                voters.into_iter().filter(|v| *v != id).collect();
            if rest.is_empty() {
                return Err(WriteError::Membership(
                    "cannot remove the last voter".into(),
                ));
            }
            openraft::ChangeMembers::ReplaceAllVoters(rest)
        } else if membership.get_node(&id).is_some() {
            openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id]))
        } else {
            return Err(WriteError::Membership(format!(
                "replica {id} is not a member"
            )));
        };
        self.raft
            .change_membership(change, false)
            .await
            .map_err(write_error)?;
        Ok(())
    }

    /// Current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// The leader's id and address, if known; this replica only once a quorum confirmed
    /// it in its current term ([`reported_leader`]).
    pub fn leader(&self) -> Option<(NodeId, String)> {
        self.leader_in_term().map(|(id, addr, _)| (id, addr))
    }

    /// As [`Replica::leader`], with the term in which this replica knows it (from the
    /// same metrics, so the two belong together).
    pub fn leader_in_term(&self) -> Option<(NodeId, String, u64)> {
        let m = self.metrics();
        let id = reported_leader(&m, self.id)?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        Some((id, addr, m.current_term))
    }

    /// Size of the Raft log database on disk.
    pub fn log_size_on_disk(&self) -> u64 {
        self.log.size_on_disk()
    }

    /// Stops Raft. Pending writes fail; storage is flushed by sled on drop.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }

    /// Waits up to `timeout` for some leader to be known.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }
}
