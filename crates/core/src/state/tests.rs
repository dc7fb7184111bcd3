//! Scenario tests of `apply`: each test names the behaviour a user relies on.

use std::collections::BTreeMap;

use super::invariants;
use super::*;

pub(crate) fn job_id(n: u32) -> JobId {
    JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("valid uuid")
}

pub(crate) fn spec(name: &str, parallelism: &[u32], restart: RestartStrategy) -> JobSpec {
    JobSpec {
        name: name.into(),
        vertices: parallelism
            .iter()
            .enumerate()
            .map(|(i, p)| VertexSpec {
                name: format!("v{i}"),
                parallelism: *p,
                task: TaskSpec::Sleep { duration_ms: 1000 },
                node_selector: BTreeMap::new(),
            })
            .collect(),
        edges: (1..parallelism.len())
            .map(|i| EdgeSpec {
                from: format!("v{}", i - 1),
                to: format!("v{i}"),
            })
            .collect(),
        priority: 0,
        restart,
        placement: None,
        labels: BTreeMap::new(),
    }
}

pub(crate) fn tm(id: &str, slots: u32) -> TaskManagerSpec {
    TaskManagerSpec {
        id: id.into(),
        instance: format!("{id}-i1"),
        address: format!("{id}:6121"),
        slots,
        labels: BTreeMap::new(),
    }
}

/// A state plus the commands fed to it, checking invariants after every command.
struct World {
    state: DispatcherState,
    now: Millis,
}

impl World {
    fn new() -> Self {
        World {
            state: DispatcherState::new(ClusterConfig::default()),
            now: 1_000,
        }
    }

    fn apply(&mut self, c: Command) -> Result<Response, Rejection> {
        let before = self.state.digest().expect("digest");
        let r = self.state.apply(c);
        if r.is_err() {
            assert_eq!(
                self.state.digest().expect("digest"),
                before,
                "a rejection changed the state"
            );
        }
        if let Err(v) = invariants::check(&self.state) {
            panic!("invariant broken: {v}");
        }
        r
    }

    fn ok(&mut self, c: Command) -> Response {
        let name = c.name();
        self.apply(c)
            .unwrap_or_else(|e| panic!("{name} rejected: {e}"))
    }

    fn submit(&mut self, id: &JobId, s: JobSpec) -> Response {
        self.ok(Command::SubmitJob {
            job_id: id.clone(),
            spec: s,
            now: self.now,
        })
    }

    fn register(&mut self, t: TaskManagerSpec) -> Response {
        self.ok(Command::RegisterTaskManager {
            spec: t,
            now: self.now,
        })
    }

    fn job(&self, id: &JobId) -> &Job {
        self.state.job(id).expect("job exists")
    }

    /// Reports every task of the job that `tm` holds as `state`.
    fn report_all(
        &mut self,
        tm: &TaskManagerSpec,
        id: &JobId,
        state: TaskState,
    ) -> Vec<ReportOutcome> {
        let reports: Vec<TaskReport> = self
            .job(id)
            .tasks
            .iter()
            .filter(|t| t.slot.as_ref().is_some_and(|s| s.task_manager == tm.id))
            .map(|t| TaskReport {
                job: id.clone(),
                key: t.key,
                attempt: t.attempt,
                state,
                exit_code: None,
                reason: String::new(),
            })
            .collect();
        self.report(tm, reports)
    }

