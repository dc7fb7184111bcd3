//! The reconcile core driven event by event: each test names a behaviour a TaskManager
//! relies on.

use super::*;

const NOW: u64 = 1_000;

fn key(job: &str, subtask: u32, attempt: u32) -> AttemptKey {
    AttemptKey {
        job: job.into(),
        vertex: "map".into(),
        subtask,
        attempt,
    }
}

fn task(kind: pb::task::Kind) -> Option<pb::Task> {
    Some(pb::Task { kind: Some(kind) })
}

fn sleep_task() -> Option<pb::Task> {
    task(pb::task::Kind::Sleep(pb::SleepTask {
        duration_ms: 60_000,
    }))
}

/// An assignment of `k` to `slot`, running a built-in sleep.
fn assign(k: &AttemptKey, slot: u32) -> pb::TaskAssignment {
    pb::TaskAssignment {
        job_id: k.job.clone(),
        vertex: k.vertex.clone(),
        subtask: k.subtask,
        attempt: k.attempt,
        slot,
        task: sleep_task(),
    }
}

/// A heartbeat answer acknowledging every pending report.
fn answer(
    r: &Reconciler,
    assignments: Vec<pb::TaskAssignment>,
    stop: Vec<pb::TaskAssignment>,
) -> Event {
    Event::Heartbeat {
        acked: r.pending().len(),
        assignments,
        stop,
    }
}

fn exited(k: &AttemptKey, outcome: Outcome) -> Event {
    Event::Exited {
        key: k.clone(),
        outcome,
    }
}

/// A registered TaskManager running `assigned`, all of whose reports were acknowledged.
fn serving(assigned: &[pb::TaskAssignment]) -> Reconciler {
    let mut r = Reconciler::new();
    r.step(
        NOW,
        Event::Registered {
            assignments: assigned.to_vec(),
        },
    );
    let ack = answer(&r, assigned.to_vec(), vec![]);
    assert!(r.step(NOW, ack).is_empty());
    assert!(r.pending().is_empty());
    r
}

fn started(actions: &[Action]) -> Vec<AttemptKey> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Start { key, .. } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

fn cancelled(actions: &[Action]) -> Vec<(AttemptKey, CancelReason)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Cancel { key, why } => Some((key.clone(), *why)),
            _ => None,
        })
        .collect()
}

fn reported(r: &Reconciler) -> Vec<(AttemptKey, pb::TaskState)> {
    r.pending()
        .iter()
        .map(|u| {
            (
                key(&u.job_id, u.subtask, u.attempt),
                pb::TaskState::try_from(u.state).unwrap_or(pb::TaskState::Unspecified),
            )
        })
        .collect()
}

#[test]
fn registration_starts_exactly_the_assigned_attempts_in_their_slots() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = Reconciler::new();
    let actions = r.step(
        NOW,
        Event::Registered {
            assignments: vec![assign(&a, 0), assign(&b, 3)],
        },
    );
    assert_eq!(
        actions,
        vec![
            Action::Start {
                key: a.clone(),
                slot: 0,
                work: Work::Sleep(Duration::from_secs(60)),
            },
            Action::Start {
                key: b.clone(),
                slot: 3,
                work: Work::Sleep(Duration::from_secs(60)),
            },
        ]
    );
    assert_eq!(r.running().cloned().collect::<Vec<_>>(), vec![a, b]);
    assert_eq!(r.phase(), Phase::Serving);
}

#[test]
fn a_heartbeat_answer_starts_what_is_newly_assigned() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[]);
    let ev = answer(&r, vec![assign(&a, 2)], vec![]);
    assert_eq!(started(&r.step(NOW, ev)), vec![a]);
}

#[test]
fn a_start_is_reported_deploying_then_running_with_its_attempt_and_time() {
    let a = key("j1", 4, 7);
    let mut r = Reconciler::new();
    r.step(
        42,
        Event::Registered {
            assignments: vec![assign(&a, 0)],
        },
    );
    assert_eq!(
        reported(&r),
        vec![
            (a.clone(), pb::TaskState::Deploying),
            (a, pb::TaskState::Running)
        ]
    );
    assert!(r
        .pending()
        .iter()
        .all(|u| u.observed_at_ms == 42 && u.vertex == "map"));
}

