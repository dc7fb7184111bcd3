//! Where the time of a submission goes, and the floors it is measured against.
//!
//! `breakdown` runs closed-loop submitters against a three-replica cluster whose replicas
//! report their stage timings (`dispatcher_server::timing`, DEBUG events of target
//! `dispatcher::timing`), then reads them back from the replicas' logs and prints the
//! median and p99 of every stage on the leader and the followers, beside the client's
//! own round trip. The stages nest (an AppendEntries call contains the follower's append
//! and sync), so the table also prints the differences that no stage reports: network
//! and gRPC, openraft's core, the batcher.
//!
//! `floor` measures what no submission can beat on this machine: a no-op unary call
//! through the same client, TLS and tonic stack (a local read of one small job, at c=1
//! and c=64), and one `fdatasync` of a 2 KiB append. A replicated write needs at least
//! the client's call, then the leader's sync beside one peer call carrying a sync, so
//! its floor is derived from those: `rpc + max(sync, rpc + sync)` = `2 rpc + sync`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use comfy_table::Table;
use serde::Serialize;

use crate::stats::{ms, percentile, Latency};
use crate::systems::dispatcher::{Dispatcher, Security};
use crate::systems::System;
use crate::workload::{self, Bound};

/// The replicas' log filter for a breakdown run: warnings, and every stage timing.
const TIMING_LOG: &str = "warn,dispatcher::timing=debug";

#[derive(clap::Args, Clone, Debug)]
pub struct BreakdownArgs {
    /// Closed-loop submitters (1: the latency of one submission with nothing to batch).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Submissions (the run also ends after --seconds).
    #[arg(long, default_value_t = 5000)]
    pub count: u64,
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FloorArgs {
    /// Calls per level of the no-op call.
    #[arg(long, default_value_t = 5000)]
    pub count: u64,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// `fdatasync`s of a 2 KiB append.
    #[arg(long, default_value_t = 2000)]
    pub syncs: usize,
}

/// One stage's timings on one role.
#[derive(Clone, Debug, Serialize)]
pub struct StageRow {
    pub stage: String,
    /// `leader`, `follower` or `client`.
    pub role: &'static str,
    pub what: &'static str,
    pub count: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize)]
pub struct Breakdown {
    pub submit: workload::SubmitResult,
    pub stages: Vec<StageRow>,
    /// Medians no stage reports, from the differences of nested stages.
    pub derived: Vec<(String, f64)>,
}

/// What each stage covers, in the order a submission meets them.
const STAGES: &[(&str, &str, &str)] = &[
    (
        "edge submit_job",
        "leader",
        "SubmitJob on the leader: from tonic handing it over to the answer",
    ),
    (
        "propose",
        "leader",
        "the batcher: queued, proposed, committed, applied here",
    ),
    (
        "raft_write",
        "leader",
        "openraft client_write of one entry (a command or a batch)",
    ),
    (
        "log_write",
        "leader",
        "encode the entries and insert them into sled",
    ),
    (
        "log_flushed",
        "leader",
        "append queued until the flusher synced it (openraft called back)",
    ),
    ("log_sync", "leader", "sled flush + fdatasync (one group)"),
    (
        "append_entries",
        "leader",
        "AppendEntries with entries, one follower: send to answer",
    ),
    (
        "edge append_entries",
        "follower",
        "AppendEntries (heartbeats too) from tonic handing it over to the answer",
    ),
    (
        "follower_append",
        "follower",
        "AppendEntries with entries: received to answered",
    ),
    ("log_write", "follower", "encode and insert into sled"),
    ("log_flushed", "follower", "append queued until synced"),
    ("log_sync", "follower", "sled flush + fdatasync"),
    ("apply", "leader", "state machine apply of a run of entries"),
    (
        "apply",
        "follower",
        "state machine apply of a run of entries",
    ),
];

