//! The commands the replicated log carries, the responses `apply` gives, and the typed
//! rejections for commands that change nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::access::Token;
use super::types::{
    Attempt, JobId, JobSpec, JobState, Millis, PlacementStrategy, TaskKey, TaskManagerId,
    TaskManagerSpec, TaskState,
};

/// Cluster-wide settings, replicated like everything else (SetClusterConfig).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Placement strategy of jobs that do not choose one.
    pub default_placement: PlacementStrategy,
    /// Largest parallelism of one vertex.
    pub max_parallelism: u32,
    /// Largest number of subtasks in one job.
    pub max_tasks_per_job: u32,
    /// Largest number of vertices in one job.
    pub max_vertices: u32,
    /// Largest number of edges in one job.
    pub max_edges: u32,
    /// Longest name, label, argument or environment string, in bytes.
    pub max_string_len: u32,
    /// Most entries in any one map or argv (labels, env, selector, argv).
    pub max_list_len: u32,
    /// Most slots one TaskManager may register.
    pub max_slots_per_task_manager: u32,
    /// Completed checkpoints kept per job (Flink's `state.checkpoints.num-retained`).
    pub max_retained_checkpoints: u32,
    /// How long a terminal job stays in the registry before PurgeFinishedJobs removes it.
    pub finished_job_retention_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            default_placement: PlacementStrategy::Spread,
            max_parallelism: 1024,
            max_tasks_per_job: 4096,
            max_vertices: 256,
            max_edges: 1024,
            max_string_len: 4096,
            max_list_len: 256,
            max_slots_per_task_manager: 1024,
            max_retained_checkpoints: 3,
            finished_job_retention_ms: 60 * 60 * 1000,
        }
    }
}

/// Bounds on what the registry holds and on restart strategies, so that no client can
/// grow the state (and every replica's memory) without bound or make a job restart in a
/// tight loop forever.
///
/// Kept apart from [`ClusterConfig`] because the codec is not self-describing: a field
/// added there would make every log entry and snapshot written before unreadable. These
/// limits travel in their own command ([`Command::SetResourceLimits`]) and their own
/// snapshot block. A state that never applied that command has no limits, exactly as
/// before they existed, so that replaying an old log gives the state it gave then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// Most jobs in the registry, ended ones included (they hold memory until purged).
    /// Ended jobs are removed early, oldest first, to make room for a new one, so only
    /// jobs that have not ended can exhaust it.
    pub max_jobs: u64,
    /// Most bytes of job specs in the registry (each spec measured as its encoded
    /// length), with the same early removal of ended jobs.
    pub max_spec_bytes: u64,
    /// Smallest `delay_ms` of a fixed-delay restart strategy.
    pub min_restart_delay_ms: u64,
    /// Largest `attempts` of a fixed-delay restart strategy.
    pub max_restart_attempts: u32,
}

impl Default for ResourceLimits {
    /// What a new cluster starts with: room for far more jobs than one leader schedules
    /// comfortably, about a gigabyte of specs per replica, and restarts at most once a
    /// second, a thousand times.
    fn default() -> Self {
        ResourceLimits {
            max_jobs: 100_000,
            max_spec_bytes: 1 << 30,
            min_restart_delay_ms: 1_000,
            max_restart_attempts: 1_000,
        }
    }
}

/// A report of one task attempt's state, as a TaskManager observed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    /// The job.
    pub job: JobId,
    /// The subtask.
    pub key: TaskKey,
    /// Which attempt the report is about; reports about older attempts are ignored.
    pub attempt: Attempt,
    /// The state the TaskManager observed.
    pub state: TaskState,
    /// Exit code of the process, if it exited.
    pub exit_code: Option<i32>,
    /// Failure reason (or empty).
    pub reason: String,
}

