//! The chaos harness: real `dispatcher` replicas and `taskmanager` agents on loopback,
//! faults scheduled from one seed (kill, pause, partitions through per-link proxies, slow
//! and flaky links, TaskManager kills, crash of every replica), a workload of concurrent
//! clients recording a history, a heal phase, and a checker of the brief's invariants.
//!
//! ```text
//! cargo run -p chaos -- run --seed 7 --duration 120 --nemesis all
//! cargo run -p chaos -- campaign --seeds 10 --duration 180 --nemesis all
//! ```
//!
//! A failure prints the command that reproduces it. Results go to `<out>/result.json`
//! (and the history to `<out>/history.jsonl`).

mod checker;
mod cluster;
mod nemesis;
mod proxy;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dispatcher_client::Client;
use dispatcher_testkit::spec::{self, JobBuilder};
use rand::rngs::StdRng;
use rand::SeedableRng;

use cluster::Cluster;
use nemesis::{Fault, Kind};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Fault injection against a real dispatcher cluster"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run with one seed.
    Run(RunArgs),
    /// Several runs with seeds 1..=N (or from --first-seed).
    Campaign {
        #[command(flatten)]
        run: RunArgs,
        /// Number of seeds.
        #[arg(long, default_value_t = 10)]
        seeds: u64,
    },
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// The seed every random choice comes from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of faults (the heal phase comes after).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Nemeses: all, kill, pause, partition, links, taskmanager, crash, or kind names.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Replicas.
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// TaskManagers.
    #[arg(long, default_value_t = 2)]
    task_managers: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Output directory (default: a new temporary one, kept).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Plain text without tokens (default: TLS for clients and peers, bearer tokens).
    #[arg(long)]
    plain: bool,
}