#[test]
fn assignments_start_with_the_work_their_task_names() {
    let cases = [
        (
            task(pb::task::Kind::Command(pb::CommandTask {
                argv: vec!["echo".into(), "hi".into()],
                env: [("K".to_string(), "V".to_string())].into(),
            })),
            Work::Command {
                argv: vec!["echo".into(), "hi".into()],
                env: [("K".to_string(), "V".to_string())].into(),
            },
        ),
        (
            task(pb::task::Kind::Sleep(pb::SleepTask { duration_ms: 250 })),
            Work::Sleep(Duration::from_millis(250)),
        ),
        (
            task(pb::task::Kind::Fail(pb::FailTask {
                after_ms: 10,
                exit_code: 3,
            })),
            Work::Fail(Duration::from_millis(10), 3),
        ),
    ];
    for (task, want) in cases {
        let a = key("j1", 0, 1);
        let mut r = Reconciler::new();
        let actions = r.step(
            NOW,
            Event::Registered {
                assignments: vec![pb::TaskAssignment {
                    task,
                    ..assign(&a, 1)
                }],
            },
        );
        assert_eq!(
            actions,
            vec![Action::Start {
                key: a,
                slot: 1,
                work: want
            }]
        );
    }
}

#[test]
fn an_identical_answer_starts_nothing_twice() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    for _ in 0..3 {
        let ev = answer(&r, vec![assign(&a, 0)], vec![]);
        assert!(r.step(NOW, ev).is_empty());
    }
    assert!(r.pending().is_empty(), "no transition, nothing to report");
}

#[test]
fn an_attempt_no_longer_assigned_is_cancelled_once() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    let ev = answer(&r, vec![assign(&b, 1)], vec![]);
    assert_eq!(
        r.step(NOW, ev),
        vec![Action::Cancel {
            key: a.clone(),
            why: CancelReason::NotAssigned
        }]
    );
    let ev = answer(&r, vec![assign(&b, 1)], vec![]);
    assert!(r.step(NOW, ev).is_empty(), "cancel is not repeated");
    // It still counts as running (and is not started again) until it exits.
    assert!(r.running().any(|k| *k == a));
}

#[test]
fn a_newer_attempt_replaces_the_older_one() {
    let (old, new) = (key("j1", 0, 1), key("j1", 0, 2));
    let mut r = serving(&[assign(&old, 0)]);
    let ev = answer(&r, vec![assign(&new, 0)], vec![]);
    assert_eq!(
        r.step(NOW, ev),
        vec![
            Action::Cancel {
                key: old.clone(),
                why: CancelReason::NotAssigned
            },
            Action::Start {
                key: new.clone(),
                slot: 0,
                work: Work::Sleep(Duration::from_secs(60)),
            },
        ]
    );
    // The old attempt's end is reported with its own attempt number.
    r.step(NOW, exited(&old, Outcome::Canceled));
    assert_eq!(
        reported(&r).last(),
        Some(&(old.clone(), pb::TaskState::Canceled))
    );
    assert_eq!(r.running().cloned().collect::<Vec<_>>(), vec![new]);
}

#[test]
fn exits_are_reported_with_their_state_code_and_reason() {
    let cases = [
        (Outcome::Finished, pb::TaskState::Finished, Some(0), ""),
        (
            Outcome::Failed {
                exit_code: Some(3),
                reason: "exited with code 3".into(),
            },
            pb::TaskState::Failed,
            Some(3),
            "exited with code 3",
        ),
        (
            Outcome::Failed {
                exit_code: None,
                reason: "killed by signal 9".into(),
            },
            pb::TaskState::Failed,
            None,
            "killed by signal 9",
        ),
        (
            Outcome::Canceled,
            pb::TaskState::Canceled,
            None,
            "canceled by the TaskManager on the leader's request",
        ),
    ];
    for (outcome, state, code, reason) in cases {
        let a = key("j1", 0, 5);
        let mut r = serving(&[assign(&a, 2)]);
        let actions = r.step(77, exited(&a, outcome.clone()));
        assert_eq!(
            actions,
            vec![Action::Ended {
                key: a.clone(),
                slot: 2,
                outcome
            }]
        );
        let [u] = r.pending() else {
            panic!("one report expected, got {:?}", r.pending());
        };
        assert_eq!(
            (u.state, u.exit_code, u.failure_reason.as_str(), u.attempt),
            (state as i32, code, reason, 5)
        );
        assert_eq!(u.observed_at_ms, 77);
        assert_eq!(r.running().count(), 0);
    }
}

