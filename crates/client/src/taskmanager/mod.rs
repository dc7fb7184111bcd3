//! The TaskManager agent: registers its slots and labels, heartbeats the leader, and on
//! every heartbeat reconciles: it runs exactly the attempts the leader assigns to it,
//! kills the rest, and reports every transition (DEPLOYING, RUNNING, FINISHED, FAILED,
//! CANCELED) with its attempt number.
//!
//! Reports travel in heartbeats and are kept until a heartbeat carrying them is
//! acknowledged, so a dispatcher failover loses none. A dispatcher failover does not touch
//! running tasks: the agent keeps them running while it looks for the new leader. When
//! the leader answers that this TaskManager is not registered (its lease ran out during a
//! network blip), it kills everything it runs and registers afresh as a new instance.
//!
//! Every attempt it starts and stops is appended to `<work-dir>/attempts.jsonl`, the
//! TaskManager side of the chaos checker's history.

pub mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio::sync::mpsc;

use crate::client::{Client, ClientConfig};
use dispatcher_proto::v1 as pb;
use runner::{AttemptKey, Exit, Outcome, Running, Work};

/// Flags of the `taskmanager` binary (also `TASKMANAGER_*` environment variables).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "taskmanager",
    version,
    about = "A dispatcher TaskManager: runs the tasks the leader assigns"
)]
pub struct Args {
    /// This TaskManager's id (stable across restarts).
    #[arg(long, env = "TASKMANAGER_ID")]
    pub id: String,
    /// Number of task slots.
    #[arg(long, env = "TASKMANAGER_SLOTS", default_value_t = 4)]
    pub slots: u32,
    /// Dispatcher replica addresses, comma-separated.
    #[arg(
        long,
        env = "TASKMANAGER_DISPATCHERS",
        value_delimiter = ',',
        required = true
    )]
    pub dispatchers: Vec<String>,
    /// A label `key=value` for label-aware placement; repeatable.
    #[arg(
        long = "label",
        value_name = "KEY=VALUE",
        env = "TASKMANAGER_LABELS",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,
    /// Working directory: task directories, logs, pid files (default `./tm-work/<id>`).
    #[arg(long, env = "TASKMANAGER_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Address shown in `taskmanager list` (informational).
    #[arg(long, env = "TASKMANAGER_ADDRESS")]
    pub address: Option<String>,
    /// Time a cancelled process gets between SIGTERM and SIGKILL, in milliseconds.
    #[arg(long, env = "TASKMANAGER_KILL_GRACE_MS", default_value_t = 3000)]
    pub kill_grace_ms: u64,
}

/// A validated TaskManager configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Id.
    pub id: String,
    /// Slots.
    pub slots: u32,
    /// Dispatcher endpoints.
    pub dispatchers: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Working directory.
    pub work_dir: PathBuf,
    /// Informational address.
    pub address: String,
    /// SIGTERM-to-SIGKILL grace.
    pub kill_grace: Duration,
}

impl Args {
    /// Validates the flags.
    pub fn into_config(self) -> Result<Config, String> {
        if self.id.trim().is_empty() {
            return Err("--id must not be empty".into());
        }
        if self.slots == 0 {
            return Err("--slots must be at least 1".into());
        }
        let mut labels = BTreeMap::new();
        for l in &self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| format!("--label {l:?} is not KEY=VALUE"))?;
            if k.is_empty() {
                return Err(format!("--label {l:?} has an empty key"));
            }
            labels.insert(k.to_string(), v.to_string());
        }
        let dispatchers: Vec<String> = self
            .dispatchers
            .into_iter()
            .filter(|d| !d.is_empty())
            .collect();
        if dispatchers.is_empty() {
            return Err("--dispatchers needs at least one address".into());
        }
        Ok(Config {
            work_dir: self
                .work_dir
                .unwrap_or_else(|| PathBuf::from("tm-work").join(&self.id)),
            address: self.address.unwrap_or_else(|| hostname_or_local(&self.id)),
            id: self.id,
            slots: self.slots,
            dispatchers,
            labels,
            kill_grace: Duration::from_millis(self.kill_grace_ms),
        })
    }
}

