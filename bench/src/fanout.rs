//! The `watch-fanout` workload (issue 14): many WatchJob streams on one big job (4,096
//! subtasks, about 800 KB of labels) must cost the cluster little. Small submissions are
//! timed without watchers, with them open on the leader, and after they closed; the
//! leader's resident memory is read before, during and after. Last, the watchers are
//! opened again and the big job is canceled: the time until every watcher has seen it
//! CANCELED is the cost of one change of that job fanned out.
//!
//! The big job never runs (no TaskManager has its selector's label), so while it is
//! watched it does not change: whatever the submissions cost beyond their own is the
//! watches' overhead.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use comfy_table::Table;
use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::{self, JobBuilder};
use futures::future::try_join_all;
use prost::Message as _;
use serde::Serialize;
use tonic::Streaming;

use crate::stats::figures;
use crate::systems::dispatcher::{Dispatcher, Security};
use crate::systems::System;
use crate::workload::{self, Bound};

/// Flags of `dispatch-bench watch-fanout`.
#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    /// WatchJob streams on the big job, all on the leader.
    #[arg(long, default_value_t = 300)]
    pub watchers: usize,
    /// Subtasks of the big job (split into vertices of at most 1,024).
    #[arg(long, default_value_t = 4096)]
    pub subtasks: u32,
    /// KiB of labels on the big job (values of 4,000 bytes).
    #[arg(long, default_value_t = 800)]
    pub label_kib: usize,
    /// Small submissions (2 KiB specs) timed in each phase.
    #[arg(long, default_value_t = 300)]
    pub submits: u64,
    /// Closed-loop submitters in each phase.
    #[arg(long, default_value_t = 1)]
    pub submitters: usize,
    /// Client connections the watchers are spread over.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
}

/// What `watch-fanout` measured.
#[derive(Debug, Serialize)]
pub struct FanoutResult {
    pub watchers: usize,
    pub submitters: usize,
    pub subtasks: u32,
    pub label_kib: usize,
    /// Encoded size of one event of the big job.
    pub event_kib: f64,
    pub submit_p50_ms_without: f64,
    pub submit_p99_ms_without: f64,
    pub submit_p50_ms_with: f64,
    pub submit_p99_ms_with: f64,
    pub submit_p50_ms_after: f64,
    /// `with / without`.
    pub p50_ratio: f64,
    /// Opening every watcher, each to its first event.
    pub open_ms: f64,
    /// Cancel of the big job to the last watcher seeing it CANCELED.
    pub fanout_ms: f64,
    pub rss_before_mib: f64,
    /// Highest sample while the watchers were open and submissions ran.
    pub rss_during_mib: f64,
    /// Once settled after the watchers closed.
    pub rss_after_mib: f64,
    /// `after / before`.
    pub rss_ratio: f64,
    /// Once settled after the next phase's submissions, with no watcher: what the same
    /// number of submissions adds on their own (new jobs in the state, log entries in
    /// sled's cache), for reading `after` against `before`.
    pub rss_after_next_phase_mib: f64,
    /// `(after - (after_next_phase - after)) / before`: the ratio with the growth of one
    /// phase's submissions taken out.
    pub rss_ratio_less_growth: f64,
    /// Once settled after the fan-out of the cancel and the watchers' end.
    pub rss_after_fanout_mib: f64,
}

