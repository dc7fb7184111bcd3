//! Domain types of the replicated state: identifiers, job specs, TaskManagers, slots,
//! task attempts, and the job and task state enums.
//!
//! Everything here is plain data with ordered collections (`BTreeMap`), so that equal
//! states encode to equal bytes and every replica iterates in the same order.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as stamped by the leader that proposed a command.
/// The state machine never reads a clock: time only enters through commands.
pub type Millis = u64;

/// A task attempt number. The first attempt of every task is 1; each restart adds one.
pub type Attempt = u32;

/// A job identifier chosen by the client: a UUID in canonical lower-case hyphenated form.
///
/// The client picks it before its first try and reuses it on every retry, which is what
/// makes submission exactly-once across failover.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(String);

impl JobId {
    /// Parses a job id, accepting any UUID spelling and normalising it, so that
    /// `6F9619FF-...` and `6f9619ff-...` name the same job.
    pub fn parse(raw: &str) -> Result<Self, String> {
        uuid::Uuid::parse_str(raw)
            .map(|u| JobId(u.hyphenated().to_string()))
            .map_err(|e| format!("not a UUID: {e}"))
    }

    /// The canonical text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TaskManager identifier chosen by the operator (`taskmanager --id tm-1`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskManagerId(pub String);

impl TaskManagerId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskManagerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TaskManagerId {
    fn from(s: &str) -> Self {
        TaskManagerId(s.to_string())
    }
}

/// One subtask of a job: vertex index (in spec order) and subtask index within the
/// vertex's parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskKey {
    /// Index of the vertex in the job spec.
    pub vertex: u32,
    /// Subtask index, `0..parallelism`.
    pub subtask: u32,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vertex, self.subtask)
    }
}

/// A task of a job, named across the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRef {
    /// The job the task belongs to.
    pub job: JobId,
    /// Which subtask.
    pub key: TaskKey,
}

impl fmt::Display for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.job, self.key)
    }
}

/// A slot: one TaskManager's slot by index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SlotRef {
    /// The TaskManager owning the slot.
    pub task_manager: TaskManagerId,
    /// Index `0..slots` on that TaskManager.
    pub index: u32,
}

impl fmt::Display for SlotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.task_manager, self.index)
    }
}

/// What a task runs. Its `Debug` shows environment keys, never values: they are
/// secrets, and log entries (openraft's debug logs included) print commands.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskSpec {
    /// A child process: `argv[0]` is the program.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
    },
    /// Built-in test task: runs for a duration, then finishes with exit code 0.
    Sleep {
        /// How long to run.
        duration_ms: u64,
    },
    /// Built-in test task: runs for a duration, then fails with the exit code.
    Fail {
        /// How long to run before failing.
        after_ms: u64,
        /// The exit code it fails with (non-zero).
        exit_code: i32,
    },
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskSpec::Command { argv, env } => {
                let env: BTreeMap<&str, &str> =
                    env.keys().map(|k| (k.as_str(), "<redacted>")).collect();
                f.debug_struct("Command")
                    .field("argv", argv)
                    .field("env", &env)
                    .finish()
            }
            TaskSpec::Sleep { duration_ms } => f
                .debug_struct("Sleep")
                .field("duration_ms", duration_ms)
                .finish(),
            TaskSpec::Fail {
                after_ms,
                exit_code,
            } => f
                .debug_struct("Fail")
                .field("after_ms", after_ms)
                .field("exit_code", exit_code)
                .finish(),
        }
    }
}

/// A vertex of the job graph: an operator with a parallelism.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexSpec {
    /// Unique within the job.
    pub name: String,
    /// Number of subtasks; each occupies one slot.
    pub parallelism: u32,
    /// What every subtask runs.
    pub task: TaskSpec,
    /// Labels a TaskManager must carry (all of them) to host this vertex's subtasks.
    pub node_selector: BTreeMap<String, String>,
}

/// A data edge between two vertices, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeSpec {
    /// Upstream vertex.
    pub from: String,
    /// Downstream vertex.
    pub to: String,
}

/// What happens when a task of the job fails, as in Flink's restart strategies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartStrategy {
    /// The first task failure fails the job.
    NoRestart,
    /// Restart the whole job up to `attempts` times, each after `delay_ms`.
    FixedDelay {
        /// How many restarts are allowed.
        attempts: u32,
        /// Delay between the failure and the restart.
        delay_ms: u64,
    },
}

