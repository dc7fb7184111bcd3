//! A cluster of real replicas (`Replica` over the sled log store and the state-machine
//! store, each in its own temporary directory) on the in-process network, and the
//! operations tests drive it with.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dispatcher_core::state::{ClusterConfig, Command, JobId};
use dispatcher_server::raft::replica::{RaftSettings, Replica, ReplicaOptions, WriteError};
use dispatcher_server::raft::NodeId;
use openraft::ServerState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

use crate::network::{mix, Router, RouterNetwork};
use crate::trace::Trace;
use crate::{init_logging, small_job, wait_for};

/// Options of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Number of voters to start with (ids 1..=n).
    pub voters: u64,
    /// Raft settings. The election timeout range is where the harness draws each
    /// replica's timeout from, with the seed (see the crate docs).
    pub raft: RaftSettings,
}

impl ClusterOptions {
    /// `n` voters with test timings.
    pub fn voters(n: u64) -> Self {
        ClusterOptions {
            voters: n,
            raft: RaftSettings {
                heartbeat_ms: 50,
                election_timeout_min_ms: 300,
                election_timeout_max_ms: 600,
                ..RaftSettings::default()
            },
        }
    }
}

/// An in-process cluster.
pub struct Cluster {
    /// The network.
    pub router: Arc<Router>,
    /// The seed of every random choice.
    pub seed: u64,
    dirs: BTreeMap<NodeId, TempDir>,
    options: ClusterOptions,
    members: BTreeMap<NodeId, String>,
    next_job: Mutex<u64>,
    /// Draws each boot's election timeout; boots happen in the test's order.
    timeouts: Mutex<StdRng>,
}

impl Cluster {
    /// Starts the voters 1..=n and waits for a leader.
    pub async fn start(options: ClusterOptions, seed: u64) -> Cluster {
        init_logging();
        assert!(
            crate::simulated(),
            "raft-tests run their body through raft_tests::simulate (paused clock, one thread)"
        );
        let members: BTreeMap<NodeId, String> = (1..=options.voters)
            .map(|id| (id, format!("node-{id}")))
            .collect();
        let mut cluster = Cluster {
            router: Router::new(seed, Arc::new(Trace::new())),
            seed,
            dirs: BTreeMap::new(),
            options,
            members,
            next_job: Mutex::new(0),
            // A stream of its own ("time"), apart from the network's.
            timeouts: Mutex::new(StdRng::seed_from_u64(mix(seed ^ 0x7469_6d65))),
        };
        for id in 1..=cluster.options.voters {
            cluster.dirs.insert(id, TempDir::new().expect("tempdir"));
            cluster.boot(id, true).await;
        }
        cluster
            .leader(Duration::from_secs(10), "the first election")
            .await;
        cluster
    }

    /// The trace of this cluster's run.
    pub fn trace(&self) -> &Trace {
        &self.router.trace
    }

    /// The Raft settings of one boot: openraft draws the election timeout from
    /// `[min, max)` with an unseeded thread-local RNG, so the harness draws it from the
    /// seed and hands openraft a range holding that one value.
    fn boot_settings(&self, id: NodeId) -> RaftSettings {
        let mut raft = self.options.raft.clone();
        let (min, max) = (raft.election_timeout_min_ms, raft.election_timeout_max_ms);
        let timeout = self.timeouts.lock().expect("timeouts").gen_range(min..max);
        raft.election_timeout_min_ms = timeout;
        raft.election_timeout_max_ms = timeout + 1;
        self.router
            .note(format!("boot {id}: election timeout {timeout} ms"));
        raft
    }

