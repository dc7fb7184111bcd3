//! `DispatcherState`: the registry of jobs and TaskManagers, and `apply`.
//!
//! Every command is checked completely before anything changes, so a rejected command
//! leaves the state byte-for-byte as it was (the property tests compare digests).
//! Derived indexes (free slots, the placement queue, due restarts, terminal jobs,
//! counters) are kept in step by the few functions that move slots and states, and are
//! rebuilt, never decoded, on restore.
//!
//! This file owns the state's fields, `new`, `apply` (the dispatch of every command) and
//! the command clock. The rest of `impl DispatcherState` is split by concern:
//! - `queries`: read-only accessors (jobs, TaskManagers, assignments, due work);
//! - `snapshot`: the canonical encoding, digest, restore and the rebuild of indexes;
//! - `jobs`: job lifecycle (submit and its resource limits, cancel, failure, restart,
//!   settle, purge);
//! - `task_managers`: registration and removal of TaskManagers;
//! - `reports`: task state reports from TaskManagers;
//! - `checkpoints`: checkpoint ids and completed-checkpoint pointers;
//! - `queue`: the placement queue and gang placement;
//! - `pending`: why a queued job is not placed (derived at read time, never stored);
//! - `access`: tokens and who registered each live TaskManager.
//!
//! Architecture invariant, for every file here: nothing does I/O, reads a clock or draws
//! a random number; time enters only as the `now` that the leader stamps into commands.

mod access;
mod checkpoints;
mod jobs;
mod pending;
mod queries;
mod queue;
mod reports;
mod snapshot;
mod task_managers;

use std::collections::{BTreeMap, BTreeSet};

use super::access::Token;
use super::command::{ClusterConfig, Command, Counters, Rejection, ResourceLimits, Response};
use super::placement::SlotIndex;
use super::types::{Job, JobId, Millis, TaskManager, TaskManagerId};
use super::validate::{validate_cluster_config, validate_resource_limits};

pub use pending::{PendingReason, PendingReasons};
pub use queries::Assignment;
use queue::QueueKey;
pub use snapshot::StateView;

/// The replicated state of the dispatcher.
#[derive(Clone, Debug, Default)]
pub struct DispatcherState {
    config: ClusterConfig,
    /// Largest leader time seen in an accepted command; time never runs backwards here
    /// even when a new leader's clock is behind the old one's.
    clock: Millis,
    next_seq: u64,
    /// Where round-robin placement continues.
    rr_cursor: Option<TaskManagerId>,
    /// Persistent maps (O(1) clone): see [`StateView`].
    jobs: imbl::OrdMap<JobId, Job>,
    task_managers: imbl::OrdMap<TaskManagerId, TaskManager>,
    /// Bearer tokens by name.
    tokens: BTreeMap<String, Token>,
    /// Who registered each live TaskManager (only registrations made with a token).
    owners: BTreeMap<TaskManagerId, String>,
    /// Bounds on the registry and on restart strategies; `None` until a
    /// SetResourceLimits command sets them (a state from before they existed has none).
    limits: Option<ResourceLimits>,

    // Derived, never encoded.
    token_hashes: BTreeMap<String, String>,
    index: SlotIndex,
    queue: BTreeSet<QueueKey>,
    restarts: BTreeSet<(Millis, JobId)>,
    terminal: BTreeSet<(Millis, JobId)>,
    counters: Counters,
    /// Jobs that commands applied since the last [`DispatcherState::take_changed_jobs`]
    /// may have created, changed or removed (a superset: an id may be noted although
    /// nothing of its record changed). Not part of the state: not encoded, not compared.
    changed_jobs: BTreeSet<JobId>,
}

impl DispatcherState {
    /// An empty state with the given configuration.
    pub fn new(config: ClusterConfig) -> Self {
        let mut s = DispatcherState {
            config,
            ..Default::default()
        };
        s.rebuild_indexes();
        s
    }

    /// Applies one command. Pure and deterministic: the same state and command give the
    /// same result on every replica. A rejection changes nothing.
    pub fn apply(&mut self, command: Command) -> Result<Response, Rejection> {
        match command {
            Command::SubmitJob { job_id, spec, now } => self.submit(job_id, spec, now),
            Command::CancelJob { job_id, now } => self.cancel(&job_id, now),
            Command::RegisterTaskManager { spec, now } => self.register(spec, String::new(), now),
            Command::RegisterTaskManagerAs { spec, owner, now } => self.register(spec, owner, now),
            Command::CreateToken { token, bootstrap } => self.create_token(token, bootstrap),
            Command::RevokeToken { name } => self.revoke_token(&name),
            Command::ExpireTaskManager { id, instance, now } => {
                self.remove_task_manager(&id, &instance, now, "lease expired")
            }
            Command::UnregisterTaskManager { id, instance, now } => {
                self.remove_task_manager(&id, &instance, now, "unregistered")
            }
            Command::ReportTaskState {
                task_manager,
                instance,
                reports,
                now,
            } => self.report(&task_manager, &instance, reports, now),
            Command::RestartTasks { job_id, now } => self.restart(&job_id, now),
            Command::AllocateCheckpointId { job_id, now } => self.allocate_checkpoint(&job_id, now),
            Command::RecordCheckpoint {
                job_id,
                checkpoint_id,
                location,
                now,
            } => self.record_checkpoint(&job_id, checkpoint_id, location, now),
            Command::PurgeFinishedJobs { now } => Ok(self.purge(now)),
            Command::RestoreState { state } => self.restore_state(&state),
            Command::SetClusterConfig { config } => {
                validate_cluster_config(&config)?;
                // A lower retention applies at once: the oldest pointers go.
                self.retain_checkpoints(config.max_retained_checkpoints as usize);
                self.config = config;
                Ok(Response::ConfigSet)
            }
            Command::SetResourceLimits { limits, bootstrap } => {
                validate_resource_limits(&limits)?;
                if bootstrap && self.limits.is_some() {
                    return Ok(Response::LimitsSet { applied: false });
                }
                self.limits = Some(limits);
                Ok(Response::LimitsSet { applied: true })
            }
            Command::Batch(commands) => {
                if let Some(i) = commands.iter().position(|c| matches!(c, Command::Batch(_))) {
                    return Err(Rejection::Invalid {
                        field: format!("batch[{i}]"),
                        reason: "a batch cannot hold a batch".into(),
                    });
                }
                Ok(Response::Batch(
                    commands.into_iter().map(|c| self.apply(c)).collect(),
                ))
            }
        }
    }

    /// Takes the ids of the jobs that the commands applied since the last call may have
    /// created, changed or removed. A job missing here did not change (its record, that
    /// is; why it waits for slots is derived from the whole state and can change with
    /// any command). The replica takes them after every applied batch, so that job
    /// watches look at only those jobs; a caller that never takes them keeps one id per
    /// job it ever touched.
    pub fn take_changed_jobs(&mut self) -> BTreeSet<JobId> {
        std::mem::take(&mut self.changed_jobs)
    }

    /// Notes that the command being applied may change `id`'s record: called before
    /// every mutable access to a job.
    fn touch(&mut self, id: &JobId) {
        if !self.changed_jobs.contains(id) {
            self.changed_jobs.insert(id.clone());
        }
    }

    /// The time an accepted command runs at, and advances the clock to it.
    fn tick(&mut self, now: Millis) -> Millis {
        self.clock = self.clock.max(now);
        self.clock
    }
}