/// How the slots of a job are chosen among TaskManagers with free slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PlacementStrategy {
    /// Least-loaded first: the TaskManager with the most free slots (ties: lowest id).
    Spread,
    /// Fill the fullest TaskManager that still has a free slot (ties: lowest id).
    BinPack,
    /// Cycle through TaskManagers in id order, continuing where the last placement stopped.
    RoundRobin,
}

/// A job as submitted: the job graph, its priority and its policies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human-readable name (not unique).
    pub name: String,
    /// The operators.
    pub vertices: Vec<VertexSpec>,
    /// Data edges; the graph must be acyclic.
    pub edges: Vec<EdgeSpec>,
    /// Higher runs first when capacity is short.
    pub priority: i32,
    /// Restart strategy.
    pub restart: RestartStrategy,
    /// Placement strategy; `None` uses the cluster default.
    pub placement: Option<PlacementStrategy>,
    /// Free-form metadata.
    pub labels: BTreeMap<String, String>,
}

impl JobSpec {
    /// The simplest job: one vertex of `parallelism` subtasks running `task`, no edges,
    /// default priority, no restarts, the cluster's placement, no labels.
    pub fn single_vertex(name: &str, vertex: &str, parallelism: u32, task: TaskSpec) -> JobSpec {
        JobSpec {
            name: name.into(),
            vertices: vec![VertexSpec {
                name: vertex.into(),
                parallelism,
                task,
                node_selector: BTreeMap::new(),
            }],
            edges: vec![],
            priority: 0,
            restart: RestartStrategy::NoRestart,
            placement: None,
            labels: BTreeMap::new(),
        }
    }

    /// Total number of subtasks (slots needed), saturating so that a hostile spec cannot
    /// overflow before validation rejects it.
    pub fn task_count(&self) -> u64 {
        self.vertices
            .iter()
            .fold(0u64, |acc, v| acc.saturating_add(u64::from(v.parallelism)))
    }
}

/// Job states, with Flink's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Accepted, waiting in the queue for slots.
    Created,
    /// All tasks placed (gang); running.
    Running,
    /// A task failed with no restart left; waiting for the other tasks to stop.
    Failing,
    /// Terminal: failed.
    Failed,
    /// Cancel requested; waiting for the tasks to stop.
    Cancelling,
    /// Terminal: canceled.
    Canceled,
    /// Terminal: every task finished.
    Finished,
    /// A task failed and a restart is due; waiting for tasks to stop, the delay to pass and
    /// then for slots.
    Restarting,
}

impl JobState {
    /// Whether the job will never change state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Failed | JobState::Canceled | JobState::Finished
        )
    }

    /// Upper-case name as users see it.
    pub fn name(self) -> &'static str {
        match self {
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

    /// Every state, in declaration order.
    pub const ALL: [JobState; 8] = [
        JobState::Created,
        JobState::Running,
        JobState::Failing,
        JobState::Failed,
        JobState::Cancelling,
        JobState::Canceled,
        JobState::Finished,
        JobState::Restarting,
    ];
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Task (attempt) states, with Flink's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for a slot.
    Scheduled,
    /// Holds a slot; the TaskManager is starting it.
    Deploying,
    /// Running on its TaskManager.
    Running,
    /// Terminal: exited with success.
    Finished,
    /// Terminal: stopped on request.
    Canceled,
    /// Terminal: failed (non-zero exit, signal, lost TaskManager).
    Failed,
}

impl TaskState {
    /// Whether this attempt will never change state again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished | TaskState::Canceled | TaskState::Failed
        )
    }

    /// Whether the attempt holds a slot in this state.
    pub fn holds_slot(self) -> bool {
        matches!(self, TaskState::Deploying | TaskState::Running)
    }

    /// Upper-case name as users see it.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Scheduled => "SCHEDULED",
            TaskState::Deploying => "DEPLOYING",
            TaskState::Running => "RUNNING",
            TaskState::Finished => "FINISHED",
            TaskState::Canceled => "CANCELED",
            TaskState::Failed => "FAILED",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One task of a job and its current attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Which subtask.
    pub key: TaskKey,
    /// Current attempt number (1-based).
    pub attempt: Attempt,
    /// State of the current attempt.
    pub state: TaskState,
    /// The slot the current attempt holds, while it is DEPLOYING or RUNNING.
    pub slot: Option<SlotRef>,
    /// The TaskManager the current attempt ran on last (kept after the slot is freed, so
    /// users can see where a finished or failed attempt ran).
    pub last_task_manager: Option<TaskManagerId>,
    /// Exit code of a finished or failed process, when known.
    pub exit_code: Option<i32>,
    /// Why the attempt failed or was canceled.
    pub reason: String,
    /// Leader time of the last change.
    pub updated_at: Millis,
}

