//! The write workloads shared by every system: `submit` (closed-loop writers at a fixed
//! concurrency, bounded by a count or a time) and `failover` (a steady stream of writes
//! while the leader is killed or frozen, timing the fault to the next acknowledged
//! write).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{median, ms, progress, Latency};
use crate::systems::{System, Writer};

/// How long one try of a write may take before the workload retries it (on the same
/// or, at the client's choice, another member). The same for every system, so that no
/// client waits longer on a dead or frozen leader than another.
pub const PER_TRY: Duration = Duration::from_millis(250);

/// Writes `key` until acknowledged or `deadline`, retrying with the same key. Returns
/// how many tries failed and when the successful try started.
pub async fn write_until_acked(
    w: &dyn Writer,
    key: &str,
    deadline: Instant,
) -> anyhow::Result<(u32, Instant)> {
    let mut failures = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "write {key} not acknowledged in time");
        let tried = Instant::now();
        match w.write(key, left.min(PER_TRY)).await {
            Ok(()) => return Ok((failures, tried)),
            Err(_) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// One `submit` run at one concurrency.
#[derive(Clone, Debug, Serialize)]
pub struct SubmitResult {
    pub system: String,
    pub concurrency: usize,
    pub writes: u64,
    pub retries: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub latency: Latency,
}

/// How long a `submit` run goes on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub count: u64,
    pub time: Duration,
    /// Writes per second for all writers together, spread evenly; None: each writer
    /// sends its next write as soon as the previous one is acknowledged.
    pub rate: Option<f64>,
}

/// Closed-loop writers: each sends its next write when the previous one is acknowledged
/// (and, with a rate, not before its turn in the schedule).
pub async fn submit(
    sys: &dyn System,
    concurrency: usize,
    bound: Bound,
    quiet: bool,
) -> anyhow::Result<SubmitResult> {
    let writer: Arc<dyn Writer> = Arc::from(sys.writer().await?);
    // Warm up connections and leader discovery; not measured.
    for _ in 0..concurrency.clamp(8, 64) {
        let key = uuid::Uuid::new_v4().to_string();
        write_until_acked(&*writer, &key, Instant::now() + Duration::from_secs(30)).await?;
    }
    let issued = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let bar = progress(
        bound.count,
        &format!("{} x{concurrency}", sys.name()),
        quiet,
    );
    let started = Instant::now();
    let stop_at = started + bound.time;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let writer = writer.clone();
        let issued = issued.clone();
        let retries = retries.clone();
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= bound.count || Instant::now() >= stop_at {
                    break;
                }
                if let Some(rate) = bound.rate.filter(|r| *r > 0.0) {
                    let due = started + Duration::from_secs_f64(n as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let key = uuid::Uuid::new_v4().to_string();
                let t = Instant::now();
                let (failed, _) =
                    write_until_acked(&*writer, &key, Instant::now() + Duration::from_secs(60))
                        .await?;
                samples.push(t.elapsed());
                retries.fetch_add(u64::from(failed), Ordering::Relaxed);
                bar.inc(1);
            }
            anyhow::Ok(samples)
        }));
    }
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    Ok(SubmitResult {
        system: sys.name().into(),
        concurrency,
        writes: samples.len() as u64,
        retries: retries.load(Ordering::Relaxed),
        seconds,
        per_second: samples.len() as f64 / seconds,
        latency: Latency::of(samples),
    })
}

/// What the failover workload does to the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// kill -9, restarted after the trial.
    Kill,
    /// SIGSTOP (a hung host), SIGCONT after the trial.
    Stop,
}

/// Every trial of one failover run.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverResult {
    pub system: String,
    pub fault: Fault,
    /// Fault to the next acknowledged write, per trial, in ms.
    pub trials_ms: Vec<f64>,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A steady stream of writes from `writers` closed-loop writers that records the time
