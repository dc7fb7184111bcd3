//! Job lifecycle: submission and the resource limits it is held to, cancellation, task
//! failure and the restart strategy, restarts, winding down (settle), purging terminal
//! jobs, and the one function that moves a job's state and its counters.
//!
//! Resource limits count jobs that have not ended against `max_jobs` and
//! `max_spec_bytes`; ended jobs still hold memory until purged, so a submission that
//! needs their room removes the oldest of them first (as Flink's job store evicts its
//! oldest finished jobs past `jobstore.max-capacity`). A registry full of finished jobs
//! thus never refuses work, and the registry never holds more than the limits.
//!
//! Nothing here does I/O, reads a clock or draws a random number: every time is a
//! command's `now`, passed through `tick`.

use super::queue::queue_key;
use super::DispatcherState;
use crate::codec;
use crate::state::command::{Rejection, Response};
use crate::state::types::{
    Checkpoints, Job, JobId, JobSpec, JobState, Millis, RestartStrategy, Task, TaskKey, TaskState,
};
use crate::state::validate::{validate_job_spec, validate_restart_limits};

/// What a spec counts against `max_spec_bytes`: its encoded length, the same on every
/// replica and close to what it costs in the log and in snapshots.
pub(super) fn spec_bytes(spec: &JobSpec) -> u64 {
    // Encoding these types cannot fail (every sequence and map knows its length); were it
    // to, the spec would count as too big for any limit, alike on every replica.
    codec::encoded_len(spec).unwrap_or(u64::MAX)
}

impl DispatcherState {
    /// Whether a new job with this spec is admitted now, as SubmitJob decides it: the
    /// spec is valid, its restart strategy is within the limits, and the jobs that have
    /// not ended leave room for it. Returns the spec's size in bytes. The gRPC layer asks
    /// before proposing, so that nothing refused reaches the log; `apply` asks again.
    pub fn check_new_job(&self, spec: &JobSpec) -> Result<u64, Rejection> {
        validate_job_spec(spec, &self.config)?;
        let bytes = spec_bytes(spec);
        let Some(limits) = &self.limits else {
            return Ok(bytes);
        };
        validate_restart_limits(spec, limits)?;
        let active_jobs = self.active_job_count();
        if active_jobs >= limits.max_jobs {
            return Err(Rejection::QuotaExceeded {
                limit: "max_jobs".into(),
                max: limits.max_jobs,
                unit: "jobs".into(),
                in_use: active_jobs,
                needs: 1,
            });
        }
        let active_bytes = self.counters.active_spec_bytes;
        if active_bytes.saturating_add(bytes) > limits.max_spec_bytes {
            return Err(Rejection::QuotaExceeded {
                limit: "max_spec_bytes".into(),
                max: limits.max_spec_bytes,
                unit: "bytes".into(),
                in_use: active_bytes,
                needs: bytes,
            });
        }
        Ok(bytes)
    }

    /// Removes ended jobs, oldest first, until a new job of `bytes` fits the limits.
    /// `check_new_job` made sure that removing every ended job would be enough.
    fn make_room(&mut self, bytes: u64) {
        let Some(limits) = &self.limits else {
            return;
        };
        let (max_jobs, max_bytes) = (limits.max_jobs, limits.max_spec_bytes);
        while self.jobs.len() as u64 >= max_jobs
            || self.counters.spec_bytes.saturating_add(bytes) > max_bytes
        {
            let Some((_, id)) = self.terminal.pop_first() else {
                break;
            };
            self.remove_job(&id);
        }
    }

    /// Drops a job from the registry and its counters (the caller has taken it out of
    /// the terminal index).
    fn remove_job(&mut self, id: &JobId) {
        if let Some(job) = self.jobs.remove(id) {
            self.touch(id);
            self.count_state(Some(job.state), None);
            self.counters.spec_bytes = self.counters.spec_bytes.saturating_sub(job.spec_bytes);
            if !job.state.is_terminal() {
                self.counters.active_spec_bytes = self
                    .counters
                    .active_spec_bytes
                    .saturating_sub(job.spec_bytes);
            }
        }
    }

    pub(super) fn submit(
        &mut self,
        job_id: JobId,
        spec: JobSpec,
        now: Millis,
    ) -> Result<Response, Rejection> {
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
        let bytes = self.check_new_job(&spec)?;
        self.make_room(bytes);
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
            spec_bytes: bytes,
        };
        self.count_state(None, Some(JobState::Created));
        self.counters.spec_bytes = self.counters.spec_bytes.saturating_add(bytes);
        self.counters.active_spec_bytes = self.counters.active_spec_bytes.saturating_add(bytes);
        self.queue.insert(queue_key(&job));
        self.touch(&job_id);
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

    pub(super) fn cancel(&mut self, job_id: &JobId, now: Millis) -> Result<Response, Rejection> {
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
        self.touch(job_id);
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

    /// A task of a RUNNING job failed: restart the job if its strategy allows, else fail
    /// it. Jobs already winding down are left as they are.
    pub(super) fn on_task_failure(&mut self, job_id: &JobId, reason: &str, now: Millis) {
        self.touch(job_id);
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
    pub(super) fn settle(&mut self, job_id: &JobId, now: Millis) {
        self.touch(job_id);
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

    pub(super) fn restart(&mut self, job_id: &JobId, now: Millis) -> Result<Response, Rejection> {
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
        self.touch(job_id);
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

    pub(super) fn purge(&mut self, now: Millis) -> Response {
        let now = self.tick(now);
        let retention = self.config.finished_job_retention_ms;
        let mut purged = Vec::new();
        while let Some((at, id)) = self.terminal.first().cloned() {
            if at.saturating_add(retention) > now {
                break;
            }
            self.terminal.pop_first();
            self.remove_job(&id);
            purged.push(id);
        }
        Response::Purged { jobs: purged }
    }

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

    pub(super) fn set_job_state(&mut self, job_id: &JobId, to: JobState, now: Millis) {
        self.touch(job_id);
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
            if !from.is_terminal() {
                self.counters.active_spec_bytes = self
                    .counters
                    .active_spec_bytes
                    .saturating_sub(job.spec_bytes);
            }
        }
        self.count_state(Some(from), Some(to));
    }
}
