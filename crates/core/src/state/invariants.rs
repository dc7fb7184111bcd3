//! Invariants of one `DispatcherState`, checked by the unit and property tests here and
//! reused by the raft tests and the chaos checker, so they are written once.
//!
//! - Slots and attempts are a bijection: a slot holds at most one attempt and that
//!   attempt points back at it; an attempt holds at most one slot.
//! - Every assigned slot belongs to a registered TaskManager (expired ones are gone).
//! - Job and task states agree: a RUNNING job has every task placed or done, a terminal
//!   job holds no slot, a FINISHED job finished every task.
//! - Checkpoint pointers are increasing, below the counter and within the retention.
//! - Derived indexes and counters equal a rebuild from the primary data.

use std::fmt;

use super::machine::DispatcherState;
use super::types::{JobState, SlotRef, TaskRef, TaskState};

/// A broken invariant, with enough context to find it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Violation(format!($($fmt)+)));
        }
    };
}

/// Checks every invariant; the first violation found is returned.
pub fn check(state: &DispatcherState) -> Result<(), Violation> {
    check_slots(state)?;
    check_jobs(state)?;
    check_access(state)?;
    ensure!(
        state.derived() == state.derived_from_scratch(),
        "derived indexes or counters differ from a rebuild:\n kept:    {:?}\n rebuilt: {:?}",
        state.derived(),
        state.derived_from_scratch()
    );
    Ok(())
}

/// Tokens are valid, at least one admin remains once any token exists, and only live
/// TaskManagers have owners.
fn check_access(state: &DispatcherState) -> Result<(), Violation> {
    for token in state.tokens().values() {
        ensure!(
            crate::state::validate_token(token).is_ok(),
            "token {:?} is invalid",
            token.name
        );
    }
    ensure!(
        !state.has_tokens()
            || state
                .tokens()
                .values()
                .any(|t| t.role == crate::state::Role::Admin),
        "tokens exist but none is an admin token"
    );
    ensure!(
        state.owned_ids().all(|id| state.task_manager(id).is_some()),
        "an owner is recorded for a TaskManager that is not registered"
    );
    Ok(())
}

fn check_slots(state: &DispatcherState) -> Result<(), Violation> {
    for tm in state.task_managers() {
        ensure!(
            tm.slots.len() == tm.spec.slots as usize,
            "TaskManager {} registered {} slots but has {}",
            tm.spec.id,
            tm.spec.slots,
            tm.slots.len()
        );
        for (i, slot) in tm.slots.iter().enumerate() {
            let Some((task_ref, attempt)) = slot else {
                continue;
            };
            let here = SlotRef {
                task_manager: tm.spec.id.clone(),
                index: i as u32,
            };
            let job = state.job(&task_ref.job).ok_or_else(|| {
                Violation(format!(
                    "slot {here} holds a task of unknown job {}",
                    task_ref.job
                ))
            })?;
            let task = job
                .task_index(task_ref.key)
                .map(|k| &job.tasks[k])
                .ok_or_else(|| Violation(format!("slot {here} holds unknown task {task_ref}")))?;
            ensure!(
                task.attempt == *attempt,
                "slot {here} holds attempt {attempt} of {task_ref}, whose current attempt is {}",
                task.attempt
            );
            ensure!(
                task.slot.as_ref() == Some(&here),
                "slot {here} holds {task_ref} attempt {attempt}, but the attempt points at {:?}",
                task.slot
            );
        }
    }
    for job in state.jobs() {
        for task in &job.tasks {
            let task_ref = TaskRef {
                job: job.id.clone(),
                key: task.key,
            };
            ensure!(
                task.state.holds_slot() == task.slot.is_some(),
                "task {task_ref} is {} but its slot is {:?}",
                task.state,
                task.slot
            );
            let Some(slot) = &task.slot else {
                continue;
            };
            let tm = state.task_manager(&slot.task_manager).ok_or_else(|| {
                Violation(format!(
                    "task {task_ref} holds slot {slot} of a TaskManager that is not registered"
                ))
            })?;
            let held = tm.slots.get(slot.index as usize).and_then(|s| s.as_ref());
            ensure!(
                held == Some(&(task_ref.clone(), task.attempt)),
                "task {task_ref} attempt {} points at slot {slot}, which holds {held:?}",
                task.attempt
            );
        }
    }
    Ok(())
}

fn check_jobs(state: &DispatcherState) -> Result<(), Violation> {
    let retained = state.config().max_retained_checkpoints as usize;
    for job in state.jobs() {
        let id = &job.id;
        ensure!(
            job.tasks.len() as u64 == job.spec.task_count(),
            "job {id} has {} tasks for a spec of {}",
            job.tasks.len(),
            job.spec.task_count()
        );
        let active = job.active_tasks();
        match job.state {
            JobState::Created => ensure!(
                job.tasks.iter().all(|t| t.state == TaskState::Scheduled),
                "job {id} is CREATED but some task left SCHEDULED"
            ),
            JobState::Running => ensure!(
                job.tasks.iter().all(|t| t.state != TaskState::Scheduled),
                "job {id} is RUNNING with an unplaced task (gang placement is all-or-nothing)"
            ),
            JobState::Finished => ensure!(
                job.tasks.iter().all(|t| t.state == TaskState::Finished),
                "job {id} is FINISHED with an unfinished task"
            ),
            JobState::Failed | JobState::Canceled => ensure!(
                job.tasks.iter().all(|t| t.state.is_terminal()),
                "job {id} is {} with a live task",
                job.state
            ),
            JobState::Failing | JobState::Cancelling | JobState::Restarting => {}
        }
        if job.state.is_terminal() {
            ensure!(active == 0, "terminal job {id} holds {active} slots");
            ensure!(
                job.finished_at.is_some(),
                "terminal job {id} has no finish time"
            );
        } else {
            ensure!(job.finished_at.is_none(), "live job {id} has a finish time");
        }
        ensure!(
            job.restart_due_at.is_none() || job.state == JobState::Restarting,
            "job {id} is {} with a restart due",
            job.state
        );
        let book = &job.checkpoints;
        ensure!(book.next_id >= 1, "job {id}: checkpoint counter at 0");
        ensure!(
            book.completed.len() <= retained,
            "job {id} keeps {} checkpoints, more than {retained}",
            book.completed.len()
        );
        ensure!(
            book.completed.windows(2).all(|w| w[0].id < w[1].id)
                && book.completed.iter().all(|c| c.id < book.next_id),
            "job {id}: completed checkpoints out of order or beyond the counter"
        );
    }
    Ok(())
}
