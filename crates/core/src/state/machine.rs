//! `DispatcherState`: the registry of jobs and TaskManagers, and `apply`.
//!
//! Every command is checked completely before anything changes, so a rejected command
//! leaves the state byte-for-byte as it was (the property tests compare digests).
//! Derived indexes (free slots, the placement queue, due restarts, terminal jobs,
//! counters) are kept in step by the few functions that move slots and states, and are
//! rebuilt, never decoded, on restore.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::{
    ClusterConfig, Command, Counters, Rejection, ReportOutcome, Response, TaskReport,
};
use super::placement::SlotIndex;
use super::types::{
    Attempt, Checkpoints, CompletedCheckpoint, Job, JobId, JobSpec, JobState, Millis,
    PlacementStrategy, RestartStrategy, SlotRef, Task, TaskKey, TaskManager, TaskManagerId,
    TaskManagerSpec, TaskRef, TaskSpec, TaskState,
};
use super::validate::{validate_cluster_config, validate_job_spec, validate_task_manager};
use crate::codec::{self, CodecError};

/// A task attempt a TaskManager should be running (the heartbeat's answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The task.
    pub task: TaskRef,
    /// Its vertex name.
    pub vertex: String,
    /// The attempt to run.
    pub attempt: Attempt,
    /// Slot index on the TaskManager.
    pub slot: u32,
    /// What to run.
    pub spec: TaskSpec,
}

/// Key of the placement queue: higher priority first, then submission order.
type QueueKey = (Reverse<i32>, u64, JobId);

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
    jobs: BTreeMap<JobId, Job>,
    task_managers: BTreeMap<TaskManagerId, TaskManager>,

    // Derived, never encoded.
    index: SlotIndex,
    queue: BTreeSet<QueueKey>,
    restarts: BTreeSet<(Millis, JobId)>,
    terminal: BTreeSet<(Millis, JobId)>,
    counters: Counters,
}

/// What the canonical encoding holds: the primary data only.
#[derive(Serialize)]
struct Encoded<'a> {
    config: &'a ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: &'a Option<TaskManagerId>,
    jobs: &'a BTreeMap<JobId, Job>,
    task_managers: &'a BTreeMap<TaskManagerId, TaskManager>,
}

#[derive(Deserialize)]
struct Decoded {
    config: ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: Option<TaskManagerId>,
    jobs: BTreeMap<JobId, Job>,
    task_managers: BTreeMap<TaskManagerId, TaskManager>,
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

    // ----- queries -------------------------------------------------------------------

    /// The cluster configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Largest leader time accepted so far.
    pub fn clock(&self) -> Millis {
        self.clock
    }

