//! Succession after the leader's process dies: an election at once, not after the
//! leader's lease and an election timeout.
//!
//! A follower that stops hearing its leader stands only after openraft 0.9's leader
//! lease (the maximum election timeout) plus its own election timeout: 400-600 ms of
//! silence with the defaults, and longer when the first candidate is refused by the
//! other follower's lease. Silence is all a follower can go on when the leader's host
//! hangs or the network cuts it off. But most leaders that go away do so as a process
//! that exits (a crash, kill -9, an OOM kill, a restart, a rolling upgrade), and then
//! the kernel closes its connections and refuses its port at once. This module acts on
//! that signal, and only when both halves of it are seen:
//!
//! 1. the inbound connection that carried the current leader's AppendEntries closes
//!    (the server's listener reports every closed connection), and
//! 2. a TCP connect to the leader's address is refused (no process listens there; a
//!    connect that succeeds or times out means the leader may be alive, and nothing is
//!    done).
//!
//! Then every surviving voter drops its lease on the old leader by standing once
//! (`trigger().elect()`: a vote for itself, which, unlike the vote for the dead
//! leader, grants no lease), and the successor, the surviving voter with the lowest id,
//! stands again a few times at short intervals: its later terms are granted by voters
//! whose vote is no longer a leader's. Raft's safety is untouched: every vote still
//! needs a majority and an up-to-date log. A successor whose log is behind is refused,
//! and the voter with the longer log wins by its own election timer, as without this
//! module.
//!
//! Must never act on a live leader: a connection that closes while the leader's port
//! still accepts (a network blip, a peer channel reconnecting) changes nothing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{NodeId, Raft};

/// How long the probe of the leader's port may take; slower means "maybe alive".
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// The successor's candidacies after the first, and the pause before each: the other
/// voters need a moment to drop their lease before a term of the successor is granted.
const SUCCESSOR_TRIES: usize = 4;
const SUCCESSOR_SPACING: Duration = Duration::from_millis(20);

/// Resolves a member's id to the address this replica dials it at.
pub type Resolve = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

/// Shared by the Raft service (which reports where the leader's messages come from) and
/// the listener (which reports closed connections). Cheap to clone.
#[derive(Clone)]
pub struct Succession {
    inner: Arc<Inner>,
}

struct Inner {
    raft: Raft,
    local: NodeId,
    resolve: Resolve,
    /// The leader whose AppendEntries came last, and the remote address of the
    /// connection they came over.
    leader_link: Mutex<Option<(NodeId, SocketAddr)>>,
}

/// What the voters do once the leader is known dead.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Not a surviving voter, or nobody to elect: nothing.
    Nothing,
    /// Stand once, to drop the lease on the dead leader.
    DropLease,
    /// Stand, then again up to [`SUCCESSOR_TRIES`] times until a leader is known.
    Succeed,
}

/// The plan of voter `local` when `dead` led `voters`.
pub fn plan(local: NodeId, dead: NodeId, voters: &BTreeSet<NodeId>) -> Plan {
    if local == dead || !voters.contains(&local) {
        return Plan::Nothing;
    }
    match voters.iter().find(|v| **v != dead) {
        Some(successor) if *successor == local => Plan::Succeed,
        Some(_) => Plan::DropLease,
        None => Plan::Nothing,
    }
}

impl Succession {
    /// The succession of replica `local`, dialing members at the addresses `resolve`
    /// gives.
    pub fn new(raft: Raft, local: NodeId, resolve: Resolve) -> Self {
        Succession {
            inner: Arc::new(Inner {
                raft,
                local,
                resolve,
                leader_link: Mutex::new(None),
            }),
        }
    }

    /// An AppendEntries from `leader` arrived over a connection from `remote`.
    pub fn heard(&self, leader: NodeId, remote: Option<SocketAddr>) {
        let Some(remote) = remote else { return };
        let mut link = self
            .inner
            .leader_link
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *link != Some((leader, remote)) {
            *link = Some((leader, remote));
        }
    }

    /// An inbound connection from `remote` closed.
    pub fn closed(&self, remote: SocketAddr) {
        let leader = {
            let mut link = self
                .inner
                .leader_link
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match *link {
                Some((leader, addr)) if addr == remote => {
                    *link = None;
                    leader
                }
                _ => return,
            }
        };
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.leader_connection_closed(leader).await });
    }
}

/// Whether a TCP connect to `addr` is refused: nothing listens there. A connect that
/// succeeds (alive), does not finish in time, or an address that does not resolve is
/// not a refusal: then the election timer decides, as it would without this module.
pub async fn refuses(addr: &str) -> bool {
    let probe = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr));
    matches!(probe.await, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

impl Inner {
    async fn leader_connection_closed(&self, leader: NodeId) {
        if self.current_leader() != Some(leader) {
            return;
        }
        let Some(addr) = (self.resolve)(leader) else {
            return;
        };
        if !refuses(&addr).await {
            return;
        }
        // Still the leader we know of after the probe: nobody has replaced it yet.
        if self.current_leader() != Some(leader) {
            return;
        }
        let voters = self.voters();
        let plan = plan(self.local, leader, &voters);
        tracing::info!(
            leader,
            ?plan,
            "the leader's connection closed and its port refuses connections: standing for election"
        );
        match plan {
            Plan::Nothing => {}
            Plan::DropLease => self.stand().await,
            Plan::Succeed => {
                self.stand().await;
                for _ in 0..SUCCESSOR_TRIES {
                    tokio::time::sleep(SUCCESSOR_SPACING).await;
                    if self.current_leader().is_some_and(|l| l != leader) {
                        return;
                    }
                    self.stand().await;
                }
            }
        }
    }

    async fn stand(&self) {
        if let Err(e) = self.raft.trigger().elect().await {
            tracing::debug!(error = %e, "cannot stand for election");
        }
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_port_nobody_listens_on_refuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        assert!(!refuses(&addr).await, "a live listener accepts");
        drop(listener);
        assert!(refuses(&addr).await, "a closed port refuses");
        assert!(!refuses("no-such-host.invalid:1").await);
    }

    #[test]
    fn the_lowest_surviving_voter_succeeds_and_the_others_drop_their_lease() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(plan(2, 1, &voters), Plan::Succeed);
        assert_eq!(plan(3, 1, &voters), Plan::DropLease);
        assert_eq!(plan(1, 2, &voters), Plan::Succeed);
        assert_eq!(plan(3, 2, &voters), Plan::DropLease);
        // The dead leader's own view, and a learner's, do nothing.
        assert_eq!(plan(1, 1, &voters), Plan::Nothing);
        assert_eq!(plan(4, 1, &voters), Plan::Nothing);
        // A lone voter left has nobody to succeed but itself.
        assert_eq!(plan(2, 1, &[1, 2].into()), Plan::Succeed);
        assert_eq!(plan(1, 1, &[1].into()), Plan::Nothing);
    }
}
