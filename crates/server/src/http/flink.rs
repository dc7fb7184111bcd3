//! Flink's REST API for what the dispatcher holds, with Flink 2.3's paths, field names
//! and value formats (job ids as 32 hex digits, epoch milliseconds, `-1` for an unset
//! end time, task counts under every execution state's name), so that Flink's CLI and
//! tools built on the API work against a dispatcher. Where we hold more than Flink
//! shows, objects gain fields (`restarts`, `subtasks`, `slot`, ...); where Flink has
//! something we cannot honour (JARs, savepoints, rescaling), the route answers 501 with
//! Flink's error shape and says why. Nothing here fakes a success.
//!
//! Handlers call the gRPC services in-process (see the module above) and turn their
//! answers into JSON with the pure functions below, which the unit tests pin.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::call::{request, HttpError};
use super::Services;
use crate::server::edge::Access;
use dispatcher_core::state::JobState;
use dispatcher_proto::v1 as pb;
use pb::cluster_service_server::ClusterService;
use pb::job_service_server::JobService;
use pb::task_manager_service_server::TaskManagerService;

/// The Flink release whose REST shapes these routes follow.
pub const FLINK_API_VERSION: &str = "2.3.0";

/// Flink's execution states: every job's and vertex's task counts name all of them
/// (Flink's own CLI reads each one).
const EXECUTION_STATES: [&str; 10] = [
    "CREATED",
    "SCHEDULED",
    "DEPLOYING",
    "RUNNING",
    "FINISHED",
    "CANCELING",
    "CANCELED",
    "FAILED",
    "RECONCILING",
    "INITIALIZING",
];

/// Flink's job states, the keys of a job's `timestamps`.
const JOB_STATES: [&str; 11] = [
    "INITIALIZING",
    "CREATED",
    "RUNNING",
    "FAILING",
    "FAILED",
    "CANCELLING",
    "CANCELED",
    "FINISHED",
    "RESTARTING",
    "SUSPENDED",
    "RECONCILING",
];

/// Why JAR routes fail.
const NO_JARS: &str = "the dispatcher runs job graphs submitted with `dispatchctl job submit` (gRPC JobService.SubmitJob); it takes no JAR uploads";
/// Why savepoint routes fail.
const NO_SAVEPOINTS: &str = "savepoints are not supported: the dispatcher records checkpoint pointers but triggers no savepoint; cancel with PATCH /jobs/:jobid?mode=cancel";
/// Why routes of runtime metrics and logs fail.
const NO_RUNTIME_METRICS: &str =
    "the dispatcher keeps no runtime metrics or logs of jobs: see /metrics (Prometheus) for the cluster's";

/// Flink's routes (mounted at `/` and at `/v1`).
pub fn routes() -> Router<Services> {
    let unsupported = |why: &'static str| {
        any(move || async move { HttpError::new(StatusCode::NOT_IMPLEMENTED, why) })
    };
    Router::new()
        .route("/config", get(config))
        .route("/overview", get(overview))
        .route(
            "/jobs",
            get(jobs)
                .post(move || async move { HttpError::new(StatusCode::NOT_IMPLEMENTED, NO_JARS) }),
        )
        .route("/jobs/overview", get(jobs_overview))
        .route("/jobs/{jobid}", get(job).patch(cancel))
        .route("/jobs/{jobid}/plan", get(plan))
        .route("/jobs/{jobid}/checkpoints", get(checkpoints))
        .route("/jobs/{jobid}/exceptions", get(exceptions))
        .route("/jobs/{jobid}/vertices/{vertexid}", get(vertex))
        .route("/taskmanagers", get(task_managers))
        .route("/taskmanagers/{tmid}", get(task_manager))
        .route("/jars", unsupported(NO_JARS))
        .route("/jars/{*rest}", unsupported(NO_JARS))
        .route("/jobs/{jobid}/savepoints", unsupported(NO_SAVEPOINTS))
        .route(
            "/jobs/{jobid}/savepoints/{*rest}",
            unsupported(NO_SAVEPOINTS),
        )
        .route("/jobs/{jobid}/stop", unsupported(NO_SAVEPOINTS))
        .route("/savepoint-disposal", unsupported(NO_SAVEPOINTS))
        .route(
            "/jobs/{jobid}/rescaling",
            unsupported("rescaling is not supported: a job's parallelism is fixed at submission"),
        )
        .route("/jobs/{jobid}/metrics", unsupported(NO_RUNTIME_METRICS))
        .route(
            "/jobs/{jobid}/accumulators",
            unsupported(NO_RUNTIME_METRICS),
        )
        .route("/jobmanager/{*rest}", unsupported(NO_RUNTIME_METRICS))
        .route(
            "/taskmanagers/{tmid}/{*rest}",
            unsupported(NO_RUNTIME_METRICS),
        )
        .route(
            "/cluster",
            unsupported("shutting the cluster down over REST is not supported: stop the replicas"),
        )
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

