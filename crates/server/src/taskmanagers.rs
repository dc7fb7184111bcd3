//! The leader's side of the TaskManager protocol, in domain terms: registration,
//! heartbeats (which carry task reports and answer with the attempts to run and to
//! stop) and unregistration. The gRPC service only translates to and from these.
//!
//! Heartbeats are not Raft writes: a heartbeat without reports only refreshes the
//! in-memory lease ([`Liveness`]); reports are proposed as one `ReportTaskState`.
//! Callers serve these on the leader after a read barrier (the edge sees to it), so
//! a deposed or lagging leader never tells a TaskManager it is unknown, nor hands it a
//! stale list of attempts.
//!
//! Identity: a registration records who made it (the caller's principal), and the
//! heartbeats and unregistration of that id are accepted only from the same principal
//! while it stays registered. Instance ids are not secrets.
//!
//! Architecture invariant: proposes commands and reads the applied state; knows no
//! gRPC.

use crate::error::ApiError;
use crate::leader::{wall_clock_ms, Liveness};
use crate::raft::replica::Replica;
use dispatcher_core::state::{
    self, Assignment, Command, JobId, Rejection, ReportOutcome, Response, TaskManagerId,
    TaskManagerSpec, TaskReport,
};

/// What a heartbeat answers.
#[derive(Debug, PartialEq)]
pub enum HeartbeatAnswer {
    /// This instance is not registered (unknown or expired): it must kill everything and
    /// register afresh.
    Unregistered,
    /// The attempts it should run, and those it should stop.
    Registered {
        /// Attempts to run.
        run: Vec<Assignment>,
        /// Attempts to stop.
        stop: Vec<Assignment>,
    },
}

/// The TaskManager protocol of one replica (served while it leads).
#[derive(Clone)]
pub struct TaskManagers {
    replica: Replica,
    /// Heartbeat tracking, shared with the leader's duty loop.
    pub liveness: Liveness,
}

impl TaskManagers {
    /// The protocol over `replica`, recording heartbeats in `liveness`.
    pub fn new(replica: Replica, liveness: Liveness) -> Self {
        TaskManagers { replica, liveness }
    }

    /// Registers an instance on behalf of `owner` (a principal; empty when the cluster
    /// has no tokens); returns the attempts it should run (a re-registration after a
    /// failover keeps its attempts). Another principal's live registration of the id is
    /// refused.
    pub async fn register(
        &self,
        spec: TaskManagerSpec,
        owner: String,
    ) -> Result<Vec<Assignment>, ApiError> {
        {
            let g = self.replica.state.read();
            state::validate_task_manager(&spec, g.state.config())?;
        }
        let (id, instance) = (spec.id.clone(), spec.instance.clone());
        self.replica
            .propose(Command::RegisterTaskManagerAs {
                spec,
                owner,
                now: wall_clock_ms(),
            })
            .await??;
        self.liveness.seen(&id, &instance);
        tracing::info!(instance = %instance, "TaskManager registered");
        Ok(self.replica.state.read().state.assignments(&id))
    }

    /// A heartbeat of `instance`; `reports` reads the reports it carries. They are read
    /// only after the registration check and the lease refresh, so that a report this
    /// build cannot read (a newer agent during an upgrade) neither hides "unregistered"
    /// from an expired TaskManager nor lets a live one's lease run out.
    pub async fn heartbeat(
        &self,
        id: &TaskManagerId,
        instance: &str,
        principal: &str,
        reports: impl FnOnce(&Self) -> Result<Vec<TaskReport>, ApiError>,
    ) -> Result<HeartbeatAnswer, ApiError> {
        self.check_owner(id, principal)?;
        if !self.registered(id, instance) {
            return Ok(HeartbeatAnswer::Unregistered);
        }
        self.liveness.seen(id, instance);
        let reports = reports(self)?;
        if !reports.is_empty() {
            let outcome = self
                .replica
                .propose(Command::ReportTaskState {
                    task_manager: id.clone(),
                    instance: instance.to_string(),
                    reports,
                    now: wall_clock_ms(),
                })
                .await?;
            match outcome {
                Ok(Response::Reports { outcomes }) => {
                    for o in outcomes {
                        if let ReportOutcome::Ignored(why) = o {
                            tracing::debug!(reason = %why, "report ignored");
                        }
                    }
                }
                Ok(_) => {}
                // Expired between the check and the proposal.
                Err(Rejection::UnknownTaskManager { .. }) => {
                    return Ok(HeartbeatAnswer::Unregistered)
                }
                Err(e) => return Err(e.into()),
            }
        }
        let g = self.replica.state.read();
        // Checked again under the one guard the answer is read under: the id may have
        // expired and been registered by another principal while the reports were
        // proposed, and its tasks are not this caller's to see.
        let still_ours = g
            .state
            .task_manager(id)
            .is_some_and(|tm| tm.spec.instance == instance)
            && g.state.owner_of(id).is_none_or(|owner| owner == principal);
        if !still_ours {
            return Ok(HeartbeatAnswer::Unregistered);
        }
        let (run, stop) = g.state.run_and_stop(id);
        Ok(HeartbeatAnswer::Registered { run, stop })
    }

    /// Unregisters an instance on behalf of `principal` (`None`: an administrator, who
    /// may unregister any); unregistering one that is already gone succeeds.
    pub async fn unregister(
        &self,
        id: &TaskManagerId,
        instance: &str,
        principal: Option<&str>,
    ) -> Result<(), ApiError> {
        if let Some(principal) = principal {
            self.check_owner(id, principal)?;
        }
        if self.registered(id, instance) {
            let outcome = self
                .replica
                .propose(Command::UnregisterTaskManager {
                    id: id.clone(),
                    instance: instance.to_string(),
                    now: wall_clock_ms(),
                })
                .await?;
            match outcome {
                Ok(_) | Err(Rejection::UnknownTaskManager { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.liveness.forget(id);
        tracing::info!(instance, "TaskManager unregistered");
        Ok(())
    }

    /// The vertex names of a job, in index order (reports name vertices on the wire).
    pub fn vertex_names(&self, job: &JobId) -> Option<Vec<String>> {
        let g = self.replica.state.read();
        g.state
            .job(job)
            .map(|j| j.spec.vertices.iter().map(|v| v.name.clone()).collect())
    }

    /// Refuses `principal` acting for a TaskManager that another principal registered.
    fn check_owner(&self, id: &TaskManagerId, principal: &str) -> Result<(), ApiError> {
        let g = self.replica.state.read();
        match g.state.owner_of(id) {
            Some(owner) if owner != principal => Err(ApiError::PermissionDenied(format!(
                "TaskManager {id} was registered by another identity; only it may heartbeat or unregister"
            ))),
            _ => Ok(()),
        }
    }

    fn registered(&self, id: &TaskManagerId, instance: &str) -> bool {
        let g = self.replica.state.read();
        g.state
            .task_manager(id)
            .is_some_and(|tm| tm.spec.instance == instance)
    }
}