impl FanoutResult {
    /// The human table.
    pub fn table(&self) -> Table {
        figures([
            (
                "big job".to_string(),
                format!(
                    "{} subtasks, {} KiB of labels, {:.0} KiB per event",
                    self.subtasks, self.label_kib, self.event_kib
                ),
            ),
            (
                format!(
                    "submit p50 / p99, {} submitter(s), no watcher",
                    self.submitters
                ),
                format!(
                    "{:.2} / {:.2} ms",
                    self.submit_p50_ms_without, self.submit_p99_ms_without
                ),
            ),
            (
                format!("submit p50 / p99, {} watchers", self.watchers),
                format!(
                    "{:.2} / {:.2} ms ({:.2}x)",
                    self.submit_p50_ms_with, self.submit_p99_ms_with, self.p50_ratio
                ),
            ),
            (
                "submit p50, watchers closed".to_string(),
                format!("{:.2} ms", self.submit_p50_ms_after),
            ),
            (
                format!("open {} watchers (to first event)", self.watchers),
                format!("{:.0} ms", self.open_ms),
            ),
            (
                "leader RSS before / during / after".to_string(),
                format!(
                    "{:.1} / {:.1} / {:.1} MiB (after/before {:.2})",
                    self.rss_before_mib, self.rss_during_mib, self.rss_after_mib, self.rss_ratio
                ),
            ),
            (
                "leader RSS after the next phase (no watcher)".to_string(),
                format!(
                    "{:.1} MiB (after/before less one phase's growth {:.2})",
                    self.rss_after_next_phase_mib, self.rss_ratio_less_growth
                ),
            ),
            (
                format!("cancel -> all {} watchers saw CANCELED", self.watchers),
                format!(
                    "{:.0} ms (leader RSS after: {:.1} MiB)",
                    self.fanout_ms, self.rss_after_fanout_mib
                ),
            ),
        ])
    }
}

/// The big job: `subtasks` sleepers in vertices of at most 1,024, about `label_kib` KiB
/// of labels, and a selector no TaskManager matches.
fn big_job(subtasks: u32, label_kib: usize) -> pb::JobSpec {
    let mut b = JobBuilder::new("watch-fanout-big");
    let mut left = subtasks;
    let mut i = 0;
    while left > 0 {
        let n = left.min(1024);
        b = b
            .vertex(&format!("v{i}"), n, spec::sleep(60_000))
            .selector("pool", "dispatch-bench-none");
        left -= n;
        i += 1;
    }
    let value = "x".repeat(4000);
    for l in 0..(label_kib * 1024).div_ceil(4000) {
        b = b.label(&format!("label-{l:04}"), &value);
    }
    b.build()
}

