//! `TaskManagerService`: registration, heartbeats (which carry task state changes and
//! answer with the attempts the TaskManager should run) and unregistration, all served
//! by the leader (forwarded if need be); listing from any replica.

use tonic::{Request, Response, Status};

use super::route::{now_ms, Edge};
use super::status;
use crate::leader::Liveness;
use dispatcher_core::state::{
    self, Command, Rejection, TaskManagerId, TaskManagerSpec, TaskReport,
};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::task_manager_service_client::TaskManagerServiceClient;
use dispatcher_proto::v1::task_manager_service_server::TaskManagerService;

/// Serves `TaskManagerService` for one replica.
pub struct TaskManagerServer {
    edge: Edge,
    liveness: Liveness,
}

impl TaskManagerServer {
    /// A server over `edge`, recording heartbeats in `liveness`.
    pub fn new(edge: Edge, liveness: Liveness) -> Self {
        TaskManagerServer { edge, liveness }
    }

    fn assignments(&self, id: &TaskManagerId) -> Vec<pb::TaskAssignment> {
        let g = self.edge.replica.state.read();
        g.state
            .assignments(id)
            .iter()
            .map(convert::assignment)
            .collect()
    }

    fn stopping(&self, id: &TaskManagerId) -> Vec<pb::TaskAssignment> {
        let g = self.edge.replica.state.read();
        g.state
            .stopping(id)
            .iter()
            .map(convert::assignment)
            .collect()
    }

    fn registered(&self, id: &TaskManagerId, instance: &str) -> bool {
        let g = self.edge.replica.state.read();
        g.state
            .task_manager(id)
            .is_some_and(|tm| tm.spec.instance == instance)
    }
}

fn rej(r: Rejection) -> Status {
    status::rejection(&r)
}

fn tm_id(raw: &str) -> Result<TaskManagerId, Status> {
    if raw.trim().is_empty() {
        return Err(Status::invalid_argument("task_manager_id: is required"));
    }
    Ok(TaskManagerId(raw.to_string()))
}

fn reports(
    updates: Vec<pb::TaskStatusUpdate>,
    job_of: impl Fn(&state::JobId) -> Option<Vec<String>>,
) -> Result<Vec<TaskReport>, Status> {
    updates
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let job = convert::job_id(&format!("updates[{i}].job_id"), &u.job_id).map_err(rej)?;
            let state = convert::task_state_from_pb(&format!("updates[{i}].state"), u.state)
                .map_err(rej)?;
            // Vertices are named on the wire and indexed in the state.
            let vertex = job_of(&job)
                .and_then(|names| names.iter().position(|n| *n == u.vertex))
                .unwrap_or(u32::MAX as usize) as u32;
            Ok(TaskReport {
                job,
                key: state::TaskKey {
                    vertex,
                    subtask: u.subtask,
                },
                attempt: u.attempt,
                state,
                exit_code: u.exit_code,
                reason: u.failure_reason,
            })
        })
        .collect()
}

