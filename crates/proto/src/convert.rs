//! Conversions between protobuf messages and domain types, kept out of the handlers.
//!
//! Proto to domain checks what the proto's types cannot (a oneof left unset, an enum
//! value this build does not know) and names the field; the state machine's own
//! validation then checks bounds and the DAG.

use crate::v1 as pb;
use dispatcher_core::state::{
    Assignment, EdgeSpec, Job, JobId, JobSpec, JobState, PendingReason, PlacementStrategy,
    Rejection, RestartStrategy, TaskSpec, TaskState, VertexSpec,
};

/// What a reader without the right to see secrets gets instead of an env value.
pub const REDACTED: &str = "<redacted>";

/// Replaces every environment value of the job's spec with [`REDACTED`], keeping the
/// keys: env values are secrets, shown only to admin tokens.
pub fn redact_secrets(status: &mut pb::JobStatus) {
    let Some(spec) = status.spec.as_mut() else {
        return;
    };
    for vertex in &mut spec.vertices {
        if let Some(task) = vertex.task.as_mut() {
            redact_task(task);
        }
    }
}

/// Replaces the environment values of one task (a TaskManager's assignment as listed to
/// readers) with [`REDACTED`].
pub fn redact_task(task: &mut pb::Task) {
    if let Some(pb::task::Kind::Command(command)) = task.kind.as_mut() {
        for value in command.env.values_mut() {
            *value = REDACTED.to_string();
        }
    }
}

/// Parses a job id field.
pub fn job_id(field: &str, raw: &str) -> Result<JobId, Rejection> {
    if raw.is_empty() {
        return Err(Rejection::invalid(
            field,
            "is required (a UUID chosen by the client)",
        ));
    }
    JobId::parse(raw).map_err(|e| Rejection::invalid(field, e))
}

/// Converts a submitted spec.
pub fn job_spec(spec: Option<pb::JobSpec>) -> Result<JobSpec, Rejection> {
    let spec = spec.ok_or_else(|| Rejection::invalid("spec", "is required"))?;
    let vertices = spec
        .vertices
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let field = format!("spec.vertices[{i}].task");
            let task = match v.task.and_then(|t| t.kind) {
                Some(pb::task::Kind::Command(c)) => TaskSpec::Command {
                    argv: c.argv,
                    env: c.env,
                },
                Some(pb::task::Kind::Sleep(s)) => TaskSpec::Sleep {
                    duration_ms: s.duration_ms,
                },
                Some(pb::task::Kind::Fail(f)) => TaskSpec::Fail {
                    after_ms: f.after_ms,
                    exit_code: f.exit_code,
                },
                None => {
                    return Err(Rejection::invalid(
                        field,
                        "must be one of command, sleep, fail",
                    ))
                }
            };
            Ok(VertexSpec {
                name: v.name,
                parallelism: v.parallelism,
                task,
                node_selector: v.node_selector,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let restart = match spec.restart_strategy.and_then(|r| r.kind) {
        None | Some(pb::restart_strategy::Kind::None(_)) => RestartStrategy::NoRestart,
        Some(pb::restart_strategy::Kind::FixedDelay(f)) => RestartStrategy::FixedDelay {
            attempts: f.attempts,
            delay_ms: f.delay_ms,
        },
    };
    let placement = match pb::PlacementStrategy::try_from(spec.placement_strategy) {
        Ok(pb::PlacementStrategy::Unspecified) => None,
        Ok(pb::PlacementStrategy::Spread) => Some(PlacementStrategy::Spread),
        Ok(pb::PlacementStrategy::BinPack) => Some(PlacementStrategy::BinPack),
        Ok(pb::PlacementStrategy::RoundRobin) => Some(PlacementStrategy::RoundRobin),
        Err(_) => {
            return Err(Rejection::invalid(
                "spec.placement_strategy",
                format!("unknown value {}", spec.placement_strategy),
            ))
        }
    };
    Ok(JobSpec {
        name: spec.name,
        vertices,
        edges: spec
            .edges
            .into_iter()
            .map(|e| EdgeSpec {
                from: e.from,
                to: e.to,
            })
            .collect(),
        priority: spec.priority,
        restart,
        placement,
        labels: spec.labels,
    })
}

/// The proto form of a domain spec (as stored, for status output).
pub fn job_spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    pb::JobSpec {
        name: spec.name.clone(),
        vertices: spec
            .vertices
            .iter()
            .map(|v| pb::Vertex {
                name: v.name.clone(),
                parallelism: v.parallelism,
                task: Some(pb::Task {
                    kind: Some(task_to_pb(&v.task)),
                }),
                node_selector: v.node_selector.clone(),
            })
            .collect(),
        edges: spec
            .edges
            .iter()
            .map(|e| pb::Edge {
                from: e.from.clone(),
                to: e.to.clone(),
            })
            .collect(),
        priority: spec.priority,
        restart_strategy: Some(pb::RestartStrategy {
            kind: Some(match spec.restart {
                RestartStrategy::NoRestart => pb::restart_strategy::Kind::None(pb::NoRestart {}),
                RestartStrategy::FixedDelay { attempts, delay_ms } => {
                    pb::restart_strategy::Kind::FixedDelay(pb::FixedDelayRestart {
                        attempts,
                        delay_ms,
                    })
                }
            }),
        }),
        placement_strategy: match spec.placement {
            None => pb::PlacementStrategy::Unspecified,
            Some(PlacementStrategy::Spread) => pb::PlacementStrategy::Spread,
            Some(PlacementStrategy::BinPack) => pb::PlacementStrategy::BinPack,
            Some(PlacementStrategy::RoundRobin) => pb::PlacementStrategy::RoundRobin,
        } as i32,
        labels: spec.labels.clone(),
    }
}

fn task_to_pb(task: &TaskSpec) -> pb::task::Kind {
    match task {
        TaskSpec::Command { argv, env } => pb::task::Kind::Command(pb::CommandTask {
            argv: argv.clone(),
            env: env.clone(),
        }),
        TaskSpec::Sleep { duration_ms } => pb::task::Kind::Sleep(pb::SleepTask {
            duration_ms: *duration_ms,
        }),
        TaskSpec::Fail {
            after_ms,
            exit_code,
        } => pb::task::Kind::Fail(pb::FailTask {
            after_ms: *after_ms,
            exit_code: *exit_code,
        }),
    }
}

/// Proto job state.
pub fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Created => pb::JobState::Created,
        JobState::Running => pb::JobState::Running,
        JobState::Failing => pb::JobState::Failing,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelling => pb::JobState::Cancelling,
        JobState::Canceled => pb::JobState::Canceled,
        JobState::Finished => pb::JobState::Finished,
        JobState::Restarting => pb::JobState::Restarting,
    }
}

