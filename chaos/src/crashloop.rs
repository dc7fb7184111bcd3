//! The kill -9 durability loop: writers submit jobs, every replica is killed with
//! SIGKILL at a moment drawn from the seed, all restart, and every submission
//! acknowledged so far (in this round or any earlier one) must be there. Round after
//! round, so that a write lost to a crash in the middle of an fsync, a purge, a
//! snapshot or a vote shows up.
//!
//! ```text
//! cargo run -p chaos -- crash-loop --rounds 100 --seed 1
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use dispatcher_client::Client;
use dispatcher_testkit::spec::{self, JobBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster::Cluster;

/// Arguments of `chaos crash-loop`.
#[derive(Parser, Clone)]
pub struct CrashLoopArgs {
    /// The seed the kill moments come from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Rounds of write, kill -9 of every replica, restart, check.
    #[arg(long, default_value_t = 100)]
    rounds: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Replicas.
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Output directory (default: a new temporary one, kept).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Plain text without tokens (default: TLS for clients and peers, bearer tokens).
    #[arg(long)]
    plain: bool,
}

/// What the loop saw.
#[derive(Debug, Default, serde::Serialize)]
struct Totals {
    rounds: u64,
    acknowledged: usize,
    lost: usize,
    /// Rounds after which the cluster did not come back (no leader, or replicas that
    /// disagree) within the deadline.
    not_back: u64,
    /// Median time from the restart to a converged cluster, ms.
    median_back_ms: u64,
}

/// Submits jobs until `stop`; records the acknowledged ids.
async fn writer(
    client: Arc<Client>,
    name: String,
    acked: Arc<Mutex<Vec<String>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut k = 0u64;
    while !*stop.borrow() {
        k += 1;
        let job = JobBuilder::new(&format!("{name}-{k}"))
            .vertex("v", 1, spec::sleep(10))
            .build();
        match client.submit_job(None, job).await {
            Ok(r) => {
                if let Ok(mut a) = acked.lock() {
                    a.push(r.job_id);
                }
            }
            // The cluster is down or electing: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs the loop; returns whether nothing acknowledged was lost and the cluster came
/// back every time.
pub async fn run(args: CrashLoopArgs) -> anyhow::Result<bool> {
    let out = match &args.out {
        Some(o) => {
            if o.exists() {
                std::fs::remove_dir_all(o)?;
            }
            std::fs::create_dir_all(o)?;
            o.clone()
        }
        None => tempfile::Builder::new()
            .prefix("chaos-crash-")
            .tempdir()?
            .keep(),
    };
    println!(
        "chaos crash-loop: seed {}, {} rounds, {} writers, output {}",
        args.seed,
        args.rounds,
        args.writers,
        out.display()
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut c = Cluster::start(&out, args.replicas, 0, args.seed, args.plain).await?;
    let mut cfg = c.client_config()?;
    cfg.timeout = Duration::from_secs(3);
    cfg.per_try_timeout = Duration::from_secs(1);
    let client = Arc::new(Client::new(cfg)?);
    crate::wait_converged(&client, Duration::from_secs(60)).await?;

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut totals = Totals::default();
    let mut back_ms = Vec::new();
    for round in 1..=args.rounds {
        let before = acked.lock().map(|a| a.len()).unwrap_or(0);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let writers: Vec<_> = (0..args.writers)
            .map(|w| {
                tokio::spawn(writer(
                    client.clone(),
                    format!("crash-{}-{round}-{w}", args.seed),
                    acked.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        let kill_after = Duration::from_millis(rng.gen_range(200..2000));
        tokio::time::sleep(kill_after).await;
        for id in 1..=args.replicas {
            c.kill_replica(id);
        }
        let _ = stop_tx.send(true);
        for w in writers {
            let _ = w.await;
        }
        let restarted = Instant::now();
        for id in 1..=args.replicas {
            c.start_replica(id)?;
        }
        let back = crate::wait_converged(&client, Duration::from_secs(60)).await;
        let took = restarted.elapsed().as_millis() as u64;
        if let Err(e) = &back {
            totals.not_back += 1;
            println!("  round {round}: not back: {e:#}");
        } else {
            back_ms.push(took);
        }
        let want: Vec<String> = acked.lock().map(|a| a.clone()).unwrap_or_default();
        let have: BTreeSet<String> = match client.list_all_jobs(Default::default()).await {
            Ok(jobs) => jobs.into_iter().map(|j| j.job_id).collect(),
            Err(e) => {
                println!("  round {round}: cannot list jobs: {e}");
                totals.not_back += 1;
                continue;
            }
        };
        let missing: Vec<&String> = want.iter().filter(|id| !have.contains(*id)).collect();
        totals.rounds = round;
        totals.acknowledged = want.len();
        totals.lost = totals.lost.max(missing.len());
        println!(
            "  round {round}: killed after {} ms, {} acknowledged this round ({} in all), {} missing, converged {} ms after the restart",
            kill_after.as_millis(),
            want.len() - before,
            want.len(),
            missing.len(),
            took
        );
        for id in missing.iter().take(10) {
            println!("    missing: {id}");
        }
    }
    c.stop_all();
    back_ms.sort_unstable();
    totals.median_back_ms = back_ms.get(back_ms.len() / 2).copied().unwrap_or(0);
    let passed = totals.lost == 0 && totals.not_back == 0;
    std::fs::write(
        out.join("result.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "seed": args.seed, "totals": totals, "passed": passed,
        }))?,
    )?;
    println!(
        "chaos crash-loop: seed {} {}: {} rounds, {} acknowledged submissions, lost {}, rounds not back {}, median {} ms from restart to converged",
        args.seed,
        if passed { "PASSED" } else { "FAILED" },
        totals.rounds,
        totals.acknowledged,
        totals.lost,
        totals.not_back,
        totals.median_back_ms
    );
    Ok(passed)
}
