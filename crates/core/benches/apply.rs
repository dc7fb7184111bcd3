//! Apply throughput of the state machine on a large cluster: 10,000 TaskManagers with 8
//! slots each and 10,000 running jobs of 7 tasks (70,000 of 80,000 slots taken, so the
//! cluster is mostly full and every TaskManager has one free slot).
//!
//! Each measured operation is undone outside the timing (cancel, report the tasks
//! canceled, purge), so every iteration sees the same large state.
//!
//! Run with `make bench` (or `cargo bench --bench apply`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dispatcher_core::state::*;

const TASK_MANAGERS: u32 = 10_000;
const SLOTS: u32 = 8;
const JOBS: u32 = 10_000;
const TASKS_PER_JOB: u32 = 7;

fn job_id(n: u64) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("uuid")
}

fn spec(tasks: u32, placement: Option<PlacementStrategy>) -> JobSpec {
    JobSpec {
        name: "bench".into(),
        vertices: vec![
            VertexSpec {
                name: "source".into(),
                parallelism: 1,
                task: TaskSpec::Sleep {
                    duration_ms: 60_000,
                },
                node_selector: BTreeMap::new(),
            },
            VertexSpec {
                name: "map".into(),
                parallelism: tasks - 1,
                task: TaskSpec::Command {
                    argv: vec!["/usr/bin/env".into(), "true".into()],
                    env: BTreeMap::from([("RUST_LOG".into(), "info".into())]),
                },
                node_selector: BTreeMap::new(),
            },
        ],
        edges: vec![EdgeSpec {
            from: "source".into(),
            to: "map".into(),
        }],
        priority: 0,
        restart: RestartStrategy::FixedDelay {
            attempts: 3,
            delay_ms: 1000,
        },
        placement,
        labels: BTreeMap::new(),
    }
}

fn big_state() -> DispatcherState {
    let config = ClusterConfig {
        finished_job_retention_ms: 0,
        max_parallelism: 20_000,
        max_tasks_per_job: 20_000,
        ..ClusterConfig::default()
    };
    let mut s = DispatcherState::new(config);
    for i in 0..TASK_MANAGERS {
        s.apply(Command::RegisterTaskManager {
            spec: TaskManagerSpec {
                id: TaskManagerId(format!("tm-{i:05}")),
                instance: "i1".into(),
                address: format!("10.0.{}.{}:6121", i / 256, i % 256),
                slots: SLOTS,
                labels: BTreeMap::from([("rack".into(), format!("r{}", i % 40))]),
            },
            now: 1,
        })
        .expect("register");
    }
    for j in 0..JOBS {
        s.apply(Command::SubmitJob {
            job_id: job_id(u64::from(j)),
            spec: spec(TASKS_PER_JOB, None),
            now: 2,
        })
        .expect("submit");
    }
    assert_eq!(
        s.counters().free_slots,
        u64::from(TASK_MANAGERS * (SLOTS - TASKS_PER_JOB))
    );
    s
}

/// Cancels a placed job and reports its tasks canceled, so its slots come back, then
/// purges it.
fn undo(s: &mut DispatcherState, id: &JobId) {
    s.apply(Command::CancelJob {
        job_id: id.clone(),
        now: 3,
    })
    .expect("cancel");
    let job = s.job(id).expect("job").clone();
    let mut by_tm: BTreeMap<TaskManagerId, Vec<TaskReport>> = BTreeMap::new();
    for t in &job.tasks {
        if let Some(slot) = &t.slot {
            by_tm
                .entry(slot.task_manager.clone())
                .or_default()
                .push(TaskReport {
                    job: id.clone(),
                    key: t.key,
                    attempt: t.attempt,
                    state: TaskState::Canceled,
                    exit_code: None,
                    reason: String::new(),
                });
        }
    }
    for (tm, reports) in by_tm {
        s.apply(Command::ReportTaskState {
            task_manager: tm,
            instance: "i1".into(),
            reports,
            now: 3,
        })
        .expect("report");
    }
    s.apply(Command::PurgeFinishedJobs { now: 3 })
        .expect("purge");
}

fn bench_apply(c: &mut Criterion) {
    let mut state = big_state();
    let mut next = u64::from(JOBS) + 1;
    let mut group = c.benchmark_group("apply");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(5));

    let cases: [(&str, u32, Option<PlacementStrategy>); 5] = [
        ("submit_and_place_4_tasks", 4, None),
        (
            "place_100_tasks_spread",
            100,
            Some(PlacementStrategy::Spread),
        ),
        (
            "place_100_tasks_bin_pack",
            100,
            Some(PlacementStrategy::BinPack),
        ),
        (
            "place_100_tasks_round_robin",
            100,
            Some(PlacementStrategy::RoundRobin),
        ),
        (
            "place_1000_tasks_spread",
            1000,
            Some(PlacementStrategy::Spread),
        ),
    ];
    for (name, tasks, placement) in cases {
        let job_spec = spec(tasks, placement);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let id = job_id(next);
                    next += 1;
                    let cmd = Command::SubmitJob {
                        job_id: id.clone(),
                        spec: job_spec.clone(),
                        now: 3,
                    };
                    let start = Instant::now();
                    let r = state.apply(black_box(cmd));
                    spent += start.elapsed();
                    assert!(matches!(
                        r,
                        Ok(Response::Submitted {
                            state: JobState::Running,
                            ..
                        })
                    ));
                    undo(&mut state, &id);
                }
                spent
            })
        });
    }

    // Submission of a 100-task job whose node selector no TaskManager matches: it is
    // validated, queued and given up on at the first label lookup.
    let mut huge = spec(100, None);
    huge.vertices[1]
        .node_selector
        .insert("gpu".into(), "none".into());
    let mut queued = Vec::new();
    group.bench_function("submit_queued_unplaceable", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let id = job_id(next);
                next += 1;
                let cmd = Command::SubmitJob {
                    job_id: id.clone(),
                    spec: huge.clone(),
                    now: 3,
                };
                let start = Instant::now();
                let r = state.apply(black_box(cmd));
                spent += start.elapsed();
                assert!(r.is_ok());
                queued.push(id);
            }
            spent
        })
    });
    group.finish();
    for id in queued {
        let _ = state.apply(Command::CancelJob { job_id: id, now: 4 });
    }
    let _ = state.apply(Command::PurgeFinishedJobs { now: 4 });
    assert_eq!(
        state.jobs().count(),
        JOBS as usize,
        "only the running jobs remain"
    );

    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.bench_function("encode_and_digest_10k_jobs", |b| {
        b.iter(|| black_box(state.digest().expect("digest")))
    });
    let bytes = state.encode().expect("encode");
    println!("snapshot of the large state: {} bytes", bytes.len());
    g.bench_function("restore_10k_jobs", |b| {
        b.iter(|| black_box(DispatcherState::restore(&bytes).expect("restore")))
    });
    g.finish();
}

criterion_group!(benches, bench_apply);
criterion_main!(benches);
