//! Read-only views of the state: accessors, job listing with paging, the attempts a
//! TaskManager should run or stop, and the work that is due (restarts, purges).
//!
//! Nothing here changes the state, does I/O, reads a clock or draws a random number: the
//! leader passes its `now` into `restarts_due` and `purge_due`.

use serde::{Deserialize, Serialize};

use super::DispatcherState;
use crate::state::command::{ClusterConfig, Counters, ResourceLimits};
use crate::state::types::{
    Attempt, Job, JobId, JobState, Millis, TaskManager, TaskManagerId, TaskRef, TaskSpec,
};

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

impl DispatcherState {
    /// The cluster configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The resource limits, or `None` while no SetResourceLimits command has set them
    /// (then nothing is bounded, as before limits existed).
    pub fn resource_limits(&self) -> Option<&ResourceLimits> {
        self.limits.as_ref()
    }

    /// Jobs in the registry, ended ones included.
    pub fn job_count(&self) -> u64 {
        self.jobs.len() as u64
    }

    /// Jobs in the registry that have not ended: what counts against `max_jobs`.
    pub fn active_job_count(&self) -> u64 {
        self.job_count().saturating_sub(self.terminal.len() as u64)
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
            .range::<_, JobId>((lower, Unbounded))
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
        self.run_and_stop(id).0
    }

    /// The attempts that hold a slot on the TaskManager but must stop: their job is
    /// winding down. The TaskManager stops them (or, if it never started them, reports
    /// them CANCELED at once) so their slots are freed.
    pub fn stopping(&self, id: &TaskManagerId) -> Vec<Assignment> {
        self.run_and_stop(id).1
    }

    /// [`Self::assignments`] and [`Self::stopping`] in one pass over the slots: what a
    /// heartbeat answers. A TaskManager's slots mostly hold tasks of a few jobs (gang
    /// placement), so the job of the previous slot is reused rather than looked up
    /// again: with 100 slots per TaskManager and 10,000 jobs, the lookups (key
    /// comparisons in the job map) were most of a heartbeat's cost.
    pub fn run_and_stop(&self, id: &TaskManagerId) -> (Vec<Assignment>, Vec<Assignment>) {
        let (mut run, mut stop) = (Vec::new(), Vec::new());
        let Some(tm) = self.task_managers.get(id) else {
            return (run, stop);
        };
        let mut last: Option<&Job> = None;
        for (i, slot) in tm.slots.iter().enumerate() {
            let Some((task, attempt)) = slot.as_ref() else {
                continue;
            };
            let job = match last {
                Some(j) if j.id == task.job => j,
                _ => match self.jobs.get(&task.job) {
                    Some(j) => {
                        last = Some(j);
                        j
                    }
                    None => continue,
                },
            };
            let Some(vertex) = job.spec.vertices.get(task.key.vertex as usize) else {
                continue;
            };
            let assignment = Assignment {
                task: task.clone(),
                vertex: vertex.name.clone(),
                attempt: *attempt,
                slot: i as u32,
                spec: vertex.task.clone(),
            };
            if job.state == JobState::Running {
                run.push(assignment);
            } else {
                stop.push(assignment);
            }
        }
        (run, stop)
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
}