/// Domain job state from a proto filter value.
pub fn job_state_from_pb(field: &str, raw: i32) -> Result<JobState, Rejection> {
    Ok(match pb::JobState::try_from(raw) {
        Ok(pb::JobState::Created) => JobState::Created,
        Ok(pb::JobState::Running) => JobState::Running,
        Ok(pb::JobState::Failing) => JobState::Failing,
        Ok(pb::JobState::Failed) => JobState::Failed,
        Ok(pb::JobState::Cancelling) => JobState::Cancelling,
        Ok(pb::JobState::Canceled) => JobState::Canceled,
        Ok(pb::JobState::Finished) => JobState::Finished,
        Ok(pb::JobState::Restarting) => JobState::Restarting,
        Ok(pb::JobState::Unspecified) | Err(_) => {
            return Err(Rejection::invalid(
                field,
                format!("unknown job state {raw}"),
            ))
        }
    })
}

/// Proto task state.
pub fn task_state_to_pb(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Scheduled => pb::TaskState::Scheduled,
        TaskState::Deploying => pb::TaskState::Deploying,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Finished => pb::TaskState::Finished,
        TaskState::Canceled => pb::TaskState::Canceled,
        TaskState::Failed => pb::TaskState::Failed,
    }
}

/// Domain task state from a report.
pub fn task_state_from_pb(field: &str, raw: i32) -> Result<TaskState, Rejection> {
    Ok(match pb::TaskState::try_from(raw) {
        Ok(pb::TaskState::Scheduled) => TaskState::Scheduled,
        Ok(pb::TaskState::Deploying) => TaskState::Deploying,
        Ok(pb::TaskState::Running) => TaskState::Running,
        Ok(pb::TaskState::Finished) => TaskState::Finished,
        Ok(pb::TaskState::Canceled) => TaskState::Canceled,
        Ok(pb::TaskState::Failed) => TaskState::Failed,
        Ok(pb::TaskState::Unspecified) | Err(_) => {
            return Err(Rejection::invalid(
                field,
                format!("unknown task state {raw}"),
            ))
        }
    })
}

/// The full status of a job, with why it waits for slots (`None` if it does not).
pub fn job_status(job: &Job, pending: Option<&PendingReason>) -> pb::JobStatus {
    pb::JobStatus {
        spec: Some(job_spec_to_pb(&job.spec)),
        ..job_status_without_spec(job, pending)
    }
}

