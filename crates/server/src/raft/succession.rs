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
//! The connection's close is the fast signal; as a fallback (a close this replica did
//! not see, the leader's connection having been replaced), a follower that has not
//! heard its leader for [`SILENCE_HEARTBEATS`] heartbeat intervals probes its port too.
//!
//! Then every surviving voter stands for election (`trigger().elect()`), the lowest id
//! first and each next one [`STAGGER`] later, and stands again every [`SPACING`] until
//! a leader is known, at most [`STANDS`] times. The first stand drops the voter's lease
//! on the dead leader (a vote for itself grants no lease, unlike a leader's vote), so
//! the next candidate's higher term is granted by every voter whose log is not longer
//! than the candidate's: the survivor with the longest log wins within a few spacings,
//! whatever its id (a voter refused by one with a longer log stops standing, so as not
//! to raise the term past it). Raft's safety is untouched: every vote still needs a majority and an
//! up-to-date log.
//!
//! Must never act on a live leader: a connection that closes while the leader's port
//! still accepts (a network blip, a peer channel reconnecting) changes nothing.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::sync::atomic::Ordering;

use super::network::LongerLog;
use super::{NodeId, Raft};

/// How long the probe of the leader's port may take; slower means "maybe alive".
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Probes of a silent leader's port before it is taken for alive, and the pause
/// between them.
const PROBES: u32 = 8;
const PROBE_SPACING: Duration = Duration::from_millis(10);

/// Most candidacies of one voter for one dead leader.
pub const STANDS: usize = 6;
/// Between two candidacies of one voter: long enough for a vote round on loopback or a
/// LAN, short against the election timeout.
pub const SPACING: Duration = Duration::from_millis(20);
/// Between the first candidacies of voters of consecutive ranks, so that they seldom
/// stand in the same term.
pub const STAGGER: Duration = Duration::from_millis(8);
/// Heartbeat intervals of silence from the leader after which its port is probed.
pub const SILENCE_HEARTBEATS: u32 = 2;

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
    /// Terms in which a voter with a longer log refused this replica (the network's).
    longer_log: LongerLog,
    /// The leader whose AppendEntries came last, and the remote address of the
    /// connection they came over.
    leader_link: Mutex<Option<(NodeId, SocketAddr)>>,
    /// The leader last heard, when, and whether its port has been probed since.
    last_heard: Mutex<Option<Heard>>,
    /// A probe or an election for a dead leader is under way.
    acting: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Copy)]
struct Heard {
    leader: NodeId,
    at: std::time::Instant,
    probed: bool,
}

/// When voter `local` first stands once `dead`, which led `voters`, is known dead: its
/// rank among the surviving voters times [`STAGGER`]; `None` for the dead leader itself
/// and for a replica that is not a voter.
pub fn first_stand(local: NodeId, dead: NodeId, voters: &BTreeSet<NodeId>) -> Option<Duration> {
    if local == dead {
        return None;
    }
    let rank = voters
        .iter()
        .filter(|v| **v != dead)
        .position(|v| *v == local)?;
    Some(STAGGER.saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX)))
}

