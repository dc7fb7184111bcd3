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
//! TaskManager side of the chaos checker's history, rotated by size ([`history`]). The
//! directories of ended attempts are removed after a retention ([`retention`]); a
//! running attempt's directory never is.
//!
//! Every decision is made by the pure core in [`reconcile`]; this module only feeds it
//! what happened and carries out what it asks for (processes, heartbeats, the history).
//! What a command task may run, and as which user, is [`sandbox`]'s to decide, once at
//! start-up from the flags and again for every task.

pub mod history;
pub mod reconcile;
pub mod retention;
pub mod runner;
pub mod sandbox;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio::sync::mpsc;

use crate::client::{Client, ClientConfig, ConnectArgs, TlsConfig, Token};
use dispatcher_proto::v1 as pb;
use history::History;
use reconcile::{Action, CancelReason, Event, Phase, Reconciler};
use retention::Retention;
use runner::{AttemptKey, Exit, Outcome, Running, Work};
use sandbox::{Sandbox, SandboxArgs};

/// How the agent writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of the `taskmanager` binary (also `TASKMANAGER_*` environment variables).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "taskmanager",
    version,
    about = "A dispatcher TaskManager: runs the tasks the leader assigns"
)]
pub struct Args {
    /// Log format: `text` (plain lines; colour only on a terminal) or `json` (one
    /// object per line).
    #[arg(long, env = "TASKMANAGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
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
    /// Size at which `attempts.jsonl` is rotated to `attempts.jsonl.1`, in bytes.
    #[arg(long, env = "TASKMANAGER_ATTEMPTS_MAX_BYTES", default_value_t = DEFAULT_ATTEMPTS_MAX_BYTES)]
    pub attempts_max_bytes: u64,
    /// Rotated attempt files kept (`attempts.jsonl.1` to `.N`); older ones are deleted.
    #[arg(long, env = "TASKMANAGER_ATTEMPTS_KEEP", default_value_t = 4)]
    pub attempts_keep: u32,
    /// Seconds the directory of an ended attempt is kept before it is removed.
    #[arg(long, env = "TASKMANAGER_RETAIN_FINISHED_SECS", default_value_t = 3600)]
    pub retain_finished_secs: u64,
    /// Directories of ended attempts kept at most; past it the oldest are removed.
    #[arg(
        long,
        env = "TASKMANAGER_RETAIN_FINISHED_COUNT",
        default_value_t = 1000
    )]
    pub retain_finished_count: usize,
    /// What command tasks may run, and as whom.
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// TLS and token, as dispatchctl's (`--ca`, `--cert`, `--key`, `--token-file`, ...).
    #[command(flatten)]
    pub connect: ConnectArgs,
}

/// Default of `--attempts-max-bytes`: 64 MiB, about 250,000 records.
pub const DEFAULT_ATTEMPTS_MAX_BYTES: u64 = 64 << 20;

/// The smallest `--attempts-max-bytes`: a few records (one is about 250 bytes) a file.
pub const MIN_ATTEMPTS_MAX_BYTES: u64 = 4096;

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
    /// Size at which the attempt history is rotated.
    pub attempts_max_bytes: u64,
    /// Rotated history files kept.
    pub attempts_keep: u32,
    /// How long the directory of an ended attempt is kept.
    pub retain_finished: Duration,
    /// How many directories of ended attempts are kept at most.
    pub retain_finished_count: usize,
    /// What command tasks may run, and as whom.
    pub sandbox: Sandbox,
    /// TLS settings for the dispatchers (read from `--ca`, `--cert`, `--key`).
    pub tls: Option<TlsConfig>,
    /// Bearer token (a `taskmanager` token bound to this id). `Debug` redacts it.
    pub token: Option<Token>,
}