#[test]
fn an_exit_is_reported_once_and_unknown_exits_are_ignored() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    assert!(r.step(NOW, exited(&a, Outcome::Finished)).is_empty());
    assert!(r
        .step(NOW, exited(&key("other", 0, 1), Outcome::Finished))
        .is_empty());
    assert_eq!(reported(&r), vec![(a, pb::TaskState::Finished)]);
}

#[test]
fn an_ended_attempt_still_assigned_is_not_started_again() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(
        NOW,
        exited(
            &a,
            Outcome::Failed {
                exit_code: Some(1),
                reason: "exited with code 1".into(),
            },
        ),
    );
    // The leader has not applied the report yet and still assigns the attempt.
    for _ in 0..2 {
        let ev = answer(&r, vec![assign(&a, 0)], vec![]);
        assert!(started(&r.step(NOW, ev)).is_empty());
    }
}

#[test]
fn reports_stay_pending_until_a_heartbeat_carrying_them_is_answered() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    for _ in 0..3 {
        assert!(r.step(NOW, Event::HeartbeatFailed).is_empty());
        assert_eq!(reported(&r), vec![(a.clone(), pb::TaskState::Finished)]);
    }
    let ev = answer(&r, vec![], vec![]);
    r.step(NOW, ev);
    assert!(r.pending().is_empty());
}

#[test]
fn a_report_made_after_the_heartbeat_was_sent_survives_its_answer() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    let sent = r.pending().len();
    r.step(NOW, exited(&b, Outcome::Finished));
    r.step(
        NOW,
        Event::Heartbeat {
            acked: sent,
            assignments: vec![assign(&a, 0), assign(&b, 1)],
            stop: vec![],
        },
    );
    assert_eq!(reported(&r), vec![(b, pb::TaskState::Finished)]);
}

#[test]
fn an_acknowledgement_of_more_than_is_pending_drops_only_what_is_pending() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(
        NOW,
        Event::Heartbeat {
            acked: 10,
            assignments: vec![assign(&a, 0)],
            stop: vec![],
        },
    );
    assert!(r.pending().is_empty());
    assert!(r.running().any(|k| *k == a));
}

#[test]
fn a_failed_heartbeat_leaves_every_task_running() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    assert!(r.step(NOW, Event::HeartbeatFailed).is_empty());
    assert_eq!(r.running().cloned().collect::<Vec<_>>(), vec![a]);
    assert_eq!(r.phase(), Phase::Serving);
}

#[test]
fn stop_cancels_a_running_attempt_once_and_its_exit_is_reported_canceled() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    // A job winding down: the attempt may still be listed as assigned too.
    let ev = answer(&r, vec![assign(&a, 0)], vec![assign(&a, 0)]);
    assert_eq!(
        cancelled(&r.step(NOW, ev)),
        vec![(a.clone(), CancelReason::Stopped)]
    );
    let ev = answer(&r, vec![], vec![assign(&a, 0)]);
    assert!(r.step(NOW, ev).is_empty(), "cancel is not repeated");
    r.step(NOW, exited(&a, Outcome::Canceled));
    assert_eq!(reported(&r), vec![(a, pb::TaskState::Canceled)]);
}

