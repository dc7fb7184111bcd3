//! Rendering of `dispatchctl` results: plain tables for people, JSON for scripts.
//! States print by name (`RUNNING`), in JSON as in tables.

use comfy_table::presets::NOTHING;
use comfy_table::{ContentArrangement, Table};
use serde_json::{json, Value};

use super::Format;
use dispatcher_proto::v1 as pb;

/// The replica of a status answer that says it is the leader, if one does. The answering
/// replica's `leader_id` is not enough: right after the leader dies its followers still
/// name it until they elect another.
pub fn leader(s: &pb::StatusResponse) -> Option<&pb::ReplicaStatus> {
    s.replicas
        .iter()
        .find(|r| r.reachable && r.role == pb::ReplicaRole::Leader as i32)
}

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

/// The failure a job's status shows: its last failure, only while the job fails or
/// restarts because of it. The reason stays recorded after a restart brought the job back
/// to RUNNING, and after it finished or was canceled; shown then, it would read as a
/// current fault.
pub fn current_failure(j: &pb::JobStatus) -> Option<&str> {
    let failing = matches!(
        pb::JobState::try_from(j.state),
        Ok(pb::JobState::Failed | pb::JobState::Failing | pb::JobState::Restarting)
    );
    (failing && !j.failure_reason.is_empty()).then_some(j.failure_reason.as_str())
}

/// The failure a `job watch` line shows: the current failure, on the first event that
/// carries it (the job started failing, or failed for another reason), so that each
/// failure prints once rather than on every later line.
pub fn new_failure<'a>(previous: Option<&pb::JobStatus>, j: &'a pb::JobStatus) -> Option<&'a str> {
    let now = current_failure(j)?;
    (previous.and_then(current_failure) != Some(now)).then_some(now)
}

/// `job watch` on a terminal: one bar of the job's tasks that are up (RUNNING or
/// FINISHED) out of all, the job's state before it and the tasks by state after it;
/// failures print above the bar as they happen.
pub struct WatchBar {
    bar: indicatif::ProgressBar,
    /// Redrawing on its own (from the first event on).
    ticking: bool,
}

/// Task states in the order the bar's summary names them.
const BAR_STATES: [(pb::TaskState, &str); 6] = [
    (pb::TaskState::Running, "running"),
    (pb::TaskState::Finished, "finished"),
    (pb::TaskState::Deploying, "deploying"),
    (pb::TaskState::Scheduled, "scheduled"),
    (pb::TaskState::Canceled, "canceled"),
    (pb::TaskState::Failed, "failed"),
];