fn hostname_or_local(id: &str) -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("local/{id}"))
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The work directory cannot be used.
    #[error("work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The client could not be created.
    #[error("{0}")]
    Client(#[from] crate::client::ClientError),
}

struct Attempt {
    running: Running,
    slot: u32,
}

struct Agent {
    config: Config,
    client: Client,
    instance: String,
    running: BTreeMap<AttemptKey, Attempt>,
    /// Attempts that ended here; never started again.
    done: BTreeSet<AttemptKey>,
    /// Reports not yet acknowledged by a heartbeat.
    pending: Vec<pb::TaskStatusUpdate>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    heartbeat: Duration,
    history: Option<std::fs::File>,
}

fn now_ms() -> u64 {
    dispatcher_proto::wall_clock_ms()
}

impl Agent {
    fn pid_dir(&self) -> PathBuf {
        self.config.work_dir.join("pids")
    }

    fn record(&mut self, event: &str, key: &AttemptKey, slot: u32, detail: &str) {
        if let Some(f) = self.history.as_mut() {
            let line = serde_json::json!({
                "at_ms": now_ms(), "event": event, "task_manager": self.config.id,
                "instance": self.instance, "job_id": key.job, "vertex": key.vertex,
                "subtask": key.subtask, "attempt": key.attempt, "slot": slot, "detail": detail,
            });
            let _ = writeln!(f, "{line}");
        }
    }

    fn report(
        &mut self,
        key: &AttemptKey,
        state: pb::TaskState,
        exit_code: Option<i32>,
        reason: String,
    ) {
        self.pending.push(pb::TaskStatusUpdate {
            job_id: key.job.clone(),
            vertex: key.vertex.clone(),
            subtask: key.subtask,
            attempt: key.attempt,
            state: state as i32,
            exit_code,
            failure_reason: reason,
            observed_at_ms: now_ms(),
        });
    }