    async fn boot(&self, id: NodeId, initial: bool) {
        let dir = self
            .dirs
            .get(&id)
            .expect("a directory per replica")
            .path()
            .to_path_buf();
        let opts = ReplicaOptions {
            id,
            data_dir: dir,
            cluster: "raft-tests".into(),
            initial_cluster: if initial {
                self.members.clone()
            } else {
                BTreeMap::new()
            },
            initial_cluster_state: Default::default(),
            raft: self.boot_settings(id),
            state_config: ClusterConfig::default(),
            peer_addresses: BTreeMap::new(),
            peer_tls: None,
        };
        let network = RouterNetwork {
            from: id,
            router: self.router.clone(),
        };
        // A replica that was just stopped holds its sled lock until the last task using
        // its store ends.
        let replica = wait_for(
            Duration::from_secs(10),
            &format!("replica {id} to open its data directory"),
            || {
                let (opts, network) = (opts.clone(), network.clone());
                async move {
                    match Replica::start_with_network(opts, network).await {
                        Ok(r) => Some(r),
                        Err(e) => {
                            self.router.note(format!("boot {id} failed: {e}"));
                            None
                        }
                    }
                }
            },
        )
        .await;
        self.router.nodes.lock().expect("nodes").insert(id, replica);
    }

    /// The running replica `id`.
    pub fn replica(&self, id: NodeId) -> Replica {
        self.router
            .nodes
            .lock()
            .expect("nodes")
            .get(&id)
            .cloned()
            .unwrap_or_else(|| panic!("replica {id} is not running"))
    }

    /// Ids of the running replicas.
    pub fn running(&self) -> Vec<NodeId> {
        self.router
            .nodes
            .lock()
            .expect("nodes")
            .keys()
            .copied()
            .collect()
    }

    /// Waits for a leader that the running replicas it can reach agree on.
    pub async fn leader(&self, timeout: Duration, why: &str) -> NodeId {
        wait_for(timeout, &format!("a leader ({why})"), || async {
            let running = self.running();
            let leaders: Vec<NodeId> = running
                .iter()
                .filter(|id| self.replica(**id).metrics().state == ServerState::Leader)
                .copied()
                .collect();
            // With partitions several may think they lead in different terms; take the
            // one with the highest term that a majority follows.
            let best = leaders
                .iter()
                .max_by_key(|id| self.replica(**id).metrics().current_term)?;
            let followers = running
                .iter()
                .filter(|id| self.replica(**id).metrics().current_leader == Some(*best))
                .count();
            (followers * 2 > self.voter_count()).then_some(*best)
        })
        .await
    }

    fn voter_count(&self) -> usize {
        let any = self.running()[0];
        self.replica(any)
            .metrics()
            .membership_config
            .membership()
            .voter_ids()
            .count()
    }

    /// A new job id, unique in this cluster.
    pub fn next_job_id(&self) -> JobId {
        let mut n = self.next_job.lock().expect("counter");
        *n += 1;
        JobId::parse(&format!("00000000-0000-4000-8000-{:012}", *n)).expect("uuid")
    }

    /// Submits a job through whichever replica leads, retrying until `timeout`.
    /// Returns the job id and the log index it committed at.
    pub async fn submit(&self, timeout: Duration) -> (JobId, u64) {
        let id = self.next_job_id();
        let cmd = Command::SubmitJob {
            job_id: id.clone(),
            spec: small_job("j"),
            now: 1,
        };
        let index = self.propose(cmd, timeout).await;
        (id, index)
    }