#[tonic::async_trait]
impl TaskManagerService for TaskManagerServer {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let forwarded = self
            .edge
            .forward_or_local(&request, |ch, req| async move {
                TaskManagerServiceClient::new(ch).register(req).await
            })
            .await?;
        if let Some(resp) = forwarded {
            return Ok(resp);
        }
        let req = request.into_inner();
        let spec = TaskManagerSpec {
            id: tm_id(&req.task_manager_id)?,
            instance: req.instance_id,
            address: req.address,
            slots: req.slots,
            labels: req.labels,
        };
        {
            let g = self.edge.replica.state.read();
            state::validate_task_manager(&spec, g.state.config()).map_err(rej)?;
        }
        let (id, instance) = (spec.id.clone(), spec.instance.clone());
        let (result, _) = self
            .edge
            .propose(Command::RegisterTaskManager {
                spec,
                now: now_ms(),
            })
            .await?;
        result.map_err(rej)?;
        self.liveness.seen(&id, &instance);
        tracing::info!(task_manager = %id, instance = %instance, "TaskManager registered");
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: self.liveness.settings.heartbeat_interval.as_millis() as u64,
            lease_timeout_ms: self.liveness.settings.lease_timeout.as_millis() as u64,
            assignments: self.assignments(&id),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let forwarded = self
            .edge
            .forward_or_local(&request, |ch, req| async move {
                TaskManagerServiceClient::new(ch).heartbeat(req).await
            })
            .await?;
        if let Some(resp) = forwarded {
            return Ok(resp);
        }
        let req = request.into_inner();
        let id = tm_id(&req.task_manager_id)?;
        let (leader_id, leader_address) = self.edge.replica.leader().unwrap_or_default();
        let respond = |registered: bool, assignments, stop| pb::HeartbeatResponse {
            registered,
            assignments,
            stop,
            heartbeat_interval_ms: self.liveness.settings.heartbeat_interval.as_millis() as u64,
            lease_timeout_ms: self.liveness.settings.lease_timeout.as_millis() as u64,
            leader_id,
            leader_address: leader_address.clone(),
        };
        // Answer only as a leader that a quorum still follows and that has applied
        // everything committed: a deposed or lagging leader must not tell a TaskManager
        // it is unknown, nor hand it a stale list of attempts.
        self.edge.read_barrier().await?;
        if !self.registered(&id, &req.instance_id) {
            // Unknown or expired: it must kill everything and register afresh.
            return Ok(Response::new(respond(false, vec![], vec![])));
        }
        self.liveness.seen(&id, &req.instance_id);
        if !req.updates.is_empty() {
            let vertex_names = |job: &state::JobId| {
                let g = self.edge.replica.state.read();
                g.state
                    .job(job)
                    .map(|j| j.spec.vertices.iter().map(|v| v.name.clone()).collect())
            };
            let reports = reports(req.updates, vertex_names)?;
            let (result, _) = self
                .edge
                .propose(Command::ReportTaskState {
                    task_manager: id.clone(),
                    instance: req.instance_id.clone(),
                    reports,
                    now: now_ms(),
                })
                .await?;
            match result {
                Ok(state::Response::Reports { outcomes }) => {
                    for o in outcomes {
                        if let state::ReportOutcome::Ignored(why) = o {
                            tracing::debug!(task_manager = %id, "report ignored: {why}");
                        }
                    }
                }
                Ok(_) => {}
                // Expired between the check and the proposal.
                Err(Rejection::UnknownTaskManager { .. }) => {
                    return Ok(Response::new(respond(false, vec![], vec![])))
                }
                Err(e) => return Err(rej(e)),
            }
        }
        Ok(Response::new(respond(
            true,
            self.assignments(&id),
            self.stopping(&id),
        )))
    }

    async fn unregister(
        &self,
        request: Request<pb::UnregisterRequest>,
    ) -> Result<Response<pb::UnregisterResponse>, Status> {
        let forwarded = self
            .edge
            .forward_or_local(&request, |ch, req| async move {
                TaskManagerServiceClient::new(ch).unregister(req).await
            })
            .await?;
        if let Some(resp) = forwarded {
            return Ok(resp);
        }
        let req = request.into_inner();
        let id = tm_id(&req.task_manager_id)?;
        if self.registered(&id, &req.instance_id) {
            let (result, _) = self
                .edge
                .propose(Command::UnregisterTaskManager {
                    id: id.clone(),
                    instance: req.instance_id,
                    now: now_ms(),
                })
                .await?;
            match result {
                Ok(_) | Err(Rejection::UnknownTaskManager { .. }) => {}
                Err(e) => return Err(rej(e)),
            }
        }
        self.liveness.forget(&id);
        Ok(Response::new(pb::UnregisterResponse {}))
    }

    async fn list_task_managers(
        &self,
        request: Request<pb::ListTaskManagersRequest>,
    ) -> Result<Response<pb::ListTaskManagersResponse>, Status> {
        if !request.get_ref().stale {
            let forwarded = self
                .edge
                .forward_or_local(&request, |ch, req| async move {
                    TaskManagerServiceClient::new(ch)
                        .list_task_managers(req)
                        .await
                })
                .await?;
            if let Some(resp) = forwarded {
                return Ok(resp);
            }
            self.edge.read_barrier().await?;
        }
        let g = self.edge.replica.state.read();
        let task_managers = g
            .state
            .task_managers()
            .map(|tm| pb::TaskManagerInfo {
                task_manager_id: tm.spec.id.to_string(),
                instance_id: tm.spec.instance.clone(),
                address: tm.spec.address.clone(),
                slots: tm.spec.slots,
                free_slots: tm.free_slots(),
                labels: tm.spec.labels.clone(),
                registered_at_ms: tm.registered_at,
                running: g
                    .state
                    .assignments(&tm.spec.id)
                    .iter()
                    .map(convert::assignment)
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListTaskManagersResponse {
            task_managers,
        }))
    }
}
