//! Checkpoint bookkeeping per job, as Flink keeps it in ZooKeeper: the checkpoint id
//! counter and the bounded list of completed-checkpoint pointers.
//!
//! Nothing here does I/O, reads a clock or draws a random number.

use super::DispatcherState;
use crate::state::command::{Rejection, Response};
use crate::state::types::{CompletedCheckpoint, JobId, JobState, Millis};

impl DispatcherState {
    pub(super) fn allocate_checkpoint(
        &mut self,
        job_id: &JobId,
        now: Millis,
    ) -> Result<Response, Rejection> {
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
        self.touch(job_id);
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

    pub(super) fn record_checkpoint(
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
        self.touch(job_id);
        if let Some(job) = self.jobs.get_mut(job_id) {
            let book = &mut job.checkpoints.completed;
            book.push(CompletedCheckpoint {
                id: checkpoint_id,
                location,
                completed_at: now,
            });
            trim_oldest(book, keep);
            job.updated_at = now;
        }
        Ok(Response::CheckpointRecorded { id: checkpoint_id })
    }

    /// Keeps at most `keep` completed checkpoints per job, dropping the oldest.
    pub(super) fn retain_checkpoints(&mut self, keep: usize) {
        // Only jobs over the bound are touched, so a snapshot sharing the map copies
        // nothing else.
        let over: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.checkpoints.completed.len() > keep)
            .map(|(id, _)| id.clone())
            .collect();
        for id in over {
            let trimmed = match self.jobs.get_mut(&id) {
                Some(job) => trim_oldest(&mut job.checkpoints.completed, keep),
                None => false,
            };
            if trimmed {
                self.touch(&id);
            }
        }
    }
}

/// Returns whether any was dropped.
fn trim_oldest(book: &mut Vec<CompletedCheckpoint>, keep: usize) -> bool {
    if book.len() <= keep {
        return false;
    }
    let excess = book.len() - keep;
    book.drain(..excess);
    true
}
