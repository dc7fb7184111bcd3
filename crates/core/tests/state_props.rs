//! Property tests of the replicated state machine: random command sequences, with the
//! state's invariants checked after every step.
//!
//! Operations are generated abstractly ("report the 3rd assigned task as FAILED") and
//! resolved against the current state, so most of them hit real tasks instead of being
//! rejected; the resolved commands are what both replicas of a pair are fed.

use std::collections::BTreeMap;

use dispatcher_core::state::invariants;
use dispatcher_core::state::*;
use proptest::prelude::*;

const CASES: u32 = 256;

#[derive(Clone, Debug)]
enum Op {
    Submit {
        job: u8,
        shape: u8,
        priority: i8,
    },
    Cancel {
        job: u8,
    },
    Register {
        tm: u8,
        incarnation: u8,
        slots: u8,
    },
    Expire {
        tm: u8,
        stale: bool,
    },
    Unregister {
        tm: u8,
    },
    ReportAssigned {
        pick: u16,
        state: TaskState,
        attempt_delta: i8,
    },
    ReportAny {
        job: u8,
        vertex: u8,
        subtask: u8,
        attempt: u8,
        state: TaskState,
    },
    RestartDue,
    Restart {
        job: u8,
    },
    Allocate {
        job: u8,
    },
    Record {
        job: u8,
        back: u8,
    },
    Purge,
    SetConfig {
        retained: u8,
        strategy: u8,
    },
    Advance {
        ms: u16,
        backwards: bool,
    },
    SetLimits {
        jobs: u8,
        bytes: u8,
        restarts: u8,
    },
}

fn task_state() -> impl Strategy<Value = TaskState> {
    prop_oneof![
        Just(TaskState::Scheduled),
        Just(TaskState::Deploying),
        Just(TaskState::Running),
        Just(TaskState::Running),
        Just(TaskState::Finished),
        Just(TaskState::Finished),
        Just(TaskState::Failed),
        Just(TaskState::Canceled),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6u8, 0..7u8, -2..3i8).prop_map(|(job, shape, priority)| Op::Submit { job, shape, priority }),
        1 => (0..6u8).prop_map(|job| Op::Cancel { job }),
        2 => (0..4u8, 0..2u8, 1..5u8).prop_map(|(tm, incarnation, slots)| Op::Register { tm, incarnation, slots }),
        1 => (0..4u8, any::<bool>()).prop_map(|(tm, stale)| Op::Expire { tm, stale }),
        1 => (0..4u8).prop_map(|tm| Op::Unregister { tm }),
        8 => (any::<u16>(), task_state(), prop_oneof![8 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)])
            .prop_map(|(pick, state, attempt_delta)| Op::ReportAssigned { pick, state, attempt_delta }),
        1 => (0..6u8, 0..3u8, 0..4u8, 0..4u8, task_state())
            .prop_map(|(job, vertex, subtask, attempt, state)| Op::ReportAny { job, vertex, subtask, attempt, state }),
        3 => Just(Op::RestartDue),
        1 => (0..6u8).prop_map(|job| Op::Restart { job }),
        1 => (0..6u8).prop_map(|job| Op::Allocate { job }),
        1 => (0..6u8, 0..3u8).prop_map(|(job, back)| Op::Record { job, back }),
        1 => Just(Op::Purge),
        1 => (0..5u8, 0..3u8).prop_map(|(retained, strategy)| Op::SetConfig { retained, strategy }),
        3 => (0..2000u16, prop_oneof![9 => Just(false), 1 => Just(true)])
            .prop_map(|(ms, backwards)| Op::Advance { ms, backwards }),
        1 => (1..5u8, 0..4u8, 0..3u8).prop_map(|(jobs, bytes, restarts)| Op::SetLimits { jobs, bytes, restarts }),
    ]
}

fn job_id(n: u8) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("uuid")
}

fn tm_id(n: u8) -> TaskManagerId {
    TaskManagerId(format!("tm-{n}"))
}

