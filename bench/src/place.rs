//! Simulated TaskManagers and the `place` workload.
//!
//! A simulated TaskManager is a tokio task, thousands per process, that speaks the real
//! TaskManagerService through the client library: it registers its slots, heartbeats at
//! the interval the leader asks for, and reports every attempt it is assigned as RUNNING
//! at its next heartbeat (it runs nothing). `place` times how long a cluster takes to
//! place M jobs of K tasks on N such TaskManagers and to see them all RUNNING; the
//! failover workload uses a small fleet to time how fast TaskManagers re-attach to a new
//! leader and to check that no task restarts.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use comfy_table::Table;
use dispatcher_client::{Client, ClientConfig};
use dispatcher_proto::v1 as pb;
use dispatcher_testkit::spec::{self, JobBuilder};
use serde::Serialize;

use crate::procs::Node;
use crate::stats::{figures, median, progress};
use crate::systems::dispatcher::{Dispatcher, Security};
use crate::systems::System;
use crate::workload::TrialObserver;

/// What one simulated TaskManager shares with the workload.
#[derive(Default)]
struct Shared {
    /// Attempts ever reported RUNNING, by every TaskManager.
    running: AtomicU64,
    /// Attempts seen with an attempt number above 1 (a restart).
    restarted: AtomicU64,
    /// Heartbeats answered.
    heartbeats: AtomicU64,
    stop: AtomicBool,
}

/// A fleet of simulated TaskManagers.
pub struct Fleet {
    shared: Arc<Shared>,
    /// Per TaskManager: when it last had a heartbeat answered, in µs since `base`.
    last_ok: Arc<Vec<AtomicU64>>,
    base: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Registers `n` TaskManagers of `slots` slots each (at most `parallel` registrations
    /// in flight) and starts their heartbeat loops. `base`: the cluster's endpoints, and
    /// its CA and a `taskmanager` token when secured.
    pub async fn start(
        base: ClientConfig,
        n: usize,
        slots: u32,
        parallel: usize,
        quiet: bool,
    ) -> anyhow::Result<Fleet> {
        // Real TaskManagers each have their own connection; a few hundred simulated
        // ones share one here (one HTTP/2 connection carrying ten thousand would hit the
        // server's per-connection limits, which real fleets never meet). Tries get a
        // generous timeout: a cancelled try resets its stream, and a flood of resets
        // makes the server close the connection.
        let mut cfg = base;
        cfg.timeout = Duration::from_secs(60);
        cfg.per_try_timeout = Duration::from_secs(10);
        let clients = (0..n.div_ceil(200).max(1))
            .map(|_| Client::new(cfg.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared::default());
        let base = Instant::now();
        let last_ok: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let bar = progress(n as u64, "registering TaskManagers", quiet);
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..n {
            let (client, shared, last_ok, sem, ready_tx, bar) = (
                clients[i % clients.len()].clone(),
                shared.clone(),
                last_ok.clone(),
                sem.clone(),
                ready_tx.clone(),
                bar.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let id = format!("sim-{i:05}");
                let instance = uuid::Uuid::new_v4().to_string();
                let interval = {
                    let _permit = sem.acquire().await;
                    let reg = client
                        .register_task_manager(pb::RegisterRequest {
                            task_manager_id: id.clone(),
                            instance_id: instance.clone(),
                            address: format!("sim:{i}"),
                            slots,
                            labels: Default::default(),
                        })
                        .await;
                    let _ = ready_tx.send(reg.is_ok());
                    bar.inc(1);
                    match reg {
                        Ok(r) => Duration::from_millis(r.heartbeat_interval_ms.max(50)),
                        Err(_) => return,
                    }
                };
                heartbeat_loop(client, id, instance, interval, shared, last_ok, i, base).await;
            }));
        }
        drop(ready_tx);
        // Each loop keeps its sender for life: count answers rather than wait for the
        // channel to close.
        let mut ok = 0;
        for _ in 0..n {
            match ready_rx.recv().await {
                Some(r) => ok += usize::from(r),
                None => break,
            }
        }
        bar.finish_and_clear();
        anyhow::ensure!(ok == n, "only {ok} of {n} TaskManagers registered");
        Ok(Fleet {
            shared,
            last_ok,
            base,
            tasks,
        })
    }

