//! The chaos harness: real `dispatcher` replicas and `taskmanager` agents on loopback,
//! faults scheduled from one seed (kill, pause, partitions through per-link proxies, slow
//! and flaky links, TaskManager kills, crash of every replica, membership churn, and
//! load: big entries to a lagging follower, busy CPUs, CPU throttling, connection
//! floods, a full disk), a workload of concurrent clients recording a history, a heal phase, and a
//! checker of the brief's invariants and of liveness under load.
//!
//! ```text
//! cargo run -p chaos -- run --seed 7 --duration 120 --nemesis all
//! cargo run -p chaos -- campaign --seeds 10 --duration 180 --nemesis all
//! cargo run -p chaos -- crash-loop --rounds 100
//! ```
//!
//! A failure prints the command that reproduces it. Results go to `<out>/result.json`
//! (and the history to `<out>/history.jsonl`).

mod checker;
mod cluster;
mod crashloop;
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
    /// kill -9 of every replica, round after round, under concurrent submissions: every
    /// acknowledged submission must survive every crash.
    CrashLoop(crashloop::CrashLoopArgs),
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// The seed every random choice comes from.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of faults (the heal phase comes after).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Nemeses: all, kill, pause, partition, links, taskmanager, crash, membership, load,
    /// disk, corrupt, or kind names.
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
        Cmd::CrashLoop(args) => crashloop::run(args).await,
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

/// The leader, if one is known, and the highest term any replica reports (None if the
/// status call failed).
async fn observe(client: &Client) -> (Option<u64>, Option<u64>) {
    let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(800), client.cluster_status()).await
    else {
        return (None, None);
    };
    let term = s.replicas.iter().map(|r| r.term).max();
    ((s.leader_id > 0).then_some(s.leader_id), term)
}