impl Args {
    /// Validates the flags; the sandbox flags against this process's user and the
    /// password database.
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
        if self.attempts_max_bytes < MIN_ATTEMPTS_MAX_BYTES {
            return Err(format!(
                "--attempts-max-bytes {} is less than the minimum of {MIN_ATTEMPTS_MAX_BYTES}",
                self.attempts_max_bytes
            ));
        }
        let sandbox = self.sandbox.into_sandbox()?;
        let tls = self.connect.tls().map_err(|e| e.to_string())?;
        let token = self.connect.token().map_err(|e| e.to_string())?;
        Ok(Config {
            tls,
            token,
            work_dir: self
                .work_dir
                .unwrap_or_else(|| PathBuf::from("tm-work").join(&self.id)),
            address: self.address.unwrap_or_else(|| hostname_or_local(&self.id)),
            id: self.id,
            slots: self.slots,
            dispatchers,
            labels,
            kill_grace: Duration::from_millis(self.kill_grace_ms),
            attempts_max_bytes: self.attempts_max_bytes,
            attempts_keep: self.attempts_keep,
            retain_finished: Duration::from_secs(self.retain_finished_secs),
            retain_finished_count: self.retain_finished_count,
            sandbox,
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

/// What the main loop does once the actions of an event ran.
enum Control {
    Continue,
    /// Register as a new instance.
    Reregister,
    /// Send these last reports, then unregister.
    Unregister(Vec<pb::TaskStatusUpdate>),
}

/// The I/O around the reconcile core: processes, heartbeats, the history file.
struct Agent {
    config: Config,
    client: Client,
    instance: String,
    core: Reconciler,
    /// Handles of the attempts started and not yet ended.
    tasks: BTreeMap<AttemptKey, Running>,
    /// Held here so that `exits` never closes while the agent runs.
    exits_tx: mpsc::UnboundedSender<Exit>,
    heartbeat: Duration,
    history: History,
    /// The directories of ended attempts, until they are removed.
    retention: Retention,
}

fn now_ms() -> u64 {
    dispatcher_proto::wall_clock_ms()
}

/// The heartbeat interval the leader asks for, bounded below so that a misconfigured
/// leader cannot make the agent spin.
fn interval(ms: u64) -> Duration {
    Duration::from_millis(ms.max(50))
}

impl Agent {
    fn pid_dir(&self) -> PathBuf {
        self.config.work_dir.join("pids")
    }

    fn task_dir(&self, key: &AttemptKey) -> PathBuf {
        key.task_dir(&self.config.work_dir.join("tasks"))
    }

    fn record(&mut self, event: &str, key: &AttemptKey, slot: u32, detail: &str) {
        let line = serde_json::json!({
            "at_ms": now_ms(), "event": event, "task_manager": self.config.id,
            "instance": self.instance, "job_id": key.job, "vertex": key.vertex,
            "subtask": key.subtask, "attempt": key.attempt, "slot": slot, "detail": detail,
        });
        if let Err(e) = self.history.append(&line.to_string()) {
            tracing::warn!(task_manager = %self.config.id, error = %e, "cannot record an attempt in attempts.jsonl");
        }
    }

    /// Removes the directories of ended attempts that are past the retention.
    fn sweep(&mut self) {
        retention::dispose(self.retention.due(now_ms()));
    }

    /// Feeds one event to the reconcile core and executes the actions it returns.
    fn step(&mut self, event: Event) -> Control {
        let mut control = Control::Continue;
        for action in self.core.step(now_ms(), event) {
            match action {
                Action::Start { key, slot, work } => self.start(key, slot, work),
                Action::Cancel { key, why } => self.cancel(&key, why),
                Action::Ended { key, slot, outcome } => {
                    self.tasks.remove(&key);
                    tracing::info!(
                        task_manager = %self.config.id, job_id = %key.job, vertex = %key.vertex,
                        subtask = key.subtask, attempt = key.attempt, ?outcome, "ended"
                    );
                    self.record("stop", &key, slot, &format!("{outcome:?}"));
                    let dir = self.task_dir(&key);
                    // Built-in tasks have no directory.
                    if dir.is_dir() {
                        retention::mark_ended(&dir);
                        self.retention.ended(now_ms(), dir);
                    }
                }
                Action::Reregister => control = Control::Reregister,
                Action::Unregister { reports } => control = Control::Unregister(reports),
            }
        }
        self.sweep();
        control
    }

    fn start(&mut self, key: AttemptKey, slot: u32, work: Work) {
        let task_dir = self.task_dir(&key);
        self.retention.started(&task_dir);
        let identity = BTreeMap::from([
            ("DISPATCHER_JOB_ID".to_string(), key.job.clone()),
            ("DISPATCHER_VERTEX".to_string(), key.vertex.clone()),
            ("DISPATCHER_SUBTASK".to_string(), key.subtask.to_string()),
            ("DISPATCHER_ATTEMPT".to_string(), key.attempt.to_string()),
            ("DISPATCHER_SLOT".to_string(), slot.to_string()),
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
            identity,
            &self.config.sandbox,
            self.config.kill_grace,
            self.exits_tx.clone(),
        );
        let pid = running
            .pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "builtin".into());
        tracing::info!(
            task_manager = %self.config.id, job_id = %key.job, vertex = %key.vertex,
            subtask = key.subtask, attempt = key.attempt, slot, pid = %pid, "started"
        );
        self.record("start", &key, slot, &format!("pid {pid}"));
        self.tasks.insert(key, running);
    }

    fn cancel(&mut self, key: &AttemptKey, why: CancelReason) {
        let Some(running) = self.tasks.get_mut(key) else {
            return;
        };
        let reason = match why {
            CancelReason::NotAssigned => "not assigned any more",
            CancelReason::Stopped => "job winding down",
            CancelReason::RegistrationLost => "registration lost",
            CancelReason::ShuttingDown => "shutting down",
        };
        tracing::info!(
            task_manager = %self.config.id, job_id = %key.job, vertex = %key.vertex,
            subtask = key.subtask, attempt = key.attempt, reason, "stopping the task"
        );
        running.cancel();
    }

    /// Feeds exits to the core until the teardown it is in (a lost registration, a
    /// shutdown) completes, and returns what to do next.
    async fn settle(
        &mut self,
        mut control: Control,
        exits: &mut mpsc::UnboundedReceiver<Exit>,
    ) -> Control {
        while matches!(control, Control::Continue)
            && matches!(self.core.phase(), Phase::Resetting | Phase::ShuttingDown)
        {
            control = match exits.recv().await {
                Some(exit) => self.step(Event::Exited {
                    key: exit.key,
                    outcome: exit.outcome,
                }),
                // Unreachable while `exits_tx` lives; without it no exit could come, so
                // the attempts count as gone rather than leaving the agent waiting.
                None => {
                    let keys: Vec<AttemptKey> = self.core.running().cloned().collect();
                    let mut last = Control::Continue;
                    for key in keys {
                        let outcome = Outcome::Canceled;
                        last = self.step(Event::Exited { key, outcome });
                    }
                    last
                }
            };
        }
        control
    }

    async fn register(&mut self) -> Control {
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
                    self.heartbeat = interval(resp.heartbeat_interval_ms);
                    tracing::info!(
                        task_manager = %self.config.id, instance = %self.instance,
                        heartbeat = ?self.heartbeat, "registered"
                    );
                    return self.step(Event::Registered {
                        assignments: resp.assignments,
                    });
                }
                Err(e) => {
                    tracing::warn!(task_manager = %self.config.id, error = %e, "cannot register yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One heartbeat: carries the pending reports, reconciles with the answer. When this
    /// instance is no longer registered, returns only once everything was killed.
    async fn heartbeat(&mut self, exits: &mut mpsc::UnboundedReceiver<Exit>) -> Control {
        let updates = self.core.pending().to_vec();
        let acked = updates.len();
        let req = pb::HeartbeatRequest {
            task_manager_id: self.config.id.clone(),
            instance_id: self.instance.clone(),
            updates,
        };
        match self.client.heartbeat(req).await {
            Ok(resp) if resp.registered => {
                self.heartbeat = interval(resp.heartbeat_interval_ms);
                self.step(Event::Heartbeat {
                    acked,
                    assignments: resp.assignments,
                    stop: resp.stop,
                })
            }
            Ok(_) => {
                tracing::warn!(task_manager = %self.config.id, instance = %self.instance, "the leader does not know this instance (lease expired?): killing all tasks and registering afresh");
                let control = self.step(Event::NotRegistered);
                self.settle(control, exits).await
            }
            Err(e) => {
                tracing::warn!(task_manager = %self.config.id, error = %e, pending = acked, "heartbeat failed; tasks keep running");
                self.step(Event::HeartbeatFailed)
            }
        }
    }

    /// Reports how the attempts ended (a task that FINISHED just before the signal must
    /// not be failed by the unregistration), then unregisters: the attempts that were
    /// still running fail, so their jobs restart elsewhere.
    async fn unregister(&mut self, reports: Vec<pb::TaskStatusUpdate>) {
        if !reports.is_empty() {
            let req = pb::HeartbeatRequest {
                task_manager_id: self.config.id.clone(),
                instance_id: self.instance.clone(),
                updates: reports,
            };
            if let Err(e) = self.client.heartbeat(req).await {
                tracing::warn!(task_manager = %self.config.id, error = %e, "could not send the last reports");
            }
        }
        let _ = self
            .client
            .unregister_task_manager(pb::UnregisterRequest {
                task_manager_id: self.config.id.clone(),
                instance_id: self.instance.clone(),
            })
            .await;
    }

    /// Prepares the work directory (kills the orphans of a previous life, opens the
    /// history, takes over the directories left behind) and the client; the receiver
    /// gets the exits of the attempts it starts.
    fn open(config: Config) -> Result<(Agent, mpsc::UnboundedReceiver<Exit>), AgentError> {
        let work_err = |path: PathBuf| move |source| AgentError::WorkDir { path, source };
        let pid_dir = config.work_dir.join("pids");
        std::fs::create_dir_all(&pid_dir).map_err(work_err(pid_dir.clone()))?;
        let killed = runner::kill_orphans(&pid_dir);
        if killed > 0 {
            tracing::warn!(task_manager = %config.id, killed, "killed orphaned task processes of a previous run");
        }
        let history = History::open(
            &config.work_dir,
            config.attempts_max_bytes,
            config.attempts_keep,
        )
        .map_err(work_err(config.work_dir.join(history::FILE_NAME)))?;
        let tasks_dir = config.work_dir.join("tasks");
        let mut retention = Retention::new(config.retain_finished, config.retain_finished_count);
        // Nothing runs yet, so every directory left by a previous life is an ended one.
        for (at, dir) in retention::ended_dirs(&tasks_dir).map_err(work_err(tasks_dir.clone()))? {
            retention.ended(at, dir);
        }
        let mut client_config = ClientConfig::new(config.dispatchers.clone());
        client_config.timeout = Duration::from_secs(3);
        client_config.per_try_timeout = Duration::from_secs(1);
        // The agent retries every failed call on its own schedule; giving up before the
        // deadline when no dispatcher listens would only make it retry and log more often.
        client_config.unreachable_timeout = client_config.timeout;
        client_config.tls = config.tls.clone();
        client_config.token = config.token.clone();
        let client = Client::new(client_config)?;
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let mut agent = Agent {
            instance: uuid::Uuid::new_v4().to_string(),
            client,
            core: Reconciler::new(),
            tasks: BTreeMap::new(),
            exits_tx,
            heartbeat: Duration::from_millis(500),
            history,
            retention,
            config,
        };
        agent.sweep();
        Ok((agent, exits))
    }
}

/// Runs a TaskManager until `shutdown` completes; then stops its tasks (SIGTERM, then
/// SIGKILL), reports them and unregisters.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let (mut agent, mut exits) = Agent::open(config)?;
    tokio::pin!(shutdown);
    let mut control = tokio::select! {
        c = agent.register() => c,
        _ = &mut shutdown => return Ok(()),
    };
    let mut next = tokio::time::Instant::now() + agent.heartbeat;
    loop {
        match control {
            Control::Continue => {}
            Control::Reregister => {
                agent.instance = uuid::Uuid::new_v4().to_string();
                control = tokio::select! {
                    c = agent.register() => c,
                    _ = &mut shutdown => break,
                };
                next = tokio::time::Instant::now() + agent.heartbeat;
                continue;
            }
            Control::Unregister(reports) => {
                agent.unregister(reports).await;
                return Ok(());
            }
        }
        control = tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                let c = agent.heartbeat(&mut exits).await;
                next = tokio::time::Instant::now() + agent.heartbeat;
                c
            }
            Some(exit) = exits.recv() => {
                // Report an ended attempt promptly rather than at the next tick.
                next = next.min(tokio::time::Instant::now() + Duration::from_millis(20));
                agent.step(Event::Exited { key: exit.key, outcome: exit.outcome })
            }
            _ = &mut shutdown => break,
        };
    }
    tracing::info!(task_manager = %agent.config.id, "shutting down: stopping tasks");
    let control = agent.step(Event::Shutdown);
    if let Control::Unregister(reports) = agent.settle(control, &mut exits).await {
        agent.unregister(reports).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