/// [`job_status`] without the spec (`spec` is `None`): what changes while a job runs,
/// for a caller that converts the spec, which never changes, only once.
pub fn job_status_without_spec(job: &Job, pending: Option<&PendingReason>) -> pb::JobStatus {
    pb::JobStatus {
        job_id: job.id.to_string(),
        name: job.spec.name.clone(),
        state: job_state_to_pb(job.state) as i32,
        spec: None,
        priority: job.spec.priority,
        submitted_at_ms: job.submitted_at,
        updated_at_ms: job.updated_at,
        finished_at_ms: job.finished_at.unwrap_or(0),
        restarts: job.restarts,
        restart_due_at_ms: job.restart_due_at.unwrap_or(0),
        failure_reason: job.failure.clone(),
        tasks: job
            .tasks
            .iter()
            .map(|t| pb::TaskStatus {
                vertex: job
                    .spec
                    .vertices
                    .get(t.key.vertex as usize)
                    .map(|v| v.name.clone())
                    .unwrap_or_default(),
                subtask: t.key.subtask,
                attempt: t.attempt,
                state: task_state_to_pb(t.state) as i32,
                task_manager_id: t
                    .slot
                    .as_ref()
                    .map(|s| s.task_manager.to_string())
                    .or_else(|| t.last_task_manager.as_ref().map(|m| m.to_string()))
                    .unwrap_or_default(),
                slot: t.slot.as_ref().map(|s| s.index),
                exit_code: t.exit_code,
                failure_reason: t.reason.clone(),
                updated_at_ms: t.updated_at,
            })
            .collect(),
        checkpoints: Some(pb::CheckpointInfo {
            next_checkpoint_id: job.checkpoints.next_id,
            completed: job
                .checkpoints
                .completed
                .iter()
                .map(|c| pb::CompletedCheckpoint {
                    id: c.id,
                    external_pointer: c.location.clone(),
                    completed_at_ms: c.completed_at,
                })
                .collect(),
        }),
        pending_reason: pending.map(ToString::to_string).unwrap_or_default(),
    }
}

/// The one-line summary of a job, with why it waits for slots (`None` if it does not).
pub fn job_summary(job: &Job, pending: Option<&PendingReason>) -> pb::JobSummary {
    pb::JobSummary {
        job_id: job.id.to_string(),
        name: job.spec.name.clone(),
        state: job_state_to_pb(job.state) as i32,
        submitted_at_ms: job.submitted_at,
        task_count: job.tasks.len() as u32,
        running_tasks: job
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Running)
            .count() as u32,
        restarts: job.restarts,
        pending_reason: pending.map(ToString::to_string).unwrap_or_default(),
        updated_at_ms: job.updated_at,
        finished_at_ms: job.finished_at.unwrap_or(0),
        task_states: {
            let mut counts: std::collections::BTreeMap<i32, u32> = Default::default();
            for t in &job.tasks {
                *counts.entry(task_state_to_pb(t.state) as i32).or_default() += 1;
            }
            counts
                .into_iter()
                .map(|(state, count)| pb::TaskStateCount { state, count })
                .collect()
        },
    }
}

/// A task assignment for a TaskManager.
pub fn assignment(a: &Assignment) -> pb::TaskAssignment {
    pb::TaskAssignment {
        job_id: a.task.job.to_string(),
        vertex: a.vertex.clone(),
        subtask: a.task.key.subtask,
        attempt: a.attempt,
        slot: a.slot,
        task: Some(pb::Task {
            kind: Some(task_to_pb(&a.spec)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_spec() -> pb::JobSpec {
        pb::JobSpec {
            name: "wc".into(),
            vertices: vec![pb::Vertex {
                name: "src".into(),
                parallelism: 2,
                task: Some(pb::Task {
                    kind: Some(pb::task::Kind::Command(pb::CommandTask {
                        argv: vec!["/bin/true".into()],
                        env: [("A".to_string(), "1".to_string())].into(),
                    })),
                }),
                node_selector: Default::default(),
            }],
            edges: vec![],
            priority: 3,
            restart_strategy: Some(pb::RestartStrategy {
                kind: Some(pb::restart_strategy::Kind::FixedDelay(
                    pb::FixedDelayRestart {
                        attempts: 2,
                        delay_ms: 100,
                    },
                )),
            }),
            placement_strategy: pb::PlacementStrategy::BinPack as i32,
            labels: Default::default(),
        }
    }

    #[test]
    fn a_spec_round_trips_through_the_domain() {
        let domain = job_spec(Some(pb_spec())).expect("valid");
        assert_eq!(job_spec_to_pb(&domain), pb_spec());
    }

    #[test]
    fn missing_task_and_unknown_enums_name_the_field() {
        let mut s = pb_spec();
        s.vertices[0].task = None;
        assert!(
            matches!(job_spec(Some(s)), Err(Rejection::Invalid { field, .. }) if field == "spec.vertices[0].task")
        );
        let mut s = pb_spec();
        s.placement_strategy = 42;
        assert!(
            matches!(job_spec(Some(s)), Err(Rejection::Invalid { field, .. }) if field == "spec.placement_strategy")
        );
        assert!(matches!(job_spec(None), Err(Rejection::Invalid { field, .. }) if field == "spec"));
        assert!(
            matches!(job_id("job_id", "nope"), Err(Rejection::Invalid { field, .. }) if field == "job_id")
        );
    }
}