/// A state-machine command. Every command whose meaning depends on time carries `now`,
/// the proposing leader's clock; the state machine never reads one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Submit a job (idempotent by id and spec).
    SubmitJob {
        /// Client-chosen id.
        job_id: JobId,
        /// The job graph and policies.
        spec: JobSpec,
        /// Leader time.
        now: Millis,
    },
    /// Cancel a job.
    CancelJob {
        /// Which job.
        job_id: JobId,
        /// Leader time.
        now: Millis,
    },
    /// Register (or re-register after a restart) a TaskManager and its slots.
    RegisterTaskManager {
        /// The registration.
        spec: TaskManagerSpec,
        /// Leader time.
        now: Millis,
    },
    /// The leader saw this TaskManager's lease run out. Only the named instance is
    /// expired, so a late proposal cannot expire a fresh registration.
    ExpireTaskManager {
        /// Which TaskManager.
        id: TaskManagerId,
        /// Which instance of it.
        instance: String,
        /// Leader time.
        now: Millis,
    },
    /// The TaskManager is leaving cleanly.
    UnregisterTaskManager {
        /// Which TaskManager.
        id: TaskManagerId,
        /// Which instance of it.
        instance: String,
        /// Leader time.
        now: Millis,
    },
    /// Task state changes reported by one TaskManager (a heartbeat's batch).
    ReportTaskState {
        /// The reporting TaskManager.
        task_manager: TaskManagerId,
        /// Its instance.
        instance: String,
        /// The changes, applied in order; each is accepted or ignored on its own.
        reports: Vec<TaskReport>,
        /// Leader time.
        now: Millis,
    },
    /// The restart delay of a RESTARTING job has passed: start new attempts.
    RestartTasks {
        /// Which job.
        job_id: JobId,
        /// Leader time; must be at or after the job's `restart_due_at`.
        now: Millis,
    },
    /// Hand out the job's next checkpoint id (Flink's checkpoint id counter).
    AllocateCheckpointId {
        /// Which job.
        job_id: JobId,
        /// Leader time.
        now: Millis,
    },
    /// Record a completed checkpoint pointer for a job.
    RecordCheckpoint {
        /// Which job.
        job_id: JobId,
        /// An id the counter handed out, newer than the last completed one.
        checkpoint_id: u64,
        /// Where the checkpoint's data lives.
        location: String,
        /// Leader time.
        now: Millis,
    },
    /// Remove terminal jobs whose retention has run out.
    PurgeFinishedJobs {
        /// Leader time.
        now: Millis,
    },
    /// Disaster recovery: replace an empty state with a backup (the canonical encoding
    /// of a state, as `DispatcherState::encode` writes it). Refused unless the state is
    /// empty, so it can only seed a new cluster.
    RestoreState {
        /// The encoded state.
        state: Vec<u8>,
    },
    /// Replace the cluster configuration.
    SetClusterConfig {
        /// The new configuration.
        config: ClusterConfig,
    },
    /// Several commands from concurrent clients, applied in order, each on its own: one
    /// command's rejection neither undoes nor stops the others. The leader groups the
    /// writes that arrive while the previous log append is on disk, so that one append,
    /// one sync and one replication round serve them all. A batch never holds a batch.
    Batch(Vec<Command>),
    /// Register (or re-register) a TaskManager on behalf of an authenticated principal,
    /// which then owns the id while it stays registered: another principal's
    /// registration of the live id is refused. (Older logs hold `RegisterTaskManager`,
    /// which is an unowned registration.)
    RegisterTaskManagerAs {
        /// The registration.
        spec: TaskManagerSpec,
        /// Who registers it (`token:<name>`); empty when the cluster has no tokens.
        owner: String,
        /// Leader time.
        now: Millis,
    },
    /// Create a bearer token (its hash; the secret never enters the log). With
    /// `bootstrap`, only when the cluster has no token at all, so that a restart with
    /// `--bootstrap-token-file` changes nothing.
    CreateToken {
        /// The token, stamped with the leader's time.
        token: Token,
        /// Create only if no token exists yet.
        bootstrap: bool,
    },
    /// Revoke a token by name.
    RevokeToken {
        /// Its name.
        name: String,
    },
    /// Set the resource limits. With `bootstrap`, only when the state has none yet, so
    /// that every leader may propose its configured defaults and only the first counts.
    /// Limits below what the registry holds already refuse new jobs until enough end;
    /// nothing is removed for them. (New variants go at the end: the log stores a
    /// variant by its position.)
    SetResourceLimits {
        /// The limits.
        limits: ResourceLimits,
        /// Set only if no limits are set yet.
        bootstrap: bool,
    },
}