/// Resident memory of `pid` in MiB, from `/proc/PID/status`.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    crate::procs::rss_kib(pid)
        .map(|k| k as f64 / 1024.0)
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// RSS once it stops moving: sampled every 250 ms until eight samples in a row (2 s)
/// are within 1% of each other, at most 20 s; the replica trims its heap about a
/// second after a burst of watch events ends.
async fn settled_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut window = std::collections::VecDeque::new();
    loop {
        window.push_back(rss_mib(pid)?);
        if window.len() > 8 {
            window.pop_front();
        }
        let (lo, hi) = window
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        if (window.len() == 8 && hi - lo <= lo * 0.01) || Instant::now() > deadline {
            return Ok(*window.back().unwrap_or(&hi));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Opens `n` watches of `job` on the leader over `clients`, each to its first event.
async fn open_watchers(
    clients: &[Client],
    leader: &str,
    job: &str,
    n: usize,
) -> anyhow::Result<Vec<Streaming<pb::JobEvent>>> {
    let opens = (0..n).map(|i| {
        let client = &clients[i % clients.len()];
        async move {
            let conn = client.connection(leader)?;
            let mut stream = pb::job_service_client::JobServiceClient::new(conn)
                .max_decoding_message_size(64 << 20)
                .watch_job(pb::WatchJobRequest {
                    job_id: job.to_string(),
                })
                .await
                .context("WatchJob")?
                .into_inner();
            stream
                .message()
                .await
                .context("first event")?
                .context("the watch ended before its first event")?;
            anyhow::Ok(stream)
        }
    });
    try_join_all(opens).await
}

/// `dispatch-bench watch-fanout`.
pub async fn run(
    work: &Path,
    bin_dir: &Path,
    args: &FanoutArgs,
    security: Security,
    quiet: bool,
) -> anyhow::Result<FanoutResult> {
    anyhow::ensure!(args.connections > 0, "--connections must be positive");
    let mut sys = Dispatcher::start(work, bin_dir, 3, &[], security)?;
    crate::systems::wait_ready(&sys, Duration::from_secs(60)).await?;
    let client = sys.client()?;
    let job_id = uuid::Uuid::new_v4().to_string();
    let big = big_job(args.subtasks, args.label_kib);
    let first = client
        .submit_job(Some(job_id.clone()), big)
        .await
        .context("submitting the big job")?;
    let event_kib = first.job.map_or(0, |j| j.encoded_len()) as f64 / 1024.0;

    let leader = sys.leader().await?;
    let pid = sys.nodes()[leader]
        .pid()
        .context("the leader's process is not running")?;
    let leader_addr = sys.endpoints[leader].clone();
    let bound = Bound {
        count: args.submits,
        time: Duration::from_secs(120),
        rate: None,
    };

    let without = workload::submit(&sys, args.submitters, bound, quiet).await?;
    let rss_before_mib = settled_rss_mib(pid).await?;

    // Each client is one connection to the leader.
    let clients = (0..args.connections)
        .map(|_| {
            let config = sys.client_config(std::slice::from_ref(&leader_addr))?;
            Client::new(config).context("a watchers' client")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let t = Instant::now();
    let watchers = open_watchers(&clients, &leader_addr, &job_id, args.watchers).await?;
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    // The peak while the watched submissions run, sampled every 50 ms.
    let peak_kib = Arc::new(AtomicU64::new(0));
    let sampling = {
        let peak_kib = peak_kib.clone();
        tokio::spawn(async move {
            while let Some(kib) = crate::procs::rss_kib(pid) {
                peak_kib.fetch_max(kib, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let with = workload::submit(&sys, args.submitters, bound, quiet).await?;
    sampling.abort();
    let rss_during_mib = rss_mib(pid)?.max(peak_kib.load(Ordering::Relaxed) as f64 / 1024.0);
    drop(watchers);
    let rss_after_mib = settled_rss_mib(pid).await?;
    let after = workload::submit(&sys, args.submitters, bound, quiet).await?;
    let rss_after_next_phase_mib = settled_rss_mib(pid).await?;
    let growth = (rss_after_next_phase_mib - rss_after_mib).max(0.0);

    // One change of the big job, fanned out to every watcher.
    let mut watchers = open_watchers(&clients, &leader_addr, &job_id, args.watchers).await?;
    let t = Instant::now();
    client
        .cancel_job(&job_id)
        .await
        .context("canceling the big job")?;
    let seen = watchers.iter_mut().map(|w| async move {
        while let Some(ev) = w.message().await? {
            if ev
                .job
                .is_some_and(|j| j.state == pb::JobState::Canceled as i32)
            {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("a watch ended before the job was CANCELED")
    });
    tokio::time::timeout(Duration::from_secs(120), try_join_all(seen))
        .await
        .context("every watcher sees the cancel within 120 s")??;
    let fanout_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(watchers);
    let rss_after_fanout_mib = settled_rss_mib(pid).await?;

    Ok(FanoutResult {
        watchers: args.watchers,
        submitters: args.submitters,
        subtasks: args.subtasks,
        label_kib: args.label_kib,
        event_kib,
        submit_p50_ms_without: without.latency.p50_ms,
        submit_p99_ms_without: without.latency.p99_ms,
        submit_p50_ms_with: with.latency.p50_ms,
        submit_p99_ms_with: with.latency.p99_ms,
        submit_p50_ms_after: after.latency.p50_ms,
        p50_ratio: with.latency.p50_ms / without.latency.p50_ms.max(f64::MIN_POSITIVE),
        open_ms,
        fanout_ms,
        rss_before_mib,
        rss_during_mib,
        rss_after_mib,
        rss_ratio: rss_after_mib / rss_before_mib.max(f64::MIN_POSITIVE),
        rss_after_next_phase_mib,
        rss_ratio_less_growth: (rss_after_mib - growth) / rss_before_mib.max(f64::MIN_POSITIVE),
        rss_after_fanout_mib,
    })
}
