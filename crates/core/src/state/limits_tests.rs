//! Resource limits: what a submission past a bound gets, what makes room again, and
//! that limits and the sizes they count survive snapshots of every layout.

use super::invariants;
use super::tests::{job_id, spec, tm};
use super::*;

const NOW: Millis = 1_000;

fn state_with(limits: ResourceLimits) -> DispatcherState {
    let mut s = DispatcherState::new(ClusterConfig::default());
    let r = s.apply(Command::SetResourceLimits {
        limits,
        bootstrap: false,
    });
    assert_eq!(r, Ok(Response::LimitsSet { applied: true }));
    s
}

fn limits(max_jobs: u64, max_spec_bytes: u64) -> ResourceLimits {
    ResourceLimits {
        max_jobs,
        max_spec_bytes,
        ..ResourceLimits::default()
    }
}

/// Applies a command; a rejection must leave the state byte for byte as it was.
fn apply(s: &mut DispatcherState, c: Command) -> Result<Response, Rejection> {
    let before = s.encode().expect("encode");
    let r = s.apply(c);
    if r.is_err() {
        assert_eq!(
            s.encode().expect("encode"),
            before,
            "a rejection changed the state"
        );
    }
    if let Err(v) = invariants::check(s) {
        panic!("invariant broken: {v}");
    }
    r
}

fn submit(s: &mut DispatcherState, n: u32, job: JobSpec) -> Result<Response, Rejection> {
    apply(
        s,
        Command::SubmitJob {
            job_id: job_id(n),
            spec: job,
            now: NOW + u64::from(n),
        },
    )
}

fn plain(name: &str) -> JobSpec {
    spec(name, &[1], RestartStrategy::NoRestart)
}

fn cancel(s: &mut DispatcherState, n: u32, now: Millis) {
    let r = apply(
        s,
        Command::CancelJob {
            job_id: job_id(n),
            now,
        },
    );
    assert!(
        matches!(
            r,
            Ok(Response::JobState {
                state: JobState::Canceled,
                ..
            })
        ),
        "{r:?}"
    );
}

fn fixed(attempts: u32, delay_ms: u64) -> JobSpec {
    spec(
        "r",
        &[1],
        RestartStrategy::FixedDelay { attempts, delay_ms },
    )
}

#[test]
fn a_state_without_limits_admits_what_it_always_did_and_a_bootstrap_sets_them_once() {
    let mut s = DispatcherState::new(ClusterConfig::default());
    assert_eq!(s.resource_limits(), None);
    // What clusters accepted before limits existed replays the same way.
    assert!(submit(&mut s, 1, fixed(u32::MAX, 0)).is_ok());

    let first = limits(10, 1 << 20);
    let r = apply(
        &mut s,
        Command::SetResourceLimits {
            limits: first.clone(),
            bootstrap: true,
        },
    );
    assert_eq!(r, Ok(Response::LimitsSet { applied: true }));
    // A later leader's bootstrap with other defaults changes nothing...
    let r = apply(
        &mut s,
        Command::SetResourceLimits {
            limits: ResourceLimits::default(),
            bootstrap: true,
        },
    );
    assert_eq!(r, Ok(Response::LimitsSet { applied: false }));
    assert_eq!(s.resource_limits(), Some(&first));
    // ...an explicit change does.
    let r = apply(
        &mut s,
        Command::SetResourceLimits {
            limits: ResourceLimits::default(),
            bootstrap: false,
        },
    );
    assert_eq!(r, Ok(Response::LimitsSet { applied: true }));
    assert_eq!(s.resource_limits(), Some(&ResourceLimits::default()));
    // Limits apply to submissions: the job admitted before keeps its strategy.
    let job = s.job(&job_id(1)).expect("still there");
    assert_eq!(
        job.spec.restart,
        RestartStrategy::FixedDelay {
            attempts: u32::MAX,
            delay_ms: 0
        }
    );
}