fn shape(job: u8, shape: u8, priority: i8) -> JobSpec {
    let (parallelism, restart, placement, selector): (&[u32], _, _, _) = match shape {
        0 => (&[1], RestartStrategy::NoRestart, None, false),
        1 => (
            &[2, 1],
            RestartStrategy::FixedDelay {
                attempts: 2,
                delay_ms: 300,
            },
            None,
            false,
        ),
        2 => (
            &[3],
            RestartStrategy::FixedDelay {
                attempts: 1,
                delay_ms: 0,
            },
            Some(PlacementStrategy::BinPack),
            false,
        ),
        3 => (
            &[1, 2],
            RestartStrategy::NoRestart,
            Some(PlacementStrategy::RoundRobin),
            true,
        ),
        4 => (
            &[4],
            RestartStrategy::FixedDelay {
                attempts: 3,
                delay_ms: 50,
            },
            Some(PlacementStrategy::Spread),
            false,
        ),
        // Invalid: a vertex with parallelism 0 (shape 5) and a cycle (shape 6).
        5 => (&[1, 0], RestartStrategy::NoRestart, None, false),
        _ => (&[1, 1, 1], RestartStrategy::NoRestart, None, false),
    };
    let cyclic = shape == 6;
    JobSpec {
        name: format!("job-{job}"),
        vertices: parallelism
            .iter()
            .enumerate()
            .map(|(i, p)| VertexSpec {
                name: format!("v{i}"),
                parallelism: *p,
                task: TaskSpec::Sleep { duration_ms: 10 },
                node_selector: if selector && i == 0 {
                    BTreeMap::from([("zone".to_string(), "a".to_string())])
                } else {
                    BTreeMap::new()
                },
            })
            .collect(),
        edges: (1..parallelism.len())
            .map(|i| EdgeSpec {
                from: format!("v{}", i - 1),
                to: format!("v{i}"),
            })
            .chain(cyclic.then(|| EdgeSpec {
                from: "v2".into(),
                to: "v0".into(),
            }))
            .collect(),
        priority: i32::from(priority),
        restart,
        placement,
        labels: BTreeMap::new(),
    }
}

