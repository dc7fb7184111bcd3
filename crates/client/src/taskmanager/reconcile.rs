//! The TaskManager's reconcile logic as a pure state machine: [`Reconciler::step`] takes
//! what happened (a leader's answer, a task's exit, a lost registration, a shutdown) and
//! returns what to do (start, cancel, forget an attempt, register afresh, unregister).
//! No clock, no processes, no network: the agent around it feeds it events, executes its
//! actions and passes the wall-clock time in, so every rule here is testable on its own.
//!
//! Reports are state rather than actions: the leader must acknowledge them, so they stay
//! in [`Reconciler::pending`] and every heartbeat carries them until one is answered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dispatcher_proto::v1 as pb;

use super::runner::{AttemptKey, Outcome, Work};

/// Something the agent observed.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The leader accepted a registration of this instance.
    Registered {
        /// The attempts this TaskManager should run.
        assignments: Vec<pb::TaskAssignment>,
    },
    /// The leader answered a heartbeat of this (registered) instance.
    Heartbeat {
        /// How many of the oldest [`Reconciler::pending`] reports the heartbeat carried;
        /// the answer acknowledges them.
        acked: usize,
        /// The attempts this TaskManager should run.
        assignments: Vec<pb::TaskAssignment>,
        /// Attempts whose job is winding down: stop them and report them CANCELED.
        stop: Vec<pb::TaskAssignment>,
    },
    /// A heartbeat got no answer (no leader, a network fault).
    HeartbeatFailed,
    /// The leader does not know this instance (its lease ran out).
    NotRegistered,
    /// An attempt's task ended.
    Exited {
        /// Which attempt.
        key: AttemptKey,
        /// How it ended.
        outcome: Outcome,
    },
    /// The agent was asked to stop.
    Shutdown,
}

/// Why an attempt is cancelled; the agent only logs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelReason {
    /// The leader no longer assigns it here.
    NotAssigned,
    /// The leader listed it among the attempts to stop (its job is winding down).
    Stopped,
    /// The registration is gone: everything dies before registering afresh.
    RegistrationLost,
    /// The agent shuts down.
    ShuttingDown,
}

/// Something the agent must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start an attempt in `slot`.
    Start {
        /// Which attempt.
        key: AttemptKey,
        /// The slot it occupies.
        slot: u32,
        /// What to run.
        work: Work,
    },
    /// Ask a running attempt to stop (SIGTERM, SIGKILL after the grace period); its
    /// [`Event::Exited`] follows.
    Cancel {
        /// Which attempt.
        key: AttemptKey,
        /// Why.
        why: CancelReason,
    },
    /// An attempt ended and its end is reported: drop its handle, record it in the history.
    Ended {
        /// Which attempt.
        key: AttemptKey,
        /// The slot it occupied.
        slot: u32,
        /// How it ended.
        outcome: Outcome,
    },
    /// Nothing runs any more after a lost registration: register as a new instance.
    Reregister,
    /// Nothing runs any more after [`Event::Shutdown`]: send these last reports without
    /// acting on the answer, then unregister.
    Unregister {
        /// The reports not yet acknowledged.
        reports: Vec<pb::TaskStatusUpdate>,
    },
}

/// Where the agent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a registration to be accepted.
    Registering,
    /// Registered: reconciling with every answer.
    Serving,
    /// The registration was lost: killing everything before registering afresh.
    Resetting,
    /// Killing everything before unregistering.
    ShuttingDown,
    /// Unregistering; nothing runs and nothing starts.
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Tracked {
    slot: u32,
    /// A cancel was sent; another one would only repeat the signal.
    cancelling: bool,
}