    /// Attempts reported RUNNING so far.
    pub fn running(&self) -> u64 {
        self.shared.running.load(Ordering::Relaxed)
    }

    /// Attempts seen whose number shows a restart.
    pub fn restarted(&self) -> u64 {
        self.shared.restarted.load(Ordering::Relaxed)
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Waits until every TaskManager had a heartbeat answered after `after_us`; returns
    /// when the last one did, in µs since the fleet's base.
    async fn all_heard_after(&self, after_us: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut latest = 0;
            let mut all = true;
            for t in self.last_ok.iter() {
                let v = t.load(Ordering::Relaxed);
                if v <= after_us {
                    all = false;
                    break;
                }
                latest = latest.max(v);
            }
            if all {
                return Ok(latest);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "TaskManagers did not re-attach within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops every heartbeat loop.
    pub async fn stop(self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    client: Client,
    id: String,
    instance: String,
    interval: Duration,
    shared: Arc<Shared>,
    last_ok: Arc<Vec<AtomicU64>>,
    index: usize,
    base: Instant,
) {
    // Spread the fleet's heartbeats over the interval instead of a thundering herd.
    let offset = interval.mul_f64((index % 97) as f64 / 97.0);
    tokio::time::sleep(offset).await;
    let mut reported: BTreeSet<(String, String, u32, u32)> = BTreeSet::new();
    let mut pending: Vec<pb::TaskStatusUpdate> = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shared.stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let sent = pending.clone();
        let resp = client
            .heartbeat(pb::HeartbeatRequest {
                task_manager_id: id.clone(),
                instance_id: instance.clone(),
                updates: sent.clone(),
            })
            .await;
        let Ok(resp) = resp else { continue };
        last_ok[index].store(base.elapsed().as_micros() as u64, Ordering::Relaxed);
        shared.heartbeats.fetch_add(1, Ordering::Relaxed);
        if !resp.registered {
            return;
        }
        // The reports were applied (or ignored as stale): never resend them.
        pending.drain(..sent.len());
        for a in resp.assignments {
            let key = (a.job_id.clone(), a.vertex.clone(), a.subtask, a.attempt);
            if reported.insert(key) {
                if a.attempt > 1 {
                    shared.restarted.fetch_add(1, Ordering::Relaxed);
                }
                pending.push(pb::TaskStatusUpdate {
                    job_id: a.job_id,
                    vertex: a.vertex,
                    subtask: a.subtask,
                    attempt: a.attempt,
                    state: pb::TaskState::Running as i32,
                    ..Default::default()
                });
                shared.running.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Report new attempts now rather than one interval later.
        if !pending.is_empty() {
            ticker.reset_immediately();
        }
    }
}

/// A job of `tasks` long-running tasks (never run by simulated TaskManagers).
pub fn job(name: &str, tasks: u32) -> pb::JobSpec {
    JobBuilder::new(name)
        .vertex("work", tasks, spec::sleep(86_400_000))
        .build()
}

/// Flags of `dispatch-bench place`.
#[derive(clap::Args, Clone, Debug)]
pub struct PlaceArgs {
    /// Simulated TaskManagers.
    #[arg(long, default_value_t = 1000)]
    pub task_managers: usize,
    /// Slots per TaskManager.
    #[arg(long, default_value_t = 100)]
    pub slots: u32,
    /// Jobs to submit.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Tasks per job.
    #[arg(long, default_value_t = 100)]
    pub tasks: u32,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 64)]
    pub submitters: usize,
    /// TaskManager heartbeat interval the cluster asks for, in ms.
    #[arg(long, default_value_t = 5000)]
    pub tm_heartbeat_ms: u64,
}

/// What `place` measured.
#[derive(Debug, Serialize)]
pub struct PlaceResult {
    pub task_managers: usize,
    pub slots: u32,
    pub jobs: usize,
    pub tasks: u64,
    pub register_seconds: f64,
    /// First submission to every job placed (state RUNNING).
    pub placed_seconds: f64,
    /// First submission to every task reported RUNNING.
    pub running_seconds: f64,
    /// ListJobs of every job through one replica (one page), median of 5, in ms.
    pub list_all_ms: f64,
    pub leader_rss_before_mib: f64,
    pub leader_rss_after_mib: f64,
}

impl PlaceResult {
    /// The human table.
    pub fn table(&self) -> Table {
        figures([
            (
                "TaskManagers x slots".to_string(),
                format!("{} x {}", self.task_managers, self.slots),
            ),
            (
                "jobs x tasks".to_string(),
                format!("{} ({} tasks)", self.jobs, self.tasks),
            ),
            (
                "register all TaskManagers".to_string(),
                format!("{:.2} s", self.register_seconds),
            ),
            (
                "submit -> every task placed".to_string(),
                format!("{:.2} s", self.placed_seconds),
            ),
            (
                "submit -> every task RUNNING".to_string(),
                format!("{:.2} s", self.running_seconds),
            ),
            (
                format!("list {} jobs (one replica)", self.jobs),
                format!("{:.2} ms", self.list_all_ms),
            ),
            (
                "leader RSS before -> after".to_string(),
                format!(
                    "{:.0} MiB -> {:.0} MiB",
                    self.leader_rss_before_mib, self.leader_rss_after_mib
                ),
            ),
        ])
    }
}

/// Jobs placed and tasks running, from one listing.
async fn census(client: &Client) -> anyhow::Result<(usize, u64)> {
    let jobs = client
        .list_all_jobs(pb::ListJobsRequest {
            stale: true,
            page_size: 1000,
            ..Default::default()
        })
        .await?;
    let placed = jobs
        .iter()
        .filter(|j| j.state == pb::JobState::Running as i32)
        .count();
    let running = jobs.iter().map(|j| u64::from(j.running_tasks)).sum();
    Ok((placed, running))
}

fn rss_mib(node: &Node) -> f64 {
    node.rss_kib().unwrap_or(0) as f64 / 1024.0
}

/// `dispatch-bench place`.
pub async fn run(
    work: &Path,
    bin_dir: &Path,
    args: &PlaceArgs,
    security: Security,
    quiet: bool,
) -> anyhow::Result<PlaceResult> {
    let lease = args.tm_heartbeat_ms * 6;
    let extra = vec![
        "--tm-heartbeat-ms".to_string(),
        args.tm_heartbeat_ms.to_string(),
        "--tm-lease-ms".into(),
        lease.to_string(),
    ];
    let mut sys = Dispatcher::start(work, bin_dir, 3, &extra, security)?;
    crate::systems::wait_ready(&sys, Duration::from_secs(60)).await?;
    // Submissions of 100-task jobs under this load take longer than the failover
    // client's 250 ms tries; an abandoned try resets its stream, and a flood of resets
    // makes the server close the connection.
    let mut cfg = sys.client_config(&sys.endpoints)?;
    cfg.timeout = Duration::from_secs(120);
    cfg.per_try_timeout = Duration::from_secs(30);
    let client = Client::new(cfg)?;
    let leader = sys.leader().await?;
    let rss_before = rss_mib(&sys.nodes()[leader]);

    let t = Instant::now();
    let fleet = Fleet::start(
        sys.task_manager_config().await?,
        args.task_managers,
        args.slots,
        256,
        quiet,
    )
    .await
    .context("registering TaskManagers")?;
    let register_seconds = t.elapsed().as_secs_f64();

    let total = args.jobs as u64 * u64::from(args.tasks);
    let bar = progress(args.jobs as u64, "submitting jobs", quiet);
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut submitters = Vec::new();
    for _ in 0..args.submitters {
        let (client, next, bar) = (client.clone(), next.clone(), bar.clone());
        let (jobs, tasks) = (args.jobs as u64, args.tasks);
        submitters.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return anyhow::Ok(());
                }
                client
                    .submit_job(None, job(&format!("place-{i}"), tasks))
                    .await
                    .with_context(|| format!("submitting job {i}"))?;
                bar.inc(1);
            }
        }));
    }
    for s in submitters {
        s.await??;
    }
    bar.finish_and_clear();

    let mut placed_at: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    let bar = progress(total, "tasks RUNNING", quiet);
    let running_seconds = loop {
        let (placed, running) = census(&client).await.context("listing jobs")?;
        bar.set_position(running);
        if placed == args.jobs && placed_at.is_none() {
            placed_at = Some(started.elapsed());
        }
        if running >= total && placed_at.is_some() {
            break started.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {placed} of {} jobs placed and {running} of {total} tasks running after 600 s",
            args.jobs
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    let placed_seconds = placed_at.map_or(running_seconds, |d| d.as_secs_f64());

    // Listing every job through one replica, as `dispatchctl job list` does (following
    // pages), from its local state.
    let mut lists = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let n = client
            .list_all_jobs(pb::ListJobsRequest {
                stale: true,
                page_size: 1000,
                ..Default::default()
            })
            .await
            .context("listing jobs")?
            .len();
        lists.push(t.elapsed().as_secs_f64() * 1000.0);
        // The readiness probe's submission is there too.
        anyhow::ensure!(n > args.jobs, "listed {n} of {} jobs", args.jobs);
    }
    let leader = sys.leader().await?;
    let rss_after = rss_mib(&sys.nodes()[leader]);
    fleet.stop().await;
    Ok(PlaceResult {
        task_managers: args.task_managers,
        slots: args.slots,
        jobs: args.jobs,
        tasks: total,
        register_seconds,
        placed_seconds,
        running_seconds,
        list_all_ms: median(&lists),
        leader_rss_before_mib: rss_before,
        leader_rss_after_mib: rss_after,
    })
}