/// Runs the breakdown.
pub async fn run(
    work: &Path,
    bin_dir: &Path,
    args: &BreakdownArgs,
    security: Security,
    quiet: bool,
) -> anyhow::Result<Breakdown> {
    let sys = Dispatcher::start_logged(work, bin_dir, 3, &[], security, TIMING_LOG)?;
    crate::systems::wait_ready(&sys, Duration::from_secs(60)).await?;
    let leader = sys.leader().await?;
    let bound = Bound {
        count: args.count,
        time: Duration::from_secs(args.seconds),
        rate: None,
    };
    let submit = workload::submit(&sys, args.concurrency, bound, quiet).await?;
    let after = sys.leader().await?;
    anyhow::ensure!(
        after == leader,
        "the leader changed during the run (replica {} to {}): the breakdown would mix roles",
        leader + 1,
        after + 1
    );
    drop(sys);
    let mut samples: BTreeMap<(String, &'static str), Vec<u64>> = BTreeMap::new();
    for i in 0..3 {
        let role = if i == leader { "leader" } else { "follower" };
        let log = work.join(format!("dispatcher-{}.log", i + 1));
        let text = std::fs::read_to_string(&log)
            .with_context(|| format!("cannot read {}", log.display()))?;
        for line in text.lines() {
            let Some(t) = parse(line) else { continue };
            let stage = match (t.stage.as_str(), t.rpc.as_deref()) {
                ("edge", Some(rpc @ ("submit_job" | "append_entries"))) => format!("edge {rpc}"),
                ("edge", _) => continue,
                _ => t.stage,
            };
            samples.entry((stage, role)).or_default().push(t.us);
        }
    }
    let mut stages = vec![StageRow {
        stage: "client".into(),
        role: "client",
        what: "the benchmark's submission: send to acknowledged",
        count: submit.latency.count,
        p50_us: submit.latency.p50_ms * 1000.0,
        p99_us: submit.latency.p99_ms * 1000.0,
    }];
    for (stage, role, what) in STAGES {
        let Some(mut s) = samples.remove(&(stage.to_string(), *role)) else {
            continue;
        };
        s.sort_unstable();
        let d: Vec<Duration> = s.iter().map(|us| Duration::from_micros(*us)).collect();
        stages.push(StageRow {
            stage: stage.to_string(),
            role,
            what,
            count: s.len(),
            p50_us: ms(percentile(&d, 0.5)) * 1000.0,
            p99_us: ms(percentile(&d, 0.99)) * 1000.0,
        });
    }
    let p50 = |stage: &str, role: &str| {
        stages
            .iter()
            .find(|r| r.stage == stage && r.role == role)
            .map_or(0.0, |r| r.p50_us)
    };
    let leader_path = p50("log_flushed", "leader").max(p50("append_entries", "leader"));
    let derived = vec![
        (
            "client to edge: network, TLS, gRPC both ways, the client library".into(),
            p50("client", "client") - p50("edge submit_job", "leader"),
        ),
        (
            "edge to batcher: auth, decode, validation, answer".into(),
            p50("edge submit_job", "leader") - p50("propose", "leader"),
        ),
        (
            "batcher to openraft: queueing and waiting for a slot".into(),
            p50("propose", "leader") - p50("raft_write", "leader"),
        ),
        (
            "openraft's own: raft_write less the longer of the leader's sync and the \
             follower round, less apply"
                .into(),
            p50("raft_write", "leader") - leader_path - p50("apply", "leader"),
        ),
        (
            "peer call less the follower's handling: network, TLS, gRPC, codec".into(),
            p50("append_entries", "leader") - p50("follower_append", "follower"),
        ),
        (
            "follower's handling less its sync wait: openraft's follower path".into(),
            p50("follower_append", "follower") - p50("log_flushed", "follower"),
        ),
    ];
    Ok(Breakdown {
        submit,
        stages,
        derived,
    })
}

impl Breakdown {
    /// The stage table, then the derived medians.
    pub fn table(&self) -> Table {
        let mut t = Table::new();
        t.set_header(["stage", "where", "count", "p50 µs", "p99 µs", "covers"]);
        for r in &self.stages {
            t.add_row([
                r.stage.clone(),
                r.role.to_string(),
                r.count.to_string(),
                format!("{:.0}", r.p50_us),
                format!("{:.0}", r.p99_us),
                r.what.to_string(),
            ]);
        }
        for (what, us) in &self.derived {
            t.add_row([
                "(derived)".to_string(),
                String::new(),
                String::new(),
                format!("{us:.0}"),
                String::new(),
                what.clone(),
            ]);
        }
        t
    }
}

/// One stage timing read back from a replica's log line.
#[derive(Debug, PartialEq)]
struct Timing {
    stage: String,
    rpc: Option<String>,
    us: u64,
}

/// Reads a `dispatcher::timing` event from a text log line, e.g.
/// `... DEBUG dispatcher::timing: stage="log_sync" entries=1 us=215`.
fn parse(line: &str) -> Option<Timing> {
    let (_, fields) = line.split_once("dispatcher::timing: ")?;
    let mut stage = None;
    let mut rpc = None;
    let mut us = None;
    for field in fields.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('"');
        match k {
            "stage" => stage = Some(v.to_string()),
            "rpc" => rpc = Some(v.to_string()),
            "us" => us = v.parse().ok(),
            _ => {}
        }
    }
    Some(Timing {
        stage: stage?,
        rpc,
        us: us?,
    })
}

/// What no submission can beat here.
#[derive(Debug, Serialize)]
pub struct Floors {
    /// A local read of one small job through the client library, per concurrency.
    pub noop: Vec<workload::SubmitResult>,
    /// One fdatasync of a 2 KiB append.
    pub sync: Latency,
    /// `2 rpc + sync` at c=1, in ms.
    pub replicated_write_p50_ms: f64,
}