/// Waits (up to `within`) until the cluster is settled: a leader known, every replica
/// reachable at one term, and that term unchanged for half a second. Returns the term,
/// or None if it did not settle. A fault's aftermath (a replica back from a partition
/// with a higher term, which deposes the leader when it is heard: openraft 0.9 has no
/// pre-vote) is thus not blamed on the next fault.
async fn settled_term(client: &Client, within: Duration) -> Option<u64> {
    let deadline = Instant::now() + within;
    let mut last: Option<u64> = None;
    while Instant::now() < deadline {
        let s = tokio::time::timeout(Duration::from_millis(800), client.cluster_status())
            .await
            .ok()
            .and_then(Result::ok);
        let term = s.and_then(|s| {
            let terms: std::collections::BTreeSet<u64> =
                s.replicas.iter().map(|r| r.term).collect();
            let all = s.replicas.iter().all(|r| r.reachable);
            (s.leader_id > 0 && all && terms.len() == 1).then(|| terms.into_iter().next())?
        });
        match (term, last) {
            (Some(t), Some(l)) if t == l => return Some(t),
            _ => last = term,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// A fault that leaves the leader able to lead, with the highest term before it.
struct Held {
    kind: Kind,
    target: String,
    at_ms: u64,
    term: u64,
}

impl Held {
    /// An election since the fault began is a liveness violation.
    fn check(self, report: &mut checker::Report, term_now: Option<u64>) {
        let Some(now) = term_now else { return };
        if now > self.term {
            report.elections_with_healthy_leader += 1;
            report.violation(format!(
                "term {} -> {now} during {:?} on {} at {} ms, with the leader able to lead",
                self.term, self.kind, self.target, self.at_ms
            ));
        }
    }
}

/// Restarts a wiped voter with its old id and flags: it must exit within 20 s, naming
/// `replace-node` in its log; then it is replaced as docs/operations.md says.
async fn wipe_aftermath(
    c: &mut Cluster,
    client: &Client,
    id: u64,
    report: &mut checker::Report,
) -> String {
    let log_before = std::fs::metadata(c.replica_log(id)).map_or(0, |m| m.len());
    if let Err(e) = c.start_replica(id) {
        return format!("restart failed: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.replica_running(id) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if c.replica_running(id) {
        report.wiped_not_refused += 1;
        report.violation(format!(
            "replica {id}, wiped and restarted with its old id, was still running after 20 s"
        ));
        c.kill_replica(id);
    }
    let said = std::fs::read(c.replica_log(id))
        .map(|b| String::from_utf8_lossy(b.get(log_before as usize..).unwrap_or(&[])).into_owned())
        .unwrap_or_default();
    let named = said.contains("replace-node");
    let how = nemesis::churn(c, client, id).await;
    format!(
        "refused to start{}; {how}",
        if named {
            ", naming replace-node"
        } else {
            " (without naming replace-node)"
        }
    )
}

/// Restarts a replica whose file was corrupted and watches it for up to 20 s: it must
/// either refuse to start (then it is replaced as docs/operations.md says: removed,
/// wiped, added back) or serve the state the others have at the same applied index.
async fn corrupt_aftermath(
    c: &mut Cluster,
    client: &Client,
    id: u64,
    report: &mut checker::Report,
) -> String {
    if let Err(e) = c.start_replica(id) {
        return format!("restart failed: {e}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !c.replica_running(id) {
            let how = nemesis::churn(c, client, id).await;
            return format!("refused to start; {how}");
        }
        let status =
            tokio::time::timeout(Duration::from_secs(5), client.cluster_status_with(true)).await;
        if let Ok(Ok(s)) = status {
            if let Some(mine) = s.replicas.iter().find(|r| r.id == id && r.reachable) {
                let wrong = s.replicas.iter().find(|o| {
                    o.id != id
                        && o.reachable
                        && o.applied_index == mine.applied_index
                        && o.state_digest != mine.state_digest
                });
                if let Some(other) = wrong {
                    report.served_wrong_digest += 1;
                    report.violation(format!(
                        "replica {id} serves digest {} at index {}, replica {} has {}",
                        mine.state_digest, mine.applied_index, other.id, other.state_digest
                    ));
                    return "served a wrong digest".into();
                }
                let views: std::collections::BTreeSet<_> = s
                    .replicas
                    .iter()
                    .map(|r| (r.reachable, r.applied_index, r.state_digest.clone()))
                    .collect();
                if views.len() == 1 {
                    return "started and caught up with the same digest".into();
                }
            }
        }
        if Instant::now() > deadline {
            return "neither refused nor caught up within 20 s".into();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Submits the big jobs of a [`Kind::BigEntries`] fault while its follower is down;
/// returns the acknowledged ones (id, name) and what happened.
async fn submit_big_jobs(
    client: &Client,
    rng: &mut StdRng,
    seed: u64,
    at_ms: u64,
) -> (Vec<(String, String)>, String) {
    use rand::Rng;
    let n = rng.gen_range(nemesis::BIG_JOBS);
    let mut acked = Vec::new();
    let mut bytes_total = 0;
    for k in 0..n {
        let bytes = rng.gen_range(nemesis::BIG_JOB_BYTES);
        let name = format!("big-{seed}-{at_ms}-{k}");
        if let Ok(r) = client.submit_job(None, spec::big_job(&name, bytes)).await {
            acked.push((r.job_id, name));
            bytes_total += bytes;
        }
    }
    let what = format!(
        "{} of {n} big jobs acknowledged ({} KiB)",
        acked.len(),
        bytes_total / 1024
    );
    (acked, what)
}

async fn run(args: RunArgs) -> anyhow::Result<checker::Report> {
    let kinds = Kind::parse_list(&args.nemesis).map_err(anyhow::Error::msg)?;
    let out = match &args.out {
        Some(o) => {
            // A fresh cluster every run: data of an earlier run would make these replicas
            // rejoin that run's cluster, at ports nobody listens on any more.
            if o.exists() {
                // A disk-full tmpfs left mounted by an aborted run.
                for e in std::fs::read_dir(o)?.flatten() {
                    if e.file_name().to_string_lossy().starts_with("disk-") {
                        cluster::unmount(&e.path());
                    }
                }
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

    let mut report = checker::Report::default();
    let mut faults: Vec<Fault> = Vec::new();
    let mut held: Option<Held> = None;
    let mut big_jobs: Vec<(String, String)> = Vec::new();
    let first_term = observe(&client).await.1;
    let end = started + Duration::from_secs(args.duration);
    while Instant::now() < end {
        let (hold, rest) = nemesis::timings(&mut rng);
        tokio::time::sleep(rest).await;
        let (mut leader, term) = observe(&client).await;
        if let Some(h) = held.take() {
            h.check(&mut report, term);
        }
        // Draw the fault first (the schedule stays the seed's); a fault that must leave
        // the leader able to lead starts only on a settled cluster.
        let kind = nemesis::draw(&mut rng, &kinds);
        let mut baseline = term;
        if kind.leader_stays_healthy() {
            baseline = settled_term(&client, Duration::from_secs(10)).await;
            if baseline.is_none() {
                report.unsettled += 1;
            }
            leader = observe(&client).await.0;
        }
        let at_ms = started.elapsed().as_millis() as u64;
        let (kind, mut target) = nemesis::inject(&mut c, &mut rng, kind, leader)?;
        if kind == Kind::Churn {
            let id: u64 = target.parse().unwrap_or(1);
            target = nemesis::churn(&mut c, &client, id).await;
        }
        if kind == Kind::WipeReplace {
            let id: u64 = target.parse().unwrap_or(1);
            let after = wipe_aftermath(&mut c, &client, id, &mut report).await;
            target = format!("{target}; {after}");
        }
        if kind == Kind::CorruptFollower {
            let id: u64 = target
                .split(':')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1);
            let after = corrupt_aftermath(&mut c, &client, id, &mut report).await;
            target = format!("{target}; {after}");
        }
        if kind == Kind::BigEntries {
            let (acked, what) = submit_big_jobs(&client, &mut rng, args.seed, at_ms).await;
            big_jobs.extend(acked);
            target = format!("{target} down; {what}");
        }
        if let (true, Some(term)) = (kind.leader_stays_healthy(), baseline) {
            held = Some(Held {
                kind,
                target: target.clone(),
                at_ms,
                term,
            });
        }
        tokio::time::sleep(hold).await;
        report.max_rss_mib = report.max_rss_mib.max(c.max_replica_rss_mib());
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
    if let Some(h) = held.take() {
        // The pause after the last fault, as the others had theirs.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        h.check(&mut report, observe(&client).await.1);
    }
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
    for (id, name) in &big_jobs {
        if !final_map.contains_key(id) {
            report.lost += 1;
            report.violation(format!("acknowledged big job {id} ({name}) is missing"));
        }
    }
    if let (Some(first), Some(last)) = (first_term, observe(&client).await.1) {
        report.elections = last.saturating_sub(first);
    }
    report.not_serving_after_heal = not_serving(&c).await;
    if report.not_serving_after_heal > 0 {
        report.violation(format!(
            "{} replica(s) not SERVING after the heal",
            report.not_serving_after_heal
        ));
    }
    report.max_rss_mib = report.max_rss_mib.max(c.max_replica_rss_mib());
    if report.max_rss_mib > checker::RSS_BOUND_MIB {
        report.violation(format!(
            "a replica's resident set reached {} MiB (bound {} MiB)",
            report.max_rss_mib,
            checker::RSS_BOUND_MIB
        ));
    }
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
        "chaos: seed {} {}: {} operations ({:.1}% acknowledged, {:.1}% answered), {} faults {:?}; {} acknowledged submissions, {} unknown, lost {}, duplicated {}, read violations {}, double-booked slots {}, attempts on two TaskManagers {}, digest mismatches {}, served a wrong digest {}, wiped voters not refused {}, stuck jobs {}; longest window without an acknowledged write {} ms",
        args.seed,
        if report.passed() { "PASSED" } else { "FAILED" },
        report.operations, report.ok_share * 100.0, report.answered_share * 100.0, faults.len(), counts,
        report.acknowledged_submissions, report.unknown_submissions, report.lost, report.duplicated,
        report.read_violations, report.double_booked_slots, report.attempts_on_two_task_managers,
        report.digest_mismatches, report.served_wrong_digest, report.wiped_not_refused, report.stuck_jobs, report.longest_write_gap_ms,
    );
    println!(
        "chaos: seed {}: {} elections, {} with the leader able to lead ({} such faults found no settled cluster); {} replicas not SERVING after the heal; largest replica RSS {} MiB",
        args.seed, report.elections, report.elections_with_healthy_leader, report.unsettled,
        report.not_serving_after_heal, report.max_rss_mib,
    );
    if !report.passed() {
        for v in &report.violations {
            println!("  violation: {v}");
        }
        println!("reproduce: {}", args.repro());
    }
    Ok(report)
}

/// How many replicas do not answer SERVING on the gRPC health service (within 10 s
/// each, for a replica that has just learnt of its leader).
async fn not_serving(c: &Cluster) -> usize {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let Ok(cfg) = c.client_config() else {
        return c.addrs.len();
    };
    let mut bad = 0;
    for addr in c.addrs.values() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let serving = loop {
            let status = async {
                let channel = cfg.endpoint(addr).ok()?.connect().await.ok()?;
                let r = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .ok()?;
                Some(r.into_inner().status())
            };
            let ok = tokio::time::timeout(Duration::from_secs(2), status).await;
            if matches!(ok, Ok(Some(ServingStatus::Serving))) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        bad += usize::from(!serving);
    }
    bad
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
