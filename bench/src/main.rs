//! `dispatch-bench`: figures for the dispatcher, and the same workloads against etcd and
//! ZooKeeper on the same machine in the same run.
//!
//! Every command launches the clusters it measures as real processes under a work
//! directory (recording their pids, killing them at the end and at the next start), so a
//! run needs no setup beyond `cargo build --release` and, for `compare`,
//! `scripts/bench-deps.sh`. Figures print as tables, or JSON with `--output json`.
//!
//! Our clusters run with TLS and tokens unless `--plain`; `compare` measures the
//! dispatcher both ways and reports the cost. etcd and ZooKeeper run without TLS or
//! authentication.

mod breakdown;
mod fanout;
mod place;
mod procs;
mod recover;
mod stats;
mod systems;
mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::Table;
use serde::Serialize;

use systems::dispatcher::{Dispatcher, Security};
use systems::System;
use workload::{Bound, Fault};

#[derive(Parser)]
#[command(name = "dispatch-bench", version, about)]
struct Cli {
    /// Human tables, or one JSON document on stdout.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    /// Where clusters keep their data and logs (emptied first).
    #[arg(long, default_value = "target/bench-work", global = true)]
    work_dir: PathBuf,
    /// Where the `dispatcher` binary is (default: `DISPATCHER_BIN_DIR`, else next to
    /// this one).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Our clusters in plain text without tokens (default: TLS for clients, TaskManagers
    /// and peers, and bearer tokens). `compare` measures both unless this is given.
    #[arg(long, global = true)]
    plain: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum SystemKind {
    Dispatcher,
    Etcd,
    Zookeeper,
}

#[derive(Subcommand)]
enum Cmd {
    /// New jobs (2 KiB specs) from concurrent closed-loop submitters.
    Submit {
        #[arg(long, value_enum, default_value = "dispatcher")]
        system: SystemKind,
        /// Concurrency levels, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        concurrency: Vec<usize>,
        /// Writes per run (the run also ends after --seconds).
        #[arg(long, default_value_t = 5000)]
        count: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Writes per second for all writers together (0: as fast as acknowledged), to
        /// grow the state steadily over a long run.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// kill -9 (or SIGSTOP) of the leader under a steady stream of submissions.
    Failover {
        #[arg(long, value_enum, default_value = "dispatcher")]
        system: SystemKind,
        #[arg(long, value_enum, default_value = "kill")]
        fault: Fault,
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// Concurrent writers of the steady stream.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// Simulated TaskManagers (dispatcher only) whose re-attachment is timed and
        /// whose running tasks must never restart.
        #[arg(long, default_value_t = 20)]
        task_managers: usize,
    },
    /// Where the time of a submission goes: every stage's timing on the leader and the
    /// followers, from the replicas' own reports.
    Breakdown(breakdown::BreakdownArgs),
    /// What no write can beat here: a no-op call through the same client and stack,
    /// one fdatasync, and the replicated write they bound.
    Floor(breakdown::FloorArgs),
    /// Simulated TaskManagers and jobs: time until every task is placed and RUNNING.
    Place(place::PlaceArgs),
    /// Restart of a replica holding a large state: time until it serves reads again.
    Recover(recover::RecoverArgs),
    /// Many WatchJob streams on one big job: submit latency and leader memory without,
    /// with and after them, and one change of the job fanned out to all.
    WatchFanout(fanout::FanoutArgs),
    /// Submit and failover against etcd, ZooKeeper and the dispatcher (with TLS and
    /// tokens, then without), with ratios and the cost of TLS.
    Compare {
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "etcd,zookeeper,dispatcher"
        )]
        systems: Vec<SystemKind>,
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        concurrency: Vec<usize>,
        #[arg(long, default_value_t = 3000)]
        count: u64,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Failover trials per system and fault (0: no failover).
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Where etcd is (default: PATH).
        #[arg(long)]
        etcd_dir: Option<PathBuf>,
    },
}

/// `--bin-dir`, else [`dispatcher_testkit::bin_dir`] (next to this executable).
fn bin_dir(cli: &Cli) -> PathBuf {
    cli.bin_dir
        .clone()
        .unwrap_or_else(dispatcher_testkit::bin_dir)
}

/// Our clusters' security for the single-system commands.
fn security(cli: &Cli) -> Security {
    if cli.plain {
        Security::Plain
    } else {
        Security::Tls
    }
}