impl Command {
    /// Short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::SubmitJob { .. } => "SubmitJob",
            Command::CancelJob { .. } => "CancelJob",
            Command::RegisterTaskManager { .. } => "RegisterTaskManager",
            Command::ExpireTaskManager { .. } => "ExpireTaskManager",
            Command::UnregisterTaskManager { .. } => "UnregisterTaskManager",
            Command::ReportTaskState { .. } => "ReportTaskState",
            Command::RestartTasks { .. } => "RestartTasks",
            Command::AllocateCheckpointId { .. } => "AllocateCheckpointId",
            Command::RecordCheckpoint { .. } => "RecordCheckpoint",
            Command::PurgeFinishedJobs { .. } => "PurgeFinishedJobs",
            Command::RestoreState { .. } => "RestoreState",
            Command::SetClusterConfig { .. } => "SetClusterConfig",
            Command::Batch(_) => "Batch",
            Command::RegisterTaskManagerAs { .. } => "RegisterTaskManager",
            Command::CreateToken { .. } => "CreateToken",
            Command::RevokeToken { .. } => "RevokeToken",
            Command::SetResourceLimits { .. } => "SetResourceLimits",
        }
    }

    /// The job the command is about, for traces.
    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            Command::SubmitJob { job_id, .. }
            | Command::CancelJob { job_id, .. }
            | Command::RestartTasks { job_id, .. }
            | Command::AllocateCheckpointId { job_id, .. }
            | Command::RecordCheckpoint { job_id, .. } => Some(job_id),
            _ => None,
        }
    }

    /// The TaskManager the command is about, for traces.
    pub fn task_manager(&self) -> Option<&TaskManagerId> {
        match self {
            Command::RegisterTaskManager { spec, .. }
            | Command::RegisterTaskManagerAs { spec, .. } => Some(&spec.id),
            Command::ExpireTaskManager { id, .. } | Command::UnregisterTaskManager { id, .. } => {
                Some(id)
            }
            Command::ReportTaskState { task_manager, .. } => Some(task_manager),
            _ => None,
        }
    }
}

/// What became of one report in a ReportTaskState batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportOutcome {
    /// The report changed the task (or confirmed its current state).
    Applied,
    /// The report was ignored; the rejection says why (stale attempt, not assigned...).
    Ignored(Rejection),
}

/// The result of an accepted command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// SubmitJob: `created` is false when the same id and spec already existed.
    Submitted {
        /// The job.
        job_id: JobId,
        /// Whether this command created it.
        created: bool,
        /// Its state after the command.
        state: JobState,
    },
    /// CancelJob, RestartTasks: the job's state after the command.
    JobState {
        /// The job.
        job_id: JobId,
        /// Its state after the command.
        state: JobState,
    },
    /// RegisterTaskManager.
    Registered {
        /// The TaskManager.
        id: TaskManagerId,
        /// False when the same instance was already registered (a retried command).
        created: bool,
        /// Attempts of the previous instance that were failed because it restarted.
        failed_attempts: u32,
    },
    /// ExpireTaskManager, UnregisterTaskManager.
    Removed {
        /// The TaskManager.
        id: TaskManagerId,
        /// How many running attempts failed with it.
        failed_attempts: u32,
    },
    /// ReportTaskState: one outcome per report, in order.
    Reports {
        /// Outcomes.
        outcomes: Vec<ReportOutcome>,
    },
    /// AllocateCheckpointId.
    CheckpointId {
        /// The id handed out.
        id: u64,
    },
    /// RecordCheckpoint.
    CheckpointRecorded {
        /// The id recorded.
        id: u64,
    },
    /// PurgeFinishedJobs.
    Purged {
        /// Removed jobs.
        jobs: Vec<JobId>,
    },
    /// SetClusterConfig.
    ConfigSet,
    /// RestoreState: how many jobs and TaskManagers the restored state holds.
    Restored {
        /// Jobs.
        jobs: u64,
        /// TaskManagers.
        task_managers: u64,
    },
    /// Batch: each command's own result, in order.
    Batch(Vec<Result<Response, Rejection>>),
    /// CreateToken: `created` is false for a bootstrap token when tokens already exist,
    /// or for a retried command (same name and hash).
    TokenCreated {
        /// The token's name.
        name: String,
        /// Whether this command created it.
        created: bool,
    },
    /// RevokeToken.
    TokenRevoked {
        /// The token's name.
        name: String,
    },
    /// SetResourceLimits: `applied` is false for a bootstrap when limits were set already.
    LimitsSet {
        /// Whether this command set them.
        applied: bool,
    },
}