/// Simulated TaskManagers running one job's tasks through a failover run: times their
/// re-attachment to each new leader and counts restarted tasks.
pub struct FailoverTms {
    fleet: Fleet,
    client: Client,
    job_id: String,
    tasks: u64,
    fault_at: u64,
    attach_ms: Vec<f64>,
}

/// What the TaskManagers saw across a failover run.
#[derive(Debug, Serialize)]
pub struct TmReport {
    pub task_managers: usize,
    /// Fault to the last TaskManager heard by the new leader, per trial, in ms.
    pub reattach_ms: Vec<f64>,
    pub reattach_median_ms: f64,
    pub tasks: u64,
    /// Tasks whose attempt number moved during the run (must be 0).
    pub tasks_restarted: u64,
}

impl TmReport {
    /// A row for the failover table.
    pub fn row(&self) -> Vec<String> {
        vec![
            format!("{} TaskManagers", self.task_managers),
            "re-attach".into(),
            self.reattach_ms.len().to_string(),
            format!("{:.0}", self.reattach_median_ms),
            "-".into(),
            format!(
                "{:.0}",
                self.reattach_ms.iter().copied().fold(0.0, f64::max)
            ),
            format!(
                "tasks restarted: {} of {}",
                self.tasks_restarted, self.tasks
            ),
        ]
    }
}