/// A fresh work directory for one system, after killing what an earlier run left.
fn fresh_dir(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = root.join(name);
    procs::cleanup(&dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts a 3-member cluster of `kind` and waits until it takes writes; `security`
/// applies to the dispatcher (the others run as they are).
async fn start(
    cli: &Cli,
    kind: SystemKind,
    security: Security,
    etcd_dir: Option<&Path>,
) -> anyhow::Result<Box<dyn System>> {
    let sys: Box<dyn System> = match kind {
        SystemKind::Dispatcher => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            Box::new(Dispatcher::start(&dir, &bin_dir(cli), 3, &[], security)?)
        }
        SystemKind::Etcd => {
            let dir = fresh_dir(&cli.work_dir, "etcd")?;
            Box::new(systems::etcd::Etcd::start(&dir, etcd_dir).await?)
        }
        SystemKind::Zookeeper => {
            let dir = fresh_dir(&cli.work_dir, "zookeeper")?;
            Box::new(systems::zookeeper::ZooKeeper::start(&dir).await?)
        }
    };
    systems::wait_ready(&*sys, Duration::from_secs(90)).await?;
    Ok(sys)
}

fn print<T: Serialize>(cli: &Cli, value: &T, table: Table) -> anyhow::Result<()> {
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Table => println!("{table}"),
    }
    Ok(())
}

fn submit_table(results: &[workload::SubmitResult]) -> Table {
    let mut t = Table::new();
    t.set_header([
        "system",
        "submitters",
        "writes",
        "writes/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "retries",
    ]);
    for r in results {
        t.add_row([
            r.system.clone(),
            r.concurrency.to_string(),
            r.writes.to_string(),
            format!("{:.0}", r.per_second),
            format!("{:.2}", r.latency.p50_ms),
            format!("{:.2}", r.latency.p99_ms),
            format!("{:.2}", r.latency.p999_ms),
            r.retries.to_string(),
        ]);
    }
    t
}

fn failover_table(results: &[workload::FailoverResult]) -> Table {
    let mut t = Table::new();
    t.set_header([
        "system",
        "fault",
        "trials",
        "median ms",
        "p99 ms",
        "max ms",
        "each (ms)",
    ]);
    for r in results {
        t.add_row([
            r.system.clone(),
            format!("{:?}", r.fault).to_lowercase(),
            r.trials_ms.len().to_string(),
            format!("{:.0}", r.median_ms),
            format!("{:.0}", r.p99_ms),
            format!("{:.0}", r.max_ms),
            r.trials_ms
                .iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    t
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let quiet = cli.output == Output::Json;
    match &cli.command {
        Cmd::Submit {
            system,
            concurrency,
            count,
            seconds,
            rate,
        } => {
            let sys = start(cli, *system, security(cli), None).await?;
            let bound = Bound {
                count: *count,
                time: Duration::from_secs(*seconds),
                rate: (*rate > 0.0).then_some(*rate),
            };
            let mut results = Vec::new();
            for c in concurrency {
                results.push(workload::submit(&*sys, *c, bound, quiet).await?);
            }
            print(cli, &results, submit_table(&results))
        }
        Cmd::Failover {
            system,
            fault,
            trials,
            writers,
            task_managers,
        } => {
            if *system == SystemKind::Dispatcher && *task_managers > 0 {
                let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
                let mut sys = Dispatcher::start(&dir, &bin_dir(cli), 3, &[], security(cli))?;
                systems::wait_ready(&sys, Duration::from_secs(60)).await?;
                let mut tms = place::FailoverTms::start(&sys, *task_managers).await?;
                let r = workload::failover(&mut sys, *fault, *trials, *writers, &mut tms, quiet)
                    .await?;
                let report = tms.finish().await?;
                let mut table = failover_table(std::slice::from_ref(&r));
                table.add_row(report.row());
                return print(cli, &(r, report), table);
            }
            let mut sys = start(cli, *system, security(cli), None).await?;
            let r =
                workload::failover(&mut *sys, *fault, *trials, *writers, &mut (), quiet).await?;
            print(cli, &r, failover_table(std::slice::from_ref(&r)))
        }
        Cmd::Breakdown(args) => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            let r = breakdown::run(&dir, &bin_dir(cli), args, security(cli), quiet).await?;
            print(cli, &r, r.table())
        }
        Cmd::Floor(args) => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            let r = breakdown::floor(&dir, &bin_dir(cli), args, security(cli), quiet).await?;
            print(cli, &r, r.table())
        }
        Cmd::Place(args) => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            let r = place::run(&dir, &bin_dir(cli), args, security(cli), quiet).await?;
            print(cli, &r, r.table())
        }
        Cmd::Recover(args) => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            let r = recover::run(&dir, &bin_dir(cli), args, security(cli), quiet).await?;
            print(cli, &r, r.table())
        }
        Cmd::WatchFanout(args) => {
            let dir = fresh_dir(&cli.work_dir, "dispatcher")?;
            let r = fanout::run(&dir, &bin_dir(cli), args, security(cli), quiet).await?;
            print(cli, &r, r.table())
        }
        Cmd::Compare {
            systems,
            concurrency,
            count,
            seconds,
            trials,
            etcd_dir,
        } => {
            compare(
                cli,
                systems,
                concurrency,
                *count,
                *seconds,
                *trials,
                etcd_dir.as_deref(),
            )
            .await
        }
    }
}

