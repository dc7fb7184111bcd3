//! Job watches: a job's states as this replica applies them, as a stream.
//!
//! A watch is served from the local applied state (any replica, no forwarding): it
//! sends the job's status when it starts, then each change, and ends after a terminal
//! state, when the job is purged, or when the replica shuts down (the client library
//! then re-attaches elsewhere). What to send for one applied change is the pure
//! [`step`]; [`spawn`] only waits for changes and feeds it.
//!
//! Architecture invariant: reads the applied state only; never proposes.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::raft::sm_store::SharedState;
use dispatcher_core::state::{DispatcherState, JobId};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;

/// How long a watch waits for an unknown job to be applied locally: a follower may not
/// yet have applied a job that was just submitted.
pub const JOB_APPEAR_WAIT: Duration = Duration::from_secs(2);

/// Why a watch ended early.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The job was purged from the state.
    Purged,
    /// The replica is shutting down.
    ShuttingDown,
}

/// What one applied change means for a watch.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// The job changed: send this event.
    Send(Box<pb::JobEvent>),
    /// Nothing the watcher sees changed.
    Quiet,
    /// The watch ends with this error.
    End(End),
}

/// The step for the job's `current` status after applying `index`, given the `last`
/// status sent.
pub fn step(last: &pb::JobStatus, current: Option<pb::JobStatus>, index: u64) -> Step {
    match current {
        None => Step::End(End::Purged),
        Some(s) if s == *last => Step::Quiet,
        Some(s) => Step::Send(Box::new(pb::JobEvent {
            job: Some(s),
            applied_index: index,
        })),
    }
}

/// Whether a job in this status will not change again (the watch is complete).
pub fn is_terminal(s: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(s.state),
        Ok(pb::JobState::Finished | pb::JobState::Failed | pb::JobState::Canceled)
    )
}

/// The job's status as GetJob and WatchJob show it: with why it waits for slots, which
/// is derived from the whole state, so a watcher also sees the reason change.
pub fn job_status(state: &DispatcherState, id: &JobId) -> Option<pb::JobStatus> {
    let job = state.job(id)?;
    Some(convert::job_status(job, state.pending_reason(id).as_ref()))
}

/// The job's status and the index it reflects, read under one lock so that no change
/// applied in between can be missed; waits up to [`JOB_APPEAR_WAIT`] for the job to
/// appear. `None` if it did not.
pub async fn first(
    shared: &SharedState,
    id: &JobId,
) -> Option<(pb::JobEvent, watch::Receiver<u64>)> {
    let mut applied = shared.subscribe();
    let wait = tokio::time::Instant::now() + JOB_APPEAR_WAIT;
    loop {
        applied.borrow_and_update();
        let (status, index) = {
            let g = shared.read();
            (
                job_status(&g.state, id),
                g.last_applied.map_or(0, |l| l.index),
            )
        };
        if let Some(status) = status {
            let event = pb::JobEvent {
                job: Some(status),
                applied_index: index,
            };
            return Some((event, applied));
        }
        if tokio::time::timeout_at(wait, applied.changed())
            .await
            .is_err()
        {
            return None;
        }
    }
}