#[test]
fn stop_of_an_attempt_never_started_reports_it_canceled_once() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[]);
    let ev = answer(&r, vec![], vec![assign(&a, 0)]);
    assert!(r.step(NOW, ev).is_empty(), "nothing to start or cancel");
    assert_eq!(reported(&r), vec![(a.clone(), pb::TaskState::Canceled)]);
    assert_eq!(r.pending()[0].failure_reason, "stopped before it started");
    // The leader has not applied it yet and lists it again, with the report in flight.
    r.step(
        NOW,
        Event::Heartbeat {
            acked: 0,
            assignments: vec![assign(&a, 0)],
            stop: vec![assign(&a, 0)],
        },
    );
    assert_eq!(reported(&r).len(), 1, "reported once");
    assert_eq!(r.running().count(), 0, "a stopped attempt never starts");
}

#[test]
fn stop_of_an_attempt_that_already_ended_does_nothing() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    let ev = answer(&r, vec![], vec![assign(&a, 0)]);
    assert!(r.step(NOW, ev).is_empty());
    assert!(r.pending().is_empty(), "no CANCELED after FINISHED");
}

#[test]
fn an_assignment_without_a_task_is_reported_failed_and_never_started() {
    let a = key("j1", 0, 1);
    let bare = pb::TaskAssignment {
        task: None,
        ..assign(&a, 0)
    };
    let mut r = Reconciler::new();
    let actions = r.step(
        NOW,
        Event::Registered {
            assignments: vec![bare.clone()],
        },
    );
    assert!(actions.is_empty());
    assert_eq!(reported(&r), vec![(a, pb::TaskState::Failed)]);
    assert_eq!(r.pending()[0].failure_reason, "assignment without a task");
    let ev = Event::Heartbeat {
        acked: 0,
        assignments: vec![bare],
        stop: vec![],
    };
    assert!(r.step(NOW, ev).is_empty());
    assert_eq!(r.pending().len(), 1, "reported once");
}

#[test]
fn ended_attempts_are_forgotten_once_acknowledged_and_no_longer_listed() {
    let (a, b, c) = (key("j1", 0, 1), key("j1", 1, 1), key("j1", 2, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1), assign(&c, 2)]);
    for k in [&a, &b, &c] {
        r.step(NOW, exited(k, Outcome::Finished));
    }
    // a is still assigned, b still to stop, c listed nowhere.
    let ev = answer(&r, vec![assign(&a, 0)], vec![assign(&b, 1)]);
    r.step(NOW, ev);
    assert_eq!(
        r.ended.iter().cloned().collect::<Vec<_>>(),
        vec![a.clone(), b.clone()]
    );
    let ev = answer(&r, vec![], vec![]);
    r.step(NOW, ev);
    assert!(r.ended.is_empty());
}

#[test]
fn ended_attempts_are_remembered_while_a_report_is_pending() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    let sent = r.pending().len();
    r.step(NOW, exited(&b, Outcome::Finished));
    // The leader answers the heartbeat that carried a's report only, no longer
    // listing either attempt: b's report is still unacknowledged.
    r.step(
        NOW,
        Event::Heartbeat {
            acked: sent,
            assignments: vec![],
            stop: vec![],
        },
    );
    assert!(r.ended.contains(&a) && r.ended.contains(&b));
    // So a stale answer that still assigns b does not run it twice.
    let ev = Event::Heartbeat {
        acked: 0,
        assignments: vec![assign(&b, 1)],
        stop: vec![],
    };
    assert!(started(&r.step(NOW, ev)).is_empty());
}

#[test]
fn a_lost_registration_kills_everything_before_registering_afresh() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    r.step(NOW, exited(&a, Outcome::Finished)); // not yet reported
    let actions = r.step(NOW, Event::NotRegistered);
    assert_eq!(
        actions,
        vec![Action::Cancel {
            key: b.clone(),
            why: CancelReason::RegistrationLost
        }]
    );
    assert_eq!(r.phase(), Phase::Resetting);
    let actions = r.step(NOW, exited(&b, Outcome::Canceled));
    assert_eq!(
        actions,
        vec![
            Action::Ended {
                key: b,
                slot: 1,
                outcome: Outcome::Canceled
            },
            Action::Reregister
        ]
    );
    assert!(
        r.pending().is_empty(),
        "reports about the old instance are dropped"
    );
    assert_eq!(r.phase(), Phase::Registering);
}