/// The TaskManager's view of its attempts.
#[derive(Clone, Debug)]
pub struct Reconciler {
    phase: Phase,
    /// Attempts started and not yet exited.
    running: BTreeMap<AttemptKey, Tracked>,
    /// Attempts that ended here (or were refused); never started again by this instance.
    ended: BTreeSet<AttemptKey>,
    /// Reports not yet acknowledged by a heartbeat, oldest first.
    pending: Vec<pb::TaskStatusUpdate>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reconciler {
    /// A TaskManager that runs nothing and is not registered yet.
    pub fn new() -> Self {
        Reconciler {
            phase: Phase::Registering,
            running: BTreeMap::new(),
            ended: BTreeSet::new(),
            pending: Vec::new(),
        }
    }

    /// Where the agent is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The reports the next heartbeat carries, oldest first.
    pub fn pending(&self) -> &[pb::TaskStatusUpdate] {
        &self.pending
    }

    /// The attempts started and not yet exited.
    pub fn running(&self) -> impl Iterator<Item = &AttemptKey> {
        self.running.keys()
    }

    /// Applies one event observed at `now_ms` (wall clock, only stamped on reports).
    pub fn step(&mut self, now_ms: u64, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Registered { assignments } => {
                if matches!(self.phase, Phase::Registering | Phase::Serving) {
                    self.phase = Phase::Serving;
                    self.reconcile(now_ms, assignments, &mut actions);
                }
            }
            Event::Heartbeat {
                acked,
                assignments,
                stop,
            } => {
                // An answer for an instance being torn down must not start anything.
                if self.phase == Phase::Serving {
                    self.acknowledge(acked, &assignments, &stop);
                    self.stop(now_ms, stop, &mut actions);
                    self.reconcile(now_ms, assignments, &mut actions);
                }
            }
            // Tasks keep running through a dispatcher failover; reports wait for a leader.
            Event::HeartbeatFailed => {}
            Event::NotRegistered => {
                if self.phase == Phase::Serving {
                    self.phase = Phase::Resetting;
                    self.cancel_all(CancelReason::RegistrationLost, &mut actions);
                    self.settle(&mut actions);
                }
            }
            Event::Exited { key, outcome } => {
                self.exited(now_ms, key, outcome, &mut actions);
                self.settle(&mut actions);
            }
            Event::Shutdown => {
                if self.phase != Phase::Stopped {
                    self.phase = Phase::ShuttingDown;
                    self.cancel_all(CancelReason::ShuttingDown, &mut actions);
                    self.settle(&mut actions);
                }
            }
        }
        actions
    }

    /// Drops the reports a heartbeat carried, and forgets ended attempts once nothing
    /// about them is pending and the leader neither assigns nor stops them any more:
    /// `ended` would otherwise grow with every attempt this instance ever ran.
    fn acknowledge(
        &mut self,
        acked: usize,
        assignments: &[pb::TaskAssignment],
        stop: &[pb::TaskAssignment],
    ) {
        self.pending.drain(..acked.min(self.pending.len()));
        if self.pending.is_empty() {
            let listed: BTreeSet<AttemptKey> =
                assignments.iter().chain(stop).map(AttemptKey::of).collect();
            self.ended.retain(|k| listed.contains(k));
        }
    }

    /// Stops attempts whose job is winding down; reports the ones never started as
    /// CANCELED so that their slots are freed.
    fn stop(&mut self, now_ms: u64, stop: Vec<pb::TaskAssignment>, actions: &mut Vec<Action>) {
        for a in stop {
            let key = AttemptKey::of(&a);
            match self.running.get_mut(&key) {
                Some(t) if !t.cancelling => {
                    t.cancelling = true;
                    actions.push(Action::Cancel {
                        key,
                        why: CancelReason::Stopped,
                    });
                }
                Some(_) => {}
                None if !self.ended.contains(&key) => {
                    self.report(
                        now_ms,
                        &key,
                        pb::TaskState::Canceled,
                        None,
                        "stopped before it started".into(),
                    );
                    self.ended.insert(key);
                }
                None => {}
            }
        }
    }

