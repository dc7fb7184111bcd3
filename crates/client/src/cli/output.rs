//! Rendering of `dispatchctl` results: plain tables for people, JSON for scripts.
//! States print by name (`RUNNING`), in JSON as in tables.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use serde_json::{json, Value};

use super::Format;
use dispatcher_proto::v1 as pb;

/// Prints results in one format.
pub struct Output {
    format: Format,
}

use dispatcher_proto::job_state_name as job_state;

fn task_state(raw: i32) -> &'static str {
    match pb::TaskState::try_from(raw) {
        Ok(pb::TaskState::Scheduled) => "SCHEDULED",
        Ok(pb::TaskState::Deploying) => "DEPLOYING",
        Ok(pb::TaskState::Running) => "RUNNING",
        Ok(pb::TaskState::Finished) => "FINISHED",
        Ok(pb::TaskState::Canceled) => "CANCELED",
        Ok(pb::TaskState::Failed) => "FAILED",
        _ => "UNKNOWN",
    }
}

fn role(raw: i32) -> &'static str {
    match pb::ReplicaRole::try_from(raw) {
        Ok(pb::ReplicaRole::Leader) => "leader",
        Ok(pb::ReplicaRole::Follower) => "follower",
        Ok(pb::ReplicaRole::Candidate) => "candidate",
        Ok(pb::ReplicaRole::Learner) => "learner",
        Ok(pb::ReplicaRole::Shutdown) => "shutdown",
        Ok(pb::ReplicaRole::Unreachable) => "unreachable",
        _ => "unknown",
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    t
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

fn task_json(t: &pb::TaskStatus) -> Value {
    json!({
        "vertex": t.vertex, "subtask": t.subtask, "attempt": t.attempt,
        "state": task_state(t.state), "task_manager": t.task_manager_id,
        "slot": t.slot, "exit_code": t.exit_code, "reason": t.failure_reason,
        "updated_at_ms": t.updated_at_ms,
    })
}

fn job_json(j: &pb::JobStatus) -> Value {
    json!({
        "job_id": j.job_id, "name": j.name, "state": job_state(j.state), "priority": j.priority,
        "submitted_at_ms": j.submitted_at_ms, "updated_at_ms": j.updated_at_ms,
        "finished_at_ms": (j.finished_at_ms > 0).then_some(j.finished_at_ms),
        "restarts": j.restarts,
        "restart_due_at_ms": (j.restart_due_at_ms > 0).then_some(j.restart_due_at_ms),
        "failure": j.failure_reason,
        "pending_reason": j.pending_reason,
        "tasks": j.tasks.iter().map(task_json).collect::<Vec<_>>(),
        "checkpoints": j.checkpoints.as_ref().map(|c| json!({
            "next_id": c.next_checkpoint_id,
            "completed": c.completed.iter().map(|k| json!({"id": k.id, "pointer": k.external_pointer, "completed_at_ms": k.completed_at_ms})).collect::<Vec<_>>(),
        })),
    })
}

impl Output {
    /// Prints in `format`.
    pub fn new(format: Format) -> Self {
        Output { format }
    }

    /// SubmitJob's result: the job id (alone, in table mode, for `$(dispatchctl job submit f)`).
    pub fn submitted(&self, r: &pb::SubmitJobResponse) {
        match self.format {
            Format::Table => println!("{}", r.job_id),
            Format::Json => print_json(&json!({
                "job_id": r.job_id, "created": r.created,
                "state": r.job.as_ref().map(|j| job_state(j.state)),
            })),
        }
    }

    /// A list of jobs.
    pub fn jobs(&self, jobs: &[pb::JobSummary]) {
        match self.format {
            Format::Table => {
                let mut t = table(&[
                    "JOB ID", "NAME", "STATE", "TASKS", "RUNNING", "RESTARTS", "PENDING",
                ]);
                for j in jobs {
                    t.add_row(vec![
                        j.job_id.clone(),
                        j.name.clone(),
                        job_state(j.state).to_string(),
                        j.task_count.to_string(),
                        j.running_tasks.to_string(),
                        j.restarts.to_string(),
                        j.pending_reason.clone(),
                    ]);
                }
                println!("{t}");
            }
            Format::Json => print_json(&Value::Array(
                jobs.iter()
                    .map(|j| {
                        json!({
                            "job_id": j.job_id, "name": j.name, "state": job_state(j.state),
                            "submitted_at_ms": j.submitted_at_ms, "tasks": j.task_count,
                            "running_tasks": j.running_tasks, "restarts": j.restarts,
                            "pending_reason": j.pending_reason,
                        })
                    })
                    .collect(),
            )),
        }
    }

    /// A job's full status.
    pub fn job(&self, j: &pb::JobStatus) {
        match self.format {
            Format::Table => {
                println!("job:       {}", j.job_id);
                println!("name:      {}", j.name);
                println!("state:     {}", job_state(j.state));
                if !j.pending_reason.is_empty() {
                    println!("pending:   {}", j.pending_reason);
                }
                println!("priority:  {}", j.priority);
                println!("restarts:  {}", j.restarts);
                if !j.failure_reason.is_empty() {
                    println!("failure:   {}", j.failure_reason);
                }
                if let Some(c) = &j.checkpoints {
                    if let Some(last) = c.completed.last() {
                        println!("checkpoint: {} at {}", last.id, last.external_pointer);
                    }
                }
                let mut t = table(&[
                    "VERTEX",
                    "SUBTASK",
                    "ATTEMPT",
                    "STATE",
                    "TASKMANAGER",
                    "SLOT",
                    "EXIT",
                    "REASON",
                ]);
                for task in &j.tasks {
                    t.add_row(vec![
                        task.vertex.clone(),
                        task.subtask.to_string(),
                        task.attempt.to_string(),
                        task_state(task.state).to_string(),
                        task.task_manager_id.clone(),
                        task.slot
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        task.exit_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        task.failure_reason.clone(),
                    ]);
                }
                println!("{t}");
            }
            Format::Json => print_json(&job_json(j)),
        }
    }

    /// One line about a job (after cancel).
    pub fn job_line(&self, j: &pb::JobStatus) {
        match self.format {
            Format::Table => println!("{} {}", j.job_id, job_state(j.state)),
            Format::Json => print_json(&json!({"job_id": j.job_id, "state": job_state(j.state)})),
        }
    }

    /// One WatchJob event.
    pub fn event(&self, ev: &pb::JobEvent, j: &pb::JobStatus) {
        let running = j
            .tasks
            .iter()
            .filter(|t| t.state == pb::TaskState::Running as i32)
            .count();
        match self.format {
            Format::Table => println!(
                "{} {:<10} tasks running {}/{} restarts {}{}{}",
                j.updated_at_ms,
                job_state(j.state),
                running,
                j.tasks.len(),
                j.restarts,
                if j.failure_reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", j.failure_reason)
                },
                // A watch also reports a change of the reason alone.
                if j.pending_reason.is_empty() {
                    String::new()
                } else {
                    format!(" pending: {}", j.pending_reason)
                }
            ),
            Format::Json => println!(
                "{}",
                json!({"applied_index": ev.applied_index, "job": job_json(j)})
            ),
        }
    }

    /// Cluster status.
    pub fn cluster(&self, s: &pb::StatusResponse) {
        let leader = s
            .replicas
            .iter()
            .find(|r| r.role == pb::ReplicaRole::Leader as i32);
        let lag = |r: &pb::ReplicaStatus| {
            leader
                .filter(|_| r.reachable)
                .map(|l| l.last_log_index.saturating_sub(r.applied_index))
        };
        match self.format {
            Format::Table => {
                let mut t = table(&[
                    "ID", "ADDRESS", "ROLE", "TERM", "LAST LOG", "APPLIED", "LAG", "DIGEST",
                ]);
                for r in &s.replicas {
                    t.add_row(vec![
                        r.id.to_string(),
                        r.address.clone(),
                        role(r.role).to_string(),
                        r.term.to_string(),
                        r.last_log_index.to_string(),
                        r.applied_index.to_string(),
                        lag(r).map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        r.state_digest.chars().take(12).collect(),
                    ]);
                }
                println!("{t}");
                match leader {
                    Some(l) => println!("leader: {} at {}", l.id, l.address),
                    None => println!("leader: none known"),
                }
            }
            Format::Json => print_json(&json!({
                "leader_id": (s.leader_id > 0).then_some(s.leader_id),
                "leader_address": s.leader_address,
                "replicas": s.replicas.iter().map(|r| json!({
                    "id": r.id, "address": r.address, "role": role(r.role), "term": r.term,
                    "last_log_index": r.last_log_index, "applied_index": r.applied_index,
                    "lag": lag(r), "leader_id": r.leader_id, "state_digest": r.state_digest,
                    "reachable": r.reachable,
                })).collect::<Vec<_>>(),
            })),
        }
    }

    /// Membership after a change.
    pub fn members(&self, members: &[pb::Member]) {
        match self.format {
            Format::Table => {
                let mut t = table(&["ID", "ADDRESS", "VOTER"]);
                for m in members {
                    t.add_row(vec![
                        m.id.to_string(),
                        m.address.clone(),
                        m.voter.to_string(),
                    ]);
                }
                println!("{t}");
            }
            Format::Json => print_json(&Value::Array(
                members
                    .iter()
                    .map(|m| json!({"id": m.id, "address": m.address, "voter": m.voter}))
                    .collect(),
            )),
        }
    }

    /// A saved backup.
    pub fn saved(&self, file: &std::path::Path, b: &dispatcher_core::backup::Backup) {
        match self.format {
            Format::Table => println!(
                "saved the state at log index {} (term {}, {} bytes, digest {}) to {}",
                b.last_log_index,
                b.last_log_term,
                b.state.len(),
                &b.digest[..12.min(b.digest.len())],
                file.display()
            ),
            Format::Json => print_json(&json!({
                "file": file.display().to_string(), "last_log_index": b.last_log_index,
                "last_log_term": b.last_log_term, "bytes": b.state.len(), "digest": b.digest,
            })),
        }
    }

    /// TaskManagers.
    pub fn task_managers(&self, tms: &[pb::TaskManagerInfo]) {
        match self.format {
            Format::Table => {
                let mut t = table(&[
                    "TASKMANAGER",
                    "ADDRESS",
                    "SLOTS",
                    "FREE",
                    "LABELS",
                    "RUNNING",
                ]);
                for tm in tms {
                    let labels: Vec<String> =
                        tm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    t.add_row(vec![
                        tm.task_manager_id.clone(),
                        tm.address.clone(),
                        tm.slots.to_string(),
                        tm.free_slots.to_string(),
                        labels.join(","),
                        tm.running.len().to_string(),
                    ]);
                }
                println!("{t}");
            }
            Format::Json => print_json(&Value::Array(
                tms.iter()
                    .map(|tm| {
                        json!({
                            "task_manager_id": tm.task_manager_id, "instance_id": tm.instance_id,
                            "address": tm.address, "slots": tm.slots, "free_slots": tm.free_slots,
                            "labels": tm.labels, "registered_at_ms": tm.registered_at_ms,
                            "running": tm.running.iter().map(|a| json!({
                                "job_id": a.job_id, "vertex": a.vertex, "subtask": a.subtask,
                                "attempt": a.attempt, "slot": a.slot,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            )),
        }
    }
}