    /// Counters kept by `apply`.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A job by id.
    pub fn job(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id)
    }

    /// All jobs in id order.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// A page of jobs in id order after `after`, keeping those `keep` accepts. Returns
    /// the page and the id to continue after, if more remain.
    pub fn list_jobs(
        &self,
        after: Option<&JobId>,
        limit: usize,
        keep: impl Fn(&Job) -> bool,
    ) -> (Vec<&Job>, Option<JobId>) {
        use std::ops::Bound::{Excluded, Unbounded};
        let lower = after.map_or(Unbounded, Excluded);
        let mut page: Vec<&Job> = self
            .jobs
            .range::<JobId, _>((lower, Unbounded))
            .map(|(_, j)| j)
            .filter(|j| keep(j))
            .take(limit.saturating_add(1))
            .collect();
        if page.len() > limit {
            page.truncate(limit);
            let next = page.last().map(|j| j.id.clone());
            return (page, next);
        }
        (page, None)
    }

    /// A TaskManager by id.
    pub fn task_manager(&self, id: &TaskManagerId) -> Option<&TaskManager> {
        self.task_managers.get(id)
    }

    /// All TaskManagers in id order.
    pub fn task_managers(&self) -> impl Iterator<Item = &TaskManager> {
        self.task_managers.values()
    }

    /// The attempts the TaskManager should be running: those in its slots whose job is
    /// RUNNING. Anything else it runs, it must kill.
    pub fn assignments(&self, id: &TaskManagerId) -> Vec<Assignment> {
        self.slot_attempts(id, true)
    }

    /// The attempts that hold a slot on the TaskManager but must stop: their job is
    /// winding down. The TaskManager stops them (or, if it never started them, reports
    /// them CANCELED at once) so their slots are freed.
    pub fn stopping(&self, id: &TaskManagerId) -> Vec<Assignment> {
        self.slot_attempts(id, false)
    }

    fn slot_attempts(&self, id: &TaskManagerId, running: bool) -> Vec<Assignment> {
        let Some(tm) = self.task_managers.get(id) else {
            return Vec::new();
        };
        tm.slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let (task, attempt) = slot.as_ref()?;
                let job = self.jobs.get(&task.job)?;
                if (job.state == JobState::Running) != running {
                    return None;
                }
                let vertex = job.spec.vertices.get(task.key.vertex as usize)?;
                Some(Assignment {
                    task: task.clone(),
                    vertex: vertex.name.clone(),
                    attempt: *attempt,
                    slot: i as u32,
                    spec: vertex.task.clone(),
                })
            })
            .collect()
    }

    /// Jobs whose restart delay has passed at `now` and whose tasks have all stopped:
    /// the leader proposes RestartTasks for each.
    pub fn restarts_due(&self, now: Millis) -> Vec<JobId> {
        self.restarts
            .iter()
            .take_while(|(due, _)| *due <= now)
            .filter(|(_, id)| self.jobs.get(id).is_some_and(|j| j.active_tasks() == 0))
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Whether PurgeFinishedJobs at `now` would remove anything.
    pub fn purge_due(&self, now: Millis) -> bool {
        self.terminal
            .first()
            .is_some_and(|(at, _)| at.saturating_add(self.config.finished_job_retention_ms) <= now)
    }

    /// Jobs waiting for slots, in queue order.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &JobId> {
        self.queue.iter().map(|(_, _, id)| id)
    }

    // ----- encoding ------------------------------------------------------------------

    /// The canonical encoding: format-version byte, then bincode of the primary data in
    /// ordered maps. Equal states give equal bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(&Encoded {
            config: &self.config,
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: &self.rr_cursor,
            jobs: &self.jobs,
            task_managers: &self.task_managers,
        })
    }

    /// Restores a state from its canonical encoding, rebuilding the indexes.
    pub fn restore(bytes: &[u8]) -> Result<Self, CodecError> {
        let d: Decoded = codec::decode(bytes)?;
        let mut s = DispatcherState {
            config: d.config,
            clock: d.clock,
            next_seq: d.next_seq,
            rr_cursor: d.rr_cursor,
            jobs: d.jobs,
            task_managers: d.task_managers,
            ..Default::default()
        };
        s.rebuild_indexes();
        Ok(s)
    }

    /// SHA-256 of the canonical encoding, in hex: replicas that applied the same log
    /// prefix have the same digest.
    pub fn digest(&self) -> Result<String, CodecError> {
        Ok(codec::digest_hex(&self.encode()?))
    }

    /// Recomputes every derived index from the primary data.
    fn rebuild_indexes(&mut self) {
        self.index = SlotIndex::default();
        self.queue.clear();
        self.restarts.clear();
        self.terminal.clear();
        self.counters = Counters::default();
        for tm in self.task_managers.values() {
            let free = tm.free_slots();
            self.index.add(tm, free);
            self.counters.total_slots += u64::from(tm.spec.slots);
            self.counters.free_slots += u64::from(free);
        }
        for job in self.jobs.values() {
            *self.counters.jobs_by_state.entry(job.state).or_default() += 1;
            if job.awaits_placement() {
                self.queue.insert(queue_key(job));
            }
            if let Some(due) = job.restart_due_at {
                self.restarts.insert((due, job.id.clone()));
            }
            if let Some(at) = job.finished_at {
                self.terminal.insert((at, job.id.clone()));
            }
        }
    }

    /// Derived data recomputed from scratch, for the invariant checker.
    pub(crate) fn derived_from_scratch(&self) -> DerivedView {
        let mut fresh = DispatcherState {
            config: self.config.clone(),
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: self.rr_cursor.clone(),
            jobs: self.jobs.clone(),
            task_managers: self.task_managers.clone(),
            ..Default::default()
        };
        fresh.rebuild_indexes();
        fresh.derived()
    }

    /// The derived data as kept incrementally.
    pub(crate) fn derived(&self) -> DerivedView {
        let mut counters = self.counters.clone();
        counters.jobs_by_state.retain(|_, n| *n > 0);
        DerivedView {
            index: self.index.clone(),
            queue: self.queue.clone(),
            restarts: self.restarts.clone(),
            terminal: self.terminal.clone(),
            counters,
        }
    }

    // ----- apply ---------------------------------------------------------------------

    /// Applies one command. Pure and deterministic: the same state and command give the
    /// same result on every replica. A rejection changes nothing.
    pub fn apply(&mut self, command: Command) -> Result<Response, Rejection> {
        match command {
            Command::SubmitJob { job_id, spec, now } => self.submit(job_id, spec, now),
            Command::CancelJob { job_id, now } => self.cancel(&job_id, now),
            Command::RegisterTaskManager { spec, now } => self.register(spec, now),
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
                let keep = config.max_retained_checkpoints as usize;
                for job in self.jobs.values_mut() {
                    let book = &mut job.checkpoints.completed;
                    if book.len() > keep {
                        let excess = book.len() - keep;
                        book.drain(..excess);
                    }
                }
                self.config = config;
                Ok(Response::ConfigSet)
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

    fn restore_state(&mut self, bytes: &[u8]) -> Result<Response, Rejection> {
        if !self.jobs.is_empty() || !self.task_managers.is_empty() || self.next_seq != 0 {
            return Err(Rejection::invalid(
                "state",
                "a backup can only be restored into a new, empty cluster",
            ));
        }
        // Decoding is deterministic: every replica gets the same state or the same error.
        let restored = DispatcherState::restore(bytes)
            .map_err(|e| Rejection::invalid("state", format!("not a valid backup: {e}")))?;
        *self = restored;
        Ok(Response::Restored {
            jobs: self.jobs.len() as u64,
            task_managers: self.task_managers.len() as u64,
        })
    }

    /// The time an accepted command runs at, and advances the clock to it.
    fn tick(&mut self, now: Millis) -> Millis {
        self.clock = self.clock.max(now);
        self.clock
    }

    fn submit(&mut self, job_id: JobId, spec: JobSpec, now: Millis) -> Result<Response, Rejection> {
        if let Some(existing) = self.jobs.get(&job_id) {
            // A retried submission (same id, same spec) returns the job it created.
            return if existing.spec == spec {
                Ok(Response::Submitted {
                    job_id,
                    created: false,
                    state: existing.state,
                })
            } else {
                Err(Rejection::AlreadyExists { job_id })
            };
        }
        validate_job_spec(&spec, &self.config)?;
        let now = self.tick(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        let tasks = spec
            .vertices
            .iter()
            .enumerate()
            .flat_map(|(v, vertex)| {
                (0..vertex.parallelism).map(move |s| Task {
                    key: TaskKey {
                        vertex: v as u32,
                        subtask: s,
                    },
                    attempt: 1,
                    state: TaskState::Scheduled,
                    slot: None,
                    last_task_manager: None,
                    exit_code: None,
                    reason: String::new(),
                    updated_at: now,
                })
            })
            .collect();
        let job = Job {
            id: job_id.clone(),
            spec,
            state: JobState::Created,
            seq,
            submitted_at: now,
            updated_at: now,
            finished_at: None,
            restarts: 0,
            restart_due_at: None,
            failure: String::new(),
            tasks,
            checkpoints: Checkpoints {
                next_id: 1,
                completed: Vec::new(),
            },
        };
        self.count_state(None, Some(JobState::Created));
        self.queue.insert(queue_key(&job));
        self.jobs.insert(job_id.clone(), job);
        // Capacity has not changed since the queue was last tried, so only the newcomer
        // can possibly fit now.
        self.try_place(&job_id);
        let state = self
            .jobs
            .get(&job_id)
            .map_or(JobState::Created, |j| j.state);
        Ok(Response::Submitted {
            job_id,
            created: true,
            state,
        })
    }

    fn cancel(&mut self, job_id: &JobId, now: Millis) -> Result<Response, Rejection> {
        let job = self.jobs.get(job_id).ok_or_else(|| Rejection::UnknownJob {
            job_id: job_id.clone(),
        })?;
        match job.state {
            JobState::Canceled | JobState::Cancelling => {
                return Ok(Response::JobState {
                    job_id: job_id.clone(),
                    state: job.state,
                })
            }
            JobState::Finished | JobState::Failed => {
                return Err(Rejection::IllegalJobTransition {
                    job_id: job_id.clone(),
                    from: job.state,
                    to: JobState::Canceled,
                })
            }
            JobState::Created | JobState::Running | JobState::Failing | JobState::Restarting => {}
        }
        let now = self.tick(now);
        self.unqueue(job_id);
        if let Some(job) = self.jobs.get_mut(job_id) {
            if let Some(due) = job.restart_due_at.take() {
                self.restarts.remove(&(due, job_id.clone()));
            }
        }
        self.set_job_state(job_id, JobState::Cancelling, now);
        self.settle(job_id, now);
        let state = self
            .jobs
            .get(job_id)
            .map_or(JobState::Canceled, |j| j.state);
        Ok(Response::JobState {
            job_id: job_id.clone(),
            state,
        })
    }

    fn register(&mut self, spec: TaskManagerSpec, now: Millis) -> Result<Response, Rejection> {
        validate_task_manager(&spec, &self.config)?;
        let mut failed = 0;
        if let Some(existing) = self.task_managers.get(&spec.id) {
            if existing.spec.instance == spec.instance {
                // A retried registration of the same process.
                return if existing.spec == spec {
                    Ok(Response::Registered {
                        id: spec.id,
                        created: false,
                        failed_attempts: 0,
                    })
                } else {
                    Err(Rejection::invalid(
                        "instance_id",
                        format!(
                            "instance {} of TaskManager {} is already registered with other slots, address or labels",
                            spec.instance, spec.id
                        ),
                    ))
                };
            }
            // The TaskManager restarted: its previous life's attempts are gone.
            let (id, old_instance) = (spec.id.clone(), existing.spec.instance.clone());
            let now = self.tick(now);
            failed = self.drop_task_manager(
                &id,
                now,
                &format!("TaskManager {id} restarted (instance {old_instance} replaced)"),
            );
        }
        let now = self.tick(now);
        let tm = TaskManager {
            slots: vec![None; spec.slots as usize],
            spec,
            registered_at: now,
        };
        let id = tm.spec.id.clone();
        self.index.add(&tm, tm.spec.slots);
        self.counters.total_slots += u64::from(tm.spec.slots);
        self.counters.free_slots += u64::from(tm.spec.slots);
        self.task_managers.insert(id.clone(), tm);
        self.place_queue();
        Ok(Response::Registered {
            id,
            created: true,
            failed_attempts: failed,
        })
    }

    fn remove_task_manager(
        &mut self,
        id: &TaskManagerId,
        instance: &str,
        now: Millis,
        why: &str,
    ) -> Result<Response, Rejection> {
        self.check_instance(id, instance)?;
        let now = self.tick(now);
        let failed = self.drop_task_manager(id, now, &format!("TaskManager {id} {why}"));
        self.place_queue();
        Ok(Response::Removed {
            id: id.clone(),
            failed_attempts: failed,
        })
    }

    fn check_instance(&self, id: &TaskManagerId, instance: &str) -> Result<(), Rejection> {
        match self.task_managers.get(id) {
            Some(tm) if tm.spec.instance == instance => Ok(()),
            _ => Err(Rejection::UnknownTaskManager {
                id: id.clone(),
                instance: instance.to_string(),
            }),
        }
    }

    /// Removes a TaskManager, failing every attempt it held. Returns how many failed.
    fn drop_task_manager(&mut self, id: &TaskManagerId, now: Millis, reason: &str) -> u32 {
        let Some(tm) = self.task_managers.remove(id) else {
            return 0;
        };
        self.index.remove(&tm);
        self.counters.total_slots -= u64::from(tm.spec.slots);
        self.counters.free_slots -= u64::from(tm.free_slots());
        let mut failed = 0;
        let mut jobs = BTreeSet::new();
        for (task, attempt) in tm.slots.into_iter().flatten() {
            let Some(job) = self.jobs.get_mut(&task.job) else {
                continue;
            };
            let Some(i) = job.task_index(task.key) else {
                continue;
            };
            let t = &mut job.tasks[i];
            if t.attempt != attempt {
                continue;
            }
            t.state = TaskState::Failed;
            t.slot = None;
            t.exit_code = None;
            t.reason = reason.to_string();
            t.updated_at = now;
            job.updated_at = now;
            failed += 1;
            jobs.insert(task.job.clone());
        }
        for job_id in jobs {
            self.on_task_failure(&job_id, reason, now);
            self.settle(&job_id, now);
        }
        failed
    }

    fn report(
        &mut self,
        tm_id: &TaskManagerId,
        instance: &str,
        reports: Vec<TaskReport>,
        now: Millis,
    ) -> Result<Response, Rejection> {
        self.check_instance(tm_id, instance)?;
        let now = self.tick(now);
        let mut outcomes = Vec::with_capacity(reports.len());
        let mut freed = false;
        for (i, r) in reports.into_iter().enumerate() {
            match self.check_report(tm_id, i, &r) {
                Ok(None) => outcomes.push(ReportOutcome::Applied),
                Ok(Some(idx)) => {
                    freed |= self.apply_report(tm_id, idx, r, now);
                    outcomes.push(ReportOutcome::Applied);
                }
                Err(why) => outcomes.push(ReportOutcome::Ignored(why)),
            }
        }
        if freed {
            self.place_queue();
        }
        Ok(Response::Reports { outcomes })
    }

    /// Checks one report. `Ok(None)`: it repeats what is known (a retried heartbeat);
    /// `Ok(Some(i))`: it moves task `i`.
    fn check_report(
        &self,
        tm_id: &TaskManagerId,
        n: usize,
        r: &TaskReport,
    ) -> Result<Option<usize>, Rejection> {
        let job = self.jobs.get(&r.job).ok_or_else(|| Rejection::UnknownJob {
            job_id: r.job.clone(),
        })?;
        let idx = job.task_index(r.key).ok_or_else(|| {
            Rejection::invalid(
                format!("reports[{n}].task"),
                format!("job {} has no subtask {}", r.job, r.key),
            )
        })?;
        let task = &job.tasks[idx];
        if r.attempt != task.attempt {
            return Err(Rejection::StaleAttempt {
                job_id: r.job.clone(),
                key: r.key,
                attempt: r.attempt,
                current: task.attempt,
            });
        }
        let held_here = task.slot.as_ref().is_some_and(|s| &s.task_manager == tm_id);
        let ran_here = task.last_task_manager.as_ref() == Some(tm_id);
        if task.state.is_terminal() && ran_here {
            if r.state == task.state {
                return Ok(None);
            }
            return Err(Rejection::IllegalTaskTransition {
                job_id: r.job.clone(),
                key: r.key,
                attempt: r.attempt,
                from: task.state,
                to: r.state,
            });
        }
        if !held_here {
            return Err(Rejection::NotAssigned {
                job_id: r.job.clone(),
                key: r.key,
                attempt: r.attempt,
                task_manager: tm_id.clone(),
            });
        }
        let legal = match (task.state, r.state) {
            (TaskState::Deploying, TaskState::Deploying)
            | (TaskState::Running, TaskState::Running) => return Ok(None),
            (TaskState::Deploying, s) => s != TaskState::Scheduled,
            (TaskState::Running, s) => s.is_terminal(),
            _ => false,
        };
        if !legal {
            return Err(Rejection::IllegalTaskTransition {
                job_id: r.job.clone(),
                key: r.key,
                attempt: r.attempt,
                from: task.state,
                to: r.state,
            });
        }
        Ok(Some(idx))
    }

    /// Applies a checked report. Returns whether a slot was freed.
    fn apply_report(
        &mut self,
        tm_id: &TaskManagerId,
        idx: usize,
        r: TaskReport,
        now: Millis,
    ) -> bool {
        let Some(job) = self.jobs.get_mut(&r.job) else {
            return false;
        };
        let task = &mut job.tasks[idx];
        task.state = r.state;
        task.updated_at = now;
        job.updated_at = now;
        if !r.state.is_terminal() {
            return false;
        }
        task.exit_code = r.exit_code;
        task.reason = r.reason.clone();
        let slot = task.slot.take();
        let job_state = job.state;
        let all_finished = job.tasks.iter().all(|t| t.state == TaskState::Finished);
        if let Some(slot) = slot {
            self.free_slot(tm_id, slot.index);
        }
        match r.state {
            TaskState::Finished if job_state == JobState::Running && all_finished => {
                self.set_job_state(&r.job, JobState::Finished, now);
            }
            TaskState::Failed => {
                let reason = format!(
                    "task {}#{} attempt {} failed: {}",
                    r.job,
                    r.key,
                    r.attempt,
                    describe_exit(r.exit_code, &r.reason)
                );
                self.on_task_failure(&r.job, &reason, now);
            }
            TaskState::Canceled if job_state == JobState::Running => {
                // Nobody asked for this cancellation: treat it as a failure.
                let reason = format!(
                    "task {}#{} attempt {} was canceled by its TaskManager: {}",
                    r.job, r.key, r.attempt, r.reason
                );
                self.on_task_failure(&r.job, &reason, now);
            }
            _ => {}
        }
        self.settle(&r.job, now);
        true
    }

    fn free_slot(&mut self, tm_id: &TaskManagerId, index: u32) {
        if let Some(tm) = self.task_managers.get_mut(tm_id) {
            if let Some(slot) = tm.slots.get_mut(index as usize) {
                if slot.take().is_some() {
                    self.index.give(tm_id);
                    self.counters.free_slots += 1;
                }
            }
        }
    }

    /// A task of a RUNNING job failed: restart the job if its strategy allows, else fail
    /// it. Jobs already winding down are left as they are.
    fn on_task_failure(&mut self, job_id: &JobId, reason: &str, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.state != JobState::Running {
            return;
        }
        job.failure = reason.to_string();
        let next = match job.spec.restart {
            RestartStrategy::FixedDelay { attempts, delay_ms } if job.restarts < attempts => {
                job.restarts += 1;
                let due = now.saturating_add(delay_ms);
                job.restart_due_at = Some(due);
                self.restarts.insert((due, job_id.clone()));
                JobState::Restarting
            }
            _ => JobState::Failing,
        };
        self.set_job_state(job_id, next, now);
    }

    /// Finishes a winding-down job once none of its attempts holds a slot: FAILING becomes
    /// FAILED, CANCELLING becomes CANCELED. Unplaced tasks of a job that ends are
    /// canceled.
    fn settle(&mut self, job_id: &JobId, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let end = match job.state {
            JobState::Failing => JobState::Failed,
            JobState::Cancelling => JobState::Canceled,
            _ => return,
        };
        if job.active_tasks() > 0 {
            return;
        }
        for t in job.tasks.iter_mut().filter(|t| !t.state.is_terminal()) {
            t.state = TaskState::Canceled;
            t.reason = format!("job {}", end.name().to_lowercase());
            t.updated_at = now;
        }
        if let Some(due) = job.restart_due_at.take() {
            self.restarts.remove(&(due, job_id.clone()));
        }
        self.set_job_state(job_id, end, now);
    }

    fn restart(&mut self, job_id: &JobId, now: Millis) -> Result<Response, Rejection> {
        let job = self.jobs.get(job_id).ok_or_else(|| Rejection::UnknownJob {
            job_id: job_id.clone(),
        })?;
        let active = job.active_tasks() as u32;
        let due = job.restart_due_at;
        let effective = self.clock.max(now);
        if job.state != JobState::Restarting || active > 0 || due.is_none_or(|d| d > effective) {
            return Err(Rejection::RestartNotDue {
                job_id: job_id.clone(),
                due_at: due,
                now,
                active,
            });
        }
        let now = self.tick(now);
        if let Some(job) = self.jobs.get_mut(job_id) {
            if let Some(d) = job.restart_due_at.take() {
                self.restarts.remove(&(d, job_id.clone()));
            }
            for t in &mut job.tasks {
                t.attempt += 1;
                t.state = TaskState::Scheduled;
                t.slot = None;
                t.last_task_manager = None;
                t.exit_code = None;
                t.reason.clear();
                t.updated_at = now;
            }
            job.updated_at = now;
            self.queue.insert(queue_key(job));
        }
        self.try_place(job_id);
        let state = self
            .jobs
            .get(job_id)
            .map_or(JobState::Restarting, |j| j.state);
        Ok(Response::JobState {
            job_id: job_id.clone(),
            state,
        })
    }

    fn allocate_checkpoint(&mut self, job_id: &JobId, now: Millis) -> Result<Response, Rejection> {
        let job = self.jobs.get(job_id).ok_or_else(|| Rejection::UnknownJob {
            job_id: job_id.clone(),
        })?;
        if job.state != JobState::Running {
            return Err(Rejection::JobNotActive {
                job_id: job_id.clone(),
                state: job.state,
                reason: "checkpoints are taken only while the job runs".into(),
            });
        }
        let now = self.tick(now);
        let job = self
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| Rejection::UnknownJob {
                job_id: job_id.clone(),
            })?;
        let id = job.checkpoints.next_id;
        job.checkpoints.next_id += 1;
        job.updated_at = now;
        Ok(Response::CheckpointId { id })
    }

    fn record_checkpoint(
        &mut self,
        job_id: &JobId,
        checkpoint_id: u64,
        location: String,
        now: Millis,
    ) -> Result<Response, Rejection> {
        let job = self.jobs.get(job_id).ok_or_else(|| Rejection::UnknownJob {
            job_id: job_id.clone(),
        })?;
        if job.state.is_terminal() {
            return Err(Rejection::JobNotActive {
                job_id: job_id.clone(),
                state: job.state,
                reason: "a terminal job records no checkpoints".into(),
            });
        }
        if location.trim().is_empty() || location.len() > self.config.max_string_len as usize {
            return Err(Rejection::invalid(
                "location",
                format!(
                    "must be a non-empty pointer of at most {} bytes",
                    self.config.max_string_len
                ),
            ));
        }
        let out_of_order = |reason: String| Rejection::CheckpointOutOfOrder {
            job_id: job_id.clone(),
            checkpoint_id,
            reason,
        };
        if checkpoint_id >= job.checkpoints.next_id || checkpoint_id == 0 {
            return Err(out_of_order(format!(
                "the counter has handed out ids below {} only",
                job.checkpoints.next_id
            )));
        }
        if let Some(last) = job.checkpoints.completed.last() {
            if checkpoint_id <= last.id {
                return Err(out_of_order(format!(
                    "checkpoint {} is already the latest completed",
                    last.id
                )));
            }
        }
        let now = self.tick(now);
        let keep = self.config.max_retained_checkpoints as usize;
        if let Some(job) = self.jobs.get_mut(job_id) {
            let book = &mut job.checkpoints.completed;
            book.push(CompletedCheckpoint {
                id: checkpoint_id,
                location,
                completed_at: now,
            });
            if book.len() > keep {
                let excess = book.len() - keep;
                book.drain(..excess);
            }
            job.updated_at = now;
        }
        Ok(Response::CheckpointRecorded { id: checkpoint_id })
    }

    fn purge(&mut self, now: Millis) -> Response {
        let now = self.tick(now);
        let retention = self.config.finished_job_retention_ms;
        let mut purged = Vec::new();
        while let Some((at, id)) = self.terminal.first().cloned() {
            if at.saturating_add(retention) > now {
                break;
            }
            self.terminal.pop_first();
            if let Some(job) = self.jobs.remove(&id) {
                self.count_state(Some(job.state), None);
            }
            purged.push(id);
        }
        Response::Purged { jobs: purged }
    }

    // ----- state moves and placement ---------------------------------------------------

    fn count_state(&mut self, from: Option<JobState>, to: Option<JobState>) {
        if let Some(f) = from {
            if let Some(n) = self.counters.jobs_by_state.get_mut(&f) {
                *n -= 1;
                if *n == 0 {
                    self.counters.jobs_by_state.remove(&f);
                }
            }
        }
        if let Some(t) = to {
            *self.counters.jobs_by_state.entry(t).or_default() += 1;
        }
    }

    fn set_job_state(&mut self, job_id: &JobId, to: JobState, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let from = job.state;
        if from == to {
            return;
        }
        job.state = to;
        job.updated_at = now;
        if to.is_terminal() {
            job.finished_at = Some(now);
            self.terminal.insert((now, job_id.clone()));
        }
        self.count_state(Some(from), Some(to));
    }

    fn unqueue(&mut self, job_id: &JobId) {
        if let Some(job) = self.jobs.get(job_id) {
            self.queue.remove(&queue_key(job));
        }
    }

    /// Tries every queued job, in priority-then-FIFO order, against the current free
    /// capacity. A job that does not fit does not block smaller ones behind it.
    fn place_queue(&mut self) {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut after: Option<QueueKey> = None;
        while self.counters.free_slots > 0 {
            let next = match &after {
                None => self.queue.first().cloned(),
                Some(k) => self.queue.range((Excluded(k), Unbounded)).next().cloned(),
            };
            let Some(key) = next else {
                break;
            };
            self.try_place(&key.2);
            after = Some(key);
        }
    }

    /// Gang placement: every task of the job gets a slot, or none does.
    fn try_place(&mut self, job_id: &JobId) -> bool {
        let Some(job) = self.jobs.get(job_id) else {
            return false;
        };
        if !job.awaits_placement() || job.tasks.len() as u64 > self.counters.free_slots {
            return false;
        }
        let strategy = job.spec.placement.unwrap_or(self.config.default_placement);
        let mut cursor = self.rr_cursor.clone();
        let mut chosen: Vec<TaskManagerId> = Vec::with_capacity(job.tasks.len());
        for task in &job.tasks {
            let selector = &job.spec.vertices[task.key.vertex as usize].node_selector;
            match self
                .index
                .pick(strategy, cursor.as_ref(), selector, &self.task_managers)
            {
                Some(tm) => {
                    self.index.take(&tm);
                    if strategy == PlacementStrategy::RoundRobin {
                        cursor = Some(tm.clone());
                    }
                    chosen.push(tm);
                }
                None => {
                    for tm in &chosen {
                        self.index.give(tm);
                    }
                    return false;
                }
            }
        }
        // Commit: the index already counts these slots as taken.
        let Some(job) = self.jobs.get_mut(job_id) else {
            return false;
        };
        self.queue.remove(&queue_key(job));
        let now = self.clock;
        for (task, tm_id) in job.tasks.iter_mut().zip(chosen) {
            let Some(tm) = self.task_managers.get_mut(&tm_id) else {
                continue;
            };
            let Some(index) = tm.slots.iter().position(Option::is_none) else {
                continue;
            };
            tm.slots[index] = Some((
                TaskRef {
                    job: job_id.clone(),
                    key: task.key,
                },
                task.attempt,
            ));
            task.slot = Some(SlotRef {
                task_manager: tm_id.clone(),
                index: index as u32,
            });
            task.state = TaskState::Deploying;
            task.last_task_manager = Some(tm_id);
            task.updated_at = now;
            self.counters.free_slots -= 1;
        }
        self.rr_cursor = cursor;
        self.set_job_state(job_id, JobState::Running, now);
        true
    }
}

/// Derived data, compared by the invariant checker against a rebuild from scratch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DerivedView {
    index: SlotIndex,
    queue: BTreeSet<QueueKey>,
    restarts: BTreeSet<(Millis, JobId)>,
    terminal: BTreeSet<(Millis, JobId)>,
    counters: Counters,
}

fn queue_key(job: &Job) -> QueueKey {
    (Reverse(job.spec.priority), job.seq, job.id.clone())
}

fn describe_exit(code: Option<i32>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (Some(c), true) => format!("exit code {c}"),
        (Some(c), false) => format!("exit code {c}: {reason}"),
        (None, false) => reason.to_string(),
        (None, true) => "no reason given".to_string(),
    }
}