async fn config(State(s): State<Services>, headers: HeaderMap) -> Result<Json<Value>, HttpError> {
    s.authorize("config", Access::Read, &headers)?;
    Ok(Json(config_json()))
}

async fn overview(State(s): State<Services>, headers: HeaderMap) -> Result<Json<Value>, HttpError> {
    let tms = list_task_managers(&s, &headers).await?;
    // Job counts from this replica's applied counters (O(1)); the call above has
    // checked the caller.
    let counts = s
        .edge
        .replica
        .state
        .read()
        .state
        .counters()
        .jobs_by_state
        .clone();
    Ok(Json(overview_json(&tms, &counts)))
}

async fn jobs(State(s): State<Services>, headers: HeaderMap) -> Result<Json<Value>, HttpError> {
    let all = list_jobs(&s, &headers).await?;
    let jobs: Vec<Value> = all
        .iter()
        .map(|j| json!({ "id": flink_id(&j.job_id), "status": job_state(j.state) }))
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

async fn jobs_overview(
    State(s): State<Services>,
    headers: HeaderMap,
) -> Result<Json<Value>, HttpError> {
    let all = list_jobs(&s, &headers).await?;
    let now = now_ms();
    // Newest first, as Flink lists them.
    let mut jobs: Vec<&pb::JobSummary> = all.iter().collect();
    jobs.sort_by_key(|j| std::cmp::Reverse(j.submitted_at_ms));
    let jobs: Vec<Value> = jobs
        .into_iter()
        .map(|j| job_overview_json(j, now))
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

async fn job(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(jobid): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let status = get_job(&s, &headers, &jobid).await?;
    Ok(Json(job_json(&status, now_ms())))
}

async fn plan(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(jobid): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let status = get_job(&s, &headers, &jobid).await?;
    Ok(Json(json!({ "plan": plan_json(&status) })))
}

async fn checkpoints(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(jobid): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let status = get_job(&s, &headers, &jobid).await?;
    Ok(Json(checkpoints_json(&status)))
}

async fn exceptions(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(jobid): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let status = get_job(&s, &headers, &jobid).await?;
    Ok(Json(exceptions_json(&status)))
}

async fn vertex(
    State(s): State<Services>,
    headers: HeaderMap,
    Path((jobid, vertexid)): Path<(String, String)>,
) -> Result<Json<Value>, HttpError> {
    let status = get_job(&s, &headers, &jobid).await?;
    let vertices = status
        .spec
        .as_ref()
        .map(|s| s.vertices.as_slice())
        .unwrap_or(&[]);
    let v = vertices
        .iter()
        .find(|v| vertex_id(&status.job_id, &v.name) == vertexid.to_ascii_lowercase())
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::NOT_FOUND,
                format!("job {} has no vertex {vertexid}", flink_id(&status.job_id)),
            )
        })?;
    Ok(Json(vertex_detail_json(&status, v, now_ms())))
}

async fn cancel(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(jobid): Path<String>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<(StatusCode, Json<Value>), HttpError> {
    // Flink's CLI sends mode=cancel; Flink takes a missing mode as cancel too.
    match params
        .get("mode")
        .map(|m| m.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("cancel") => {}
        Some("stop") => {
            return Err(HttpError::new(StatusCode::NOT_IMPLEMENTED, NO_SAVEPOINTS));
        }
        Some(other) => {
            return Err(HttpError::bad_request(format!(
                "mode: {other:?} is not a termination mode; use mode=cancel"
            )));
        }
    }
    let req = request(&headers, pb::CancelJobRequest { job_id: jobid });
    JobService::cancel_job(&*s.jobs, req).await?;
    // Flink answers 202 Accepted with an empty object: the cancellation is under way.
    Ok((StatusCode::ACCEPTED, Json(json!({}))))
}

async fn task_managers(
    State(s): State<Services>,
    headers: HeaderMap,
) -> Result<Json<Value>, HttpError> {
    let tms = list_task_managers(&s, &headers).await?;
    let list: Vec<Value> = tms.iter().map(task_manager_json).collect();
    Ok(Json(json!({ "taskmanagers": list })))
}

async fn task_manager(
    State(s): State<Services>,
    headers: HeaderMap,
    Path(tmid): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let tms = list_task_managers(&s, &headers).await?;
    let tm = tms
        .iter()
        .find(|t| t.task_manager_id == tmid)
        .ok_or_else(|| {
            HttpError::new(
                StatusCode::NOT_FOUND,
                format!("no TaskManager {tmid} is registered"),
            )
        })?;
    Ok(Json(task_manager_json(tm)))
}

/// Our cluster view (not Flink's): every replica's Raft status as the answering replica
/// gathers it, for the dashboard.
pub async fn cluster(
    State(s): State<Services>,
    headers: HeaderMap,
) -> Result<Json<Value>, HttpError> {
    let req = request(&headers, pb::StatusRequest::default());
    let status = ClusterService::status(&*s.cluster, req).await?.into_inner();
    Ok(Json(cluster_json(&status)))
}

async fn list_jobs(s: &Services, headers: &HeaderMap) -> Result<Vec<pb::JobSummary>, HttpError> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = request(
            headers,
            pb::ListJobsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            },
        );
        let page = JobService::list_jobs(&*s.jobs, req).await?.into_inner();
        all.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = page.next_page_token;
    }
}

