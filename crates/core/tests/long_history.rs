//! A fixed, long history of commands with its digests recorded: a refactoring of the state
//! machine that changes any behaviour (a state, a response, a rejection's wording, the
//! order of placement) changes a constant here.
//!
//! The history comes from a fixed seed through a PRNG written here, so it cannot drift
//! with a dependency's version, and it reads no clock. Commands are resolved against the
//! current state (report the tasks that hold slots, restart the jobs that are due), so
//! most of them reach deep into the lifecycles instead of being rejected at the door.
//!
//! The constants were recorded once against the state machine as it was before
//! `machine.rs` was split into modules. If a deliberate change of behaviour alters them,
//! re-record them in the same commit as that change and say why.

use std::collections::BTreeMap;

use dispatcher_core::codec;
use dispatcher_core::state::invariants;
use dispatcher_core::state::*;

const SEED: u64 = 0x5EED_D15C_A7C4_2024;
const STEPS: usize = 6_000;

/// Digests of the state after this many steps of the history.
const CHECKPOINTS: [(usize, &str); 3] = [
    (
        1_000,
        "e9680ccebffdaada06547b6e2187dad4ac3ef793fb25695182306f31fa1a5647",
    ),
    (
        3_000,
        "319bbcbf1dccd2b347a209ca2a7e8550b466710c3380c34c8bfafda4d523cd35",
    ),
    (
        4_500,
        "1678e6d1c1f945cc07361c275f2d69814f5f0b2807b82597ff8aa954078364d3",
    ),
];
const FINAL_DIGEST: &str = "2d6db8198535e5949e0313e376977c03a4ecdf1c9b4d75477f4082fcedeb0a44";
/// Digest of every command's result in order: catches a change of response or rejection
/// that leaves the state alone.
const RESULTS_DIGEST: &str = "0e0cc0e8af92df1fad301ab23696dfcfe956771c33c54324d4468dfeafb1a064";
const ACCEPTED: usize = 4_393;
const REJECTED: usize = 1_607;
/// Reports ignored inside accepted ReportTaskState commands (stale, not assigned...).
const IGNORED_REPORTS: usize = 1_514;

/// SplitMix64: tiny, well mixed, and fully determined by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// True with probability `num / den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

const JOBS: u64 = 48;
const TASK_MANAGERS: u64 = 7;

fn job_id(n: u64) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("a valid uuid")
}

fn tm_id(n: u64) -> TaskManagerId {
    TaskManagerId(format!("tm-{n}"))
}

fn zone(n: u64) -> BTreeMap<String, String> {
    BTreeMap::from([("zone".to_string(), ["a", "b"][(n % 2) as usize].to_string())])
}

/// A job spec drawn from the PRNG. `valid` false draws one of several kinds of invalid
/// spec instead.
fn job_spec(rng: &mut Rng, n: u64, valid: bool) -> JobSpec {
    let vertices = 1 + rng.below(3) as usize;
    let mut spec = JobSpec {
        name: format!("job-{n}"),
        vertices: (0..vertices)
            .map(|i| VertexSpec {
                name: format!("v{i}"),
                parallelism: 1 + rng.below(3) as u32,
                task: match rng.below(3) {
                    0 => TaskSpec::Sleep {
                        duration_ms: rng.below(5_000),
                    },
                    1 => TaskSpec::Fail {
                        after_ms: rng.below(5_000),
                        exit_code: 1 + rng.below(100) as i32,
                    },
                    _ => TaskSpec::Command {
                        argv: vec!["/bin/echo".into(), format!("{n}-{i}")],
                        env: BTreeMap::from([("STEP".to_string(), i.to_string())]),
                    },
                },
                node_selector: if rng.chance(1, 5) {
                    zone(rng.next())
                } else {
                    BTreeMap::new()
                },
            })
            .collect(),
        edges: (1..vertices)
            .map(|i| EdgeSpec {
                from: format!("v{}", i - 1),
                to: format!("v{i}"),
            })
            .collect(),
        priority: rng.below(7) as i32 - 3,
        restart: if rng.chance(1, 3) {
            RestartStrategy::NoRestart
        } else {
            RestartStrategy::FixedDelay {
                attempts: rng.below(4) as u32,
                delay_ms: rng.pick(&[0, 0, 50, 300, 1_500]),
            }
        },
        placement: rng.pick(&[
            None,
            Some(PlacementStrategy::Spread),
            Some(PlacementStrategy::BinPack),
            Some(PlacementStrategy::RoundRobin),
        ]),
        labels: if rng.chance(1, 4) {
            BTreeMap::from([("team".to_string(), format!("t{}", n % 3))])
        } else {
            BTreeMap::new()
        },
    };
    if !valid {
        match rng.below(6) {
            0 => spec.vertices[0].parallelism = 0,
            1 => spec.vertices.clear(),
            2 => spec.edges.push(EdgeSpec {
                from: format!("v{}", vertices - 1),
                to: "v0".into(),
            }),
            3 => spec.vertices[0].parallelism = 5_000,
            4 => {
                spec.vertices[0].task = TaskSpec::Fail {
                    after_ms: 1,
                    exit_code: 0,
                }
            }
            _ => spec.name = "  ".into(),
        }
    }
    spec
}