    async fn register(&mut self) {
        loop {
            let req = pb::RegisterRequest {
                task_manager_id: self.config.id.clone(),
                instance_id: self.instance.clone(),
                address: self.config.address.clone(),
                slots: self.config.slots,
                labels: self.config.labels.clone(),
            };
            match self.client.register_task_manager(req).await {
                Ok(resp) => {
                    self.heartbeat = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
                    tracing::info!(instance = %self.instance, heartbeat = ?self.heartbeat, "registered");
                    self.reconcile(resp.assignments);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// Stops attempts whose job is winding down; reports the ones never started as
    /// CANCELED so that their slots are freed.
    fn stop(&mut self, stop: Vec<pb::TaskAssignment>) {
        for a in stop {
            let key = AttemptKey::of(&a);
            match self.running.get_mut(&key) {
                Some(r) if !r.running.cancelling() => {
                    tracing::info!(attempt = ?key, "job winding down: stopping it");
                    r.running.cancel();
                }
                Some(_) => {}
                None if !self.done.contains(&key) => {
                    self.report(
                        &key,
                        pb::TaskState::Canceled,
                        None,
                        "stopped before it started".into(),
                    );
                    self.done.insert(key);
                }
                None => {}
            }
        }
    }

    /// Makes what runs here equal to what the leader assigns.
    fn reconcile(&mut self, assignments: Vec<pb::TaskAssignment>) {
        let mut desired: BTreeMap<AttemptKey, pb::TaskAssignment> = BTreeMap::new();
        for a in assignments {
            let key = AttemptKey::of(&a);
            desired.insert(key, a);
        }
        let unwanted: Vec<AttemptKey> = self
            .running
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for key in unwanted {
            if let Some(a) = self.running.get_mut(&key) {
                if !a.running.cancelling() {
                    tracing::info!(attempt = ?key, "not assigned any more: stopping it");
                    a.running.cancel();
                }
            }
        }
        for (key, a) in desired {
            if self.running.contains_key(&key) || self.done.contains(&key) {
                continue;
            }
            let work = match a.task.and_then(|t| t.kind) {
                Some(pb::task::Kind::Command(c)) => Work::Command {
                    argv: c.argv,
                    env: c.env,
                },
                Some(pb::task::Kind::Sleep(s)) => Work::Sleep(Duration::from_millis(s.duration_ms)),
                Some(pb::task::Kind::Fail(f)) => {
                    Work::Fail(Duration::from_millis(f.after_ms), f.exit_code)
                }
                None => {
                    self.report(
                        &key,
                        pb::TaskState::Failed,
                        None,
                        "assignment without a task".into(),
                    );
                    self.done.insert(key);
                    continue;
                }
            };
            self.report(&key, pb::TaskState::Deploying, None, String::new());
            let task_dir = self.config.work_dir.join("tasks").join(key.file_name());
            let env = BTreeMap::from([
                ("DISPATCHER_JOB_ID".to_string(), key.job.clone()),
                ("DISPATCHER_VERTEX".to_string(), key.vertex.clone()),
                ("DISPATCHER_SUBTASK".to_string(), key.subtask.to_string()),
                ("DISPATCHER_ATTEMPT".to_string(), key.attempt.to_string()),
                ("DISPATCHER_SLOT".to_string(), a.slot.to_string()),
                (
                    "DISPATCHER_TASK_MANAGER".to_string(),
                    self.config.id.clone(),
                ),
            ]);
            let running = runner::start(
                key.clone(),
                work,
                task_dir,
                &self.pid_dir(),
                env,
                self.config.kill_grace,
                self.exits_tx.clone(),
            );
            let pid = running
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "builtin".into());
            tracing::info!(attempt = ?key, slot = a.slot, pid = %pid, "started");
            self.record("start", &key, a.slot, &format!("pid {pid}"));
            self.report(&key, pb::TaskState::Running, None, String::new());
            self.running.insert(
                key,
                Attempt {
                    running,
                    slot: a.slot,
                },
            );
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(a) = self.running.remove(&exit.key) else {
            return;
        };
        let (state, code, reason) = match &exit.outcome {
            Outcome::Finished => (pb::TaskState::Finished, Some(0), String::new()),
            Outcome::Failed { exit_code, reason } => {
                (pb::TaskState::Failed, *exit_code, reason.clone())
            }
            Outcome::Canceled => (
                pb::TaskState::Canceled,
                None,
                "canceled by the TaskManager on the leader's request".into(),
            ),
        };
        tracing::info!(attempt = ?exit.key, outcome = ?exit.outcome, "ended");
        self.record("stop", &exit.key, a.slot, &format!("{:?}", exit.outcome));
        self.report(&exit.key, state, code, reason);
        self.done.insert(exit.key);
    }

    /// Kills everything at once (the registration is gone) and forgets pending reports,
    /// which the state would ignore anyway.
    async fn kill_all(&mut self, exits: &mut mpsc::UnboundedReceiver<Exit>) {
        for a in self.running.values_mut() {
            a.running.cancel();
        }
        while !self.running.is_empty() {
            match exits.recv().await {
                Some(exit) => self.on_exit(exit),
                None => break,
            }
        }
        self.pending.clear();
    }

    /// Sends the pending reports without acting on the answer (on the way out).
    async fn flush_reports(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let req = pb::HeartbeatRequest {
            task_manager_id: self.config.id.clone(),
            instance_id: self.instance.clone(),
            updates: std::mem::take(&mut self.pending),
        };
        if let Err(e) = self.client.heartbeat(req).await {
            tracing::warn!(error = %e, "could not send the last reports");
        }
    }

    /// One heartbeat: sends pending reports, reconciles with the answer. Returns false
    /// when this instance is no longer registered (everything was killed): the caller
    /// registers afresh.
    async fn heartbeat(&mut self, exits: &mut mpsc::UnboundedReceiver<Exit>) -> bool {
        let sent = self.pending.len();
        let req = pb::HeartbeatRequest {
            task_manager_id: self.config.id.clone(),
            instance_id: self.instance.clone(),
            updates: self.pending.clone(),
        };
        match self.client.heartbeat(req).await {
            Ok(resp) if resp.registered => {
                self.pending.drain(..sent);
                self.heartbeat = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
                let assigned: BTreeSet<AttemptKey> =
                    resp.assignments.iter().map(AttemptKey::of).collect();
                // Ended attempts can be forgotten once their report was acknowledged and
                // the leader stopped assigning them.
                let stopping: BTreeSet<AttemptKey> = resp.stop.iter().map(AttemptKey::of).collect();
                if self.pending.is_empty() {
                    self.done
                        .retain(|k| assigned.contains(k) || stopping.contains(k));
                }
                self.stop(resp.stop);
                self.reconcile(resp.assignments);
            }
            Ok(_) => {
                tracing::warn!(instance = %self.instance, "the leader does not know this instance (lease expired?): killing all tasks and registering afresh");
                self.kill_all(exits).await;
                self.done.clear();
                self.instance = uuid::Uuid::new_v4().to_string();
                return false;
            }
            Err(e) => {
                tracing::warn!(error = %e, pending = self.pending.len(), "heartbeat failed; tasks keep running")
            }
        }
        true
    }
}

/// Runs a TaskManager until `shutdown` completes; then stops its tasks (SIGTERM, then
/// SIGKILL), reports them and unregisters.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let work_err = |path: PathBuf| move |source| AgentError::WorkDir { path, source };
    let pid_dir = config.work_dir.join("pids");
    std::fs::create_dir_all(&pid_dir).map_err(work_err(pid_dir.clone()))?;
    let killed = runner::kill_orphans(&pid_dir);
    if killed > 0 {
        tracing::warn!(killed, "killed orphaned task processes of a previous run");
    }
    let history_path = config.work_dir.join("attempts.jsonl");
    let history = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&history_path)
        .map_err(work_err(history_path.clone()))?;
    let mut client_config = ClientConfig::new(config.dispatchers.clone());
    client_config.timeout = Duration::from_secs(3);
    client_config.per_try_timeout = Duration::from_secs(1);
    let client = Client::new(client_config)?;
    let (exits_tx, mut exits) = mpsc::unbounded_channel();
    let mut agent = Agent {
        instance: uuid::Uuid::new_v4().to_string(),
        client,
        running: BTreeMap::new(),
        done: BTreeSet::new(),
        pending: Vec::new(),
        exits_tx,
        heartbeat: Duration::from_millis(500),
        history: Some(history),
        config,
    };
    tokio::pin!(shutdown);
    tokio::select! {
        _ = agent.register() => {}
        _ = &mut shutdown => return Ok(()),
    }
    let mut next = tokio::time::Instant::now() + agent.heartbeat;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if !agent.heartbeat(&mut exits).await {
                    tokio::select! {
                        _ = agent.register() => {}
                        _ = &mut shutdown => break,
                    }
                }
                next = tokio::time::Instant::now() + agent.heartbeat;
            }
            Some(exit) = exits.recv() => {
                agent.on_exit(exit);
                // Report an ended attempt promptly rather than at the next tick.
                next = next.min(tokio::time::Instant::now() + Duration::from_millis(20));
            }
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("shutting down: stopping tasks");
    for a in agent.running.values_mut() {
        a.running.cancel();
    }
    while !agent.running.is_empty() {
        match exits.recv().await {
            Some(exit) => agent.on_exit(exit),
            None => break,
        }
    }
    // Report how the attempts ended (a task that FINISHED just before the signal must
    // not be failed by the unregistration), then unregister: the attempts that were
    // still running fail, so their jobs restart elsewhere.
    agent.flush_reports().await;
    let _ = agent
        .client
        .unregister_task_manager(pb::UnregisterRequest {
            task_manager_id: agent.config.id.clone(),
            instance_id: agent.instance.clone(),
        })
        .await;
    Ok(())
}