async fn get_job(
    s: &Services,
    headers: &HeaderMap,
    jobid: &str,
) -> Result<pb::JobStatus, HttpError> {
    let req = request(
        headers,
        pb::GetJobRequest {
            job_id: jobid.to_string(),
            stale: false,
        },
    );
    JobService::get_job(&*s.jobs, req)
        .await?
        .into_inner()
        .job
        .ok_or_else(|| HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, "GetJob answered no job"))
}

async fn list_task_managers(
    s: &Services,
    headers: &HeaderMap,
) -> Result<Vec<pb::TaskManagerInfo>, HttpError> {
    let req = request(headers, pb::ListTaskManagersRequest { stale: false });
    Ok(
        TaskManagerService::list_task_managers(&*s.task_managers, req)
            .await?
            .into_inner()
            .task_managers,
    )
}

// ---------------------------------------------------------------------------
// JSON shapes (pure)
// ---------------------------------------------------------------------------

fn now_ms() -> u64 {
    crate::leader::wall_clock_ms()
}

/// A job id as Flink shows it: the UUID's 32 hex digits without dashes.
pub fn flink_id(job_id: &str) -> String {
    job_id.replace('-', "")
}

/// A vertex id in Flink's form (32 hex digits), stable for a job and vertex name.
pub fn vertex_id(job_id: &str, vertex: &str) -> String {
    let mut h = Sha256::new();
    h.update(job_id.as_bytes());
    h.update([0]);
    h.update(vertex.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A job state's Flink name.
pub fn job_state(v: i32) -> &'static str {
    pb::JobState::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// A task state's Flink name (our task states are Flink execution states).
pub fn task_state(v: i32) -> &'static str {
    pb::TaskState::try_from(v)
        .map(|s| s.as_str_name().trim_start_matches("TASK_STATE_"))
        .unwrap_or("UNKNOWN")
}

/// `-1` for an unset time, as Flink writes it.
fn time_or_unset(ms: u64) -> i64 {
    if ms == 0 {
        -1
    } else {
        ms as i64
    }
}

/// Flink's duration: to the end time, or to now while the job runs.
fn duration(start: u64, end: u64, now: u64) -> i64 {
    let until = if end == 0 { now } else { end };
    until.saturating_sub(start) as i64
}

/// Counts under every execution state's name, `upper` as in a job's details, lower
/// case (plus `total`) as in the jobs overview.
fn execution_counts(counts: &BTreeMap<&str, u32>, upper: bool) -> Value {
    let mut m = Map::new();
    for s in EXECUTION_STATES {
        let key = if upper {
            s.to_string()
        } else {
            s.to_ascii_lowercase()
        };
        m.insert(key, json!(counts.get(s).copied().unwrap_or(0)));
    }
    if !upper {
        m.insert("total".into(), json!(counts.values().sum::<u32>()));
    }
    Value::Object(m)
}

/// GET /config.
pub fn config_json() -> Value {
    json!({
        "refresh-interval": 3000,
        "timezone-name": "Coordinated Universal Time",
        "timezone-offset": 0,
        "flink-version": FLINK_API_VERSION,
        "flink-revision": format!("dispatcher {}", env!("CARGO_PKG_VERSION")),
        "features": {
            "web-submit": false,
            "web-cancel": true,
            "web-rescale": false,
            "web-history": false,
        },
    })
}

/// GET /overview: Flink counts every job not yet ended as running.
pub fn overview_json(tms: &[pb::TaskManagerInfo], jobs: &BTreeMap<JobState, u64>) -> Value {
    let n = |s: JobState| jobs.get(&s).copied().unwrap_or(0);
    let running = n(JobState::Created)
        + n(JobState::Running)
        + n(JobState::Restarting)
        + n(JobState::Failing)
        + n(JobState::Cancelling);
    json!({
        "taskmanagers": tms.len(),
        "slots-total": tms.iter().map(|t| t.slots as u64).sum::<u64>(),
        "slots-available": tms.iter().map(|t| t.free_slots as u64).sum::<u64>(),
        "jobs-running": running,
        "jobs-finished": n(JobState::Finished),
        "jobs-cancelled": n(JobState::Canceled),
        "jobs-failed": n(JobState::Failed),
        "flink-version": FLINK_API_VERSION,
        "flink-commit": format!("dispatcher {}", env!("CARGO_PKG_VERSION")),
    })
}

/// One job of GET /jobs/overview.
pub fn job_overview_json(j: &pb::JobSummary, now: u64) -> Value {
    let counts: BTreeMap<&str, u32> = j
        .task_states
        .iter()
        .map(|c| (task_state(c.state), c.count))
        .collect();
    json!({
        "jid": flink_id(&j.job_id),
        "name": j.name,
        "jobType": "STREAMING",
        "schedulerType": "Default",
        "start-time": j.submitted_at_ms,
        "end-time": time_or_unset(j.finished_at_ms),
        "duration": duration(j.submitted_at_ms, j.finished_at_ms, now),
        "state": job_state(j.state),
        "last-modification": j.updated_at_ms,
        "tasks": execution_counts(&counts, false),
        "pending-operators": 0,
        "restarts": j.restarts,
        "pending-reason": j.pending_reason,
    })
}

/// A vertex's tasks (subtasks' current attempts), in subtask order.
fn vertex_tasks<'a>(status: &'a pb::JobStatus, vertex: &str) -> Vec<&'a pb::TaskStatus> {
    status.tasks.iter().filter(|t| t.vertex == vertex).collect()
}

