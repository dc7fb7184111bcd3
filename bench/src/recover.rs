//! The `recover` workload: a cluster holding a large state (many 2 KiB jobs, so that
//! both the snapshot and the log behind it are large) is restarted, first one follower,
//! then every replica at once; each time, the figure is how long until it serves
//! linearizable reads again.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use comfy_table::Table;
use dispatcher_client::Client;
use dispatcher_proto::v1 as pb;
use serde::Serialize;

use crate::stats::{figures, progress};
use crate::systems::dispatcher::{job_spec, Dispatcher, Security};
use crate::systems::System;

/// Flags of `dispatch-bench recover`.
#[derive(clap::Args, Clone, Debug)]
pub struct RecoverArgs {
    /// Jobs (2 KiB specs) in the state before the restarts.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: u64,
    /// Build a snapshot after this many log entries (so that the restart loads a
    /// snapshot and replays a log tail).
    #[arg(long, default_value_t = 5_000)]
    pub snapshot_after_logs: u64,
}

/// What `recover` measured.
#[derive(Debug, Serialize)]
pub struct RecoverResult {
    pub jobs: u64,
    /// Bytes of one replica's data directory (sled log + snapshot).
    pub data_dir_mib: f64,
    /// kill -9 and restart of a follower to its first linearizable read answered
    /// locally-caught-up (applied index at least the leader's at the kill).
    pub follower_restart_ms: f64,
    /// kill -9 of every replica, restart of all, to the first linearizable read.
    pub full_restart_ms: f64,
    /// Listing every job (ids and states, following pages) from one replica's local
    /// state: median of 5, in ms.
    pub list_all_ms: f64,
    /// Listing the first 10,000 jobs the same way: median of 5, in ms.
    pub list_10k_ms: f64,
    /// `cluster status` (every replica's view, no digest) through one replica:
    /// median of 20, in ms.
    pub status_ms: f64,
    /// `cluster status --digest`: median of 5, in ms.
    pub status_digest_ms: f64,
}

impl RecoverResult {
    /// The human table.
    pub fn table(&self) -> Table {
        figures([
            (
                "state".to_string(),
                format!(
                    "{} jobs, {:.0} MiB per replica on disk",
                    self.jobs, self.data_dir_mib
                ),
            ),
            (
                "follower kill -9 -> caught up and reading".to_string(),
                format!("{:.0} ms", self.follower_restart_ms),
            ),
            (
                "all replicas kill -9 -> linearizable read".to_string(),
                format!("{:.0} ms", self.full_restart_ms),
            ),
            (
                "list 10,000 jobs through one replica".to_string(),
                format!("{:.1} ms", self.list_10k_ms),
            ),
            (
                format!("list all {} jobs through one replica", self.jobs),
                format!("{:.1} ms", self.list_all_ms),
            ),
            (
                "cluster status (no digest)".to_string(),
                format!("{:.2} ms", self.status_ms),
            ),
            (
                "cluster status --digest".to_string(),
                format!("{:.0} ms", self.status_digest_ms),
            ),
        ])
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(p) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A linearizable read of `job_id`, retried until `deadline`.
async fn read_until(client: &Client, job_id: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        if client.get_job(job_id, false).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no linearizable read in time");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `dispatch-bench recover`.
pub async fn run(
    work: &Path,
    bin_dir: &Path,
    args: &RecoverArgs,
    security: Security,
    quiet: bool,
) -> anyhow::Result<RecoverResult> {
    let extra = vec![
        "--snapshot-after-logs".to_string(),
        args.snapshot_after_logs.to_string(),
    ];
    let mut sys = Dispatcher::start(work, bin_dir, 3, &extra, security)?;
    crate::systems::wait_ready(&sys, Duration::from_secs(60)).await?;
    let client = sys.client()?;

    let bar = progress(args.jobs, "filling the state", quiet);
    let next = Arc::new(AtomicU64::new(0));
    let mut fillers = Vec::new();
    for _ in 0..64 {
        let (client, next, bar, jobs) = (client.clone(), next.clone(), bar.clone(), args.jobs);
        fillers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let id = uuid::Uuid::new_v4().to_string();
                client.submit_job(Some(id.clone()), job_spec(&id)).await?;
                bar.inc(1);
            }
            anyhow::Ok(())
        }));
    }
    for f in fillers {
        f.await??;
    }
    bar.finish_and_clear();
    let probe = client.submit_job(None, job_spec("probe")).await?.job_id;

    // One follower.
    let leader = sys.leader().await?;
    let follower = (leader + 1) % 3;
    let target = client
        .replica_status(&sys.endpoints[leader])
        .await?
        .replicas
        .first()
        .map_or(0, |r| r.applied_index);
    let data_dir_mib = dir_bytes(&sys.data_dirs[follower]) as f64 / (1024.0 * 1024.0);
    sys.nodes()[follower].kill9();
    let t = Instant::now();
    sys.nodes()[follower].spawn()?;
    let only = Client::new(sys.client_config(&sys.endpoints[follower..=follower])?)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let caught_up = only
            .replica_status(&sys.endpoints[follower])
            .await
            .ok()
            .and_then(|s| s.replicas.first().map(|r| r.applied_index >= target))
            .unwrap_or(false);
        if caught_up {
            read_until(&only, &probe, deadline).await?;
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the follower did not catch up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let follower_restart_ms = t.elapsed().as_secs_f64() * 1000.0;

    // Every replica.
    for i in 0..3 {
        sys.nodes()[i].kill9();
    }
    let t = Instant::now();
    for i in 0..3 {
        sys.nodes()[i].spawn()?;
    }
    read_until(&client, &probe, Instant::now() + Duration::from_secs(300)).await?;
    let full_restart_ms = t.elapsed().as_secs_f64() * 1000.0;
    let list_all_ms = list_ms(&only, None).await?;
    let list_10k_ms = list_ms(&only, Some(10_000)).await?;
    let status_ms = time_status(&only, false, 20).await?;
    let status_digest_ms = time_status(&only, true, 5).await?;
    Ok(RecoverResult {
        jobs: args.jobs,
        data_dir_mib,
        follower_restart_ms,
        full_restart_ms,
        list_all_ms,
        list_10k_ms,
        status_ms,
        status_digest_ms,
    })
}

/// Median time of `n` `cluster status` calls through `client`'s one replica.
async fn time_status(client: &Client, digest: bool, n: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let s = client.cluster_status_with(digest).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            s.replicas.iter().all(|r| r.reachable),
            "a replica did not answer cluster status"
        );
    }
    Ok(crate::stats::median(&times))
}

/// Median of 5 listings of (at most about `limit`) jobs through `client`'s one replica,
/// following pages as `dispatchctl job list` does, served from its local state.
async fn list_ms(client: &Client, limit: Option<usize>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut req = pb::ListJobsRequest {
            stale: true,
            page_size: 1000,
            ..Default::default()
        };
        let mut n = 0;
        loop {
            let page = client.list_jobs(req.clone()).await?;
            n += page.jobs.len();
            if page.next_page_token.is_empty() || limit.is_some_and(|l| n >= l) {
                break;
            }
            req.page_token = page.next_page_token;
        }
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(n > 0, "the restarted cluster lists no job");
    }
    Ok(crate::stats::median(&times))
}