impl WatchBar {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(1),
            indicatif::ProgressDrawTarget::stdout(),
        );
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>10.bold} [{bar:30.green/white}] {pos}/{len} tasks up  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        WatchBar {
            bar,
            ticking: false,
        }
    }

    /// Shows the job as of one event.
    pub fn update(&mut self, j: &pb::JobStatus, previous: Option<&pb::JobStatus>) {
        let count = |s: pb::TaskState| j.tasks.iter().filter(|t| t.state == s as i32).count();
        let up = count(pb::TaskState::Running) + count(pb::TaskState::Finished);
        let mut parts: Vec<String> = BAR_STATES
            .iter()
            .map(|(s, name)| (count(*s), name))
            .filter(|(n, _)| *n > 0)
            .map(|(n, name)| format!("{n} {name}"))
            .collect();
        if j.restarts > 0 {
            parts.push(format!("{} restarts", j.restarts));
        }
        if !j.pending_reason.is_empty() {
            parts.push(format!("pending: {}", j.pending_reason));
        }
        if let Some(f) = new_failure(previous, j) {
            self.bar.println(format!("failure: {f}"));
        }
        // Text first: a redraw comes with the position, and draws are rate-limited.
        self.bar.set_prefix(job_state(j.state));
        self.bar.set_message(parts.join(" · "));
        self.bar.set_length(j.tasks.len() as u64);
        self.bar.set_position(up as u64);
        if !self.ticking {
            // Redraws between events too, so that the last change is never left
            // undrawn by the rate limit.
            self.bar
                .enable_steady_tick(std::time::Duration::from_millis(250));
            self.ticking = true;
        }
    }

    /// Leaves the bar with the job's last state on the screen.
    pub fn finish(&mut self, j: &pb::JobStatus) {
        self.update(j, Some(j));
        self.bar.finish();
    }

    /// Leaves the bar as it was (the watch failed; the error follows).
    pub fn abandon(&mut self) {
        self.bar.abandon();
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
                if let Some(failure) = current_failure(j) {
                    println!("failure:   {failure}");
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

    /// For `job watch` in table format on a terminal: a live progress bar instead of
    /// lines (`None` in a pipe, a file, or JSON).
    pub fn watch_bar(&self) -> Option<WatchBar> {
        use std::io::IsTerminal;
        (self.format == Format::Table && std::io::stdout().is_terminal()).then(WatchBar::new)
    }

    /// One WatchJob event; `previous` is the status the last event printed.
    pub fn event(&self, ev: &pb::JobEvent, j: &pb::JobStatus, previous: Option<&pb::JobStatus>) {
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
                new_failure(previous, j)
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default(),
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
        let leader = leader(s);
        // A replica that did not answer reports no pid (0); show that as unknown.
        let pid = |r: &pb::ReplicaStatus| (r.pid > 0).then_some(r.pid);
        let lag = |r: &pb::ReplicaStatus| {
            leader
                .filter(|_| r.reachable)
                .map(|l| l.last_log_index.saturating_sub(r.applied_index))
        };
        match self.format {
            Format::Table => {
                let mut t = table(&[
                    "ID", "ADDRESS", "PID", "ROLE", "TERM", "LAST LOG", "APPLIED", "LAG", "DIGEST",
                ]);
                for r in &s.replicas {
                    t.add_row(vec![
                        r.id.to_string(),
                        r.address.clone(),
                        pid(r).map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        role(r.role).to_string(),
                        r.term.to_string(),
                        r.last_log_index.to_string(),
                        r.applied_index.to_string(),
                        lag(r).map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                        if r.state_digest.is_empty() {
                            "-".into()
                        } else {
                            r.state_digest.chars().take(12).collect()
                        },
                    ]);
                }
                println!("{t}");
                // Without a leader, the CLI says so on stderr and exits non-zero.
                if let Some(l) = leader {
                    match pid(l) {
                        Some(p) => println!("leader: {} at {} (pid {p})", l.id, l.address),
                        None => println!("leader: {} at {}", l.id, l.address),
                    }
                }
            }
            Format::Json => print_json(&json!({
                "leader_id": (s.leader_id > 0).then_some(s.leader_id),
                "leader_address": s.leader_address,
                "replicas": s.replicas.iter().map(|r| json!({
                    "id": r.id, "address": r.address, "pid": pid(r), "role": role(r.role),
                    "term": r.term,
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

/// A token role's name, as `--role` takes it.
pub fn role_name(raw: i32) -> &'static str {
    match pb::TokenRole::try_from(raw) {
        Ok(pb::TokenRole::Admin) => "admin",
        Ok(pb::TokenRole::Submit) => "submit",
        Ok(pb::TokenRole::Read) => "read",
        Ok(pb::TokenRole::TaskManager) => "taskmanager",
        _ => "unknown",
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time, to the second.
pub fn utc(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

fn token_json(t: &pb::TokenInfo) -> Value {
    json!({
        "name": t.name, "role": role_name(t.role), "task_managers": t.task_managers,
        "created_at_ms": t.created_at_ms,
    })
}

impl Output {
    /// A created token. Table mode prints the secret alone on stdout (for
    /// `dispatchctl token create … > FILE`) and the rest on stderr.
    pub fn token_created(&self, r: &pb::CreateTokenResponse) {
        let info = r.token.clone().unwrap_or_default();
        match self.format {
            Format::Table => {
                println!("{}", r.secret);
                eprintln!(
                    "created token {:?} (role {}); its secret above is shown only this once",
                    info.name,
                    role_name(info.role)
                );
            }
            Format::Json => {
                let mut v = token_json(&info);
                v["secret"] = Value::String(r.secret.clone());
                print_json(&v);
            }
        }
    }

    /// Tokens.
    pub fn tokens(&self, tokens: &[pb::TokenInfo]) {
        match self.format {
            Format::Table => {
                let mut t = table(&["NAME", "ROLE", "TASKMANAGERS", "CREATED"]);
                for tok in tokens {
                    t.add_row(vec![
                        tok.name.clone(),
                        role_name(tok.role).to_string(),
                        if tok.task_managers.is_empty() {
                            "-".to_string()
                        } else {
                            tok.task_managers.join(",")
                        },
                        utc(tok.created_at_ms),
                    ]);
                }
                println!("{t}");
            }
            Format::Json => print_json(&Value::Array(tokens.iter().map(token_json).collect())),
        }
    }

    /// A revoked token.
    pub fn token_revoked(&self, name: &str) {
        match self.format {
            Format::Table => println!("revoked token {name:?}"),
            Format::Json => print_json(&json!({"name": name, "revoked": true})),
        }
    }

    /// What `dev-certs` wrote: the files on stderr; on stdout the lines to export (table
    /// mode, so that `eval "$(dispatchctl dev-certs --out DIR)"` works) or one JSON
    /// document.
    pub fn dev_certs(&self, w: &super::dev_certs::Written) {
        let ca = w.ca().display().to_string();
        let token = w.admin_token().display().to_string();
        match self.format {
            Format::Table => {
                for f in &w.files {
                    eprintln!("wrote {}: {}", f.path.display(), f.what);
                }
                println!("export DISPATCHER_CA={}", shell_word(&ca));
                println!("export DISPATCHER_TOKEN_FILE={}", shell_word(&token));
            }
            Format::Json => print_json(&json!({
                "dir": w.dir.display().to_string(),
                "files": w.files.iter().map(|f| json!({
                    "path": f.path.display().to_string(), "what": f.what,
                })).collect::<Vec<_>>(),
                "env": {"DISPATCHER_CA": ca, "DISPATCHER_TOKEN_FILE": token},
            })),
        }
    }
}

/// `s` as one shell word: as is when it is safe, else single-quoted.
pub fn shell_word(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@%,=".contains(&b));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: pb::JobState, failure: &str) -> pb::JobStatus {
        pb::JobStatus {
            state: state as i32,
            failure_reason: failure.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_failure_shows_only_while_the_job_fails_or_restarts_because_of_it() {
        use pb::JobState::*;
        let cases = [
            (Failed, true),
            (Failing, true),
            (Restarting, true),
            // Recovered by a restart, or ended otherwise: the old reason is history.
            (Running, false),
            (Finished, false),
            (Canceled, false),
            (Cancelling, false),
            (Created, false),
        ];
        for (state, shown) in cases {
            let j = job(state, "exit code 3");
            let want = shown.then_some("exit code 3");
            assert_eq!(current_failure(&j), want, "{state:?}");
        }
        assert_eq!(current_failure(&job(Failed, "")), None, "nothing to show");
    }

    #[test]
    fn a_watch_prints_each_failure_once() {
        use pb::JobState::*;
        // A job that fails, restarts, runs, fails again for the same reason (a second
        // failure), then fails for good.
        let events = [
            job(Running, ""),
            job(Restarting, "exit code 3"),
            job(Restarting, "exit code 3"),
            job(Running, "exit code 3"),
            job(Restarting, "exit code 3"),
            job(Running, "exit code 3"),
            job(Failing, "TaskManager tm-1 lost"),
            job(Failed, "TaskManager tm-1 lost"),
        ];
        let mut previous: Option<&pb::JobStatus> = None;
        let mut shown = Vec::new();
        for j in &events {
            shown.push(new_failure(previous, j));
            previous = Some(j);
        }
        assert_eq!(
            shown,
            [
                None,
                Some("exit code 3"),
                None,
                None,
                Some("exit code 3"),
                None,
                Some("TaskManager tm-1 lost"),
                None,
            ]
        );
    }

    #[test]
    fn a_watch_that_attaches_to_a_failed_job_shows_why() {
        let j = job(pb::JobState::Failed, "exit code 3");
        assert_eq!(new_failure(None, &j), Some("exit code 3"));
    }
}