    /// Makes what runs here equal to what the leader assigns: cancels the rest (an older
    /// attempt of a reassigned subtask among them), starts what is new.
    fn reconcile(
        &mut self,
        now_ms: u64,
        assignments: Vec<pb::TaskAssignment>,
        actions: &mut Vec<Action>,
    ) {
        let desired: BTreeMap<AttemptKey, pb::TaskAssignment> = assignments
            .into_iter()
            .map(|a| (AttemptKey::of(&a), a))
            .collect();
        for (key, t) in &mut self.running {
            if !desired.contains_key(key) && !t.cancelling {
                t.cancelling = true;
                actions.push(Action::Cancel {
                    key: key.clone(),
                    why: CancelReason::NotAssigned,
                });
            }
        }
        for (key, a) in desired {
            if self.running.contains_key(&key) || self.ended.contains(&key) {
                continue;
            }
            let Some(work) = work_of(a.task) else {
                self.report(
                    now_ms,
                    &key,
                    pb::TaskState::Failed,
                    None,
                    "assignment without a task".into(),
                );
                self.ended.insert(key);
                continue;
            };
            self.report(now_ms, &key, pb::TaskState::Deploying, None, String::new());
            self.report(now_ms, &key, pb::TaskState::Running, None, String::new());
            self.running.insert(
                key.clone(),
                Tracked {
                    slot: a.slot,
                    cancelling: false,
                },
            );
            actions.push(Action::Start {
                key,
                slot: a.slot,
                work,
            });
        }
    }

    fn exited(
        &mut self,
        now_ms: u64,
        key: AttemptKey,
        outcome: Outcome,
        actions: &mut Vec<Action>,
    ) {
        // An exit of an attempt not running here was already reported (or never started).
        let Some(t) = self.running.remove(&key) else {
            return;
        };
        let (state, code, reason) = match &outcome {
            Outcome::Finished => (pb::TaskState::Finished, Some(0), String::new()),
            Outcome::Failed { exit_code, reason } => {
                (pb::TaskState::Failed, *exit_code, reason.clone())
            }
            Outcome::Canceled => (
                pb::TaskState::Canceled,
                None,
                "canceled by the TaskManager on the leader's request".into(),
            ),
        };
        self.report(now_ms, &key, state, code, reason);
        self.ended.insert(key.clone());
        actions.push(Action::Ended {
            key,
            slot: t.slot,
            outcome,
        });
    }

    fn cancel_all(&mut self, why: CancelReason, actions: &mut Vec<Action>) {
        for (key, t) in &mut self.running {
            if !t.cancelling {
                t.cancelling = true;
                actions.push(Action::Cancel {
                    key: key.clone(),
                    why,
                });
            }
        }
    }

    /// Finishes a teardown once the last attempt exited.
    fn settle(&mut self, actions: &mut Vec<Action>) {
        if !self.running.is_empty() {
            return;
        }
        match self.phase {
            Phase::Resetting => {
                // The new instance starts clean: the state ignores reports about the old
                // one, and the leader may assign this TaskManager anything afresh.
                self.pending.clear();
                self.ended.clear();
                self.phase = Phase::Registering;
                actions.push(Action::Reregister);
            }
            Phase::ShuttingDown => {
                self.phase = Phase::Stopped;
                actions.push(Action::Unregister {
                    reports: std::mem::take(&mut self.pending),
                });
            }
            Phase::Registering | Phase::Serving | Phase::Stopped => {}
        }
    }

    fn report(
        &mut self,
        now_ms: u64,
        key: &AttemptKey,
        state: pb::TaskState,
        exit_code: Option<i32>,
        reason: String,
    ) {
        self.pending.push(pb::TaskStatusUpdate {
            job_id: key.job.clone(),
            vertex: key.vertex.clone(),
            subtask: key.subtask,
            attempt: key.attempt,
            state: state as i32,
            exit_code,
            failure_reason: reason,
            observed_at_ms: now_ms,
        });
    }
}

/// What an assignment's task runs; `None` if the assignment has no task.
pub fn work_of(task: Option<pb::Task>) -> Option<Work> {
    Some(match task?.kind? {
        pb::task::Kind::Command(c) => Work::Command {
            argv: c.argv,
            env: c.env,
        },
        pb::task::Kind::Sleep(s) => Work::Sleep(Duration::from_millis(s.duration_ms)),
        pb::task::Kind::Fail(f) => Work::Fail(Duration::from_millis(f.after_ms), f.exit_code),
    })
}

#[cfg(test)]
mod tests {
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
}
