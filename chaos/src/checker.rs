//! The checks run at the end of a run, after a heal phase with no faults.
//!
//! - every acknowledged submission exists; no job exists twice; a submission that ended
//!   unknown exists once or not at all;
//! - per job, reads are consistent with a sequential model: a job acknowledged before a
//!   read began is found; restart counts never go backwards between reads that do not
//!   overlap; a terminal state is never left; after an acknowledged cancel, reads see
//!   CANCELLING or CANCELED;
//! - no slot held two attempts at once and no attempt ran on two TaskManagers (from the
//!   TaskManagers' own records);
//! - every replica reports the same digest at the same applied index;
//! - every job ends terminal (the workload's tasks are short) with no task left on a
//!   TaskManager that is gone;
//! - availability: the share of operations acknowledged, and the longest window with no
//!   acknowledged write;
//! - liveness under load: no election while a fault that leaves the leader able to lead
//!   is held (big entries, busy CPUs, throttling, a connection flood, a TaskManager
//!   kill); every replica reports SERVING once healed; no replica's resident set grows
//!   past [`RSS_BOUND_MIB`].

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::workload::{Op, Outcome};

/// The resident set a replica of a chaos run must stay under: the workload's state is
/// a few MiB, so a replica past this is leaking.
pub const RSS_BOUND_MIB: u64 = 1024;

/// What the checker found.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Operations in the history.
    pub operations: usize,
    /// Acknowledged submissions.
    pub acknowledged_submissions: usize,
    /// Submissions that ended unknown.
    pub unknown_submissions: usize,
    /// Acknowledged submissions missing from the final state.
    pub lost: usize,
    /// Jobs present more than once (by unique name).
    pub duplicated: usize,
    /// Read-consistency violations.
    pub read_violations: usize,
    /// Slots that held two attempts at once.
    pub double_booked_slots: usize,
    /// Attempts started on two TaskManagers.
    pub attempts_on_two_task_managers: usize,
    /// Replicas whose digest differs at the same applied index.
    pub digest_mismatches: usize,
    /// Jobs not terminal at the end.
    pub stuck_jobs: usize,
    /// Replicas that served, after one of their files was corrupted, a state whose
    /// digest differs from another replica's at the same applied index.
    pub served_wrong_digest: usize,
    /// Wiped voters restarted with their old id that started instead of refusing.
    pub wiped_not_refused: usize,
    /// Share of operations acknowledged.
    pub ok_share: f64,
    /// Share of operations answered (acknowledged or definitely refused, e.g. a cancel
    /// of a finished job); the rest ended unknown (unavailable, timed out).
    pub answered_share: f64,
    /// Longest window with no acknowledged write, ms.
    pub longest_write_gap_ms: u64,
    /// Elections (a term rise on any replica) while a fault that leaves the leader able
    /// to lead was held, or in the pause after it.
    pub elections_with_healthy_leader: usize,
    /// Elections over the whole run (the highest term at the end minus at the start).
    pub elections: u64,
    /// Faults that leave the leader able to lead but found no settled cluster within
    /// 10 s (not checked for elections).
    pub unsettled: usize,
    /// Replicas not SERVING on the health service after the heal.
    pub not_serving_after_heal: usize,
    /// The largest resident set of a replica seen, MiB.
    pub max_rss_mib: u64,
    /// Human-readable violations (first few of each kind).
    pub violations: Vec<String>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.read_violations == 0
            && self.double_booked_slots == 0
            && self.attempts_on_two_task_managers == 0
            && self.digest_mismatches == 0
            && self.stuck_jobs == 0
            && self.served_wrong_digest == 0
            && self.wiped_not_refused == 0
            && self.elections_with_healthy_leader == 0
            && self.not_serving_after_heal == 0
            && self.max_rss_mib <= RSS_BOUND_MIB
    }

    /// Records a violation (the first 50 are kept).
    pub fn violation(&mut self, v: String) {
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }
}

fn terminal(s: &str) -> bool {
    matches!(s, "FINISHED" | "FAILED" | "CANCELED")
}