impl RunArgs {
    fn repro(&self) -> String {
        format!(
            "cargo run -p chaos -- run --seed {} --duration {} --nemesis {} --replicas {} --task-managers {} --clients {}{}",
            self.seed, self.duration, self.nemesis, self.replicas, self.task_managers, self.clients,
            if self.plain { " --plain" } else { "" }
        )
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => run(args).await.map(|r| r.passed()),
        Cmd::Campaign { run: args, seeds } => {
            let mut all = true;
            let first = args.seed;
            for seed in first..first + seeds {
                let a = RunArgs {
                    seed,
                    out: args.out.as_ref().map(|o| o.join(format!("seed-{seed}"))),
                    ..args.clone()
                };
                match run(a).await {
                    Ok(r) => all &= r.passed(),
                    Err(e) => {
                        eprintln!("seed {seed}: {e:#}");
                        all = false;
                    }
                }
            }
            Ok(all)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn leader_of(client: &Client) -> Option<u64> {
    let s = tokio::time::timeout(Duration::from_millis(800), client.cluster_status())
        .await
        .ok()?
        .ok()?;
    (s.leader_id > 0).then_some(s.leader_id)
}

async fn run(args: RunArgs) -> anyhow::Result<checker::Report> {
    let kinds = Kind::parse_list(&args.nemesis).map_err(anyhow::Error::msg)?;
    let out = match &args.out {
        Some(o) => {
            // A fresh cluster every run: data of an earlier run would make these replicas
            // rejoin that run's cluster, at ports nobody listens on any more.
            if o.exists() {
                std::fs::remove_dir_all(o)?;
            }
            std::fs::create_dir_all(o)?;
            o.clone()
        }
        None => tempfile::Builder::new().prefix("chaos-").tempdir()?.keep(),
    };
    println!(
        "chaos: seed {} for {} s, nemeses {:?}, {}, output {}",
        args.seed,
        args.duration,
        kinds,
        if args.plain {
            "plain text without tokens"
        } else {
            "TLS and tokens"
        },
        out.display()
    );
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut c = Cluster::start(
        &out,
        args.replicas,
        args.task_managers,
        args.seed,
        args.plain,
    )
    .await?;
    let mut cfg = c.client_config()?;
    cfg.timeout = Duration::from_secs(30);
    let client = Client::new(cfg)?;
    wait_converged(&client, Duration::from_secs(60)).await?;

    let started = Instant::now();
    let history: workload::History = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let base = c.client_config()?;
    let clients: Vec<_> = (0..args.clients)
        .map(|n| {
            tokio::spawn(workload::client(
                n,
                base.clone(),
                args.seed,
                started,
                history.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();

    let mut faults: Vec<Fault> = Vec::new();
    let end = started + Duration::from_secs(args.duration);
    while Instant::now() < end {
        let (hold, rest) = nemesis::timings(&mut rng);
        tokio::time::sleep(rest).await;
        let leader = leader_of(&client).await;
        let at_ms = started.elapsed().as_millis() as u64;
        let (kind, mut target) = nemesis::inject(&mut c, &mut rng, &kinds, leader)?;
        if kind == Kind::Churn {
            let id: u64 = target.parse().unwrap_or(1);
            target = nemesis::churn(&mut c, &client, id).await;
        }
        tokio::time::sleep(hold).await;
        c.heal()?;
        println!(
            "  {at_ms:>7} ms {kind:?} on {target} for {} ms",
            hold.as_millis()
        );
        faults.push(Fault {
            at_ms,
            kind,
            target,
            held_ms: hold.as_millis() as u64,
        });
    }
    let _ = stop_tx.send(true);
    for cl in clients {
        let _ = cl.await;
    }
    let run_ms = started.elapsed().as_millis() as u64;

    // Heal phase: no faults; the cluster must converge and accept writes.
    c.heal()?;
    let mut report = checker::Report::default();
    if let Err(e) = wait_converged(&client, Duration::from_secs(60)).await {
        report.digest_mismatches += 1;
        report
            .violations
            .push(format!("no convergence after healing: {e}"));
    }
    match client
        .submit_job(
            None,
            JobBuilder::new("after-heal")
                .vertex("v", 1, spec::sleep(10))
                .build(),
        )
        .await
    {
        Ok(_) => {}
        Err(e) => report
            .violations
            .push(format!("no write accepted after healing: {e}")),
    }
    // Every job must end: the workload's tasks are short and TaskManagers are back.
    let deadline = Instant::now() + Duration::from_secs(120);
    let final_jobs = loop {
        let jobs = client.list_all_jobs(Default::default()).await?;
        let live: Vec<_> = jobs
            .iter()
            .filter(|j| {
                !matches!(
                    workload::state_name(j.state),
                    "FINISHED" | "FAILED" | "CANCELED"
                )
            })
            .collect();
        if live.is_empty() || Instant::now() > deadline {
            report.stuck_jobs = live.len();
            for j in live.iter().take(10) {
                report.violations.push(format!(
                    "job {} ({}) stuck in {}",
                    j.job_id,
                    j.name,
                    workload::state_name(j.state)
                ));
            }
            break jobs;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if wait_converged(&client, Duration::from_secs(30))
        .await
        .is_err()
    {
        report.digest_mismatches += 1;
        report
            .violations
            .push("replicas disagree after the jobs ended".into());
    }
    let final_map: BTreeMap<String, (String, String)> = final_jobs
        .iter()
        .map(|j| {
            (
                j.job_id.clone(),
                (j.name.clone(), workload::state_name(j.state).to_string()),
            )
        })
        .collect();
    let hist = history.lock().map(|h| h.clone()).unwrap_or_default();
    checker::check_history(&mut report, &hist, &final_map, run_ms);
    let mut records = BTreeMap::new();
    for tm in c.task_managers.keys() {
        // Every record kept, across the rotated files, oldest first.
        let lines =
            dispatcher_client::taskmanager::history::read(&c.tm_dir(tm)).unwrap_or_else(|e| {
                report
                    .violations
                    .push(format!("{tm}: cannot read its attempt history: {e}"));
                Vec::new()
            });
        records.insert(
            tm.clone(),
            lines
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect::<Vec<_>>(),
        );
    }
    checker::check_attempts(&mut report, &records);
    c.stop_all();

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for f in &faults {
        *counts.entry(format!("{:?}", f.kind)).or_default() += 1;
    }
    let result = serde_json::json!({
        "seed": args.seed, "duration_s": args.duration, "secured": !args.plain, "nemeses": format!("{kinds:?}"),
        "faults": counts, "fault_log": faults, "report": report, "passed": report.passed(),
        "reproduce": args.repro(),
    });
    std::fs::write(
        out.join("result.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    let lines: Vec<String> = hist
        .iter()
        .filter_map(|o| serde_json::to_string(o).ok())
        .collect();
    std::fs::write(out.join("history.jsonl"), lines.join("\n"))?;
    println!(
        "chaos: seed {} {}: {} operations ({:.1}% acknowledged, {:.1}% answered), {} faults {:?}; {} acknowledged submissions, {} unknown, lost {}, duplicated {}, read violations {}, double-booked slots {}, attempts on two TaskManagers {}, digest mismatches {}, stuck jobs {}; longest window without an acknowledged write {} ms",
        args.seed,
        if report.passed() { "PASSED" } else { "FAILED" },
        report.operations, report.ok_share * 100.0, report.answered_share * 100.0, faults.len(), counts,
        report.acknowledged_submissions, report.unknown_submissions, report.lost, report.duplicated,
        report.read_violations, report.double_booked_slots, report.attempts_on_two_task_managers,
        report.digest_mismatches, report.stuck_jobs, report.longest_write_gap_ms,
    );
    if !report.passed() {
        for v in &report.violations {
            println!("  violation: {v}");
        }
        println!("reproduce: {}", args.repro());
    }
    Ok(report)
}

/// Waits until every replica answers with the same applied index and digest.
async fn wait_converged(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_secs(10), client.cluster_status_with(true)).await
        {
            let all = s.replicas.iter().all(|r| r.reachable);
            let views: std::collections::BTreeSet<_> = s
                .replicas
                .iter()
                .map(|r| (r.applied_index, r.state_digest.clone()))
                .collect();
            if all && s.leader_id > 0 && views.len() == 1 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("replicas did not converge within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