#[derive(Serialize)]
struct Comparison {
    submit: Vec<workload::SubmitResult>,
    failover: Vec<workload::FailoverResult>,
    /// The dispatcher with TLS and tokens against itself in plain text.
    tls_cost: Vec<CostRow>,
    note: &'static str,
}

/// One figure of the dispatcher measured secured and plain.
#[derive(Serialize)]
struct CostRow {
    figure: String,
    secured: f64,
    plain: f64,
    /// `secured / plain`: below 1 for throughput, above 1 for times, means TLS costs.
    ratio: f64,
}

const SECURED: &str = "dispatcher";
const PLAIN: &str = "dispatcher-plain";
const NOTE: &str = "dispatcher: TLS (rustls) for clients and peers and bearer tokens; \
                    dispatcher-plain: the same cluster in plain text without tokens; \
                    etcd and ZooKeeper run without TLS or authentication.";

#[allow(clippy::too_many_arguments)]
async fn compare(
    cli: &Cli,
    kinds: &[SystemKind],
    concurrency: &[usize],
    count: u64,
    seconds: u64,
    trials: usize,
    etcd_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let quiet = cli.output == Output::Json;
    let bound = Bound {
        count,
        time: Duration::from_secs(seconds),
        rate: None,
    };
    let mut out = Comparison {
        submit: vec![],
        failover: vec![],
        tls_cost: vec![],
        note: NOTE,
    };
    let mut runs = Vec::new();
    for kind in kinds {
        match kind {
            SystemKind::Dispatcher if !cli.plain => {
                runs.push((*kind, Security::Tls));
                runs.push((*kind, Security::Plain));
            }
            _ => runs.push((*kind, security(cli))),
        }
    }
    for (kind, security) in runs {
        // One system at a time: the machine's two cores are the bound, so no system
        // runs while another is measured.
        let mut sys = start(cli, kind, security, etcd_dir).await?;
        for c in concurrency {
            out.submit
                .push(workload::submit(&*sys, *c, bound, quiet).await?);
        }
        if trials > 0 {
            for fault in [Fault::Kill, Fault::Stop] {
                out.failover
                    .push(workload::failover(&mut *sys, fault, trials, 4, &mut (), quiet).await?);
            }
        }
        drop(sys);
    }
    out.tls_cost = tls_cost(&out);
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{}", submit_table(&out.submit));
    if !out.failover.is_empty() {
        println!("{}", failover_table(&out.failover));
    }
    println!("{}", ratio_table(&out));
    if !out.tls_cost.is_empty() {
        println!("{}", cost_table(&out.tls_cost));
    }
    println!("{NOTE}");
    Ok(())
}

fn submit_of<'a>(
    out: &'a Comparison,
    system: &str,
    c: usize,
) -> Option<&'a workload::SubmitResult> {
    out.submit
        .iter()
        .find(|r| r.system == system && r.concurrency == c)
}

fn failover_of<'a>(
    out: &'a Comparison,
    system: &str,
    fault: Fault,
) -> Option<&'a workload::FailoverResult> {
    out.failover
        .iter()
        .find(|r| r.system == system && r.fault == fault)
}

