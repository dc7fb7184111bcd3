//! `TaskManagerService`: registration, heartbeats and unregistration, served by the
//! leader (the edge forwards them; heartbeats after a read barrier), and listing from
//! any replica. Handlers translate to and from [`crate::taskmanagers`].

use super::edge::{Caller, Edge};
use super::status::ApiError;
use crate::taskmanagers::{HeartbeatAnswer, TaskManagers};
use dispatcher_core::state::{self, TaskManagerId, TaskManagerSpec, TaskReport};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;
use dispatcher_proto::v1::task_manager_service_client::TaskManagerServiceClient;
use dispatcher_proto::v1::task_manager_service_server::TaskManagerService;

/// Serves `TaskManagerService` for one replica.
pub struct TaskManagerServer {
    edge: Edge,
    tms: TaskManagers,
}

edge_service! {
    TaskManagerService for TaskManagerServer, forward with TaskManagerServiceClient {
        rpc register(RegisterRequest) -> pb::RegisterResponse: Leader, TaskManager => register(caller);
        rpc heartbeat(HeartbeatRequest) -> pb::HeartbeatResponse: Linearizable, TaskManager => heartbeat(caller);
        rpc unregister(UnregisterRequest) -> pb::UnregisterResponse: Leader, TaskManager => unregister(caller);
        rpc list_task_managers(ListTaskManagersRequest) -> pb::ListTaskManagersResponse:
            Linearizable, Read => list(caller);
    }
}

fn tm_id(raw: &str) -> Result<TaskManagerId, ApiError> {
    if raw.trim().is_empty() {
        return Err(ApiError::invalid("task_manager_id", "is required"));
    }
    Ok(TaskManagerId(raw.to_string()))
}

fn assignments(list: Vec<state::Assignment>) -> Vec<pb::TaskAssignment> {
    list.iter().map(convert::assignment).collect()
}

/// Task reports from the wire; vertices are named there and indexed in the state.
fn reports(
    updates: Vec<pb::TaskStatusUpdate>,
    vertex_names: impl Fn(&state::JobId) -> Option<Vec<String>>,
) -> Result<Vec<TaskReport>, ApiError> {
    updates
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            let job = convert::job_id(&format!("updates[{i}].job_id"), &u.job_id)?;
            let state = convert::task_state_from_pb(&format!("updates[{i}].state"), u.state)?;
            // An unknown vertex gets an index no job has: the state machine ignores it.
            let vertex = vertex_names(&job)
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

impl TaskManagerServer {
    /// A server over `edge` and the TaskManager protocol `tms`.
    pub fn new(edge: Edge, tms: TaskManagers) -> Self {
        TaskManagerServer { edge, tms }
    }

    fn intervals(&self) -> (u64, u64) {
        let s = &self.tms.liveness.settings;
        (
            s.heartbeat_interval.as_millis() as u64,
            s.lease_timeout.as_millis() as u64,
        )
    }

    async fn register(
        &self,
        caller: Caller,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse, ApiError> {
        let id = tm_id(&req.task_manager_id)?;
        caller.require_task_manager(&id)?;
        let spec = TaskManagerSpec {
            id,
            instance: req.instance_id,
            address: req.address,
            slots: req.slots,
            labels: req.labels,
        };
        let run = self.tms.register(spec, caller.principal()).await?;
        let (heartbeat_interval_ms, lease_timeout_ms) = self.intervals();
        Ok(pb::RegisterResponse {
            heartbeat_interval_ms,
            lease_timeout_ms,
            assignments: assignments(run),
        })
    }

    async fn heartbeat(
        &self,
        caller: Caller,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, ApiError> {
        let id = tm_id(&req.task_manager_id)?;
        caller.require_task_manager(&id)?;
        let updates = req.updates;
        let answer = self
            .tms
            .heartbeat(&id, &req.instance_id, &caller.principal(), |tms| {
                reports(updates, |job| tms.vertex_names(job))
            })
            .await?;
        let (registered, run, stop) = match answer {
            HeartbeatAnswer::Unregistered => (false, vec![], vec![]),
            HeartbeatAnswer::Registered { run, stop } => (true, run, stop),
        };
        let (leader_id, leader_address) = self.edge.replica.leader().unwrap_or_default();
        let (heartbeat_interval_ms, lease_timeout_ms) = self.intervals();
        Ok(pb::HeartbeatResponse {
            registered,
            assignments: assignments(run),
            stop: assignments(stop),
            heartbeat_interval_ms,
            lease_timeout_ms,
            leader_id,
            leader_address,
        })
    }

    async fn unregister(
        &self,
        caller: Caller,
        req: pb::UnregisterRequest,
    ) -> Result<pb::UnregisterResponse, ApiError> {
        let id = tm_id(&req.task_manager_id)?;
        caller.require_task_manager(&id)?;
        let principal = caller.principal();
        let acting_as = (!caller.is_admin()).then_some(principal.as_str());
        self.tms
            .unregister(&id, &req.instance_id, acting_as)
            .await?;
        Ok(pb::UnregisterResponse {})
    }

    /// Every TaskManager and the attempts it runs; the tasks' env values are redacted
    /// unless the caller may see secrets.
    async fn list(
        &self,
        caller: Caller,
        _req: pb::ListTaskManagersRequest,
    ) -> Result<pb::ListTaskManagersResponse, ApiError> {
        let secrets = caller.sees_secrets();
        let running = |list: Vec<state::Assignment>| {
            let mut list = assignments(list);
            if !secrets {
                for task in list.iter_mut().filter_map(|a| a.task.as_mut()) {
                    convert::redact_task(task);
                }
            }
            list
        };
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
                running: running(g.state.assignments(&tm.spec.id)),
            })
            .collect();
        Ok(pb::ListTaskManagersResponse { task_managers })
    }
}
