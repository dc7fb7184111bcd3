//! The replica's Prometheus metrics: what the edge and the leader's duties count as they
//! go (rejections, forwards, submission latency, leader changes, expired TaskManagers,
//! log append and sync latency), and what a scrape reads at that moment (Raft from
//! openraft's metrics watch, jobs, tasks, slots and TaskManagers from the applied state,
//! heartbeat ages from the leader's memory, open watches).
//!
//! Owns the names and help texts (docs/api.md lists them) and the text exposition
//! (`prometheus-client`). Must never hold the state lock while walking jobs, never
//! encode or hash the state, and never block apply: a scrape takes the counters and an
//! O(1) view of the state's persistent maps under the lock, then counts tasks off it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::raft::replica::Replica;
use dispatcher_core::state::{JobState, TaskState};

/// Labels naming an RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The method, e.g. `submit_job`.
    pub rpc: String,
}

/// Labels naming an RPC and the gRPC code it was refused with.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    /// The method.
    pub rpc: String,
    /// The gRPC code, e.g. `Unauthenticated`.
    pub code: String,
}

/// A state label (job, task or Raft role).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// The state's name, e.g. `RUNNING`.
    pub state: String,
}

/// A peer replica.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's replica id.
    pub peer: String,
}

/// A TaskManager.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskManagerLabels {
    /// Its id.
    pub task_manager: String,
}

/// Latency of the log store's work, shared by every log store of the process (one per
/// replica; a test process running several replicas sums them).
pub struct StorageMetrics {
    /// Writing entries into sled (the append call, before the sync).
    pub append: Histogram,
    /// One flush plus fdatasync of the log (a group commit of every append queued).
    pub sync: Histogram,
}

/// The log store's histograms (see [`StorageMetrics`]).
pub static STORAGE: LazyLock<StorageMetrics> = LazyLock::new(|| StorageMetrics {
    append: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
    sync: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
});

/// Every metric of one replica.
pub struct Metrics {
    registry: Registry,
    /// Calls refused, by RPC and gRPC code (HTTP routes count under their gRPC call).
    pub rejected: Family<RejectedLabels, Counter>,
    /// Calls this replica forwarded to the leader and got the leader's answer for.
    pub forwarded: Family<RpcLabels, Counter>,
    /// SubmitJob from arrival to answer, at the replica the client called.
    pub submit_latency: Histogram,
    /// Times the known leader changed (to another replica or to none).
    pub leader_changes: Counter,
    // Read at each scrape.
    raft_term: Gauge,
    raft_role: Family<StateLabels, Gauge>,
    raft_leader: Gauge,
    raft_last_log_index: Gauge,
    raft_applied_index: Gauge,
    raft_commit_index: Gauge,
    raft_replication_lag: Family<PeerLabels, Gauge>,
    jobs: Family<StateLabels, Gauge>,
    tasks: Family<StateLabels, Gauge>,
    slots_total: Gauge,
    slots_free: Gauge,
    task_managers: Gauge,
    expired_total: Counter,
    heartbeat_age: Family<TaskManagerLabels, Gauge<f64, AtomicU64>>,
    watch_streams: Gauge,
    watched_jobs: Gauge,
    /// One scrape at a time: a scrape clears and refills the per-label families.
    scrape: tokio::sync::Mutex<()>,
}

/// What a scrape reads besides the replica: the leader's heartbeat memory and the
/// watch registry's counts.
pub struct ScrapeSources {
    /// TaskManager id and time since its last heartbeat, known only on the leader.
    pub heartbeat_ages: Vec<(String, Duration)>,
    /// Jobs watched and open WatchJob streams, on this replica.
    pub watches: (usize, usize),
    /// TaskManagers this replica expired while it led, since it started.
    pub expired: u64,
}

const JOB_STATES: [JobState; 8] = [
    JobState::Created,
    JobState::Running,
    JobState::Failing,
    JobState::Failed,
    JobState::Cancelling,
    JobState::Canceled,
    JobState::Finished,
    JobState::Restarting,
];

/// The Flink name of a job state.
pub fn job_state_name(s: JobState) -> &'static str {
    match s {
        JobState::Created => "CREATED",
        JobState::Running => "RUNNING",
        JobState::Failing => "FAILING",
        JobState::Failed => "FAILED",
        JobState::Cancelling => "CANCELLING",
        JobState::Canceled => "CANCELED",
        JobState::Finished => "FINISHED",
        JobState::Restarting => "RESTARTING",
    }
}

/// The Flink name of a task state.
pub fn task_state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Scheduled => "SCHEDULED",
        TaskState::Deploying => "DEPLOYING",
        TaskState::Running => "RUNNING",
        TaskState::Finished => "FINISHED",
        TaskState::Canceled => "CANCELED",
        TaskState::Failed => "FAILED",
    }
}