/// Why a command was rejected. A rejected command changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Rejection {
    /// A field of the command is invalid.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `spec.vertices[2].parallelism`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The job id exists with another spec.
    #[error("job {job_id} already exists with a different spec")]
    AlreadyExists {
        /// The id.
        job_id: JobId,
    },
    /// No such job.
    #[error("job {job_id} not found")]
    UnknownJob {
        /// The id.
        job_id: JobId,
    },
    /// No such TaskManager (or not this instance of it).
    #[error("TaskManager {id} (instance {instance}) is not registered")]
    UnknownTaskManager {
        /// The id.
        id: TaskManagerId,
        /// The instance named by the command.
        instance: String,
    },
    /// The job cannot go from its state to the requested one.
    #[error("job {job_id} cannot go from {from} to {to}")]
    IllegalJobTransition {
        /// The job.
        job_id: JobId,
        /// Current state.
        from: JobState,
        /// Requested state.
        to: JobState,
    },
    /// The task cannot go from its state to the reported one.
    #[error("task {job_id}#{key} attempt {attempt} cannot go from {from} to {to}")]
    IllegalTaskTransition {
        /// The job.
        job_id: JobId,
        /// The task.
        key: TaskKey,
        /// The attempt.
        attempt: Attempt,
        /// Current state.
        from: TaskState,
        /// Reported state.
        to: TaskState,
    },
    /// The report is about an attempt that is not the current one.
    #[error("task {job_id}#{key}: attempt {attempt} is stale, current is {current}")]
    StaleAttempt {
        /// The job.
        job_id: JobId,
        /// The task.
        key: TaskKey,
        /// The reported attempt.
        attempt: Attempt,
        /// The current attempt.
        current: Attempt,
    },
    /// The reporting TaskManager does not hold this attempt.
    #[error("task {job_id}#{key} attempt {attempt} is not assigned to TaskManager {task_manager}")]
    NotAssigned {
        /// The job.
        job_id: JobId,
        /// The task.
        key: TaskKey,
        /// The attempt.
        attempt: Attempt,
        /// The reporter.
        task_manager: TaskManagerId,
    },
    /// The job's restart is not due yet (or it is not waiting for one).
    #[error(
        "job {job_id} has no restart due at {now} (due at {due_at:?}, {active} tasks still active)"
    )]
    RestartNotDue {
        /// The job.
        job_id: JobId,
        /// When it is due, if at all.
        due_at: Option<Millis>,
        /// The command's time.
        now: Millis,
        /// Attempts that still hold slots.
        active: u32,
    },
    /// The job is not in a state that allows the operation.
    #[error("job {job_id} is {state}: {reason}")]
    JobNotActive {
        /// The job.
        job_id: JobId,
        /// Its state.
        state: JobState,
        /// What was refused.
        reason: String,
    },
    /// A checkpoint id that the counter never handed out or that is not newer than the
    /// last completed one.
    #[error("job {job_id}: checkpoint {checkpoint_id} is out of order ({reason})")]
    CheckpointOutOfOrder {
        /// The job.
        job_id: JobId,
        /// The id.
        checkpoint_id: u64,
        /// Why.
        reason: String,
    },
    /// A token of that name exists (with another secret or role).
    #[error("a token named {name:?} already exists")]
    TokenExists {
        /// The name.
        name: String,
    },
    /// No token has that name.
    #[error("no token is named {name:?}")]
    UnknownToken {
        /// The name.
        name: String,
    },
    /// Revoking it would leave no admin token, locking every operator out.
    #[error(
        "token {name:?} is the last admin token; create another admin token before revoking it"
    )]
    LastAdminToken {
        /// The name.
        name: String,
    },
    /// The TaskManager id is registered by another principal.
    #[error("TaskManager {id} is registered by another identity ({owner}); it can take the id over only once that registration ends")]
    TaskManagerOwned {
        /// The id.
        id: TaskManagerId,
        /// Who registered it.
        owner: String,
    },
    /// Admitting the job would take the registry past a resource limit. Only jobs that
    /// have not ended count here: ended ones are removed early to make room.
    #[error("job refused: cluster limit {limit} = {max} {unit} would be exceeded (jobs that have not ended use {in_use}, this job needs {needs}); cancel jobs or wait for some to end, ended jobs make room by themselves")]
    QuotaExceeded {
        /// The limit's name in [`ResourceLimits`], e.g. `max_spec_bytes`.
        limit: String,
        /// Its value.
        max: u64,
        /// What it counts (`jobs`, `bytes`).
        unit: String,
        /// How much of it jobs that have not ended use.
        in_use: u64,
        /// How much of it the refused job needs.
        needs: u64,
    },
}

impl Rejection {
    /// Shorthand for an invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Counts kept up to date by `apply` (checked against the data by the invariants).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Slots of all registered TaskManagers.
    pub total_slots: u64,
    /// Slots holding no attempt.
    pub free_slots: u64,
    /// Jobs per state.
    pub jobs_by_state: BTreeMap<JobState, u64>,
    /// Encoded bytes of the specs of every job in the registry.
    pub spec_bytes: u64,
    /// The part of `spec_bytes` that jobs which have not ended hold.
    pub active_spec_bytes: u64,
}