/// of every acknowledgement, relative to `base`.
struct Stream {
    base: Instant,
    /// When the latest acknowledged try was sent, in µs since `base`.
    last_sent_us: Arc<AtomicU64>,
    /// When the latest acknowledgement arrived, in µs since `base`.
    last_ack_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stream {
    fn start(writer: Arc<dyn Writer>, writers: usize) -> Stream {
        let base = Instant::now();
        let last_sent_us = Arc::new(AtomicU64::new(0));
        let last_ack_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..writers)
            .map(|_| {
                let (writer, last, last_at, stop) = (
                    writer.clone(),
                    last_sent_us.clone(),
                    last_ack_us.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let key = uuid::Uuid::new_v4().to_string();
                        let deadline = Instant::now() + Duration::from_secs(120);
                        if let Ok((_, tried)) = write_until_acked(&*writer, &key, deadline).await {
                            // An acknowledgement counts from when its successful try was
                            // sent: an answer that was on its way before a fault (or sat
                            // in a busy runtime) is no proof of recovery.
                            let sent = tried.saturating_duration_since(base).as_micros() as u64;
                            let at = base.elapsed().as_micros() as u64;
                            last.fetch_max(sent, Ordering::Relaxed);
                            last_at.fetch_max(at, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        Stream {
            base,
            last_sent_us,
            last_ack_us,
            stop,
            tasks,
        }
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }

    /// Waits for the acknowledgement of a try sent after `after_us`; returns when an
    /// acknowledgement arrived.
    async fn ack_after(&self, after_us: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.last_sent_us.load(Ordering::Relaxed) > after_us {
                return Ok(self.last_ack_us.load(Ordering::Relaxed));
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no write acknowledged within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// The leader, asked until one answers or `timeout` passes: a member restored for the
/// previous trial may still be catching up, or a question may be lost on a busy machine.
async fn leader_within(sys: &dyn System, timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        match sys.leader().await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Hooks the failover workload calls around each trial (the dispatcher's simulated
/// TaskManagers use them to time their re-attachment).
pub trait TrialObserver: Send {
    /// Just before the fault.
    fn before_fault(&mut self) {}
    /// Once the next write is acknowledged.
    fn after_recovery(&mut self) {}
}

impl TrialObserver for () {}

/// Kills (or freezes) the leader `trials` times under a steady write stream.
pub async fn failover(
    sys: &mut dyn System,
    fault: Fault,
    trials: usize,
    writers: usize,
    observer: &mut dyn TrialObserver,
    quiet: bool,
) -> anyhow::Result<FailoverResult> {
    let writer: Arc<dyn Writer> = Arc::from(sys.writer().await?);
    let stream = Stream::start(writer, writers);
    let bar = progress(trials as u64, &format!("{} {fault:?}", sys.name()), quiet);
    let mut times = Vec::new();
    let outcome: anyhow::Result<()> = async {
        for _ in 0..trials {
            // Steady state: writes flowing and a known leader.
            stream
                .ack_after(stream.now_us(), Duration::from_secs(60))
                .await?;
            let leader = leader_within(&*sys, Duration::from_secs(10)).await?;
            observer.before_fault();
            let fault_at = stream.now_us();
            match fault {
                Fault::Kill => sys.nodes()[leader].kill9(),
                Fault::Stop => sys.nodes()[leader].pause(),
            }
            let next = stream.ack_after(fault_at, Duration::from_secs(60)).await?;
            times.push((next - fault_at) as f64 / 1000.0);
            observer.after_recovery();
            match fault {
                Fault::Kill => sys.nodes()[leader].spawn()?,
                Fault::Stop => sys.nodes()[leader].resume(),
            }
            // Let the restored member rejoin and catch up before the next trial.
            tokio::time::sleep(Duration::from_secs(2)).await;
            bar.inc(1);
        }
        Ok(())
    }
    .await;
    bar.finish_and_clear();
    stream.stop().await;
    outcome?;
    let sorted: Vec<Duration> = {
        let mut d: Vec<Duration> = times
            .iter()
            .map(|t| Duration::from_micros((t * 1000.0) as u64))
            .collect();
        d.sort_unstable();
        d
    };
    Ok(FailoverResult {
        system: sys.name().into(),
        fault,
        median_ms: median(&times),
        p99_ms: ms(crate::stats::percentile(&sorted, 0.99)),
        max_ms: times.iter().copied().fold(0.0, f64::max),
        trials_ms: times,
    })
}