/// Flink's aggregate state of a vertex from its subtasks' states.
fn aggregate_state(counts: &BTreeMap<&str, u32>, parallelism: u32) -> &'static str {
    let n = |s: &str| counts.get(s).copied().unwrap_or(0);
    if parallelism > 0 && n("FINISHED") == parallelism {
        "FINISHED"
    } else if n("FAILED") > 0 {
        "FAILED"
    } else if n("CANCELING") > 0 {
        "CANCELING"
    } else if n("CANCELED") > 0 {
        "CANCELED"
    } else if n("RUNNING") > 0 || n("FINISHED") > 0 {
        "RUNNING"
    } else if n("DEPLOYING") > 0 {
        "DEPLOYING"
    } else if n("SCHEDULED") > 0 {
        "SCHEDULED"
    } else {
        "CREATED"
    }
}

fn counts_of(tasks: &[&pb::TaskStatus]) -> BTreeMap<&'static str, u32> {
    let mut counts = BTreeMap::new();
    for t in tasks {
        *counts.entry(task_state(t.state)).or_insert(0) += 1;
    }
    counts
}

/// Flink's I/O metrics of a vertex or subtask: the dispatcher does not see a task's
/// records, so every figure is 0 and marked incomplete.
fn no_io_metrics() -> Value {
    json!({
        "read-bytes": 0, "read-bytes-complete": false,
        "write-bytes": 0, "write-bytes-complete": false,
        "read-records": 0, "read-records-complete": false,
        "write-records": 0, "write-records-complete": false,
        "accumulated-backpressured-time": 0,
        "accumulated-idle-time": 0,
        "accumulated-busy-time": "NaN",
    })
}

fn is_terminal_task(state: i32) -> bool {
    matches!(task_state(state), "FINISHED" | "CANCELED" | "FAILED")
}

/// One subtask as Flink's vertex details show it, plus the slot, exit code and failure.
fn subtask_json(t: &pb::TaskStatus, now: u64) -> Value {
    let state = task_state(t.state);
    let (start, end) = match state {
        "RUNNING" => (t.updated_at_ms as i64, -1),
        _ if is_terminal_task(t.state) => (-1, t.updated_at_ms as i64),
        _ => (-1, -1),
    };
    let duration = if start > 0 {
        now.saturating_sub(start as u64) as i64
    } else {
        -1
    };
    json!({
        "subtask": t.subtask,
        "status": state,
        // Flink counts attempts from 0; ours start at 1.
        "attempt": t.attempt.saturating_sub(1),
        "endpoint": t.task_manager_id,
        "start-time": start,
        "end-time": end,
        "duration": duration,
        "metrics": no_io_metrics(),
        "taskmanager-id": t.task_manager_id,
        "status-duration": {},
        "start_time": start,
        "slot": t.slot,
        "exit-code": t.exit_code,
        "failure-cause": t.failure_reason,
        "last-modification": t.updated_at_ms,
    })
}