/// A no-op call: reads one small job from the replica the client talks to, locally.
struct NoopWriter {
    client: dispatcher_client::Client,
    job: String,
}

#[tonic::async_trait]
impl crate::systems::Writer for NoopWriter {
    async fn write(&self, _key: &str, timeout: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(timeout, self.client.get_job(&self.job, true)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e)),
            Err(_) => anyhow::bail!("no answer within {timeout:?}"),
        }
    }
}

/// A [`System`] whose writes are no-op calls, so the submit workload measures them.
struct Noop<'a> {
    sys: &'a mut Dispatcher,
    job: String,
}

#[tonic::async_trait]
impl System for Noop<'_> {
    fn name(&self) -> &'static str {
        "no-op call"
    }
    fn nodes(&mut self) -> &mut Vec<crate::procs::Node> {
        self.sys.nodes()
    }
    async fn writer(&self) -> anyhow::Result<Box<dyn crate::systems::Writer>> {
        Ok(Box::new(NoopWriter {
            client: self.sys.client()?,
            job: self.job.clone(),
        }))
    }
    async fn leader(&self) -> anyhow::Result<usize> {
        self.sys.leader().await
    }
}

/// Measures the floors.
pub async fn floor(
    work: &Path,
    bin_dir: &Path,
    args: &FloorArgs,
    security: Security,
    quiet: bool,
) -> anyhow::Result<Floors> {
    let sync = sync_floor(work, args.syncs)?;
    let mut sys = Dispatcher::start(work, bin_dir, 3, &[], security)?;
    crate::systems::wait_ready(&sys, Duration::from_secs(60)).await?;
    let job = sys
        .client()?
        .submit_job(None, crate::systems::dispatcher::job_spec("floor"))
        .await
        .context("submitting the job the no-op call reads")?
        .job_id;
    let noop_sys = Noop { sys: &mut sys, job };
    let bound = Bound {
        count: args.count,
        time: Duration::from_secs(args.seconds),
        rate: None,
    };
    let mut noop = Vec::new();
    for c in [1, 64] {
        noop.push(workload::submit(&noop_sys, c, bound, quiet).await?);
    }
    let rpc = noop.first().map_or(0.0, |r| r.latency.p50_ms);
    Ok(Floors {
        replicated_write_p50_ms: 2.0 * rpc + sync.p50_ms,
        noop,
        sync,
    })
}

/// `count` appends of 2 KiB to a file in `work`, each followed by `fdatasync`.
fn sync_floor(work: &Path, count: usize) -> anyhow::Result<Latency> {
    let path = work.join("sync-floor");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let block = vec![0x5a_u8; 2048];
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(Latency::of(samples))
}

impl Floors {
    /// The floor table.
    pub fn table(&self) -> Table {
        let mut t = Table::new();
        t.set_header(["floor", "count", "per second", "p50 ms", "p99 ms"]);
        for r in &self.noop {
            t.add_row([
                format!("no-op call through the client, c={}", r.concurrency),
                r.writes.to_string(),
                format!("{:.0}", r.per_second),
                format!("{:.3}", r.latency.p50_ms),
                format!("{:.3}", r.latency.p99_ms),
            ]);
        }
        t.add_row([
            "fdatasync of a 2 KiB append".to_string(),
            self.sync.count.to_string(),
            format!("{:.0}", 1000.0 / self.sync.p50_ms.max(f64::MIN_POSITIVE)),
            format!("{:.3}", self.sync.p50_ms),
            format!("{:.3}", self.sync.p99_ms),
        ]);
        t.add_row([
            "replicated write (derived: 2 calls + 1 sync), c=1".to_string(),
            String::new(),
            format!(
                "{:.0}",
                1000.0 / self.replicated_write_p50_ms.max(f64::MIN_POSITIVE)
            ),
            format!("{:.3}", self.replicated_write_p50_ms),
            String::new(),
        ]);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timing_line_is_read_back() {
        let line = "2026-11-28T10:00:00.123Z DEBUG dispatcher::timing: stage=\"edge\" \
                    rpc=\"submit_job\" us=1234";
        assert_eq!(
            parse(line),
            Some(Timing {
                stage: "edge".into(),
                rpc: Some("submit_job".into()),
                us: 1234
            })
        );
        let line = "x DEBUG dispatcher::timing: stage=\"log_sync\" entries=3 us=215";
        assert_eq!(parse(line).map(|t| t.us), Some(215));
        assert_eq!(parse("x INFO dispatcher::server: listening"), None);
        assert_eq!(parse("x DEBUG dispatcher::timing: us=5"), None);
    }
}