#[test]
fn a_lost_registration_with_nothing_running_registers_afresh_at_once() {
    let mut r = serving(&[]);
    assert_eq!(r.step(NOW, Event::NotRegistered), vec![Action::Reregister]);
}

#[test]
fn an_attempt_being_cancelled_is_not_cancelled_again_when_the_registration_is_lost() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    let ev = answer(&r, vec![assign(&b, 1)], vec![]);
    r.step(NOW, ev);
    assert_eq!(
        cancelled(&r.step(NOW, Event::NotRegistered)),
        vec![(b, CancelReason::RegistrationLost)]
    );
    // Still waits for the attempt cancelled earlier.
    assert_eq!(r.running().count(), 2);
}

#[test]
fn nothing_starts_while_the_old_instance_is_torn_down() {
    let (a, b) = (key("j1", 0, 1), key("j2", 0, 1));
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, Event::NotRegistered);
    let ev = answer(&r, vec![assign(&a, 0), assign(&b, 1)], vec![]);
    assert!(r.step(NOW, ev).is_empty());
    assert!(r
        .step(
            NOW,
            Event::Registered {
                assignments: vec![assign(&b, 1)]
            }
        )
        .is_empty());
    assert_eq!(r.phase(), Phase::Resetting);
}

#[test]
fn after_registering_afresh_an_assigned_attempt_starts_again() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, exited(&a, Outcome::Finished));
    r.step(NOW, Event::NotRegistered);
    let actions = r.step(
        NOW,
        Event::Registered {
            assignments: vec![assign(&a, 0)],
        },
    );
    assert_eq!(started(&actions), vec![a]);
    assert_eq!(r.phase(), Phase::Serving);
}

#[test]
fn shutdown_stops_everything_and_unregisters_with_the_last_reports() {
    let (a, b) = (key("j1", 0, 1), key("j1", 1, 1));
    let mut r = serving(&[assign(&a, 0), assign(&b, 1)]);
    // Finished just before the signal: its FINISHED must reach the leader.
    r.step(NOW, exited(&a, Outcome::Finished));
    assert_eq!(
        r.step(NOW, Event::Shutdown),
        vec![Action::Cancel {
            key: b.clone(),
            why: CancelReason::ShuttingDown
        }]
    );
    assert_eq!(r.phase(), Phase::ShuttingDown);
    let actions = r.step(NOW, exited(&b, Outcome::Canceled));
    let Some(Action::Unregister { reports }) = actions.last() else {
        panic!("expected Unregister last, got {actions:?}");
    };
    let states: Vec<(u32, i32)> = reports.iter().map(|u| (u.subtask, u.state)).collect();
    assert_eq!(
        states,
        vec![
            (0, pb::TaskState::Finished as i32),
            (1, pb::TaskState::Canceled as i32)
        ]
    );
    assert!(r.pending().is_empty());
    assert_eq!(r.phase(), Phase::Stopped);
    assert!(r.step(NOW, Event::Shutdown).is_empty(), "unregisters once");
}

#[test]
fn shutdown_with_nothing_running_unregisters_at_once() {
    let mut r = serving(&[]);
    assert_eq!(
        r.step(NOW, Event::Shutdown),
        vec![Action::Unregister { reports: vec![] }]
    );
}

#[test]
fn shutdown_while_tearing_down_an_instance_unregisters_instead_of_registering() {
    let a = key("j1", 0, 1);
    let mut r = serving(&[assign(&a, 0)]);
    r.step(NOW, Event::NotRegistered);
    assert!(
        r.step(NOW, Event::Shutdown).is_empty(),
        "already cancelling"
    );
    let actions = r.step(NOW, exited(&a, Outcome::Canceled));
    assert!(matches!(actions.last(), Some(Action::Unregister { .. })));
    assert!(!actions.contains(&Action::Reregister));
}