/// GET /jobs/:jobid.
pub fn job_json(status: &pb::JobStatus, now: u64) -> Value {
    let jid = flink_id(&status.job_id);
    let state = job_state(status.state);
    let spec_vertices = status
        .spec
        .as_ref()
        .map(|s| s.vertices.as_slice())
        .unwrap_or(&[]);
    let vertices: Vec<Value> = spec_vertices
        .iter()
        .map(|v| {
            let tasks = vertex_tasks(status, &v.name);
            let counts = counts_of(&tasks);
            let vstate = aggregate_state(&counts, v.parallelism);
            let end = if vstate == "FINISHED" || vstate == "CANCELED" || vstate == "FAILED" {
                tasks.iter().map(|t| t.updated_at_ms).max().unwrap_or(0)
            } else {
                0
            };
            let start = tasks
                .iter()
                .filter(|t| task_state(t.state) == "RUNNING")
                .map(|t| t.updated_at_ms)
                .min()
                .unwrap_or(0);
            json!({
                "id": vertex_id(&status.job_id, &v.name),
                "slotSharingGroupId": vertex_id(&status.job_id, ""),
                "name": v.name,
                "maxParallelism": v.parallelism,
                "parallelism": v.parallelism,
                "status": vstate,
                "start-time": time_or_unset(start),
                "end-time": time_or_unset(end),
                "duration": if start == 0 { -1 } else { duration(start, end, now) },
                "tasks": execution_counts(&counts, true),
                "metrics": no_io_metrics(),
                "subtasks": tasks.iter().map(|t| subtask_json(t, now)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let all: Vec<&pb::TaskStatus> = status.tasks.iter().collect();
    let mut timestamps = Map::new();
    for s in JOB_STATES {
        timestamps.insert(s.into(), json!(0));
    }
    // What the registry records: submission, and the moment the job ended.
    timestamps.insert("INITIALIZING".into(), json!(status.submitted_at_ms));
    timestamps.insert("CREATED".into(), json!(status.submitted_at_ms));
    if status.finished_at_ms > 0 {
        timestamps.insert(state.into(), json!(status.finished_at_ms));
    }
    json!({
        "jid": jid,
        "application-id": jid,
        "name": status.name,
        "isStoppable": false,
        "state": state,
        "job-type": "STREAMING",
        "schedulerType": "Default",
        "start-time": status.submitted_at_ms,
        "end-time": time_or_unset(status.finished_at_ms),
        "duration": duration(status.submitted_at_ms, status.finished_at_ms, now),
        "maxParallelism": -1,
        "now": now,
        "timestamps": timestamps,
        "vertices": vertices,
        "status-counts": execution_counts(&counts_of(&all), true),
        "plan": plan_json(status),
        "pending-operators": 0,
        "priority": status.priority,
        "restarts": status.restarts,
        "restart-due-at": time_or_unset(status.restart_due_at_ms),
        "failure-cause": status.failure_reason,
        "pending-reason": status.pending_reason,
        "last-modification": status.updated_at_ms,
    })
}

/// What a vertex runs, in a few words.
fn task_description(v: &pb::Vertex) -> String {
    match v.task.as_ref().and_then(|t| t.kind.as_ref()) {
        Some(pb::task::Kind::Command(c)) => format!("command: {}", c.argv.join(" ")),
        Some(pb::task::Kind::Sleep(s)) => format!("sleep {} ms", s.duration_ms),
        Some(pb::task::Kind::Fail(f)) => {
            format!(
                "fail with exit code {} after {} ms",
                f.exit_code, f.after_ms
            )
        }
        None => String::new(),
    }
}

/// The job graph as Flink's `plan`: one node per vertex, inputs from the edges.
pub fn plan_json(status: &pb::JobStatus) -> Value {
    let empty = pb::JobSpec::default();
    let spec = status.spec.as_ref().unwrap_or(&empty);
    let nodes: Vec<Value> = spec
        .vertices
        .iter()
        .map(|v| {
            let inputs: Vec<Value> = spec
                .edges
                .iter()
                .filter(|e| e.to == v.name)
                .enumerate()
                .map(|(i, e)| {
                    json!({
                        "id": vertex_id(&status.job_id, &e.from),
                        "num": i,
                        "exchange": "pipelined_bounded",
                        "ship_strategy": "FORWARD",
                    })
                })
                .collect();
            // Flink leaves `inputs` out of a source; an empty list reads the same.
            json!({
                "id": vertex_id(&status.job_id, &v.name),
                "operator": "",
                "parallelism": v.parallelism,
                "operator_strategy": "",
                "description": format!("{}<br/>{}", v.name, task_description(v)),
                "optimizer_properties": {},
                "inputs": inputs,
            })
        })
        .collect();
    json!({
        "jid": flink_id(&status.job_id),
        "name": status.name,
        "type": "STREAMING",
        "nodes": nodes,
    })
}

/// GET /jobs/:jobid/vertices/:vertexid.
pub fn vertex_detail_json(status: &pb::JobStatus, v: &pb::Vertex, now: u64) -> Value {
    let tasks = vertex_tasks(status, &v.name);
    json!({
        "id": vertex_id(&status.job_id, &v.name),
        "name": v.name,
        "parallelism": v.parallelism,
        "maxParallelism": v.parallelism,
        "now": now,
        "subtasks": tasks.iter().map(|t| subtask_json(t, now)).collect::<Vec<_>>(),
    })
}

/// Flink's statistics of a figure the dispatcher does not record (sizes, durations).
fn unrecorded_stats() -> Value {
    json!({ "min": 0, "max": 0, "avg": 0, "p50": 0.0, "p90": 0.0, "p95": 0.0, "p99": 0.0, "p999": 0.0 })
}

/// GET /jobs/:jobid/checkpoints: the completed checkpoints the registry retains
/// (Flink's ZooKeeper pointers). Sizes and durations are not recorded: 0.
pub fn checkpoints_json(status: &pb::JobStatus) -> Value {
    let info = status.checkpoints.clone().unwrap_or_default();
    let subtasks = status.tasks.len();
    let entry = |c: &pb::CompletedCheckpoint| {
        json!({
            "className": "completed",
            "id": c.id,
            "status": "COMPLETED",
            "is_savepoint": false,
            "savepointFormat": null,
            "trigger_timestamp": c.completed_at_ms,
            "latest_ack_timestamp": c.completed_at_ms,
            "checkpointed_size": 0,
            "state_size": 0,
            "end_to_end_duration": 0,
            "alignment_buffered": 0,
            "processed_data": 0,
            "persisted_data": 0,
            "num_subtasks": subtasks,
            "num_acknowledged_subtasks": subtasks,
            "checkpoint_type": "CHECKPOINT",
            "tasks": {},
            "external_path": c.external_pointer,
            "discarded": false,
        })
    };
    let history: Vec<Value> = info.completed.iter().rev().map(entry).collect();
    let n = info.completed.len();
    json!({
        "counts": { "restored": 0, "total": n, "in_progress": 0, "completed": n, "failed": 0 },
        "summary": {
            "checkpointed_size": unrecorded_stats(),
            "state_size": unrecorded_stats(),
            "end_to_end_duration": unrecorded_stats(),
            "alignment_buffered": unrecorded_stats(),
            "processed_data": unrecorded_stats(),
            "persisted_data": unrecorded_stats(),
        },
        "latest": {
            "completed": history.first().cloned().unwrap_or(Value::Null),
            "savepoint": null,
            "failed": null,
            "restored": null,
        },
        "history": history,
        "next-checkpoint-id": info.next_checkpoint_id,
    })
}

/// GET /jobs/:jobid/exceptions: Flink 2's exception history, from the failures the
/// registry holds (each subtask's current attempt, and the job's own reason).
pub fn exceptions_json(status: &pb::JobStatus) -> Value {
    let parallelism: BTreeMap<&str, u32> = status
        .spec
        .iter()
        .flat_map(|s| s.vertices.iter())
        .map(|v| (v.name.as_str(), v.parallelism))
        .collect();
    let mut entries: Vec<Value> = status
        .tasks
        .iter()
        .filter(|t| task_state(t.state) == "FAILED" && !t.failure_reason.is_empty())
        .map(|t| {
            let p = parallelism.get(t.vertex.as_str()).copied().unwrap_or(0);
            json!({
                "exceptionName": "TaskFailure",
                "stacktrace": t.failure_reason,
                "timestamp": t.updated_at_ms,
                "taskName": format!("{} ({}/{})#{}", t.vertex, t.subtask + 1, p, t.attempt.saturating_sub(1)),
                "endpoint": t.task_manager_id,
                "taskManagerId": t.task_manager_id,
                "failureLabels": {},
                "concurrentExceptions": [],
            })
        })
        .collect();
    if entries.is_empty() && !status.failure_reason.is_empty() {
        entries.push(json!({
            "exceptionName": "JobFailure",
            "stacktrace": status.failure_reason,
            "timestamp": status.updated_at_ms,
            "taskName": null,
            "endpoint": null,
            "taskManagerId": null,
            "failureLabels": {},
            "concurrentExceptions": [],
        }));
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e["timestamp"].as_u64()));
    json!({ "exceptionHistory": { "entries": entries, "truncated": false } })
}

/// One TaskManager of GET /taskmanagers. Flink's resource, hardware and memory blocks
/// are left out: a TaskManager registers only its slots and labels.
pub fn task_manager_json(t: &pb::TaskManagerInfo) -> Value {
    let slots: Vec<Value> = t
        .running
        .iter()
        .map(|a| {
            json!({
                "slot": a.slot,
                "jobId": flink_id(&a.job_id),
                "vertex": a.vertex,
                "subtask": a.subtask,
                "attempt": a.attempt.saturating_sub(1),
            })
        })
        .collect();
    json!({
        "id": t.task_manager_id,
        "path": t.address,
        "dataPort": -1,
        "jmxPort": -1,
        "slotsNumber": t.slots,
        "freeSlots": t.free_slots,
        "assignedTasks": t.running.len(),
        "address": t.address,
        "labels": t.labels,
        "registered-at": t.registered_at_ms,
        "instance-id": t.instance_id,
        "allocatedSlots": slots,
    })
}

/// GET /dispatcher/cluster.
pub fn cluster_json(s: &pb::StatusResponse) -> Value {
    let role = |r: i32| {
        pb::ReplicaRole::try_from(r)
            .map(|r| {
                r.as_str_name()
                    .trim_start_matches("REPLICA_ROLE_")
                    .to_string()
            })
            .unwrap_or_else(|_| "UNKNOWN".into())
    };
    let newest = s
        .replicas
        .iter()
        .map(|r| r.applied_index)
        .max()
        .unwrap_or(0);
    let replicas: Vec<Value> = s
        .replicas
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "address": r.address,
                "role": role(r.role),
                "term": r.term,
                "last-log-index": r.last_log_index,
                "applied-index": r.applied_index,
                "lag": if r.reachable { newest.saturating_sub(r.applied_index) } else { 0 },
                "leader-id": r.leader_id,
                "reachable": r.reachable,
                "healthy": r.reachable && r.leader_id != 0,
                "pid": r.pid,
            })
        })
        .collect();
    json!({
        "leader-id": s.leader_id,
        "leader-address": s.leader_address,
        "responder-id": s.responder_id,
        "replicas": replicas,
        "membership": s.membership.iter().map(|m| json!({ "id": m.id, "address": m.address, "voter": m.voter })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";

    fn status() -> pb::JobStatus {
        let vertex = |name: &str, p: u32| pb::Vertex {
            name: name.into(),
            parallelism: p,
            task: Some(pb::Task {
                kind: Some(pb::task::Kind::Sleep(pb::SleepTask { duration_ms: 5000 })),
            }),
            ..Default::default()
        };
        let task = |v: &str, i: u32, state: pb::TaskState| pb::TaskStatus {
            vertex: v.into(),
            subtask: i,
            attempt: 1,
            state: state as i32,
            task_manager_id: "tm-1".into(),
            slot: Some(i),
            updated_at_ms: 1_500,
            ..Default::default()
        };
        pb::JobStatus {
            job_id: ID.into(),
            name: "etl".into(),
            state: pb::JobState::Running as i32,
            spec: Some(pb::JobSpec {
                name: "etl".into(),
                vertices: vec![vertex("src", 2), vertex("sink", 1)],
                edges: vec![pb::Edge {
                    from: "src".into(),
                    to: "sink".into(),
                }],
                ..Default::default()
            }),
            submitted_at_ms: 1_000,
            updated_at_ms: 1_500,
            tasks: vec![
                task("src", 0, pb::TaskState::Running),
                task("src", 1, pb::TaskState::Running),
                task("sink", 0, pb::TaskState::Deploying),
            ],
            checkpoints: Some(pb::CheckpointInfo {
                next_checkpoint_id: 3,
                completed: vec![
                    pb::CompletedCheckpoint {
                        id: 1,
                        external_pointer: "file:/c/1".into(),
                        completed_at_ms: 1_100,
                    },
                    pb::CompletedCheckpoint {
                        id: 2,
                        external_pointer: "file:/c/2".into(),
                        completed_at_ms: 1_200,
                    },
                ],
            }),
            ..Default::default()
        }
    }

    fn sample(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/flink-rest-samples")
            .join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).expect("a JSON sample"),
            // The samples live beside the repository; without them, check our own keys.
            Err(_) => Value::Null,
        }
    }

    /// Every key of Flink's object is in ours (recursively through objects, and into
    /// the first element of arrays).
    fn assert_has_flink_keys(ours: &Value, flink: &Value, at: &str) {
        match (ours, flink) {
            (Value::Object(o), Value::Object(f)) => {
                for (k, fv) in f {
                    let ov = o.get(k).unwrap_or_else(|| panic!("{at}.{k} missing"));
                    assert_has_flink_keys(ov, fv, &format!("{at}.{k}"));
                }
            }
            (Value::Array(o), Value::Array(f)) => {
                if let (Some(o), Some(f)) = (o.first(), f.first()) {
                    assert_has_flink_keys(o, f, &format!("{at}[0]"));
                }
            }
            _ => {}
        }
    }

    #[test]
    fn ids_are_32_hex_digits() {
        assert_eq!(flink_id(ID), "6f9619ff8b86d011b42d00cf4fc964ff");
        let v = vertex_id(ID, "src");
        assert_eq!(v.len(), 32);
        assert!(v.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(v, vertex_id(ID, "sink"));
    }

    #[test]
    fn a_job_has_flinks_fields_and_ours() {
        let j = job_json(&status(), 2_000);
        assert_eq!(j["jid"], "6f9619ff8b86d011b42d00cf4fc964ff");
        assert_eq!(j["state"], "RUNNING");
        assert_eq!(j["end-time"], -1);
        assert_eq!(j["duration"], 1_000);
        assert_eq!(j["vertices"][0]["tasks"]["RUNNING"], 2);
        assert_eq!(j["vertices"][1]["status"], "DEPLOYING");
        assert_eq!(j["status-counts"]["DEPLOYING"], 1);
        assert_eq!(j["vertices"][0]["subtasks"][1]["slot"], 1);
        assert_eq!(
            j["plan"]["nodes"][1]["inputs"][0]["id"],
            vertex_id(ID, "src")
        );
        let flink = sample("jobs_JOBID.json");
        if !flink.is_null() {
            assert_has_flink_keys(&j, &flink, "job");
        }
    }

    #[test]
    fn the_jobs_overview_counts_tasks_under_every_state() {
        let summary = pb::JobSummary {
            job_id: ID.into(),
            name: "etl".into(),
            state: pb::JobState::Finished as i32,
            submitted_at_ms: 1_000,
            finished_at_ms: 3_000,
            updated_at_ms: 3_000,
            task_count: 3,
            task_states: vec![pb::TaskStateCount {
                state: pb::TaskState::Finished as i32,
                count: 3,
            }],
            ..Default::default()
        };
        let j = job_overview_json(&summary, 9_000);
        assert_eq!(j["tasks"]["finished"], 3);
        assert_eq!(j["tasks"]["total"], 3);
        assert_eq!(j["tasks"]["reconciling"], 0);
        assert_eq!(j["end-time"], 3_000);
        assert_eq!(j["duration"], 2_000);
        let flink = sample("jobs_overview.json");
        if !flink.is_null() {
            assert_has_flink_keys(&json!({ "jobs": [j] }), &flink, "overview");
        }
    }

    #[test]
    fn checkpoints_list_the_newest_first() {
        let c = checkpoints_json(&status());
        assert_eq!(c["counts"]["completed"], 2);
        assert_eq!(c["latest"]["completed"]["id"], 2);
        assert_eq!(c["history"][1]["external_path"], "file:/c/1");
        let flink = sample("jobs_JOBID_checkpoints.json");
        if !flink.is_null() {
            assert_has_flink_keys(&c, &flink, "checkpoints");
        }
    }

    #[test]
    fn overview_and_config_have_flinks_fields() {
        let tm = pb::TaskManagerInfo {
            task_manager_id: "tm-1".into(),
            slots: 4,
            free_slots: 1,
            ..Default::default()
        };
        let counts = BTreeMap::from([(JobState::Running, 2), (JobState::Created, 1)]);
        let o = overview_json(std::slice::from_ref(&tm), &counts);
        assert_eq!(o["jobs-running"], 3);
        assert_eq!(o["slots-available"], 1);
        for (ours, name) in [
            (o, "overview.json"),
            (config_json(), "config.json"),
            (
                json!({ "jobs": [{ "id": flink_id(ID), "status": "RUNNING" }] }),
                "jobs.json",
            ),
        ] {
            let flink = sample(name);
            if !flink.is_null() {
                assert_has_flink_keys(&ours, &flink, name);
            }
        }
        let t = task_manager_json(&tm);
        assert_eq!(t["slotsNumber"], 4);
        assert_eq!(t["freeSlots"], 1);
    }

    #[test]
    fn failures_become_the_exception_history() {
        let mut s = status();
        s.tasks[2].state = pb::TaskState::Failed as i32;
        s.tasks[2].failure_reason = "exit code 3".into();
        let e = exceptions_json(&s);
        assert_eq!(
            e["exceptionHistory"]["entries"][0]["stacktrace"],
            "exit code 3"
        );
        assert_eq!(
            e["exceptionHistory"]["entries"][0]["taskName"],
            "sink (1/1)#0"
        );
    }
}