impl FailoverTms {
    /// Registers `n` simulated TaskManagers of two slots each on `sys` and runs one job
    /// on all their slots.
    pub async fn start(sys: &Dispatcher, n: usize) -> anyhow::Result<Self> {
        let client = sys.client()?;
        let fleet = Fleet::start(sys.task_manager_config().await?, n, 2, 64, true).await?;
        let tasks = (n * 2) as u32;
        let job_id = client
            .submit_job(None, job("failover-witness", tasks))
            .await?
            .job_id;
        let deadline = Instant::now() + Duration::from_secs(60);
        while fleet.running() < u64::from(tasks) {
            anyhow::ensure!(Instant::now() < deadline, "witness job not running in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(FailoverTms {
            fleet,
            client,
            job_id,
            tasks: u64::from(tasks),
            fault_at: 0,
            attach_ms: Vec::new(),
        })
    }

    /// Stops the fleet and reports.
    pub async fn finish(self) -> anyhow::Result<TmReport> {
        let job = self.client.get_job(&self.job_id, false).await?;
        let restarted = job.tasks.iter().filter(|t| t.attempt != 1).count() as u64;
        let report = TmReport {
            task_managers: self.fleet.last_ok.len(),
            reattach_median_ms: median(&self.attach_ms),
            reattach_ms: self.attach_ms,
            tasks: self.tasks,
            tasks_restarted: restarted.max(self.fleet.restarted()),
        };
        self.fleet.stop().await;
        Ok(report)
    }
}

impl TrialObserver for FailoverTms {
    fn before_fault(&mut self) {
        self.fault_at = self.fleet.now_us();
    }

    fn after_recovery(&mut self) {
        // Block the trial until every TaskManager is heard by the new leader: the next
        // trial must not start while some still look for it.
        let fault_at = self.fault_at;
        let waited = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(
                self.fleet
                    .all_heard_after(fault_at + 2_000, Duration::from_secs(60)),
            )
        });
        if let Ok(at) = waited {
            self.attach_ms.push((at - fault_at) as f64 / 1000.0);
        }
    }
}