fn levels(out: &Comparison) -> Vec<usize> {
    let mut levels: Vec<usize> = out.submit.iter().map(|r| r.concurrency).collect();
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// The dispatcher's figures over each other system's: throughput ratios (higher is
/// better for us) and failover ratios (their time over ours), for the secured cluster
/// and, in parentheses, the plain one.
fn ratio_table(out: &Comparison) -> Table {
    let mut t = Table::new();
    t.set_header(["figure", "ours", "vs etcd", "vs zookeeper"]);
    // Secured first: the figure a deployment gets.
    let ours: Vec<&str> = [SECURED, PLAIN]
        .into_iter()
        .filter(|s| out.submit.iter().any(|r| r.system == *s))
        .collect();
    let label = |s: &str| if s == SECURED { "" } else { "plain " };
    for c in levels(out) {
        let mut mine = Vec::new();
        let mut ratios = [Vec::new(), Vec::new()];
        for s in &ours {
            let Some(o) = submit_of(out, s, c) else {
                continue;
            };
            mine.push(format!(
                "{}{:.0} (p50 {:.2} ms)",
                label(s),
                o.per_second,
                o.latency.p50_ms
            ));
            for (i, other) in ["etcd", "zookeeper"].into_iter().enumerate() {
                if let Some(r) = submit_of(out, other, c) {
                    ratios[i].push(format!("{}{:.1}x", label(s), o.per_second / r.per_second));
                }
            }
        }
        if mine.is_empty() {
            continue;
        }
        let cell = |v: &[String]| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(", ")
            }
        };
        t.add_row([
            format!("writes/s, {c} submitters"),
            mine.join(", "),
            cell(&ratios[0]),
            cell(&ratios[1]),
        ]);
    }
    for fault in [Fault::Kill, Fault::Stop] {
        let mut mine = Vec::new();
        let mut ratios = [Vec::new(), Vec::new()];
        for s in &ours {
            let Some(o) = failover_of(out, s, fault) else {
                continue;
            };
            mine.push(format!("{}{:.0} ms", label(s), o.median_ms));
            for (i, other) in ["etcd", "zookeeper"].into_iter().enumerate() {
                if let Some(r) = failover_of(out, other, fault) {
                    ratios[i].push(format!(
                        "{}{:.1}x faster",
                        label(s),
                        r.median_ms / o.median_ms.max(0.001)
                    ));
                }
            }
        }
        if mine.is_empty() {
            continue;
        }
        let cell = |v: &[String]| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(", ")
            }
        };
        t.add_row([
            format!("leader {fault:?} -> next ack (median)").to_lowercase(),
            mine.join(", "),
            cell(&ratios[0]),
            cell(&ratios[1]),
        ]);
    }
    t
}

/// The secured dispatcher's figures against the plain one's, where both were measured.
fn tls_cost(out: &Comparison) -> Vec<CostRow> {
    let mut rows = Vec::new();
    let mut row = |figure: String, secured: f64, plain: f64| {
        rows.push(CostRow {
            figure,
            secured,
            plain,
            ratio: secured / plain.max(f64::MIN_POSITIVE),
        })
    };
    for c in levels(out) {
        let (Some(s), Some(p)) = (submit_of(out, SECURED, c), submit_of(out, PLAIN, c)) else {
            continue;
        };
        row(
            format!("writes/s, {c} submitters"),
            s.per_second,
            p.per_second,
        );
        row(
            format!("p50 ms, {c} submitters"),
            s.latency.p50_ms,
            p.latency.p50_ms,
        );
        row(
            format!("p99 ms, {c} submitters"),
            s.latency.p99_ms,
            p.latency.p99_ms,
        );
    }
    for fault in [Fault::Kill, Fault::Stop] {
        let (Some(s), Some(p)) = (
            failover_of(out, SECURED, fault),
            failover_of(out, PLAIN, fault),
        ) else {
            continue;
        };
        row(
            format!("leader {fault:?} -> next ack, median ms").to_lowercase(),
            s.median_ms,
            p.median_ms,
        );
    }
    rows
}

fn cost_table(rows: &[CostRow]) -> Table {
    let mut t = Table::new();
    t.set_header([
        "cost of TLS and tokens",
        "TLS + tokens",
        "plain",
        "secured / plain",
    ]);
    for r in rows {
        // Rates and failover times in whole units, latencies to the hundredth.
        let digits = if r.figure.starts_with("p5") || r.figure.starts_with("p9") {
            2
        } else {
            0
        };
        t.add_row([
            r.figure.clone(),
            format!("{:.*}", digits, r.secured),
            format!("{:.*}", digits, r.plain),
            format!("{:.2}x", r.ratio),
        ]);
    }
    t
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dispatch-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dispatch-bench: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
