//! TaskManagers joining and leaving: registration (a retry, a restart of the process or
//! a newcomer), expiry and unregistration, and failing the attempts a lost TaskManager held.
//!
//! Nothing here does I/O, reads a clock or draws a random number: a lease runs out only
//! when the leader proposes ExpireTaskManager.

use std::collections::BTreeSet;

use super::DispatcherState;
use crate::state::command::{Rejection, Response};
use crate::state::types::{Millis, TaskManager, TaskManagerId, TaskManagerSpec, TaskState};
use crate::state::validate::validate_task_manager;

impl DispatcherState {
    pub(super) fn register(
        &mut self,
        spec: TaskManagerSpec,
        owner: String,
        now: Millis,
    ) -> Result<Response, Rejection> {
        validate_task_manager(&spec, &self.config)?;
        self.check_owner(&spec.id, &owner)?;
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
        if !owner.is_empty() {
            self.owners.insert(id.clone(), owner);
        }
        self.place_queue();
        Ok(Response::Registered {
            id,
            created: true,
            failed_attempts: failed,
        })
    }

    pub(super) fn remove_task_manager(
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

    pub(super) fn check_instance(
        &self,
        id: &TaskManagerId,
        instance: &str,
    ) -> Result<(), Rejection> {
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
        self.owners.remove(id);
        self.index.remove(&tm);
        self.counters.total_slots -= u64::from(tm.spec.slots);
        self.counters.free_slots -= u64::from(tm.free_slots());
        let mut failed = 0;
        let mut jobs = BTreeSet::new();
        for (task, attempt) in tm.slots.into_iter().flatten() {
            self.touch(&task.job);
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
}