    /// Proposes a command through the leader, retrying until `timeout`.
    pub async fn propose(&self, cmd: Command, timeout: Duration) -> u64 {
        let index = wait_for(timeout, &format!("{} to commit", cmd.name()), || {
            let cmd = cmd.clone();
            async move {
                // A deposed leader cut off from the others may still think it leads: take
                // the one with the newest term.
                let leader = self
                    .running()
                    .into_iter()
                    .filter(|id| self.replica(*id).metrics().state == ServerState::Leader)
                    .max_by_key(|id| self.replica(*id).metrics().current_term)?;
                // A leader cut off from its quorum never answers: give up on it after a
                // while and look for the leader again.
                let attempt = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.replica(leader).propose_indexed(cmd),
                )
                .await;
                match attempt {
                    Err(_) => None,
                    Ok(Ok((Ok(_), index))) => Some(index),
                    Ok(Ok((other, _))) => panic!("command rejected: {other:?}"),
                    Ok(Err(WriteError::NotLeader { .. })) | Ok(Err(WriteError::Fatal(_))) => None,
                    Ok(Err(e)) => panic!("write failed: {e}"),
                }
            }
        })
        .await;
        self.router
            .note(format!("{} committed at {index}", cmd.name()));
        index
    }

    /// Tries one write through `via` without retrying: whether it committed.
    pub async fn try_submit_via(&self, via: NodeId, timeout: Duration) -> Result<JobId, String> {
        let id = self.next_job_id();
        let cmd = Command::SubmitJob {
            job_id: id.clone(),
            spec: small_job("j"),
            now: 1,
        };
        match tokio::time::timeout(timeout, self.replica(via).propose(cmd)).await {
            Ok(Ok(_)) => Ok(id),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Stops a replica (its data directory stays).
    pub async fn stop(&self, id: NodeId) {
        self.router.note(format!("stop {id}"));
        let replica = self.router.nodes.lock().expect("nodes").remove(&id);
        if let Some(r) = replica {
            r.shutdown().await;
        }
    }

    /// Restarts a stopped replica from its data directory.
    pub async fn restart(&self, id: NodeId) {
        self.router.note(format!("restart {id}"));
        self.boot(id, false).await;
    }

    /// Adds a new replica (fresh directory) to the running set, not yet a member.
    pub async fn spawn_new(&mut self, id: NodeId) {
        self.router.note(format!("spawn {id}"));
        self.dirs.insert(id, TempDir::new().expect("tempdir"));
        self.boot(id, false).await;
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        self.router.note(format!("cut {a}-{b}"));
        let mut links = self.router.links.lock().expect("links");
        links.entry((a, b)).or_default().cut = true;
        links.entry((b, a)).or_default().cut = true;
    }

    /// Cuts `id` off from every other replica.
    pub fn isolate(&self, id: NodeId) {
        for other in self.all_ids() {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Makes every link drop `percent` of messages (seeded).
    pub fn set_loss(&self, percent: u8) {
        self.router.note(format!("loss {percent}%"));
        let mut links = self.router.links.lock().expect("links");
        for a in self.all_ids() {
            for b in self.all_ids() {
                if a != b {
                    links.entry((a, b)).or_default().drop_percent = percent;
                }
            }
        }
    }

    /// Delays every message on the link from `a` to `b`.
    pub fn set_delay(&self, a: NodeId, b: NodeId, delay: Duration) {
        self.router.note(format!("delay {a}->{b} {delay:?}"));
        self.router
            .links
            .lock()
            .expect("links")
            .entry((a, b))
            .or_default()
            .delay = delay;
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.router.note("heal");
        self.router.links.lock().expect("links").clear();
    }

    fn all_ids(&self) -> BTreeSet<NodeId> {
        self.dirs.keys().copied().collect()
    }

    /// Waits until every running replica applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration, why: &str) {
        wait_for(
            timeout,
            &format!("every replica to apply {index} ({why})"),
            || async {
                self.running()
                    .iter()
                    .all(|id| {
                        self.replica(*id)
                            .state
                            .read()
                            .last_applied
                            .map(|l| l.index)
                            .unwrap_or(0)
                            >= index
                    })
                    .then_some(())
            },
        )
        .await
    }

    /// Waits until every running replica has applied the same index with the same digest,
    /// and returns that index. This is the check every test ends with.
    pub async fn assert_converged(&self, timeout: Duration, why: &str) -> u64 {
        wait_for(
            timeout,
            &format!("all replicas to converge on one digest ({why})"),
            || async {
                let mut views: Vec<(Option<u64>, String)> = vec![];
                for id in self.running() {
                    views.push(self.replica(id).state.digest().await);
                }
                let first = views.first()?.clone();
                views
                    .iter()
                    .all(|v| *v == first)
                    .then_some(first.0.unwrap_or(0))
            },
        )
        .await
    }

    /// Whether replica `id` has the job in its applied state.
    pub fn has_job(&self, id: NodeId, job: &JobId) -> bool {
        self.replica(id).state.read().state.job(job).is_some()
    }

    /// Stops every replica, then checks the whole run's trace for two leaders in one
    /// term (Raft's election safety), which a test's own polling could miss.
    pub async fn shutdown(&self) {
        for id in self.running() {
            self.stop(id).await;
        }
        for (term, leaders) in self.trace().leaders_by_term() {
            assert!(
                leaders.len() <= 1,
                "two leaders in term {term}: {leaders:?} (seed {})",
                self.seed
            );
        }
    }
}