fn tm_spec(rng: &mut Rng, n: u64, incarnation: u64) -> TaskManagerSpec {
    TaskManagerSpec {
        id: tm_id(n),
        instance: format!("i{incarnation}"),
        address: format!("10.0.0.{n}:6121"),
        // Fixed per incarnation, so a re-registration of the same instance is a retry;
        // zero slots is a rejected registration.
        slots: ((n * 7 + incarnation * 3) % 5) as u32,
        labels: if rng.chance(2, 3) {
            zone(n)
        } else {
            BTreeMap::new()
        },
    }
}

fn config(rng: &mut Rng) -> ClusterConfig {
    let mut c = ClusterConfig {
        default_placement: rng.pick(&[
            PlacementStrategy::Spread,
            PlacementStrategy::BinPack,
            PlacementStrategy::RoundRobin,
        ]),
        max_retained_checkpoints: 1 + rng.below(4) as u32,
        finished_job_retention_ms: rng.pick(&[0, 2_000, 10_000, 60_000]),
        ..ClusterConfig::default()
    };
    if rng.chance(1, 5) {
        // Rejected: limits must be at least 1.
        c.max_retained_checkpoints = 0;
    }
    c
}

/// Every slot-holding attempt: (TaskManager, its instance, task, attempt).
fn held(state: &DispatcherState) -> Vec<(TaskManagerId, String, TaskRef, Attempt)> {
    state
        .task_managers()
        .flat_map(|tm| {
            tm.slots
                .iter()
                .flatten()
                .map(|(t, a)| (tm.spec.id.clone(), tm.spec.instance.clone(), t.clone(), *a))
        })
        .collect()
}

fn task_state(rng: &mut Rng) -> TaskState {
    rng.pick(&[
        TaskState::Scheduled,
        TaskState::Deploying,
        TaskState::Running,
        TaskState::Running,
        TaskState::Running,
        TaskState::Finished,
        TaskState::Finished,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Canceled,
    ])
}

/// The registered instance of TaskManager `n`, or a name no instance has had yet.
fn instance_of(state: &DispatcherState, n: u64) -> String {
    state
        .task_manager(&tm_id(n))
        .map_or_else(|| "i0".to_string(), |t| t.spec.instance.clone())
}

/// The history's generator: draws the next command against the current state.
struct History {
    rng: Rng,
    now: Millis,
    /// Specs submitted per job id, so that resubmissions can repeat or differ.
    submitted: BTreeMap<u64, JobSpec>,
    /// Current incarnation per TaskManager id.
    incarnation: BTreeMap<u64, u64>,
}

impl History {
    fn new() -> Self {
        History {
            rng: Rng(SEED),
            now: 1_000,
            submitted: BTreeMap::new(),
            incarnation: BTreeMap::new(),
        }
    }