#[test]
fn limits_that_would_refuse_everything_are_refused() {
    let mut s = DispatcherState::new(ClusterConfig::default());
    for (bad, field) in [
        (limits(0, 1), "limits.max_jobs"),
        (limits(1, 0), "limits.max_spec_bytes"),
        (
            ResourceLimits {
                min_restart_delay_ms: 24 * 60 * 60 * 1000 + 1,
                ..ResourceLimits::default()
            },
            "limits.min_restart_delay_ms",
        ),
    ] {
        match apply(
            &mut s,
            Command::SetResourceLimits {
                limits: bad,
                bootstrap: true,
            },
        ) {
            Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert_eq!(s.resource_limits(), None);
}

#[test]
fn a_restart_strategy_outside_the_limits_is_refused_naming_the_field() {
    let mut s = state_with(ResourceLimits::default());
    let refused = |s: &mut DispatcherState, n, job| match submit(s, n, job) {
        Err(Rejection::Invalid { field, reason }) => (field, reason),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // The restart loop that was measured: four billion restarts, no delay.
    let (field, reason) = refused(&mut s, 1, fixed(u32::MAX, 0));
    assert_eq!(field, "spec.restart_strategy.fixed_delay.attempts");
    assert_eq!(
        reason,
        "must be at most 1000 (cluster limit max_restart_attempts)"
    );
    let (field, reason) = refused(&mut s, 2, fixed(3, 999));
    assert_eq!(field, "spec.restart_strategy.fixed_delay.delay_ms");
    assert_eq!(
        reason,
        "must be at least 1000 (cluster limit min_restart_delay_ms)"
    );
    let e = submit(&mut s, 2, fixed(3, 0)).expect_err("no delay");
    assert_eq!(
        e.to_string(),
        "invalid spec.restart_strategy.fixed_delay.delay_ms: must be at least 1000 (cluster limit min_restart_delay_ms)"
    );
    assert_eq!(s.job_count(), 0);

    // The bounds themselves are allowed, and a delay never waited is not checked.
    assert!(submit(&mut s, 3, fixed(1_000, 1_000)).is_ok());
    assert!(submit(&mut s, 4, fixed(0, 0)).is_ok());
    assert!(submit(&mut s, 5, plain("none")).is_ok());
}

#[test]
fn the_job_limit_refuses_a_job_past_it_with_the_bound_and_the_use_and_changes_nothing() {
    let mut s = state_with(limits(2, 1 << 30));
    assert!(submit(&mut s, 1, plain("a")).is_ok());
    assert!(submit(&mut s, 2, plain("b")).is_ok());
    let e = submit(&mut s, 3, plain("c")).expect_err("past max_jobs");
    assert_eq!(
        e,
        Rejection::QuotaExceeded {
            limit: "max_jobs".into(),
            max: 2,
            unit: "jobs".into(),
            in_use: 2,
            needs: 1,
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("max_jobs = 2 jobs"), "{msg}");
    assert!(msg.contains("use 2"), "{msg}");
    assert!(s.job(&job_id(3)).is_none());
    // A retried submission of a job that exists is not a new job: still answered.
    assert_eq!(
        submit(&mut s, 2, plain("b")),
        Ok(Response::Submitted {
            job_id: job_id(2),
            created: false,
            state: JobState::Created,
        })
    );
    // The pre-check the gRPC layer runs says the same as apply.
    assert_eq!(s.check_new_job(&plain("c")), Err(e));
}

#[test]
fn the_spec_byte_limit_counts_encoded_specs_and_refuses_past_it() {
    let one = DispatcherState::new(ClusterConfig::default())
        .check_new_job(&plain("a"))
        .expect("a valid spec");
    assert!(one > 0);
    // Room for two such specs and a half.
    let mut s = state_with(limits(100, 2 * one + one / 2));
    assert!(submit(&mut s, 1, plain("a")).is_ok());
    assert!(submit(&mut s, 2, plain("b")).is_ok());
    assert_eq!(s.counters().spec_bytes, 2 * one);
    assert_eq!(s.job(&job_id(1)).map(|j| j.spec_bytes), Some(one));
    let e = submit(&mut s, 3, plain("c")).expect_err("past max_spec_bytes");
    assert_eq!(
        e,
        Rejection::QuotaExceeded {
            limit: "max_spec_bytes".into(),
            max: 2 * one + one / 2,
            unit: "bytes".into(),
            in_use: 2 * one,
            needs: one,
        }
    );
    // One spec bigger than the whole limit is refused on an empty registry too.
    let mut s = state_with(limits(100, one - 1));
    assert!(matches!(
        submit(&mut s, 1, plain("a")),
        Err(Rejection::QuotaExceeded { limit, in_use: 0, .. }) if limit == "max_spec_bytes"
    ));
    assert_eq!(s.job_count(), 0);
}

#[test]
fn an_ended_job_makes_room_the_oldest_ended_first() {
    let mut s = state_with(limits(3, 1 << 30));
    for n in 1..=3 {
        assert!(submit(&mut s, n, plain("j")).is_ok());
    }
    assert!(submit(&mut s, 4, plain("j")).is_err());
    // Job 2 ends first, then job 1.
    cancel(&mut s, 2, 2_000);
    cancel(&mut s, 1, 3_000);
    assert_eq!(s.active_job_count(), 1);
    assert!(submit(&mut s, 4, plain("j")).is_ok());
    assert!(s.job(&job_id(2)).is_none(), "the oldest ended job goes");
    assert!(s.job(&job_id(1)).is_some(), "only as many as needed go");
    assert!(submit(&mut s, 5, plain("j")).is_ok());
    assert!(s.job(&job_id(1)).is_none());
    assert_eq!(s.job_count(), 3);
    // Only jobs that have not ended can fill the registry.
    assert!(matches!(
        submit(&mut s, 6, plain("j")),
        Err(Rejection::QuotaExceeded { in_use: 3, .. })
    ));
}

#[test]
fn a_finished_or_failed_job_makes_room_too() {
    let mut s = state_with(limits(1, 1 << 30));
    let t = tm("tm-1", 1);
    assert!(apply(
        &mut s,
        Command::RegisterTaskManager {
            spec: t.clone(),
            now: NOW
        }
    )
    .is_ok());
    assert!(submit(&mut s, 1, plain("a")).is_ok());
    let report = |state| Command::ReportTaskState {
        task_manager: t.id.clone(),
        instance: t.instance.clone(),
        reports: vec![TaskReport {
            job: job_id(1),
            key: TaskKey {
                vertex: 0,
                subtask: 0,
            },
            attempt: 1,
            state,
            exit_code: Some(0),
            reason: String::new(),
        }],
        now: 2_000,
    };
    assert!(apply(&mut s, report(TaskState::Running)).is_ok());
    assert!(submit(&mut s, 2, plain("b")).is_err(), "job 1 still runs");
    assert!(apply(&mut s, report(TaskState::Finished)).is_ok());
    assert_eq!(s.job(&job_id(1)).map(|j| j.state), Some(JobState::Finished));
    assert_eq!(s.counters().active_spec_bytes, 0);
    assert!(submit(&mut s, 2, plain("b")).is_ok());
    assert!(s.job(&job_id(1)).is_none());
}

#[test]
fn purging_ended_jobs_returns_their_bytes() {
    let mut s = state_with(limits(10, 1 << 30));
    assert!(submit(&mut s, 1, plain("a")).is_ok());
    assert!(submit(&mut s, 2, plain("b")).is_ok());
    let one = s.job(&job_id(1)).map_or(0, |j| j.spec_bytes);
    cancel(&mut s, 1, 2_000);
    assert_eq!(s.counters().spec_bytes, 2 * one);
    assert_eq!(s.counters().active_spec_bytes, one);
    let retention = s.config().finished_job_retention_ms;
    let r = apply(
        &mut s,
        Command::PurgeFinishedJobs {
            now: 2_000 + retention,
        },
    );
    assert_eq!(
        r,
        Ok(Response::Purged {
            jobs: vec![job_id(1)]
        })
    );
    assert_eq!(s.counters().spec_bytes, one);
    assert_eq!(s.job_count(), 1);
}

#[test]
fn limits_only_move_the_bar_for_new_jobs() {
    let mut s = state_with(limits(10, 1 << 30));
    for n in 1..=3 {
        assert!(submit(&mut s, n, plain("j")).is_ok());
    }
    let r = apply(
        &mut s,
        Command::SetResourceLimits {
            limits: limits(2, 1 << 30),
            bootstrap: false,
        },
    );
    assert!(r.is_ok());
    assert_eq!(s.job_count(), 3, "nothing is removed for a lower limit");
    assert!(matches!(
        submit(&mut s, 4, plain("j")),
        Err(Rejection::QuotaExceeded {
            max: 2,
            in_use: 3,
            ..
        })
    ));
    cancel(&mut s, 1, 2_000);
    cancel(&mut s, 2, 2_001);
    // Two ended jobs make room for one new job within the lower limit.
    assert!(submit(&mut s, 4, plain("j")).is_ok());
    assert_eq!(s.job_count(), 2);
}

#[test]
fn a_restore_recomputes_the_sizes_and_decides_like_the_original() {
    let mut s = state_with(limits(4, 1 << 30));
    for n in 1..=4 {
        assert!(submit(
            &mut s,
            n,
            spec(&format!("job-{n}"), &[n], RestartStrategy::NoRestart)
        )
        .is_ok());
    }
    cancel(&mut s, 2, 2_000);
    let restored = DispatcherState::restore(&s.encode().expect("encode")).expect("restore");
    assert_eq!(restored.resource_limits(), s.resource_limits());
    assert_eq!(restored.counters(), s.counters());
    for n in 1..=4 {
        let sizes = |st: &DispatcherState| st.job(&job_id(n)).map(|j| j.spec_bytes);
        assert_eq!(sizes(&restored), sizes(&s));
        assert!(sizes(&s).is_some_and(|b| b > 0));
    }
    assert!(invariants::check(&restored).is_ok());
    let mut restored = restored;
    let next = Command::SubmitJob {
        job_id: job_id(9),
        spec: plain("next"),
        now: 3_000,
    };
    assert_eq!(restored.apply(next.clone()), s.apply(next));
    assert_eq!(restored.digest().ok(), s.digest().ok());
}

#[test]
fn a_state_that_never_set_limits_keeps_the_older_layout() {
    let mut s = DispatcherState::new(ClusterConfig::default());
    assert!(submit(&mut s, 1, plain("a")).is_ok());
    let v1 = s.encode().expect("encode");
    let mut with_limits = s.clone();
    assert!(with_limits
        .apply(Command::SetResourceLimits {
            limits: ResourceLimits::default(),
            bootstrap: true,
        })
        .is_ok());
    let v3 = with_limits.encode().expect("encode");
    assert!(v3.len() > v1.len());
    assert_eq!(&v3[..v1.len()], &v1[..], "later layouts only append");
    // Bytes after the last known block are refused, not ignored.
    let mut longer = v3.clone();
    longer.push(0);
    assert!(DispatcherState::restore(&longer).is_err());
}

#[test]
fn a_backup_without_limits_restored_into_a_new_cluster_keeps_the_new_limits() {
    let mut old = DispatcherState::new(ClusterConfig::default());
    assert!(submit(&mut old, 1, fixed(u32::MAX, 0)).is_ok());
    let backup = old.encode().expect("encode");
    let mut fresh = state_with(ResourceLimits::default());
    let r = apply(&mut fresh, Command::RestoreState { state: backup });
    assert!(matches!(r, Ok(Response::Restored { jobs: 1, .. })), "{r:?}");
    assert_eq!(fresh.resource_limits(), Some(&ResourceLimits::default()));
    assert!(fresh.job(&job_id(1)).is_some_and(|j| j.spec_bytes > 0));
}
