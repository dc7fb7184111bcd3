//! The leader's duties that depend on time: TaskManager leases, due restarts, and the
//! retention purge. They turn wall-clock time into commands, so the state machine stays
//! pure.
//!
//! Heartbeats are not Raft writes: the leader keeps, in memory, when it last heard from
//! each TaskManager instance. When a lease runs out it proposes ExpireTaskManager. A new
//! leader has no such memory, so it first grants every registered TaskManager a grace
//! period of one lease before it may expire any: a leader failover never expires a live
//! TaskManager, and so never restarts a running task.
//!
//! Architecture invariant: knows Raft (it proposes commands) but no gRPC service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::raft::replica::Replica;
use dispatcher_core::state::{Command, TaskManagerId};

/// Liveness settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LivenessSettings {
    /// How often TaskManagers heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// A TaskManager not heard from for this long is expired. Also the grace period a
    /// new leader grants.
    pub lease_timeout: Duration,
    /// How often the leader looks for expired leases and due restarts.
    pub tick: Duration,
    /// How often the leader proposes the retention purge when one is due.
    pub purge_every: Duration,
}

impl Default for LivenessSettings {
    fn default() -> Self {
        // 500 ms heartbeats and a 4 s lease: eight missed heartbeats, enough to ride out a
        // dispatcher failover (~0.6 s) and a TaskManager's reconnection, yet a dead
        // TaskManager's tasks are rescheduled in seconds, not Flink's 50 s.
        LivenessSettings {
            heartbeat_interval: Duration::from_millis(500),
            lease_timeout: Duration::from_secs(4),
            tick: Duration::from_millis(100),
            purge_every: Duration::from_secs(10),
        }
    }
}

#[derive(Default)]
struct Memory {
    /// The term this memory belongs to; reset when leadership changes.
    term: Option<u64>,
    /// Until when no TaskManager may be expired (set when leadership is gained).
    grace_until: Option<Instant>,
    /// When each TaskManager instance was last heard from, by this leader.
    last_seen: HashMap<TaskManagerId, (String, Instant)>,
}

/// In-memory heartbeat tracking, shared by the TaskManager service and the duty loop.
#[derive(Clone)]
pub struct Liveness {
    memory: Arc<Mutex<Memory>>,
    /// TaskManagers expired by this replica as leader (for metrics).
    expired: Arc<std::sync::atomic::AtomicU64>,
    /// The settings.
    pub settings: LivenessSettings,
}

impl Liveness {
    /// Empty tracking.
    pub fn new(settings: LivenessSettings) -> Self {
        Liveness {
            memory: Arc::new(Mutex::new(Memory::default())),
            expired: Arc::default(),
            settings,
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat (or registration) of a TaskManager instance.
    pub fn seen(&self, id: &TaskManagerId, instance: &str) {
        self.memory()
            .last_seen
            .insert(id.clone(), (instance.to_string(), Instant::now()));
    }

    /// Time since each TaskManager's last heartbeat, as this replica heard them while
    /// leading (empty on a follower).
    pub fn heartbeat_ages(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        self.memory()
            .last_seen
            .iter()
            .map(|(id, (_, at))| (id.0.clone(), now.saturating_duration_since(*at)))
            .collect()
    }

    /// The counter of TaskManagers this replica expired as leader.
    pub fn expired_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.expired.clone()
    }

    /// Forgets a TaskManager (unregistered or expired).
    pub fn forget(&self, id: &TaskManagerId) {
        self.memory().last_seen.remove(id);
    }
}

/// The leader's clock, in milliseconds since the epoch, for the commands it proposes.
pub fn wall_clock_ms() -> u64 {
    dispatcher_proto::wall_clock_ms()
}

/// Runs the duties while this replica leads; returns when the replica shuts down.
pub async fn run(replica: Replica, liveness: Liveness) {
    let mut ticker = tokio::time::interval(liveness.settings.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_purge = Instant::now();
    loop {
        ticker.tick().await;
        let m = replica.metrics();
        if m.state == ServerState::Shutdown {
            return;
        }
        if m.state != ServerState::Leader {
            let mut mem = liveness.memory();
            mem.term = None;
            mem.grace_until = None;
            mem.last_seen.clear();
            continue;
        }
        let now = Instant::now();
        {
            let mut mem = liveness.memory();
            if mem.term != Some(m.current_term) {
                // New leadership: nobody's heartbeat is known yet; grant everyone a lease.
                mem.term = Some(m.current_term);
                mem.grace_until = Some(now + liveness.settings.lease_timeout);
                mem.last_seen.clear();
                tracing::info!(term = m.current_term, grace = ?liveness.settings.lease_timeout, "leading: TaskManagers get a grace period");
            }
        }
        let now_ms = wall_clock_ms();
        let mut commands = Vec::new();
        {
            let applied = replica.state.read();
            let mut mem = liveness.memory();
            let in_grace = mem.grace_until.is_some_and(|g| now < g);
            for tm in applied.state.task_managers() {
                let id = &tm.spec.id;
                let fresh = match mem.last_seen.get(id) {
                    Some((instance, at)) if *instance == tm.spec.instance => {
                        now.duration_since(*at) <= liveness.settings.lease_timeout
                    }
                    // Registered before this leadership, or a new instance we have not
                    // heard from: its lease starts now.
                    _ => {
                        mem.last_seen
                            .insert(id.clone(), (tm.spec.instance.clone(), now));
                        true
                    }
                };
                if !fresh && !in_grace {
                    commands.push(Command::ExpireTaskManager {
                        id: id.clone(),
                        instance: tm.spec.instance.clone(),
                        now: now_ms,
                    });
                }
            }
            for job_id in applied.state.restarts_due(now_ms) {
                commands.push(Command::RestartTasks {
                    job_id,
                    now: now_ms,
                });
            }
            if now.duration_since(last_purge) >= liveness.settings.purge_every
                && applied.state.purge_due(now_ms)
            {
                last_purge = now;
                commands.push(Command::PurgeFinishedJobs { now: now_ms });
            }
        }
        for cmd in commands {
            if let Command::ExpireTaskManager { id, .. } = &cmd {
                tracing::warn!(task_manager = %id, "lease expired; failing its tasks");
                liveness.forget(id);
            }
            let name = cmd.name();
            let expiry = matches!(cmd, Command::ExpireTaskManager { .. });
            match replica.propose(cmd).await {
                Ok(Ok(_)) if expiry => {
                    liveness
                        .expired
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(command = name, error = %e, "leader duty not committed");
                    break;
                }
            }
        }
    }
}