    fn next_command(&mut self, state: &DispatcherState) -> Command {
        // Time mostly moves forward, by varied steps; now and then a new leader's clock
        // lags behind the old one's.
        let step = self.rng.pick(&[0, 1, 10, 40, 100, 250, 600, 2_000]);
        if self.rng.chance(1, 40) {
            self.now = self.now.saturating_sub(self.rng.below(3_000));
        } else {
            self.now += step;
        }
        loop {
            if let Some(cmd) = self.draw(state) {
                return cmd;
            }
        }
    }

    fn draw(&mut self, state: &DispatcherState) -> Option<Command> {
        let now = self.now;
        let rng = &mut self.rng;
        let roll = rng.below(100);
        Some(match roll {
            // Submit: new, retried, conflicting or invalid.
            0..=13 => {
                let n = rng.below(JOBS);
                let spec = match (self.submitted.get(&n), rng.below(10)) {
                    (Some(old), 0..=3) => old.clone(),
                    (_, 9) => job_spec(rng, n, false),
                    _ => job_spec(rng, n, true),
                };
                self.submitted.entry(n).or_insert_with(|| spec.clone());
                Command::SubmitJob {
                    job_id: job_id(n),
                    spec,
                    now,
                }
            }
            14..=17 => Command::CancelJob {
                job_id: job_id(rng.below(JOBS)),
                now,
            },
            // Register: a retry of the current instance, a restart, or a new one.
            18..=24 => {
                let n = rng.below(TASK_MANAGERS);
                let current = self.incarnation.get(&n).copied().unwrap_or(0);
                let incarnation = if rng.chance(1, 3) {
                    current
                } else {
                    current + 1
                };
                self.incarnation.insert(n, incarnation);
                let mut spec = tm_spec(rng, n, incarnation);
                if incarnation == current && rng.chance(1, 4) {
                    // Same instance, other slots: rejected.
                    spec.slots += 1;
                }
                Command::RegisterTaskManager { spec, now }
            }
            25..=27 => {
                let n = rng.below(TASK_MANAGERS);
                let mut instance = instance_of(state, n);
                if rng.chance(1, 3) {
                    instance.push_str("-old");
                }
                Command::ExpireTaskManager {
                    id: tm_id(n),
                    instance,
                    now,
                }
            }
            28..=29 => {
                let n = rng.below(TASK_MANAGERS);
                Command::UnregisterTaskManager {
                    id: tm_id(n),
                    instance: instance_of(state, n),
                    now,
                }
            }
            // Reports about attempts that hold slots, a heartbeat's batch of them, some
            // stale or from the wrong TaskManager.
            30..=64 => {
                let held = held(state);
                if held.is_empty() {
                    return None;
                }
                let (tm, instance, _, _) = held[rng.below(held.len() as u64) as usize].clone();
                let mine: Vec<_> = held.iter().filter(|h| h.0 == tm).collect();
                let count = 1 + rng.below(mine.len().min(4) as u64) as usize;
                let reports = (0..count)
                    .map(|_| {
                        let (_, _, task, attempt) = mine[rng.below(mine.len() as u64) as usize];
                        let state = task_state(rng);
                        let attempt = match rng.below(12) {
                            0 => attempt.saturating_sub(1),
                            1 => attempt + 1,
                            _ => *attempt,
                        };
                        TaskReport {
                            job: task.job.clone(),
                            key: task.key,
                            attempt,
                            state,
                            exit_code: match state {
                                TaskState::Failed => Some(1 + rng.below(9) as i32),
                                TaskState::Finished => Some(0),
                                _ => None,
                            },
                            reason: if rng.chance(1, 2) {
                                String::new()
                            } else {
                                format!("observed at {now}")
                            },
                        }
                    })
                    .collect();
                let (task_manager, instance) = if rng.chance(1, 25) {
                    let n = rng.below(TASK_MANAGERS);
                    (tm_id(n), instance_of(state, n))
                } else {
                    (tm, instance)
                };
                Command::ReportTaskState {
                    task_manager,
                    instance,
                    reports,
                    now,
                }
            }
            // The TaskManager stops what it must stop.
            65..=68 => {
                let n = rng.below(TASK_MANAGERS);
                let stopping = state.stopping(&tm_id(n));
                if stopping.is_empty() {
                    return None;
                }
                Command::ReportTaskState {
                    task_manager: tm_id(n),
                    instance: instance_of(state, n),
                    reports: stopping
                        .iter()
                        .map(|a| TaskReport {
                            job: a.task.job.clone(),
                            key: a.task.key,
                            attempt: a.attempt,
                            state: TaskState::Canceled,
                            exit_code: None,
                            reason: "stopped".into(),
                        })
                        .collect(),
                    now,
                }
            }
            // A report about anything at all: unknown jobs, subtasks, attempts.
            69..=70 => {
                let n = rng.below(TASK_MANAGERS);
                Command::ReportTaskState {
                    task_manager: tm_id(n),
                    instance: instance_of(state, n),
                    reports: vec![TaskReport {
                        job: job_id(rng.below(JOBS)),
                        key: TaskKey {
                            vertex: rng.below(4) as u32,
                            subtask: rng.below(4) as u32,
                        },
                        attempt: rng.below(4) as u32,
                        state: task_state(rng),
                        exit_code: None,
                        reason: String::new(),
                    }],
                    now,
                }
            }
            71..=77 => {
                let due = state.restarts_due(now);
                let job_id = match due.first() {
                    Some(id) if rng.chance(9, 10) => id.clone(),
                    _ => job_id(rng.below(JOBS)),
                };
                Command::RestartTasks { job_id, now }
            }
            // Checkpoints, mostly of running jobs and with the id just handed out; some
            // repeated, skipped back or of jobs that do not run.
            78..=82 => {
                let running: Vec<u64> = (0..JOBS)
                    .filter(|n| {
                        state
                            .job(&job_id(*n))
                            .is_some_and(|j| j.state == JobState::Running)
                    })
                    .collect();
                let n = if !running.is_empty() && rng.chance(4, 5) {
                    rng.pick(&running)
                } else {
                    rng.below(JOBS)
                };
                Command::AllocateCheckpointId {
                    job_id: job_id(n),
                    now,
                }
            }
            83..=87 => {
                let allocated: Vec<u64> = (0..JOBS)
                    .filter(|n| {
                        state
                            .job(&job_id(*n))
                            .is_some_and(|j| j.checkpoints.next_id > 1)
                    })
                    .collect();
                let n = if !allocated.is_empty() && rng.chance(4, 5) {
                    rng.pick(&allocated)
                } else {
                    rng.below(JOBS)
                };
                let next = state.job(&job_id(n)).map_or(1, |j| j.checkpoints.next_id);
                let back = rng.pick(&[1, 1, 1, 2, 3, 0]);
                Command::RecordCheckpoint {
                    job_id: job_id(n),
                    checkpoint_id: next.saturating_sub(back),
                    location: if rng.chance(1, 15) {
                        " ".into()
                    } else {
                        format!("s3://ckpt/{n}/{next}")
                    },
                    now,
                }
            }
            88..=90 => Command::PurgeFinishedJobs { now },
            91..=92 => Command::SetClusterConfig {
                config: config(rng),
            },
            // Always rejected: the state is not empty (or the bytes are no backup).
            93 => Command::RestoreState {
                state: if rng.chance(1, 2) {
                    state.encode().expect("a state always encodes")
                } else {
                    vec![1, 2, 3]
                },
            },
            _ => {
                let len = 2 + rng.below(3);
                let mut inner = Vec::new();
                for _ in 0..len {
                    let cmd = loop {
                        if let Some(c) = self.draw(state) {
                            if !matches!(c, Command::Batch(_)) {
                                break c;
                            }
                        }
                    };
                    inner.push(cmd);
                }
                if self.rng.chance(1, 6) {
                    inner.push(Command::Batch(Vec::new()));
                }
                Command::Batch(inner)
            }
        })
    }
}