/// Checks the history against the final jobs (id -> (name, state)).
pub fn check_history(
    report: &mut Report,
    history: &[Op],
    final_jobs: &BTreeMap<String, (String, String)>,
    run_ms: u64,
) {
    report.operations = history.len();
    let ok = history.iter().filter(|o| o.outcome == Outcome::Ok).count();
    report.ok_share = if history.is_empty() {
        1.0
    } else {
        ok as f64 / history.len() as f64
    };
    let answered = history
        .iter()
        .filter(|o| o.outcome != Outcome::Unknown)
        .count();
    report.answered_share = if history.is_empty() {
        1.0
    } else {
        answered as f64 / history.len() as f64
    };

    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, _) in final_jobs.values() {
        *names.entry(name.as_str()).or_default() += 1;
    }
    for (name, n) in &names {
        if *n > 1 {
            report.duplicated += 1;
            report.violation(format!("job name {name} exists {n} times"));
        }
    }
    let mut acked_at: BTreeMap<&str, u64> = BTreeMap::new();
    let mut write_times = vec![0u64];
    for o in history.iter().filter(|o| o.kind == "submit") {
        match o.outcome {
            Outcome::Ok => {
                report.acknowledged_submissions += 1;
                acked_at.insert(&o.job_id, o.complete_ms);
                write_times.push(o.complete_ms);
                if !final_jobs.contains_key(&o.job_id) {
                    report.lost += 1;
                    report.violation(format!(
                        "acknowledged submission {} ({}) is lost",
                        o.job_id, o.name
                    ));
                }
            }
            Outcome::Unknown => report.unknown_submissions += 1,
            Outcome::Fail => {}
        }
    }
    write_times.push(run_ms);
    write_times.sort();
    report.longest_write_gap_ms = write_times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);

    // Reads, per job, against a sequential model.
    let mut cancel_acked: BTreeMap<&str, u64> = BTreeMap::new();
    for o in history
        .iter()
        .filter(|o| o.kind == "cancel" && o.outcome == Outcome::Ok)
    {
        let e = cancel_acked.entry(&o.job_id).or_insert(o.complete_ms);
        *e = (*e).min(o.complete_ms);
    }
    let mut reads: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in history
        .iter()
        .filter(|o| o.kind == "read" && o.outcome == Outcome::Ok)
    {
        reads.entry(&o.job_id).or_default().push(o);
    }
    for (job, rs) in &reads {
        for r in rs {
            if r.not_found {
                if acked_at.get(job).is_some_and(|at| *at < r.invoke_ms)
                    && final_jobs.contains_key(*job)
                {
                    report.read_violations += 1;
                    report.violation(format!(
                        "read of {job} at {} ms found nothing, but it was acknowledged before",
                        r.invoke_ms
                    ));
                }
                continue;
            }
            if let (Some(at), Some(state)) = (cancel_acked.get(job), &r.state) {
                if *at < r.invoke_ms && !matches!(state.as_str(), "CANCELLING" | "CANCELED") {
                    report.read_violations += 1;
                    report.violation(format!("read of {job} at {} ms saw {state} after its cancel was acknowledged at {at} ms", r.invoke_ms));
                }
            }
        }
        for a in rs.iter().filter(|r| !r.not_found) {
            for b in rs
                .iter()
                .filter(|r| !r.not_found && a.complete_ms < r.invoke_ms)
            {
                if b.restarts < a.restarts {
                    report.read_violations += 1;
                    report.violation(format!(
                        "reads of {job}: restarts went from {:?} to {:?}",
                        a.restarts, b.restarts
                    ));
                }
                if let (Some(sa), Some(sb)) = (&a.state, &b.state) {
                    if terminal(sa) && sa != sb {
                        report.read_violations += 1;
                        report.violation(format!(
                            "reads of {job}: left terminal state {sa} for {sb}"
                        ));
                    }
                }
            }
        }
    }
}

/// One attempt as a TaskManager recorded it.
#[derive(Debug, Clone)]
struct Interval {
    tm: String,
    instance: String,
    slot: u64,
    attempt: (String, String, u64, u64),
    start: u64,
    end: u64,
}

/// Checks the TaskManagers' attempt records (`attempts.jsonl` per TaskManager).
pub fn check_attempts(report: &mut Report, records: &BTreeMap<String, Vec<serde_json::Value>>) {
    let mut intervals: Vec<Interval> = Vec::new();
    for (tm, lines) in records {
        // When each instance first appears: an older instance's tasks end by then (a
        // restarted TaskManager kills its orphans before registering).
        let mut first_seen: Vec<(u64, String)> = Vec::new();
        for l in lines {
            let inst = l["instance"].as_str().unwrap_or_default().to_string();
            if !first_seen.iter().any(|(_, i)| *i == inst) {
                first_seen.push((l["at_ms"].as_u64().unwrap_or(0), inst));
            }
        }
        let mut open: BTreeMap<(String, String, u64, u64), Interval> = BTreeMap::new();
        for l in lines {
            let key = (
                l["job_id"].as_str().unwrap_or_default().to_string(),
                l["vertex"].as_str().unwrap_or_default().to_string(),
                l["subtask"].as_u64().unwrap_or(0),
                l["attempt"].as_u64().unwrap_or(0),
            );
            let at = l["at_ms"].as_u64().unwrap_or(0);
            let instance = l["instance"].as_str().unwrap_or_default().to_string();
            match l["event"].as_str() {
                Some("start") => {
                    open.insert(
                        key.clone(),
                        Interval {
                            tm: tm.clone(),
                            instance,
                            slot: l["slot"].as_u64().unwrap_or(0),
                            attempt: key,
                            start: at,
                            end: u64::MAX,
                        },
                    );
                }
                Some("stop") => {
                    if let Some(mut i) = open.remove(&key) {
                        i.end = at;
                        intervals.push(i);
                    }
                }
                _ => {}
            }
        }
        for mut i in open.into_values() {
            i.end = first_seen
                .iter()
                .filter(|(t, inst)| *t > i.start && *inst != i.instance)
                .map(|(t, _)| *t)
                .min()
                .unwrap_or(u64::MAX);
            intervals.push(i);
        }
    }
    let mut where_run: BTreeMap<&(String, String, u64, u64), BTreeSet<&str>> = BTreeMap::new();
    for i in &intervals {
        where_run.entry(&i.attempt).or_default().insert(&i.tm);
    }
    let mut two = Vec::new();
    for (a, tms) in &where_run {
        if tms.len() > 1 {
            two.push(format!("attempt {a:?} ran on {tms:?}"));
        }
    }
    report.attempts_on_two_task_managers += two.len();
    for v in two {
        report.violation(v);
    }
    let mut by_slot: BTreeMap<(&str, &str, u64), Vec<&Interval>> = BTreeMap::new();
    for i in &intervals {
        by_slot
            .entry((&i.tm, &i.instance, i.slot))
            .or_default()
            .push(i);
    }
    let mut doubles = Vec::new();
    for (slot, is) in &by_slot {
        for (n, a) in is.iter().enumerate() {
            for b in &is[n + 1..] {
                if a.attempt != b.attempt && a.start < b.end && b.start < a.end {
                    doubles.push(format!(
                        "slot {slot:?} held {:?} and {:?} at once",
                        a.attempt, b.attempt
                    ));
                }
            }
        }
    }
    report.double_booked_slots += doubles.len();
    for v in doubles {
        report.violation(v);
    }
}
