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
mod tests;