fn digest(state: &DispatcherState) -> String {
    state.digest().expect("a state always encodes")
}

/// Tally of results per command name: (accepted, rejected).
type Tally = BTreeMap<&'static str, (usize, usize)>;

struct Run {
    state: DispatcherState,
    digests: BTreeMap<usize, String>,
    /// The state midway, to replay the rest from a restored snapshot.
    midway: (usize, Vec<u8>),
    commands: Vec<Command>,
    results: Vec<Result<Response, Rejection>>,
    tally: Tally,
    ignored_reports: usize,
}

/// The history, run once and shared by the tests (it takes a while in a debug build).
fn run() -> &'static Run {
    static RUN: std::sync::OnceLock<Run> = std::sync::OnceLock::new();
    RUN.get_or_init(run_history)
}

fn run_history() -> Run {
    let mut history = History::new();
    let mut state = DispatcherState::new(ClusterConfig::default());
    let mut digests = BTreeMap::new();
    let mut midway = (0, Vec::new());
    let mut commands = Vec::with_capacity(STEPS);
    let mut results = Vec::with_capacity(STEPS);
    let mut tally = Tally::new();
    let mut ignored_reports = 0;
    for step in 0..STEPS {
        if step == STEPS / 2 {
            midway = (step, state.encode().expect("encode"));
        }
        let cmd = history.next_command(&state);
        let name = cmd.name();
        let before = digest(&state);
        let result = state.apply(cmd.clone());
        match &result {
            Ok(response) => {
                tally.entry(name).or_default().0 += 1;
                let mut stack = vec![response];
                while let Some(r) = stack.pop() {
                    match r {
                        Response::Reports { outcomes } => {
                            ignored_reports += outcomes
                                .iter()
                                .filter(|o| matches!(o, ReportOutcome::Ignored(_)))
                                .count();
                        }
                        Response::Batch(inner) => stack.extend(inner.iter().flatten()),
                        _ => {}
                    }
                }
            }
            Err(rejection) => {
                tally.entry(name).or_default().1 += 1;
                assert_eq!(
                    digest(&state),
                    before,
                    "step {step}: rejected {name} ({rejection}) changed the state"
                );
            }
        }
        if let Err(v) = invariants::check(&state) {
            panic!("step {step}: {name} ({result:?}) broke an invariant: {v}");
        }
        commands.push(cmd);
        results.push(result);
        if CHECKPOINTS.iter().any(|(at, _)| *at == step + 1) {
            digests.insert(step + 1, digest(&state));
        }
    }
    Run {
        state,
        digests,
        midway,
        commands,
        results,
        tally,
        ignored_reports,
    }
}