const TASK_STATES: [TaskState; 6] = [
    TaskState::Scheduled,
    TaskState::Deploying,
    TaskState::Running,
    TaskState::Finished,
    TaskState::Canceled,
    TaskState::Failed,
];

fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            rejected: Family::default(),
            forwarded: Family::default(),
            submit_latency: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            leader_changes: Counter::default(),
            raft_term: Gauge::default(),
            raft_role: Family::default(),
            raft_leader: Gauge::default(),
            raft_last_log_index: Gauge::default(),
            raft_applied_index: Gauge::default(),
            raft_commit_index: Gauge::default(),
            raft_replication_lag: Family::default(),
            jobs: Family::default(),
            tasks: Family::default(),
            slots_total: Gauge::default(),
            slots_free: Gauge::default(),
            task_managers: Gauge::default(),
            expired_total: Counter::default(),
            heartbeat_age: Family::default(),
            watch_streams: Gauge::default(),
            watched_jobs: Gauge::default(),
            scrape: tokio::sync::Mutex::new(()),
        };
        let r = &mut m.registry;
        macro_rules! reg {
            ($name:expr, $help:expr, $metric:expr) => {
                r.register(concat!("dispatcher_", $name), $help, $metric)
            };
        }
        reg!(
            "raft_term",
            "Current Raft term of this replica",
            m.raft_term.clone()
        );
        reg!("raft_role", "1 for this replica's Raft role (leader, follower, candidate, learner, shutdown), 0 for the others", m.raft_role.clone());
        reg!(
            "raft_leader_id",
            "Replica id of the leader this replica knows; 0 if none",
            m.raft_leader.clone()
        );
        reg!(
            "raft_last_log_index",
            "Index of the last entry in this replica's log",
            m.raft_last_log_index.clone()
        );
        reg!(
            "raft_applied_index",
            "Index of the last entry applied to this replica's state machine",
            m.raft_applied_index.clone()
        );
        reg!("raft_commit_index", "Highest index a quorum holds, as the leader computes it from replication; on a follower, its applied index (a lower bound)", m.raft_commit_index.clone());
        reg!(
            "raft_leader_changes",
            "Times the leader known to this replica changed",
            m.leader_changes.clone()
        );
        reg!(
            "raft_replication_lag_entries",
            "On the leader: entries each peer's log is behind the leader's last log index",
            m.raft_replication_lag.clone()
        );
        reg!(
            "raft_log_append_seconds",
            "Time to write appended entries into the log store (sled), before the sync",
            STORAGE.append.clone()
        );
        reg!(
            "raft_log_sync_seconds",
            "Time of one flush and fdatasync of the log (one group commit)",
            STORAGE.sync.clone()
        );
        reg!(
            "jobs",
            "Jobs in the registry by state (applied state of this replica)",
            m.jobs.clone()
        );
        reg!(
            "tasks",
            "Subtasks by the state of their current attempt (applied state of this replica)",
            m.tasks.clone()
        );
        reg!(
            "slots_total",
            "Slots of all registered TaskManagers",
            m.slots_total.clone()
        );
        reg!(
            "slots_free",
            "Slots holding no task attempt",
            m.slots_free.clone()
        );
        reg!(
            "taskmanagers_alive",
            "Registered TaskManagers (not expired or unregistered)",
            m.task_managers.clone()
        );
        reg!(
            "taskmanagers_expired",
            "TaskManagers this replica expired while it led (lease ran out)",
            m.expired_total.clone()
        );
        reg!(
            "taskmanager_heartbeat_age_seconds",
            "On the leader: time since each TaskManager's last heartbeat",
            m.heartbeat_age.clone()
        );
        reg!(
            "submit_latency_seconds",
            "SubmitJob latency at the replica the client called, forwarding included",
            m.submit_latency.clone()
        );
        reg!(
            "requests_forwarded",
            "Calls this replica forwarded to the leader, by RPC",
            m.forwarded.clone()
        );
        reg!(
            "requests_rejected",
            "Calls answered with an error, by RPC and gRPC code",
            m.rejected.clone()
        );
        reg!(
            "watch_streams",
            "Open WatchJob streams on this replica",
            m.watch_streams.clone()
        );
        reg!(
            "watched_jobs",
            "Jobs with at least one open WatchJob stream on this replica",
            m.watched_jobs.clone()
        );
        m
    }

    /// Counts a refused call.
    pub fn reject(&self, rpc: &str, code: tonic::Code) {
        self.rejected
            .get_or_create(&RejectedLabels {
                rpc: rpc.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Counts a call answered by the leader through this replica.
    pub fn forward(&self, rpc: &str) {
        self.forwarded
            .get_or_create(&RpcLabels {
                rpc: rpc.to_string(),
            })
            .inc();
    }

    /// Reads the scrape-time values and returns the text exposition.
    pub async fn scrape(&self, replica: &Replica, sources: ScrapeSources) -> String {
        let _one = self.scrape.lock().await;
        self.read_raft(replica);
        self.read_state(replica);
        self.heartbeat_age.clear();
        for (tm, age) in sources.heartbeat_ages {
            self.heartbeat_age
                .get_or_create(&TaskManagerLabels { task_manager: tm })
                .set(age.as_secs_f64());
        }
        self.watch_streams.set(sources.watches.1 as i64);
        self.watched_jobs.set(sources.watches.0 as i64);
        let expired = sources.expired;
        let seen = self.expired_total.get();
        if expired > seen {
            self.expired_total.inc_by(expired - seen);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    fn read_raft(&self, replica: &Replica) {
        let m = replica.metrics();
        self.raft_term.set(m.current_term as i64);
        for s in [
            ServerState::Leader,
            ServerState::Follower,
            ServerState::Candidate,
            ServerState::Learner,
            ServerState::Shutdown,
        ] {
            self.raft_role
                .get_or_create(&StateLabels {
                    state: role_name(s).into(),
                })
                .set((m.state == s) as i64);
        }
        self.raft_leader.set(m.current_leader.unwrap_or(0) as i64);
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        self.raft_last_log_index.set(last as i64);
        self.raft_applied_index.set(applied as i64);
        self.raft_replication_lag.clear();
        let mut commit = applied;
        if let Some(replication) = &m.replication {
            let voters: std::collections::BTreeSet<u64> =
                m.membership_config.membership().voter_ids().collect();
            let mut matched = vec![last];
            for (peer, log_id) in replication.iter() {
                let at = log_id.map_or(0, |l| l.index);
                if *peer != m.id {
                    self.raft_replication_lag
                        .get_or_create(&PeerLabels {
                            peer: peer.to_string(),
                        })
                        .set(last.saturating_sub(at) as i64);
                    if voters.contains(peer) {
                        matched.push(at);
                    }
                }
            }
            // The highest index a majority of voters (this leader included) holds.
            matched.sort_unstable_by(|a, b| b.cmp(a));
            let quorum = voters.len().max(1) / 2;
            if let Some(at) = matched.get(quorum) {
                commit = commit.max(*at);
            }
        }
        self.raft_commit_index.set(commit as i64);
    }

    fn read_state(&self, replica: &Replica) {
        // Under the lock: O(1) counters and a view of the persistent maps.
        let (view, counters, task_managers) = {
            let g = replica.state.read();
            (
                g.state.view(),
                g.state.counters().clone(),
                g.state.task_managers().count(),
            )
        };
        for s in JOB_STATES {
            let n = counters.jobs_by_state.get(&s).copied().unwrap_or(0);
            self.jobs
                .get_or_create(&StateLabels {
                    state: job_state_name(s).into(),
                })
                .set(n as i64);
        }
        let mut tasks = [0i64; TASK_STATES.len()];
        for job in view.jobs() {
            for t in &job.tasks {
                if let Some(i) = TASK_STATES.iter().position(|s| *s == t.state) {
                    tasks[i] += 1;
                }
            }
        }
        for (s, n) in TASK_STATES.iter().zip(tasks) {
            self.tasks
                .get_or_create(&StateLabels {
                    state: task_state_name(*s).into(),
                })
                .set(n);
        }
        self.slots_total.set(counters.total_slots as i64);
        self.slots_free.set(counters.free_slots as i64);
        self.task_managers.set(task_managers as i64);
    }
}

/// Counts leader changes from openraft's metrics watch until the replica shuts down.
pub async fn count_leader_changes(replica: Replica, metrics: Arc<Metrics>) {
    let mut rx = replica.raft.metrics();
    let mut leader = rx.borrow_and_update().current_leader;
    while rx.changed().await.is_ok() {
        let now = rx.borrow_and_update().current_leader;
        if now != leader {
            if leader.is_some() || now.is_some() {
                metrics.leader_changes.inc();
            }
            leader = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_documented_metric() {
        let m = Metrics::new();
        m.reject("submit_job", tonic::Code::Unauthenticated);
        m.forward("get_job");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).expect("encode");
        for name in [
            "dispatcher_raft_term",
            "dispatcher_raft_log_sync_seconds_bucket",
            "dispatcher_requests_rejected_total{rpc=\"submit_job\",code=\"Unauthenticated\"} 1",
            "dispatcher_requests_forwarded_total{rpc=\"get_job\"} 1",
            "dispatcher_submit_latency_seconds_count",
        ] {
            assert!(out.contains(name), "{name} missing from\n{out}");
        }
    }
}