    fn report(&mut self, tm: &TaskManagerSpec, reports: Vec<TaskReport>) -> Vec<ReportOutcome> {
        match self.ok(Command::ReportTaskState {
            task_manager: tm.id.clone(),
            instance: tm.instance.clone(),
            reports,
            now: self.now,
        }) {
            Response::Reports { outcomes } => outcomes,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_job_waits_for_slots_then_is_placed_whole_when_a_task_manager_registers() {
    let mut w = World::new();
    let id = job_id(1);
    let r = w.submit(&id, spec("etl", &[2, 2], RestartStrategy::NoRestart));
    assert_eq!(
        r,
        Response::Submitted {
            job_id: id.clone(),
            created: true,
            state: JobState::Created
        }
    );
    let small = tm("tm-1", 3);
    w.register(small.clone());
    // 4 tasks do not fit in 3 slots: gang placement places none.
    assert_eq!(w.job(&id).state, JobState::Created);
    assert!(w.state.assignments(&small.id).is_empty());
    w.register(tm("tm-2", 3));
    assert_eq!(w.job(&id).state, JobState::Running);
    let placed: usize = ["tm-1", "tm-2"]
        .iter()
        .map(|t| w.state.assignments(&(*t).into()).len())
        .sum();
    assert_eq!(placed, 4);
    assert_eq!(w.state.counters().free_slots, 2);
}

#[test]
fn a_retried_submission_is_the_same_job_and_another_spec_under_its_id_is_refused() {
    let mut w = World::new();
    let id = job_id(1);
    w.submit(&id, spec("etl", &[1], RestartStrategy::NoRestart));
    let again = w.submit(&id, spec("etl", &[1], RestartStrategy::NoRestart));
    assert_eq!(
        again,
        Response::Submitted {
            job_id: id.clone(),
            created: false,
            state: JobState::Created
        }
    );
    let other = w.apply(Command::SubmitJob {
        job_id: id.clone(),
        spec: spec("etl", &[2], RestartStrategy::NoRestart),
        now: w.now,
    });
    assert_eq!(other, Err(Rejection::AlreadyExists { job_id: id }));
    assert_eq!(w.state.jobs().count(), 1);
}

#[test]
fn a_batch_applies_each_command_on_its_own_exactly_as_one_by_one() {
    let submit = |n: u32, s: JobSpec| Command::SubmitJob {
        job_id: job_id(n),
        spec: s,
        now: 2_000,
    };
    let mut cyclic = spec("bad", &[1, 1], RestartStrategy::NoRestart);
    cyclic.edges.push(EdgeSpec {
        from: "v1".into(),
        to: "v0".into(),
    });
    let commands = vec![
        Command::RegisterTaskManager {
            spec: tm("tm-1", 4),
            now: 2_000,
        },
        submit(1, spec("a", &[2], RestartStrategy::NoRestart)),
        submit(2, cyclic),
        submit(1, spec("a", &[3], RestartStrategy::NoRestart)),
        submit(3, spec("c", &[1], RestartStrategy::NoRestart)),
    ];
    let mut one_by_one = World::new();
    let expected: Vec<_> = commands
        .iter()
        .cloned()
        .map(|c| one_by_one.apply(c))
        .collect();
    let mut batched = World::new();
    let got = batched.ok(Command::Batch(commands));
    assert_eq!(got, Response::Batch(expected.clone()));
    // The rejected commands (a cycle, a different spec under an existing id) neither
    // stopped nor undid the others.
    assert!(expected[2].is_err() && expected[3].is_err());
    assert!(expected[1].is_ok() && expected[4].is_ok());
    assert_eq!(batched.state.jobs().count(), 2);
    assert_eq!(
        batched.state.digest().expect("digest"),
        one_by_one.state.digest().expect("digest")
    );

    // A batch inside a batch is refused whole, and changes nothing.
    let nested = Command::Batch(vec![
        submit(4, spec("d", &[1], RestartStrategy::NoRestart)),
        Command::Batch(vec![]),
    ]);
    assert!(matches!(
        batched.apply(nested),
        Err(Rejection::Invalid { field, .. }) if field == "batch[1]"
    ));
    assert_eq!(batched.state.jobs().count(), 2);
}

#[test]
fn an_invalid_spec_is_rejected_and_changes_nothing() {
    let mut w = World::new();
    let mut s = spec("etl", &[1, 1], RestartStrategy::NoRestart);
    s.edges.push(EdgeSpec {
        from: "v1".into(),
        to: "v0".into(),
    });
    let r = w.apply(Command::SubmitJob {
        job_id: job_id(1),
        spec: s,
        now: w.now,
    });
    assert!(
        matches!(r, Err(Rejection::Invalid { ref field, .. }) if field == "spec.edges"),
        "{r:?}"
    );
    assert_eq!(w.state.jobs().count(), 0);
}

#[test]
fn the_queue_places_higher_priority_first_then_in_submission_order_and_backfills() {
    let mut w = World::new();
    let t = tm("tm-1", 2);
    w.register(t.clone());
    let (hog, low, high, big, tiny) = (job_id(1), job_id(2), job_id(3), job_id(4), job_id(5));
    w.submit(&hog, spec("hog", &[2], RestartStrategy::NoRestart));
    w.submit(&low, spec("low", &[2], RestartStrategy::NoRestart));
    let mut h = spec("high", &[2], RestartStrategy::NoRestart);
    h.priority = 10;
    w.submit(&high, h);
    let mut b = spec("big", &[3], RestartStrategy::NoRestart);
    b.priority = 5;
    w.submit(&big, b);
    assert_eq!(
        w.state.queued_jobs().cloned().collect::<Vec<_>>(),
        vec![high.clone(), big.clone(), low.clone()]
    );
    w.report_all(&t, &hog, TaskState::Finished);
    assert_eq!(w.job(&hog).state, JobState::Finished);
    // High priority won the two slots, though `low` was submitted before it.
    assert_eq!(w.job(&high).state, JobState::Running);
    assert_eq!(w.job(&low).state, JobState::Created);
    w.report_all(&t, &high, TaskState::Finished);
    // `big` cannot fit in 2 slots; `low` behind it is placed rather than left idle.
    assert_eq!(w.job(&big).state, JobState::Created);
    assert_eq!(w.job(&low).state, JobState::Running);
    w.submit(&tiny, spec("tiny", &[1], RestartStrategy::NoRestart));
    assert_eq!(w.job(&tiny).state, JobState::Created);
}

#[test]
fn a_job_runs_to_finished_and_gives_its_slots_back() {
    let mut w = World::new();
    let t = tm("tm-1", 4);
    w.register(t.clone());
    let id = job_id(1);
    w.submit(&id, spec("etl", &[1, 2], RestartStrategy::NoRestart));
    let out = w.report_all(&t, &id, TaskState::Deploying);
    assert!(out.iter().all(|o| *o == ReportOutcome::Applied));
    w.report_all(&t, &id, TaskState::Running);
    assert!(w
        .job(&id)
        .tasks
        .iter()
        .all(|t| t.state == TaskState::Running));
    w.report_all(&t, &id, TaskState::Finished);
    let job = w.job(&id);
    assert_eq!(job.state, JobState::Finished);
    assert!(job.finished_at.is_some());
    assert_eq!(w.state.counters().free_slots, 4);
    // The TaskManager's retried heartbeat repeats FINISHED: accepted, no change.
    let digest = w.state.digest().expect("digest");
    let again = w.report(
        &t,
        vec![TaskReport {
            job: id.clone(),
            key: TaskKey {
                vertex: 0,
                subtask: 0,
            },
            attempt: 1,
            state: TaskState::Finished,
            exit_code: None,
            reason: String::new(),
        }],
    );
    assert_eq!(again, vec![ReportOutcome::Applied]);
    assert_eq!(w.state.digest().expect("digest"), digest);
}

#[test]
fn a_failed_task_restarts_the_job_after_the_delay_and_fails_it_when_attempts_run_out() {
    let mut w = World::new();
    let t = tm("tm-1", 4);
    w.register(t.clone());
    let id = job_id(1);
    w.submit(
        &id,
        spec(
            "etl",
            &[2],
            RestartStrategy::FixedDelay {
                attempts: 1,
                delay_ms: 500,
            },
        ),
    );
    w.report_all(&t, &id, TaskState::Running);
    let fail = |attempt| TaskReport {
        job: id.clone(),
        key: TaskKey {
            vertex: 0,
            subtask: 0,
        },
        attempt,
        state: TaskState::Failed,
        exit_code: Some(3),
        reason: String::new(),
    };
    w.report(&t, vec![fail(1)]);
    let job = w.job(&id);
    assert_eq!(job.state, JobState::Restarting);
    assert_eq!(job.restarts, 1);
    assert_eq!(job.restart_due_at, Some(w.now + 500));
    assert!(job.failure.contains("exit code 3"), "{}", job.failure);
    // The surviving subtask must be stopped: it is no longer assigned.
    assert!(w.state.assignments(&t.id).is_empty());
    w.now += 600;
    // Due, but the other attempt still holds its slot.
    assert!(w.state.restarts_due(w.now).is_empty());
    let early = w.apply(Command::RestartTasks {
        job_id: id.clone(),
        now: w.now,
    });
    assert!(
        matches!(early, Err(Rejection::RestartNotDue { active: 1, .. })),
        "{early:?}"
    );
    w.report_all(&t, &id, TaskState::Canceled);
    assert_eq!(w.state.restarts_due(w.now), vec![id.clone()]);
    w.ok(Command::RestartTasks {
        job_id: id.clone(),
        now: w.now,
    });
    let job = w.job(&id);
    assert_eq!(job.state, JobState::Running);
    assert!(job
        .tasks
        .iter()
        .all(|t| t.attempt == 2 && t.state == TaskState::Deploying));
    // A late report about attempt 1 is ignored as stale.
    let stale = w.report(&t, vec![fail(1)]);
    assert!(matches!(
        stale[0],
        ReportOutcome::Ignored(Rejection::StaleAttempt { current: 2, .. })
    ));
    assert_eq!(w.job(&id).state, JobState::Running);
    // Attempts exhausted: the next failure fails the job once the rest stop.
    w.report(&t, vec![fail(2)]);
    assert_eq!(w.job(&id).state, JobState::Failing);
    w.report_all(&t, &id, TaskState::Canceled);
    let job = w.job(&id);
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.active_tasks(), 0);
}

#[test]
fn an_expired_task_manager_fails_its_attempts_and_the_restart_lands_elsewhere() {
    let mut w = World::new();
    let (a, b) = (tm("tm-a", 2), tm("tm-b", 2));
    w.register(a.clone());
    let id = job_id(1);
    w.submit(
        &id,
        spec(
            "etl",
            &[2],
            RestartStrategy::FixedDelay {
                attempts: 3,
                delay_ms: 0,
            },
        ),
    );
    assert_eq!(w.state.assignments(&a.id).len(), 2);
    w.register(b.clone());
    // Expiring an older instance is refused: the registration may be fresh.
    let stale = w.apply(Command::ExpireTaskManager {
        id: a.id.clone(),
        instance: "tm-a-i0".into(),
        now: w.now,
    });
    assert!(matches!(stale, Err(Rejection::UnknownTaskManager { .. })));
    let r = w.ok(Command::ExpireTaskManager {
        id: a.id.clone(),
        instance: a.instance.clone(),
        now: w.now,
    });
    assert_eq!(
        r,
        Response::Removed {
            id: a.id.clone(),
            failed_attempts: 2
        }
    );
    assert!(w.state.task_manager(&a.id).is_none());
    assert_eq!(w.job(&id).state, JobState::Restarting);
    assert_eq!(w.state.restarts_due(w.now), vec![id.clone()]);
    w.ok(Command::RestartTasks {
        job_id: id.clone(),
        now: w.now,
    });
    assert_eq!(w.state.assignments(&b.id).len(), 2);
    assert_eq!(w.job(&id).state, JobState::Running);
}

#[test]
fn a_restarted_task_manager_loses_its_old_attempts_and_a_retried_registration_is_a_no_op() {
    let mut w = World::new();
    let a = tm("tm-a", 2);
    w.register(a.clone());
    let retried = w.register(a.clone());
    assert_eq!(
        retried,
        Response::Registered {
            id: a.id.clone(),
            created: false,
            failed_attempts: 0
        }
    );
    let id = job_id(1);
    w.submit(&id, spec("etl", &[2], RestartStrategy::NoRestart));
    let reborn = TaskManagerSpec {
        instance: "tm-a-i2".into(),
        ..a.clone()
    };
    let r = w.register(reborn.clone());
    assert_eq!(
        r,
        Response::Registered {
            id: a.id.clone(),
            created: true,
            failed_attempts: 2
        }
    );
    assert_eq!(w.job(&id).state, JobState::Failed);
    // The old instance can no longer report.
    let old = w.apply(Command::ReportTaskState {
        task_manager: a.id.clone(),
        instance: a.instance.clone(),
        reports: vec![],
        now: w.now,
    });
    assert!(matches!(old, Err(Rejection::UnknownTaskManager { .. })));
}

#[test]
fn cancel_stops_running_tasks_and_ends_when_they_report() {
    let mut w = World::new();
    let t = tm("tm-1", 2);
    w.register(t.clone());
    let (run, wait) = (job_id(1), job_id(2));
    w.submit(&run, spec("run", &[2], RestartStrategy::NoRestart));
    w.submit(&wait, spec("wait", &[2], RestartStrategy::NoRestart));
    // A queued job is canceled at once.
    let r = w.ok(Command::CancelJob {
        job_id: wait.clone(),
        now: w.now,
    });
    assert_eq!(
        r,
        Response::JobState {
            job_id: wait.clone(),
            state: JobState::Canceled
        }
    );
    assert!(w
        .job(&wait)
        .tasks
        .iter()
        .all(|t| t.state == TaskState::Canceled));
    w.report_all(&t, &run, TaskState::Running);
    let r = w.ok(Command::CancelJob {
        job_id: run.clone(),
        now: w.now,
    });
    assert_eq!(
        r,
        Response::JobState {
            job_id: run.clone(),
            state: JobState::Cancelling
        }
    );
    assert!(
        w.state.assignments(&t.id).is_empty(),
        "cancelled tasks must be killed"
    );
    // Cancelling twice is fine; the slots stay held until the processes are gone.
    w.ok(Command::CancelJob {
        job_id: run.clone(),
        now: w.now,
    });
    assert_eq!(w.state.counters().free_slots, 0);
    w.report_all(&t, &run, TaskState::Canceled);
    assert_eq!(w.job(&run).state, JobState::Canceled);
    assert_eq!(w.state.counters().free_slots, 2);
    let unknown = w.apply(Command::CancelJob {
        job_id: job_id(9),
        now: w.now,
    });
    assert!(matches!(unknown, Err(Rejection::UnknownJob { .. })));
}

#[test]
fn a_finished_job_cannot_be_canceled_and_is_purged_after_its_retention() {
    let mut w = World::new();
    let t = tm("tm-1", 1);
    w.register(t.clone());
    let id = job_id(1);
    w.submit(&id, spec("etl", &[1], RestartStrategy::NoRestart));
    w.report_all(&t, &id, TaskState::Finished);
    let r = w.apply(Command::CancelJob {
        job_id: id.clone(),
        now: w.now,
    });
    assert!(matches!(
        r,
        Err(Rejection::IllegalJobTransition {
            from: JobState::Finished,
            ..
        })
    ));
    let retention = w.state.config().finished_job_retention_ms;
    assert!(!w.state.purge_due(w.now + retention - 1));
    let r = w.ok(Command::PurgeFinishedJobs {
        now: w.now + retention - 1,
    });
    assert_eq!(r, Response::Purged { jobs: vec![] });
    let r = w.ok(Command::PurgeFinishedJobs {
        now: w.now + retention,
    });
    assert_eq!(
        r,
        Response::Purged {
            jobs: vec![id.clone()]
        }
    );
    assert!(w.state.job(&id).is_none());
}

#[test]
fn illegal_and_misaddressed_reports_are_ignored_with_a_reason() {
    let mut w = World::new();
    let (a, b) = (tm("tm-a", 1), tm("tm-b", 1));
    w.register(a.clone());
    w.register(b.clone());
    let id = job_id(1);
    w.submit(&id, spec("etl", &[1], RestartStrategy::NoRestart));
    let holder = w.job(&id).tasks[0]
        .slot
        .clone()
        .expect("placed")
        .task_manager;
    let other = if holder == a.id { b.clone() } else { a.clone() };
    let holder = if holder == a.id { a.clone() } else { b.clone() };
    let report = |state| TaskReport {
        job: id.clone(),
        key: TaskKey {
            vertex: 0,
            subtask: 0,
        },
        attempt: 1,
        state,
        exit_code: None,
        reason: String::new(),
    };
    let out = w.report(&other, vec![report(TaskState::Running)]);
    assert!(matches!(
        out[0],
        ReportOutcome::Ignored(Rejection::NotAssigned { .. })
    ));
    w.report(&holder, vec![report(TaskState::Running)]);
    let out = w.report(&holder, vec![report(TaskState::Deploying)]);
    assert!(matches!(
        out[0],
        ReportOutcome::Ignored(Rejection::IllegalTaskTransition { .. })
    ));
    let mut bad = report(TaskState::Running);
    bad.key.subtask = 7;
    let out = w.report(&holder, vec![bad]);
    assert!(matches!(
        out[0],
        ReportOutcome::Ignored(Rejection::Invalid { .. })
    ));
}

#[test]
fn checkpoint_ids_only_grow_and_the_completed_list_is_bounded() {
    let mut w = World::new();
    w.register(tm("tm-1", 1));
    let id = job_id(1);
    w.submit(&id, spec("etl", &[1], RestartStrategy::NoRestart));
    let mut ids = vec![];
    for _ in 0..5 {
        match w.ok(Command::AllocateCheckpointId {
            job_id: id.clone(),
            now: w.now,
        }) {
            Response::CheckpointId { id } => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    let record = |n: u64| Command::RecordCheckpoint {
        job_id: id.clone(),
        checkpoint_id: n,
        location: format!("s3://ckpt/{n}"),
        now: 2_000,
    };
    for n in [1, 2, 4, 5] {
        w.ok(record(n));
    }
    assert!(matches!(
        w.apply(record(3)),
        Err(Rejection::CheckpointOutOfOrder { .. })
    ));
    assert!(matches!(
        w.apply(record(6)),
        Err(Rejection::CheckpointOutOfOrder { .. })
    ));
    let kept: Vec<u64> = w
        .job(&id)
        .checkpoints
        .completed
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(kept, vec![2, 4, 5]);
}

#[test]
fn strategies_spread_pack_and_honour_node_selectors() {
    let mut w = World::new();
    let mut gpu = tm("tm-gpu", 4);
    gpu.labels.insert("gpu".into(), "a100".into());
    w.register(tm("tm-a", 4));
    w.register(tm("tm-b", 4));
    w.register(gpu.clone());
    let spread = job_id(1);
    w.submit(&spread, spec("spread", &[3], RestartStrategy::NoRestart));
    let hosts: Vec<_> = w
        .job(&spread)
        .tasks
        .iter()
        .filter_map(|t| t.last_task_manager.clone())
        .collect();
    assert_eq!(hosts, vec!["tm-a".into(), "tm-b".into(), "tm-gpu".into()]);
    let pack = job_id(2);
    let mut p = spec("pack", &[3], RestartStrategy::NoRestart);
    p.placement = Some(PlacementStrategy::BinPack);
    w.submit(&pack, p);
    let hosts: Vec<_> = w
        .job(&pack)
        .tasks
        .iter()
        .filter_map(|t| t.last_task_manager.clone())
        .collect();
    assert_eq!(hosts, vec!["tm-a".into(), "tm-a".into(), "tm-a".into()]);
    let ml = job_id(3);
    let mut m = spec("ml", &[3], RestartStrategy::NoRestart);
    m.vertices[0]
        .node_selector
        .insert("gpu".into(), "a100".into());
    w.submit(&ml, m);
    assert!(w
        .job(&ml)
        .tasks
        .iter()
        .all(|t| t.last_task_manager == Some(gpu.id.clone())));
    let more = job_id(4);
    let mut m = spec("ml2", &[1], RestartStrategy::NoRestart);
    m.vertices[0]
        .node_selector
        .insert("gpu".into(), "a100".into());
    w.submit(&more, m);
    // The GPU TaskManager is full: the job waits although other TaskManagers have room.
    assert_eq!(w.job(&more).state, JobState::Created);
}

#[test]
fn time_never_runs_backwards_under_a_leader_with_a_slow_clock() {
    let mut w = World::new();
    w.submit(&job_id(1), spec("a", &[1], RestartStrategy::NoRestart));
    let t1 = w.state.clock();
    w.ok(Command::SubmitJob {
        job_id: job_id(2),
        spec: spec("b", &[1], RestartStrategy::NoRestart),
        now: t1 - 500,
    });
    assert_eq!(w.state.clock(), t1);
    assert_eq!(w.job(&job_id(2)).submitted_at, t1);
}

#[test]
fn a_restored_snapshot_has_the_same_digest_and_behaves_the_same() {
    let mut w = World::new();
    let t = tm("tm-1", 3);
    w.register(t.clone());
    w.submit(&job_id(1), spec("a", &[2], RestartStrategy::NoRestart));
    w.submit(&job_id(2), spec("b", &[2], RestartStrategy::NoRestart));
    let bytes = w.state.encode().expect("encode");
    let mut restored = DispatcherState::restore(&bytes).expect("restore");
    assert_eq!(restored.digest().ok(), w.state.digest().ok());
    invariants::check(&restored).expect("restored state is consistent");
    let next = Command::ReportTaskState {
        task_manager: t.id.clone(),
        instance: t.instance.clone(),
        reports: vec![TaskReport {
            job: job_id(1),
            key: TaskKey {
                vertex: 0,
                subtask: 0,
            },
            attempt: 1,
            state: TaskState::Failed,
            exit_code: Some(1),
            reason: String::new(),
        }],
        now: 5_000,
    };
    w.ok(next.clone());
    restored.apply(next).expect("applies on the restored state");
    assert_eq!(restored.digest().ok(), w.state.digest().ok());
}

#[test]
fn a_backup_restores_only_into_an_empty_state() {
    let mut w = World::new();
    w.register(tm("tm-1", 2));
    w.submit(&job_id(1), spec("a", &[1], RestartStrategy::NoRestart));
    let backup = w.state.encode().expect("encode");
    let mut fresh = World::new();
    let r = fresh.ok(Command::RestoreState {
        state: backup.clone(),
    });
    assert_eq!(
        r,
        Response::Restored {
            jobs: 1,
            task_managers: 1
        }
    );
    assert_eq!(fresh.state.digest().ok(), w.state.digest().ok());
    let again = w.apply(Command::RestoreState { state: backup });
    assert!(matches!(again, Err(Rejection::Invalid { ref field, .. }) if field == "state"));
    let garbage = World::new().apply(Command::RestoreState {
        state: vec![1, 2, 3],
    });
    assert!(matches!(garbage, Err(Rejection::Invalid { .. })));
}

/// Regression: a job that leaves RUNNING before its TaskManager started an attempt must
/// tell that TaskManager to stop the attempt (it is no longer an assignment), or the
/// attempt would hold its slot, and the job stay CANCELLING, forever.
#[test]
fn attempts_of_a_winding_down_job_are_listed_to_stop_not_to_run() {
    let mut w = World::new();
    let t = tm("tm-1", 2);
    w.register(t.clone());
    let id = job_id(1);
    w.submit(&id, spec("etl", &[2], RestartStrategy::NoRestart));
    assert_eq!(w.state.assignments(&t.id).len(), 2);
    assert!(w.state.stopping(&t.id).is_empty());
    w.ok(Command::CancelJob {
        job_id: id.clone(),
        now: w.now,
    });
    assert!(w.state.assignments(&t.id).is_empty());
    let stop = w.state.stopping(&t.id);
    assert_eq!(stop.len(), 2);
    // The TaskManager never started them: it reports them CANCELED, and the job ends.
    w.report_all(&t, &id, TaskState::Canceled);
    assert_eq!(w.job(&id).state, JobState::Canceled);
    assert!(w.state.stopping(&t.id).is_empty());
}

/// The pending reason of a job as users read it; the listing query must agree with the
/// one-job query.
fn pending(w: &World, id: &JobId) -> Option<String> {
    let one = w.state.pending_reason(id);
    assert_eq!(
        w.state.pending_reasons().of(id),
        one,
        "listing and status agree"
    );
    one.map(|r| r.to_string())
}

fn with_selector(mut s: JobSpec, vertex: usize, labels: &[(&str, &str)]) -> JobSpec {
    for (k, v) in labels {
        s.vertices[vertex]
            .node_selector
            .insert((*k).into(), (*v).into());
    }
    s
}

fn labelled(id: &str, slots: u32, labels: &[(&str, &str)]) -> TaskManagerSpec {
    let mut t = tm(id, slots);
    for (k, v) in labels {
        t.labels.insert((*k).into(), (*v).into());
    }
    t
}

#[test]
fn a_job_whose_node_selector_no_task_manager_matches_says_so_until_one_joins() {
    let mut w = World::new();
    let id = job_id(1);
    let gpu = with_selector(
        spec("train", &[2], RestartStrategy::NoRestart),
        0,
        &[("gpu", "true")],
    );
    w.submit(&id, gpu);
    assert_eq!(
        pending(&w, &id).as_deref(),
        Some("needs 2 slots; no TaskManager is registered")
    );
    // A TaskManager carrying only some of the selected labels does not match.
    w.register(labelled("tm-1", 4, &[("rack", "r1")]));
    w.register(labelled("tm-2", 4, &[("gpu", "false")]));
    assert_eq!(
        pending(&w, &id).as_deref(),
        Some("vertex 'v0' needs 2 slots with gpu=true; 0 TaskManagers match")
    );
    w.register(labelled("tm-3", 1, &[("gpu", "true")]));
    assert_eq!(
        pending(&w, &id).as_deref(),
        Some("vertex 'v0' needs 2 slots with gpu=true; 1 TaskManager matches, with 1 slot")
    );
    w.register(labelled("tm-4", 1, &[("gpu", "true")]));
    assert_eq!(w.job(&id).state, JobState::Running);
    assert_eq!(pending(&w, &id), None, "a placed job waits for nothing");
}

#[test]
fn vertices_sharing_a_selector_are_counted_together_and_a_job_bigger_than_the_cluster_says_so() {
    let mut w = World::new();
    w.register(labelled("tm-gpu", 3, &[("gpu", "true")]));
    w.register(tm("tm-cpu", 4));
    // Each vertex alone fits on tm-gpu; together they do not.
    let both = job_id(1);
    let mut s = spec("pair", &[2, 2, 1], RestartStrategy::NoRestart);
    s = with_selector(s, 0, &[("gpu", "true")]);
    s = with_selector(s, 1, &[("gpu", "true")]);
    w.submit(&both, s);
    assert_eq!(
        pending(&w, &both).as_deref(),
        Some(
            "vertices 'v0' and 'v1' need 4 slots with gpu=true; \
             1 TaskManager matches, with 3 slots"
        )
    );
    let big = job_id(2);
    w.submit(&big, spec("big", &[8], RestartStrategy::NoRestart));
    assert_eq!(
        pending(&w, &big).as_deref(),
        Some("needs 8 slots; the cluster has 7 on 2 TaskManagers")
    );
}

#[test]
fn a_job_waiting_for_free_slots_counts_them_and_the_jobs_tried_before_it() {
    let mut w = World::new();
    let tms: Vec<_> = (1..=3).map(|i| tm(&format!("tm-{i}"), 4)).collect();
    for t in &tms {
        w.register(t.clone());
    }
    let hog = job_id(1);
    let mut h = spec("hog", &[9], RestartStrategy::NoRestart);
    h.placement = Some(PlacementStrategy::BinPack);
    w.submit(&hog, h);
    assert_eq!(w.job(&hog).state, JobState::Running);
    // Queue: `low` (priority -1, first), `mine`, then `high` (priority 5, last).
    let (low, mine, high) = (job_id(2), job_id(3), job_id(4));
    let mut l = spec("low", &[8], RestartStrategy::NoRestart);
    l.priority = -1;
    w.submit(&low, l);
    w.submit(&mine, spec("mine", &[8], RestartStrategy::NoRestart));
    assert_eq!(
        pending(&w, &mine).as_deref(),
        Some("needs 8 free slots; 3 free on 1 TaskManager (12 in the cluster)")
    );
    let mut hi = spec("high", &[8], RestartStrategy::NoRestart);
    hi.priority = 5;
    w.submit(&high, hi);
    // A job of lower priority submitted earlier is not ahead; a higher one submitted
    // later is.
    assert_eq!(
        pending(&w, &mine).as_deref(),
        Some(
            "needs 8 free slots; 3 free on 1 TaskManager (12 in the cluster); \
             1 queued job of higher or equal priority is tried first"
        )
    );
    assert_eq!(
        pending(&w, &low)
            .as_deref()
            .map(|r| r.ends_with("2 queued jobs of higher or equal priority are tried first")),
        Some(true)
    );
    // What the reason promised: the job counted ahead takes the freed slots first.
    for t in &tms {
        w.report_all(t, &hog, TaskState::Finished);
    }
    assert_eq!(w.job(&high).state, JobState::Running);
    assert_eq!(w.job(&mine).state, JobState::Created);
    assert_eq!(pending(&w, &high), None);
    assert_eq!(
        pending(&w, &mine).as_deref(),
        Some("needs 8 free slots; 4 free on 3 TaskManagers (12 in the cluster)")
    );
}

#[test]
fn a_full_selector_is_named_although_other_task_managers_have_room() {
    let mut w = World::new();
    w.register(labelled("tm-gpu", 2, &[("gpu", "true")]));
    w.register(tm("tm-cpu", 4));
    let first = job_id(1);
    w.submit(
        &first,
        with_selector(
            spec("a", &[2], RestartStrategy::NoRestart),
            0,
            &[("gpu", "true")],
        ),
    );
    assert_eq!(w.job(&first).state, JobState::Running);
    let second = job_id(2);
    w.submit(
        &second,
        with_selector(
            spec("b", &[1], RestartStrategy::NoRestart),
            0,
            &[("gpu", "true")],
        ),
    );
    assert_eq!(
        pending(&w, &second).as_deref(),
        Some(
            "vertex 'v0' needs 1 free slot with gpu=true; \
             0 free on 0 of 1 matching TaskManager (2 slots in all)"
        )
    );
}

#[test]
fn a_job_that_fits_by_count_but_not_vertex_by_vertex_says_so() {
    let mut w = World::new();
    // Spread gives the unconstrained vertex the lowest id among the emptiest, the only
    // GPU TaskManager, and the GPU vertex finds no slot left.
    w.register(labelled("a-gpu", 1, &[("gpu", "true")]));
    w.register(tm("b-cpu", 1));
    let id = job_id(1);
    w.submit(
        &id,
        with_selector(
            spec("mixed", &[1, 1], RestartStrategy::NoRestart),
            1,
            &[("gpu", "true")],
        ),
    );
    assert_eq!(w.job(&id).state, JobState::Created);
    assert_eq!(
        pending(&w, &id).as_deref(),
        Some(
            "needs 2 free slots and 2 are free, but not every vertex finds one matching \
             its node selector after earlier vertices take theirs"
        )
    );
}

#[test]
fn only_jobs_in_the_placement_queue_have_a_pending_reason() {
    let mut w = World::new();
    let t = tm("tm-1", 2);
    w.register(t.clone());
    let (running, waiting) = (job_id(1), job_id(2));
    w.submit(
        &running,
        spec(
            "r",
            &[2],
            RestartStrategy::FixedDelay {
                attempts: 1,
                delay_ms: 500,
            },
        ),
    );
    w.submit(&waiting, spec("w", &[1], RestartStrategy::NoRestart));
    assert_eq!(pending(&w, &running), None);
    assert!(pending(&w, &waiting).is_some());
    assert_eq!(pending(&w, &job_id(9)), None, "unknown job");
    // Waiting for its restart delay is not waiting for slots.
    w.report_all(&t, &running, TaskState::Failed);
    assert_eq!(w.job(&running).state, JobState::Restarting);
    assert_eq!(pending(&w, &running), None);
    w.ok(Command::CancelJob {
        job_id: waiting.clone(),
        now: w.now,
    });
    assert_eq!(
        pending(&w, &waiting),
        None,
        "a canceled job waits for nothing"
    );
}