#[test]
fn a_long_fixed_history_reaches_the_recorded_digests() {
    let run = run();
    let accepted: usize = run.tally.values().map(|t| t.0).sum();
    let rejected: usize = run.tally.values().map(|t| t.1).sum();
    let results_digest = codec::digest_hex(&codec::encode(&run.results).expect("results encode"));
    let summary = format!(
        "final {}\nresults {results_digest}\naccepted {accepted} rejected {rejected} ignored reports {}\ncheckpoints {:?}\ntally {:?}\njobs by state {:?}\nclock {}",
        digest(&run.state),
        run.ignored_reports,
        run.digests,
        run.tally,
        run.state.counters().jobs_by_state,
        run.state.clock(),
    );
    eprintln!("{summary}");
    for (at, expected) in CHECKPOINTS {
        assert_eq!(
            run.digests[&at], expected,
            "digest after {at} steps\n{summary}"
        );
    }
    assert_eq!(digest(&run.state), FINAL_DIGEST, "final digest\n{summary}");
    assert_eq!(results_digest, RESULTS_DIGEST, "results digest\n{summary}");
    assert_eq!((accepted, rejected), (ACCEPTED, REJECTED), "{summary}");
    assert_eq!(run.ignored_reports, IGNORED_REPORTS, "{summary}");
}