/// Streams the job's changes after `first` into a channel, until the job is terminal,
/// purged, the receiver is gone, or `stopping` turns true.
pub fn spawn(
    shared: SharedState,
    id: JobId,
    first: pb::JobEvent,
    mut applied: watch::Receiver<u64>,
    mut stopping: watch::Receiver<bool>,
) -> mpsc::Receiver<Result<pb::JobEvent, End>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let Some(mut last) = first.job.clone() else {
            return;
        };
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        while !is_terminal(&last) {
            let shutting_down = tokio::select! {
                changed = applied.changed() => changed.is_err(),
                _ = stopping.wait_for(|s| *s) => true,
            };
            if shutting_down {
                let _ = tx.send(Err(End::ShuttingDown)).await;
                return;
            }
            let index = *applied.borrow_and_update();
            let current = job_status(&shared.read().state, &id);
            match step(&last, current, index) {
                Step::Quiet => {}
                Step::Send(event) => {
                    if let Some(job) = &event.job {
                        last = job.clone();
                    }
                    if tx.send(Ok(*event)).await.is_err() {
                        return;
                    }
                }
                Step::End(end) => {
                    let _ = tx.send(Err(end)).await;
                    return;
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: pb::JobState, attempt: u32) -> pb::JobStatus {
        pb::JobStatus {
            state: state as i32,
            restarts: attempt,
            ..Default::default()
        }
    }

    #[test]
    fn a_change_is_sent_with_its_index_and_an_unchanged_status_is_not() {
        let last = status(pb::JobState::Created, 0);
        assert_eq!(step(&last, Some(last.clone()), 7), Step::Quiet);
        let running = status(pb::JobState::Running, 0);
        assert_eq!(
            step(&last, Some(running.clone()), 8),
            Step::Send(Box::new(pb::JobEvent {
                job: Some(running),
                applied_index: 8
            }))
        );
    }

    #[test]
    fn a_watcher_sees_why_the_job_waits_and_the_reason_clearing_when_it_is_placed() {
        use dispatcher_core::state::{ClusterConfig, Command, JobSpec, TaskManagerSpec, TaskSpec};
        let mut state = DispatcherState::new(ClusterConfig::default());
        let tm = |id: &str, labels: &[(&str, &str)]| Command::RegisterTaskManager {
            spec: TaskManagerSpec {
                id: id.into(),
                instance: "i1".into(),
                address: String::new(),
                slots: 2,
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            },
            now: 1,
        };
        let id = JobId::parse("00000000-0000-4000-8000-000000000001").expect("uuid");
        let mut spec =
            JobSpec::single_vertex("gpu", "trainer", 2, TaskSpec::Sleep { duration_ms: 1000 });
        spec.vertices[0]
            .node_selector
            .insert("gpu".into(), "true".into());
        state
            .apply(Command::SubmitJob {
                job_id: id.clone(),
                spec,
                now: 2,
            })
            .expect("submit");
        let first = job_status(&state, &id).expect("job");
        assert_eq!(
            first.pending_reason,
            "needs 2 slots; no TaskManager is registered"
        );
        // Only the reason changes: still a change the watcher is sent.
        state.apply(tm("tm-1", &[])).expect("register");
        let Step::Send(event) = step(&first, job_status(&state, &id), 4) else {
            panic!("a new pending reason is sent");
        };
        let waiting = event.job.expect("status");
        assert_eq!(waiting.state, pb::JobState::Created as i32);
        assert_eq!(
            waiting.pending_reason,
            "vertex 'trainer' needs 2 slots with gpu=true; 0 TaskManagers match"
        );
        state
            .apply(tm("tm-gpu", &[("gpu", "true")]))
            .expect("register");
        let Step::Send(event) = step(&waiting, job_status(&state, &id), 5) else {
            panic!("placing the job is a change the watcher sees");
        };
        let placed = event.job.expect("status");
        assert_eq!(placed.state, pb::JobState::Running as i32);
        assert_eq!(placed.pending_reason, "");
    }

    #[test]
    fn a_purged_job_ends_the_watch() {
        let last = status(pb::JobState::Finished, 0);
        assert_eq!(step(&last, None, 9), Step::End(End::Purged));
    }

    #[test]
    fn only_finished_failed_and_canceled_are_terminal() {
        use pb::JobState::*;
        for (s, terminal) in [
            (Created, false),
            (Running, false),
            (Restarting, false),
            (Cancelling, false),
            (Failing, false),
            (Finished, true),
            (Failed, true),
            (Canceled, true),
        ] {
            assert_eq!(is_terminal(&status(s, 0)), terminal, "{s:?}");
        }
    }
}