/// A completed checkpoint pointer, as Flink keeps in ZooKeeper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedCheckpoint {
    /// Checkpoint id (from the job's counter).
    pub id: u64,
    /// Where the checkpoint's data lives (external pointer, e.g. a path or URL).
    pub location: String,
    /// Leader time at which it was recorded.
    pub completed_at: Millis,
}

/// Per-job checkpoint bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoints {
    /// The next id the counter hands out; starts at 1 and only grows.
    pub next_id: u64,
    /// Latest completed checkpoints, oldest first, bounded by the cluster config.
    pub completed: Vec<CompletedCheckpoint>,
}

/// A job in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Client-chosen id.
    pub id: JobId,
    /// The spec as validated.
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// Submission order, for FIFO among equal priorities.
    pub seq: u64,
    /// Leader time of submission.
    pub submitted_at: Millis,
    /// Leader time of the last change.
    pub updated_at: Millis,
    /// Leader time at which the job became terminal.
    pub finished_at: Option<Millis>,
    /// Restarts used so far.
    pub restarts: u32,
    /// When a pending restart becomes due (the leader proposes RestartTasks then).
    pub restart_due_at: Option<Millis>,
    /// Why the job failed, or the last failure that caused a restart.
    pub failure: String,
    /// Tasks in vertex-major order: all subtasks of vertex 0, then of vertex 1, ...
    pub tasks: Vec<Task>,
    /// Checkpoint counter and completed checkpoints.
    pub checkpoints: Checkpoints,
    /// The spec's encoded length, what it counts against `max_spec_bytes`. Derived:
    /// set at submission and recomputed on restore, never encoded (so snapshots written
    /// before it existed still read, and its absence cannot disagree with the spec).
    #[serde(skip)]
    pub spec_bytes: u64,
}

impl Job {
    /// Index into `tasks` of a task key, if it exists in this job.
    pub fn task_index(&self, key: TaskKey) -> Option<usize> {
        let mut base = 0usize;
        for (i, v) in self.spec.vertices.iter().enumerate() {
            if i as u32 == key.vertex {
                return (key.subtask < v.parallelism).then(|| base + key.subtask as usize);
            }
            base += v.parallelism as usize;
        }
        None
    }

    /// Whether the job's tasks are waiting in the placement queue.
    pub fn awaits_placement(&self) -> bool {
        matches!(self.state, JobState::Created | JobState::Restarting)
            && self.restart_due_at.is_none()
            && !self.tasks.is_empty()
            && self.tasks.iter().all(|t| t.state == TaskState::Scheduled)
    }

    /// Number of attempts holding a slot.
    pub fn active_tasks(&self) -> usize {
        self.tasks.iter().filter(|t| t.state.holds_slot()).count()
    }
}

/// A TaskManager registration as the TaskManager announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskManagerSpec {
    /// Operator-chosen id.
    pub id: TaskManagerId,
    /// Random per process start: a new instance means the TaskManager restarted and runs
    /// nothing of its previous life.
    pub instance: String,
    /// Where it can be reached (informational).
    pub address: String,
    /// Number of slots.
    pub slots: u32,
    /// Labels for label-aware placement.
    pub labels: BTreeMap<String, String>,
}

/// A registered TaskManager and what its slots hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskManager {
    /// What it registered with.
    pub spec: TaskManagerSpec,
    /// `slots[i]` is the task attempt holding slot `i`, if any.
    pub slots: Vec<Option<(TaskRef, Attempt)>>,
    /// Leader time of registration.
    pub registered_at: Millis,
}

impl TaskManager {
    /// Number of free slots (linear in the slot count, which is small).
    pub fn free_slots(&self) -> u32 {
        self.slots.iter().filter(|s| s.is_none()).count() as u32
    }
}