/// The history must exercise what it claims to, or its digests prove little.
#[test]
fn the_history_covers_every_command_both_accepted_and_rejected() {
    let run = run();
    for name in [
        "SubmitJob",
        "CancelJob",
        "RegisterTaskManager",
        "ExpireTaskManager",
        "UnregisterTaskManager",
        "ReportTaskState",
        "RestartTasks",
        "AllocateCheckpointId",
        "RecordCheckpoint",
        "PurgeFinishedJobs",
        "SetClusterConfig",
        "Batch",
    ] {
        let (accepted, _) = run.tally.get(name).copied().unwrap_or_default();
        assert!(accepted > 0, "{name} is never accepted: {:?}", run.tally);
    }
    for name in [
        "SubmitJob",
        "CancelJob",
        "RegisterTaskManager",
        "ExpireTaskManager",
        "UnregisterTaskManager",
        "RestartTasks",
        "AllocateCheckpointId",
        "RecordCheckpoint",
        "SetClusterConfig",
        "RestoreState",
        "Batch",
    ] {
        let (_, rejected) = run.tally.get(name).copied().unwrap_or_default();
        assert!(rejected > 0, "{name} is never rejected: {:?}", run.tally);
    }
    assert!(run.ignored_reports > 0, "no report was ignored");

    // Jobs pass through every state somewhere in the history.
    let mut seen = std::collections::BTreeSet::new();
    let mut state = DispatcherState::new(ClusterConfig::default());
    for cmd in &run.commands {
        let _ = state.apply(cmd.clone());
        seen.extend(state.jobs().map(|j| j.state));
    }
    for s in JobState::ALL {
        assert!(seen.contains(&s), "the history never reaches {s}: {seen:?}");
    }
    // The interesting outcomes happen, not just the commands.
    let seen = |what: &str, f: &dyn Fn(&Response) -> bool| {
        assert!(
            run.results.iter().flatten().any(f),
            "the history never {what}"
        );
    };
    seen("placed a restarted job", &|r| {
        matches!(
            r,
            Response::JobState {
                state: JobState::Running,
                ..
            }
        )
    });
    seen("answered a retried submission", &|r| {
        matches!(r, Response::Submitted { created: false, .. })
    });
    seen(
        "failed attempts of a restarted TaskManager",
        &|r| matches!(r, Response::Registered { failed_attempts, .. } if *failed_attempts > 0),
    );
    seen(
        "failed attempts of a lost TaskManager",
        &|r| matches!(r, Response::Removed { failed_attempts, .. } if *failed_attempts > 0),
    );
    seen(
        "purged a job",
        &|r| matches!(r, Response::Purged { jobs } if !jobs.is_empty()),
    );
}

#[test]
fn snapshots_of_the_history_restore_to_the_same_digest_and_replay_alike() {
    let run = run();
    let bytes = run.state.encode().expect("encode");
    let restored = DispatcherState::restore(&bytes).expect("restore");
    assert_eq!(digest(&restored), digest(&run.state));
    assert_eq!(restored.encode().expect("encode"), bytes);
    assert!(invariants::check(&restored).is_ok());

    // A backup restored into a new cluster through the log gives the same state.
    let mut fresh = DispatcherState::new(ClusterConfig::default());
    fresh
        .apply(Command::RestoreState {
            state: bytes.clone(),
        })
        .expect("a backup restores into an empty state");
    assert_eq!(digest(&fresh), digest(&run.state));

    // A replica that starts from the midway snapshot and applies the rest of the log
    // ends where the one that applied all of it did, with the same results.
    let (cut, snapshot) = &run.midway;
    let mut replica = DispatcherState::restore(snapshot).expect("restore midway");
    for (cmd, expected) in run.commands[*cut..].iter().zip(&run.results[*cut..]) {
        assert_eq!(&replica.apply(cmd.clone()), expected);
    }
    assert_eq!(digest(&replica), digest(&run.state));
}