/// Turns an abstract operation into a concrete command against the current state.
fn resolve(state: &DispatcherState, now: &mut Millis, op: &Op) -> Option<Command> {
    let now_v = *now;
    Some(match *op {
        Op::Submit {
            job,
            shape: s,
            priority,
        } => Command::SubmitJob {
            job_id: job_id(job),
            spec: shape(job, s, priority),
            now: now_v,
        },
        Op::Cancel { job } => Command::CancelJob {
            job_id: job_id(job),
            now: now_v,
        },
        Op::Register {
            tm,
            incarnation,
            slots,
        } => Command::RegisterTaskManager {
            spec: TaskManagerSpec {
                id: tm_id(tm),
                instance: format!("i{incarnation}"),
                address: format!("10.0.0.{tm}:6121"),
                slots: u32::from(slots),
                labels: if tm % 2 == 0 {
                    BTreeMap::from([("zone".to_string(), "a".to_string())])
                } else {
                    BTreeMap::new()
                },
            },
            now: now_v,
        },
        Op::Expire { tm, stale } => {
            let instance = state
                .task_manager(&tm_id(tm))
                .map(|t| t.spec.instance.clone())
                .unwrap_or_else(|| "i0".into());
            Command::ExpireTaskManager {
                id: tm_id(tm),
                instance: if stale {
                    format!("{instance}-old")
                } else {
                    instance
                },
                now: now_v,
            }
        }
        Op::Unregister { tm } => Command::UnregisterTaskManager {
            id: tm_id(tm),
            instance: state
                .task_manager(&tm_id(tm))
                .map(|t| t.spec.instance.clone())
                .unwrap_or_else(|| "i0".into()),
            now: now_v,
        },
        Op::ReportAssigned {
            pick,
            state: s,
            attempt_delta,
        } => {
            let held: Vec<(TaskManagerSpec, TaskRef, Attempt)> = state
                .task_managers()
                .flat_map(|tm| {
                    tm.slots
                        .iter()
                        .flatten()
                        .map(|(t, a)| (tm.spec.clone(), t.clone(), *a))
                        .collect::<Vec<_>>()
                })
                .collect();
            if held.is_empty() {
                return None;
            }
            let (tm, task, attempt) = held[usize::from(pick) % held.len()].clone();
            Command::ReportTaskState {
                task_manager: tm.id,
                instance: tm.instance,
                reports: vec![TaskReport {
                    job: task.job,
                    key: task.key,
                    attempt: attempt.saturating_add_signed(i32::from(attempt_delta)),
                    state: s,
                    exit_code: (s == TaskState::Failed).then_some(1),
                    reason: String::new(),
                }],
                now: now_v,
            }
        }
        Op::ReportAny {
            job,
            vertex,
            subtask,
            attempt,
            state: s,
        } => {
            let tm = state.task_managers().next()?;
            Command::ReportTaskState {
                task_manager: tm.spec.id.clone(),
                instance: tm.spec.instance.clone(),
                reports: vec![TaskReport {
                    job: job_id(job),
                    key: TaskKey {
                        vertex: u32::from(vertex),
                        subtask: u32::from(subtask),
                    },
                    attempt: u32::from(attempt),
                    state: s,
                    exit_code: None,
                    reason: "observed".into(),
                }],
                now: now_v,
            }
        }
        Op::RestartDue => {
            let due = state.restarts_due(now_v);
            Command::RestartTasks {
                job_id: due.first()?.clone(),
                now: now_v,
            }
        }
        Op::Restart { job } => Command::RestartTasks {
            job_id: job_id(job),
            now: now_v,
        },
        Op::Allocate { job } => Command::AllocateCheckpointId {
            job_id: job_id(job),
            now: now_v,
        },
        Op::Record { job, back } => {
            let next = state.job(&job_id(job)).map_or(1, |j| j.checkpoints.next_id);
            Command::RecordCheckpoint {
                job_id: job_id(job),
                checkpoint_id: next.saturating_sub(u64::from(back) + 1),
                location: format!("file:///ckpt/{job}"),
                now: now_v,
            }
        }
        Op::Purge => Command::PurgeFinishedJobs { now: now_v },
        Op::SetConfig { retained, strategy } => Command::SetClusterConfig {
            config: ClusterConfig {
                max_retained_checkpoints: u32::from(retained),
                default_placement: [
                    PlacementStrategy::Spread,
                    PlacementStrategy::BinPack,
                    PlacementStrategy::RoundRobin,
                ][usize::from(strategy)],
                finished_job_retention_ms: 5_000,
                ..ClusterConfig::default()
            },
        },
        Op::SetLimits {
            jobs,
            bytes,
            restarts,
        } => Command::SetResourceLimits {
            limits: ResourceLimits {
                max_jobs: u64::from(jobs),
                // One to a few of the generated specs (20-40 bytes each), or plenty.
                max_spec_bytes: [50, 100, 250, 1 << 30][usize::from(bytes)],
                min_restart_delay_ms: [0, 100, 0][usize::from(restarts)],
                max_restart_attempts: [5, 2, 1][usize::from(restarts)],
            },
            bootstrap: false,
        },
        Op::Advance { ms, backwards } => {
            if backwards {
                *now = now.saturating_sub(u64::from(ms));
            } else {
                *now += u64::from(ms);
            }
            return None;
        }
    })
}

