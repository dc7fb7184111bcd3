//! The placement queue and gang placement: which jobs wait for slots, in what order, and
//! how a job gets a slot for every task or none.
//!
//! Nothing here does I/O, reads a clock or draws a random number: placement is a pure
//! function of the queue, the free slots and the round-robin cursor.

use std::cmp::Reverse;

use super::DispatcherState;
use crate::state::types::{
    Job, JobId, JobState, PlacementStrategy, SlotRef, TaskManagerId, TaskRef, TaskState,
};

/// Key of the placement queue: higher priority first, then submission order.
pub(super) type QueueKey = (Reverse<i32>, u64, JobId);

impl DispatcherState {
    pub(super) fn unqueue(&mut self, job_id: &JobId) {
        if let Some(job) = self.jobs.get(job_id) {
            self.queue.remove(&queue_key(job));
        }
    }

    /// Tries every queued job, in priority-then-FIFO order, against the current free
    /// capacity. A job that does not fit does not block smaller ones behind it.
    pub(super) fn place_queue(&mut self) {
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
    pub(super) fn try_place(&mut self, job_id: &JobId) -> bool {
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
        self.touch(job_id);
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

pub(super) fn queue_key(job: &Job) -> QueueKey {
    (Reverse(job.spec.priority), job.seq, job.id.clone())
}