impl Succession {
    /// The succession of replica `local`, dialing members at the addresses `resolve`
    /// gives; starts the silence watch, which looks every `heartbeat`.
    pub fn new(
        raft: Raft,
        local: NodeId,
        resolve: Resolve,
        longer_log: LongerLog,
        heartbeat: Duration,
    ) -> Self {
        let succession = Succession {
            inner: Arc::new(Inner {
                raft,
                local,
                resolve,
                longer_log,
                leader_link: Mutex::new(None),
                last_heard: Mutex::new(None),
                acting: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let weak = Arc::downgrade(&succession.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if let Some(leader) = inner.silent_leader(heartbeat * SILENCE_HEARTBEATS) {
                    inner.clone().act_if_dead(leader);
                }
            }
        });
        succession
    }

    /// An AppendEntries from `leader` arrived over a connection from `remote`, and
    /// openraft took it.
    pub fn heard(&self, leader: NodeId, remote: Option<SocketAddr>) {
        *lock(&self.inner.last_heard) = Some(Heard {
            leader,
            at: std::time::Instant::now(),
            probed: false,
        });
        let Some(remote) = remote else { return };
        let mut link = lock(&self.inner.leader_link);
        if *link != Some((leader, remote)) {
            tracing::debug!(leader, %remote, "the leader's messages come over a new connection");
            *link = Some((leader, remote));
        }
    }

    /// An inbound connection from `remote` closed.
    pub fn closed(&self, remote: SocketAddr) {
        let leader = {
            let mut link = lock(&self.inner.leader_link);
            match *link {
                Some((leader, addr)) if addr == remote => {
                    *link = None;
                    leader
                }
                other => {
                    tracing::trace!(%remote, link = ?other, "a connection other than the leader's closed");
                    return;
                }
            }
        };
        tracing::debug!(leader, %remote, "the leader's connection closed");
        self.inner.clone().act_if_dead(leader);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a TCP connect to `addr` is refused: nothing listens there. A connect that
/// succeeds (alive), does not finish in time, or an address that does not resolve is
/// not a refusal: then the election timer decides, as it would without this module.
pub async fn refuses(addr: &str) -> bool {
    let probe = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr));
    matches!(probe.await, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

impl Inner {
    /// The leader this follower knows of, if it has been silent for `silence` and its
    /// port has not been probed since it was last heard (marked probed now).
    fn silent_leader(&self, silence: Duration) -> Option<NodeId> {
        let mut heard = lock(&self.last_heard);
        let h = heard.as_mut()?;
        if h.probed || h.at.elapsed() < silence || self.current_leader() != Some(h.leader) {
            return None;
        }
        h.probed = true;
        Some(h.leader)
    }

    /// Probes `leader`'s port in a task of its own and, if it refuses, stands for
    /// election as the module documentation says. One at a time.
    fn act_if_dead(self: Arc<Self>, leader: NodeId) {
        if self.acting.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            self.stand_if_dead(leader).await;
            self.acting.store(false, Ordering::Release);
        });
    }

    async fn stand_if_dead(&self, leader: NodeId) {
        let since = std::time::Instant::now();
        let Some(addr) = (self.resolve)(leader) else {
            return;
        };
        // A dying process may still hold its port for a moment after its connections
        // closed (the kernel tears it down): probe a few times while it stays silent.
        let mut probes = 0;
        loop {
            if self.current_leader() != Some(leader) || self.heard_since(leader, since) {
                tracing::debug!(
                    leader,
                    "the leader was replaced or spoke again: not probing"
                );
                return;
            }
            if refuses(&addr).await {
                break;
            }
            probes += 1;
            if probes >= PROBES {
                tracing::debug!(leader, probes, "the leader's port still accepts");
                return;
            }
            tokio::time::sleep(PROBE_SPACING).await;
        }
        // Still the leader we know of after the probe: nobody has replaced it yet.
        if self.current_leader() != Some(leader) {
            return;
        }
        let Some(first) = first_stand(self.local, leader, &self.voters()) else {
            return;
        };
        tracing::info!(
            leader,
            %addr,
            "the leader's port refuses connections: its process is gone; standing for election"
        );
        tokio::time::sleep(first).await;
        let refused_before = self.longer_log.load(Ordering::Acquire);
        for stand in 0..STANDS {
            // A voter with a longer log refused this one: only it can win, and it will
            // once this one stops raising the term.
            if self.longer_log.load(Ordering::Acquire) > refused_before {
                tracing::debug!(
                    leader,
                    "a voter has a longer log: leaving the election to it"
                );
                return;
            }
            if self.current_leader().is_some_and(|l| l != leader) {
                return;
            }
            // After its own first stand, a voter whose vote went to another candidate
            // (a higher term, which it granted) leaves the field to it: standing again
            // would depose a leader it has just elected.
            if stand > 0 && self.voted_for() != Some(self.local) {
                return;
            }
            self.stand().await;
            tokio::time::sleep(SPACING).await;
        }
    }

    /// Whether `leader` was heard after `since`.
    fn heard_since(&self, leader: NodeId, since: std::time::Instant) -> bool {
        lock(&self.last_heard).is_some_and(|h| h.leader == leader && h.at > since)
    }

    fn voted_for(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().vote.leader_id().voted_for()
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
    fn surviving_voters_stand_in_the_order_of_their_ids() {
        let voters: BTreeSet<NodeId> = [1, 2, 3].into();
        assert_eq!(first_stand(2, 1, &voters), Some(Duration::ZERO));
        assert_eq!(first_stand(3, 1, &voters), Some(STAGGER));
        assert_eq!(first_stand(1, 2, &voters), Some(Duration::ZERO));
        assert_eq!(first_stand(3, 2, &voters), Some(STAGGER));
        // The dead leader's own view, and a learner's, do nothing.
        assert_eq!(first_stand(1, 1, &voters), None);
        assert_eq!(first_stand(4, 1, &voters), None);
        assert_eq!(first_stand(2, 1, &[1, 2].into()), Some(Duration::ZERO));
    }
}