fn digest(s: &DispatcherState) -> String {
    s.digest().expect("a state always encodes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Invariants hold after every command; a rejected command leaves the digest as it was.
    #[test]
    fn invariants_hold_and_rejections_change_nothing(ops in prop::collection::vec(op(), 1..120)) {
        let mut state = DispatcherState::new(ClusterConfig::default());
        let mut now = 1_000;
        for (step, op) in ops.iter().enumerate() {
            let Some(cmd) = resolve(&state, &mut now, op) else { continue };
            let before = digest(&state);
            let name = cmd.name();
            let result = state.apply(cmd);
            if let Err(rejection) = &result {
                prop_assert_eq!(digest(&state), before, "step {} {} rejected ({}) but changed the state", step, name, rejection);
            }
            if let Err(v) = invariants::check(&state) {
                prop_assert!(false, "step {} {} ({:?}) broke an invariant: {}", step, name, result, v);
            }
            // A job admitted under limits leaves the registry within them (ended jobs made
            // room if needed), even when the limits were lowered below what it held.
            if let (Ok(Response::Submitted { created: true, .. }), Some(limits)) = (&result, state.resource_limits()) {
                prop_assert!(state.job_count() <= limits.max_jobs, "step {}: {} jobs past {:?}", step, state.job_count(), limits);
                prop_assert!(state.counters().spec_bytes <= limits.max_spec_bytes, "step {}: {} bytes past {:?}", step, state.counters().spec_bytes, limits);
            }
        }
    }

    /// Two replicas fed the same commands agree, including one that starts from a snapshot
    /// taken midway; the snapshot restores to the same digest.
    #[test]
    fn replicas_and_restored_snapshots_agree(ops in prop::collection::vec(op(), 1..120), cut in 0usize..120) {
        let mut a = DispatcherState::new(ClusterConfig::default());
        let mut b = DispatcherState::new(ClusterConfig::default());
        let mut c: Option<DispatcherState> = None;
        let mut now = 1_000;
        for (step, op) in ops.iter().enumerate() {
            if step == cut {
                let restored = DispatcherState::restore(&a.encode().expect("encode")).expect("restore");
                prop_assert_eq!(digest(&restored), digest(&a));
                c = Some(restored);
            }
            let Some(cmd) = resolve(&a, &mut now, op) else { continue };
            let ra = a.apply(cmd.clone());
            let rb = b.apply(cmd.clone());
            prop_assert_eq!(&ra, &rb);
            if let Some(c) = c.as_mut() {
                prop_assert_eq!(&c.apply(cmd), &ra);
            }
        }
        prop_assert_eq!(digest(&a), digest(&b));
        if let Some(c) = &c {
            prop_assert_eq!(digest(c), digest(&a));
            prop_assert!(invariants::check(c).is_ok());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Every job whose record a command created, changed or removed is among the changed
    /// jobs the state reports: job watches look at nothing else, so a job missing there
    /// would be a change a watcher never sees.
    #[test]
    fn every_changed_job_is_reported(ops in prop::collection::vec(op(), 1..120)) {
        let mut state = DispatcherState::new(ClusterConfig::default());
        let mut now = 1_000;
        for (step, op) in ops.iter().enumerate() {
            let Some(cmd) = resolve(&state, &mut now, op) else { continue };
            let before: BTreeMap<JobId, Job> =
                state.jobs().map(|j| (j.id.clone(), j.clone())).collect();
            let name = cmd.name();
            let _ = state.apply(cmd);
            let changed = state.take_changed_jobs();
            let after: BTreeMap<JobId, Job> =
                state.jobs().map(|j| (j.id.clone(), j.clone())).collect();
            for id in before.keys().chain(after.keys()) {
                if before.get(id) != after.get(id) {
                    prop_assert!(changed.contains(id), "step {} {} changed job {} without reporting it", step, name, id);
                }
            }
        }
    }
}

/// The generator must reach the interesting states, or the properties above prove little.
#[test]
fn the_generator_reaches_running_restarting_and_terminal_jobs() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let mut seen = std::collections::BTreeSet::new();
    let (mut refused, mut made_room) = (std::collections::BTreeSet::new(), 0);
    for _ in 0..64 {
        let ops = prop::collection::vec(op(), 100..120)
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        let mut state = DispatcherState::new(ClusterConfig::default());
        let mut now = 1_000;
        for op in &ops {
            if let Some(cmd) = resolve(&state, &mut now, op) {
                let jobs_before = state.job_count();
                match state.apply(cmd) {
                    Err(Rejection::QuotaExceeded { limit, .. }) => {
                        refused.insert(limit);
                    }
                    Ok(Response::Submitted { created: true, .. })
                        if state.job_count() <= jobs_before =>
                    {
                        made_room += 1
                    }
                    _ => {}
                }
                seen.extend(state.jobs().map(|j| j.state));
            }
        }
    }
    for s in [
        JobState::Created,
        JobState::Running,
        JobState::Restarting,
        JobState::Finished,
        JobState::Failed,
        JobState::Canceled,
        JobState::Cancelling,
    ] {
        assert!(
            seen.contains(&s),
            "generated histories never reach {s}: {seen:?}"
        );
    }
    assert_eq!(
        refused,
        ["max_jobs".to_string(), "max_spec_bytes".to_string()].into(),
        "generated histories must hit both registry limits"
    );
    assert!(
        made_room > 0,
        "no generated submission ever removed an ended job"
    );
}
