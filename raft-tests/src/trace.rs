//! What happened in a run, in simulated time: the fate of every message, every change of
//! a replica's term, role or leader, and the harness's own actions. Two runs of one seed
//! must produce equal traces; `tests/replay.rs` holds the harness to that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use dispatcher_server::raft::NodeId;
use openraft::ServerState;
use tokio::time::Instant;

use crate::network::Rpc;

/// Which way a message crosses its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    /// The request, initiator to target.
    Request,
    /// The answer, target to initiator.
    Reply,
}

/// What the network did with one leg of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Handed over.
    Delivered,
    /// Lost by the link's seeded loss.
    Dropped,
    /// The link is cut.
    Cut,
    /// The target replica is not running.
    Down,
}

/// One entry of the trace. `at_ms` is simulated time since the cluster started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// One leg of a message of the conversation (`from` asks `to`, `rpc`), its `seq`-th.
    Message {
        /// When.
        at_ms: u64,
        /// The initiator of the conversation.
        from: NodeId,
        /// The target of the conversation.
        to: NodeId,
        /// The RPC.
        rpc: Rpc,
        /// The request's number in its conversation.
        seq: u64,
        /// Request or answer.
        leg: Leg,
        /// What became of it.
        fate: Fate,
    },
    /// A replica's term, role or known leader changed.
    Role {
        /// When.
        at_ms: u64,
        /// The replica.
        node: NodeId,
        /// Its term.
        term: u64,
        /// Its role.
        state: ServerState,
        /// The leader it knows.
        leader: Option<NodeId>,
    },
    /// Something the test did (stop, restart, cut, heal, loss) or observed (a commit).
    Harness {
        /// When.
        at_ms: u64,
        /// What.
        what: String,
    },
}

impl Event {
    /// Whether this records a network decision (as opposed to a role change or action).
    pub fn is_message(&self) -> bool {
        matches!(self, Event::Message { .. })
    }
}

/// The trace of one cluster, appended to by the network, the role watchers and the
/// harness.
pub struct Trace {
    origin: Instant,
    events: Mutex<Vec<Event>>,
    /// The (term, role, leader) last recorded per replica.
    roles: Mutex<BTreeMap<NodeId, Role>>,
}

/// A replica's term, role and known leader.
pub(crate) type Role = (u64, ServerState, Option<NodeId>);

impl Trace {
    pub(crate) fn new() -> Self {
        Trace {
            origin: Instant::now(),
            events: Mutex::new(Vec::new()),
            roles: Mutex::new(BTreeMap::new()),
        }
    }

    /// Simulated milliseconds since the cluster started.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub(crate) fn record(&self, event: impl FnOnce(u64) -> Event) {
        let e = event(self.now_ms());
        self.events.lock().expect("trace").push(e);
    }

    /// Records a harness action or observation (without sampling roles: see
    /// `Router::note`).
    pub(crate) fn note(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!(at_ms = self.now_ms(), "{what}");
        self.record(|at_ms| Event::Harness { at_ms, what });
    }

    /// The replicas seen leading, per term, over the whole run so far.
    pub fn leaders_by_term(&self) -> BTreeMap<u64, BTreeSet<NodeId>> {
        let mut out: BTreeMap<u64, BTreeSet<NodeId>> = BTreeMap::new();
        for e in self.events.lock().expect("trace").iter() {
            if let Event::Role {
                node,
                term,
                state: ServerState::Leader,
                ..
            } = e
            {
                out.entry(*term).or_default().insert(*node);
            }
        }
        out
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("trace").clone()
    }

    /// Records the replicas whose term, role or leader changed since the last look, in
    /// id order. Called before every other record rather than from tasks that follow
    /// the metrics channels: when those ran would depend on tokio's seeded-from-the-OS
    /// choice of wake-up order among a channel's receivers.
    pub(crate) fn sample_roles(&self, replicas: impl IntoIterator<Item = (NodeId, Role)>) {
        let mut last = self.roles.lock().expect("roles");
        for (node, role) in replicas {
            if last.insert(node, role) != Some(role) {
                let (term, state, leader) = role;
                self.record(|at_ms| Event::Role {
                    at_ms,
                    node,
                    term,
                    state,
                    leader,
                });
            }
        }
    }
}
