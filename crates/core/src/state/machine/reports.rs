//! Task state reports from TaskManagers (a heartbeat's batch): each report is checked on
//! its own (stale attempts, slots held elsewhere, illegal transitions are ignored with a
//! reason), then applied, freeing slots and failing or finishing jobs.
//!
//! Nothing here does I/O, reads a clock or draws a random number.

use super::DispatcherState;
use crate::state::command::{Rejection, ReportOutcome, Response, TaskReport};
use crate::state::types::{JobState, Millis, TaskManagerId, TaskState};

impl DispatcherState {
    pub(super) fn report(
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
        self.touch(&r.job);
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
}

fn describe_exit(code: Option<i32>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (Some(c), true) => format!("exit code {c}"),
        (Some(c), false) => format!("exit code {c}: {reason}"),
        (None, false) => reason.to_string(),
        (None, true) => "no reason given".to_string(),
    }
}
