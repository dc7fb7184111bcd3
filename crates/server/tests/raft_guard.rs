//! No peer input can panic a replica (issue 13, point 3).
//!
//! Three replicas run in this process (`server::serve` on port-0 listeners). Every
//! replica is fed crafted RaftMessages (extreme terms, unknown and forged senders,
//! truncated, random and oversized payloads, entries past the log end or out of order,
//! wild snapshot offsets, a snapshot that does not decode), each refusal code asserted,
//! then a seeded stream of random messages (`DISPATCHER_FUZZ_SEED` replays a run,
//! `DISPATCHER_FUZZ_COUNT` sets its length): fully random ones, a stale member's valid
//! messages and the current leader's valid messages, each with fields replaced by wild
//! values and some with damaged bytes. Afterwards the cluster must acknowledge a job,
//! every replica must reach the same applied index and digest, nothing in the process
//! may have panicked, and no replica may have persisted a vote of a non-member or of an
//! out-of-bounds term; then the replicas restart from their data and serve again.
//!
//! What the random stream does not send: a well-formed message in a member's name, at a
//! term that member could be in, that the guard accepts. Such a message is what that
//! member could send; without peer authentication (the certificate check of issue 13
//! point 2) nothing can tell it from the member's own, and Raft trusts its members.
//! Such messages the guard refuses are sent (the refusal is decided by the guard's own
//! pure check against a view that knows less than the target, so the target refuses
//! them too, or outvotes them); so is everything from non-members, from node 0 and in
//! the target's own name, at any term.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::RaftLogStorage;
use openraft::{
    CommittedLeaderId, Entry, EntryPayload, Membership, SnapshotMeta, StoredMembership,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;

use dispatcher_core::codec;
use dispatcher_proto::v1 as pb;
use dispatcher_server::raft::guard::{self, View, MAX_SNAPSHOT_BYTES, MAX_TERM};
use dispatcher_server::raft::log_store::{Identity, LogStore};
use dispatcher_server::raft::network::MAX_RAFT_MESSAGE;
use dispatcher_server::raft::{LogId, Node, NodeId, TypeConfig};
use dispatcher_server::server::config::{Args, ServerConfig};
use dispatcher_server::server::{serve, ServerError};
use dispatcher_testkit::spec::{self, JobBuilder};
use dispatcher_testkit::wait_for;
use pb::cluster_service_client::ClusterServiceClient;
use pb::job_service_client::JobServiceClient;
use pb::raft_service_client::RaftServiceClient;

type Vote = openraft::Vote<NodeId>;

const CLUSTER: &str = "guard-test";
const MEMBERS: [NodeId; 3] = [1, 2, 3];
const DEADLINE: Duration = Duration::from_secs(30);
/// One call to a replica; a replica whose Raft died must fail the test, not hang it.
const CALL: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- the cluster

struct Replica {
    id: NodeId,
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

struct Cluster {
    _root: tempfile::TempDir,
    initial: String,
    tune: Tune,
    replicas: Vec<Replica>,
}

/// Changes to a replica's settings beyond what the flags set.
type Tune = fn(&mut ServerConfig);

fn start_replica(
    id: NodeId,
    listener: TcpListener,
    initial: &str,
    dir: &Path,
    tune: Tune,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), ServerError>>) {
    let addr = listener.local_addr().expect("bound listener");
    let mut config = Args {
        id: Some(id),
        listen: Some(addr),
        data_dir: Some(dir.to_path_buf()),
        initial_cluster: Some(initial.to_string()),
        cluster_name: Some(CLUSTER.into()),
        heartbeat_ms: Some(50),
        election_timeout_min_ms: Some(150),
        election_timeout_max_ms: Some(300),
        ..Default::default()
    }
    .into_config()
    .expect("a valid replica configuration");
    tune(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(config, listener, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

impl Cluster {
    async fn start(tune: Tune) -> Cluster {
        let root = tempfile::tempdir().expect("temp dir");
        let mut listeners = vec![];
        for _ in MEMBERS {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.local_addr().expect("bound"))
            .collect();
        let initial = MEMBERS
            .iter()
            .zip(&addrs)
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut replicas = vec![];
        for ((id, listener), addr) in MEMBERS.iter().zip(listeners).zip(addrs) {
            let dir = root.path().join(format!("r{id}"));
            let (stop, task) = start_replica(*id, listener, &initial, &dir, tune);
            replicas.push(Replica {
                id: *id,
                addr,
                dir,
                stop: Some(stop),
                task: Some(task),
            });
        }
        Cluster {
            _root: root,
            initial,
            tune,
            replicas,
        }
    }

    async fn stop(&mut self) {
        for r in &mut self.replicas {
            if let Some(stop) = r.stop.take() {
                let _ = stop.send(());
            }
        }
        for r in &mut self.replicas {
            if let Some(task) = r.task.take() {
                let result = tokio::time::timeout(DEADLINE, task)
                    .await
                    .expect("a replica stops within the deadline")
                    .expect("the replica's task did not panic");
                result.expect("the replica stopped without an error");
            }
        }
    }

    /// Stops replica `id`.
    async fn stop_one(&mut self, id: NodeId) {
        let r = self
            .replicas
            .iter_mut()
            .find(|r| r.id == id)
            .expect("a member");
        if let Some(stop) = r.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = r.task.take() {
            let stopped = tokio::time::timeout(DEADLINE, task)
                .await
                .expect("a replica stops within the deadline");
            stopped
                .expect("the replica's task did not panic")
                .expect("the replica stopped without an error");
        }
    }

    /// Starts the stopped replica `id` from its data, once it answers. The stopped
    /// instance lives in this process: its last connection tasks may still hold its
    /// storage open for a moment after it stopped (a process that exits has no such
    /// moment), and a start in that moment fails to open the data directory: then it is
    /// started again.
    async fn start_one(&mut self, id: NodeId) {
        let (initial, tune) = (self.initial.clone(), self.tune);
        let r = self
            .replicas
            .iter_mut()
            .find(|r| r.id == id)
            .expect("a member");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let listener = TcpListener::bind(r.addr).await.expect("rebind");
            let (stop, task) = start_replica(id, listener, &initial, &r.dir, tune);
            let started = loop {
                if status(r.addr).await.is_some() {
                    break true;
                }
                if task.is_finished() {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match started {
                true => {
                    r.stop = Some(stop);
                    r.task = Some(task);
                    return;
                }
                false => {
                    let outcome = task.await.map(|r| r.err());
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "replica {id} did not start again: {outcome:?}"
                    );
                    println!("replica {id} did not start yet ({outcome:?}); again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Stops replica `id` until the others elect a leader, then starts it again: a new
    /// term, so that the random stream has stale terms to send.
    async fn bounce(&mut self, id: NodeId) {
        self.stop_one(id).await;
        let others: Vec<SocketAddr> = self
            .replicas
            .iter()
            .filter(|o| o.id != id)
            .map(|o| o.addr)
            .collect();
        wait_for(DEADLINE, "the other replicas elect a leader", || {
            let others = others.clone();
            async move {
                let mut leaders = vec![];
                for a in others {
                    leaders.push(status(a).await?.leader_id);
                }
                (leaders
                    .iter()
                    .all(|l| *l != 0 && *l != id && *l == leaders[0]))
                .then_some(())
            }
        })
        .await;
        self.start_one(id).await;
    }

    async fn restart(&mut self) {
        for r in &mut self.replicas {
            let listener = TcpListener::bind(r.addr).await.expect("rebind");
            let (stop, task) = start_replica(r.id, listener, &self.initial, &r.dir, self.tune);
            r.stop = Some(stop);
            r.task = Some(task);
        }
    }

    fn addr(&self, id: NodeId) -> SocketAddr {
        self.replicas
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.addr)
            .expect("a member")
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// One replica's own status, if it answers.
async fn status(addr: SocketAddr) -> Option<pb::ReplicaStatus> {
    let call = async {
        let mut client = ClusterServiceClient::connect(url(addr)).await.ok()?;
        let resp = client
            .status(pb::StatusRequest {
                local_only: true,
                with_digest: true,
            })
            .await
            .ok()?
            .into_inner();
        resp.replicas.into_iter().find(|r| r.reachable)
    };
    tokio::time::timeout(CALL, call).await.ok().flatten()
}

async fn all_status(cluster: &Cluster) -> Option<Vec<pb::ReplicaStatus>> {
    let mut out = vec![];
    for r in &cluster.replicas {
        out.push(status(r.addr).await?);
    }
    Some(out)
}

/// Waits for one leader that every replica knows.
async fn wait_leader(cluster: &Cluster) -> Vec<pb::ReplicaStatus> {
    wait_for(DEADLINE, "a leader known to every replica", || async {
        let all = all_status(cluster).await?;
        let l = all[0].leader_id;
        (l != 0 && all.iter().all(|s| s.leader_id == l)).then_some(all)
    })
    .await
}

/// Submits a job through any replica until one acknowledges it.
async fn submit(cluster: &Cluster, n: u64) -> String {
    let job_id = format!("00000000-0000-4000-8000-{n:012x}");
    let spec = JobBuilder::new(&format!("after-attack-{n}"))
        .vertex("work", 1, spec::sleep(10))
        .build();
    let addrs: Vec<SocketAddr> = cluster.replicas.iter().map(|r| r.addr).collect();
    wait_for(DEADLINE, "a job acknowledged by the cluster", || {
        let (job_id, spec, addrs) = (job_id.clone(), spec.clone(), addrs.clone());
        async move {
            for addr in addrs {
                let call = async {
                    let mut client = JobServiceClient::connect(url(addr)).await.ok()?;
                    let req = pb::SubmitJobRequest {
                        job_id: job_id.clone(),
                        spec: Some(spec.clone()),
                    };
                    client.submit_job(req).await.ok()
                };
                if let Ok(Some(resp)) = tokio::time::timeout(CALL, call).await {
                    return Some(resp.into_inner().job_id);
                }
            }
            None
        }
    })
    .await
}

/// Waits until every replica applied the same index with the same digest.
async fn converged(cluster: &Cluster) -> Vec<pb::ReplicaStatus> {
    wait_for(
        DEADLINE,
        "every replica at the same applied index and digest",
        || async {
            let all = all_status(cluster).await?;
            let first = &all[0];
            let same = all.iter().all(|s| {
                s.applied_index == first.applied_index
                    && s.state_digest == first.state_digest
                    && s.last_log_index == s.applied_index
            });
            (same && first.applied_index > 0).then_some(all)
        },
    )
    .await
}

// ---------------------------------------------------------------- messages

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

fn lid(term: u64, node: NodeId, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn leader_vote(term: u64, node: NodeId) -> Vote {
    Vote::new_committed(term, node)
}

fn blank(id: LogId) -> Entry<TypeConfig> {
    Entry {
        log_id: id,
        payload: EntryPayload::Blank,
    }
}

fn append(
    vote: Vote,
    prev: Option<LogId>,
    entries: Vec<Entry<TypeConfig>>,
    leader_commit: Option<LogId>,
) -> Vec<u8> {
    let req: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote,
        prev_log_id: prev,
        entries,
        leader_commit,
    };
    codec::encode(&req).expect("encode")
}

fn vote_req(vote: Vote, last: Option<LogId>) -> Vec<u8> {
    codec::encode(&VoteRequest::new(vote, last)).expect("encode")
}

/// The cluster's membership as `initialize` wrote it (at log id 0): what a correct
/// snapshot of this cluster carries.
fn membership(cluster: &Cluster) -> Membership<NodeId, Node> {
    let nodes: BTreeMap<NodeId, Node> = cluster
        .replicas
        .iter()
        .map(|r| {
            let addr = r.addr.to_string();
            (r.id, Node { addr })
        })
        .collect();
    Membership::new(vec![MEMBERS.into_iter().collect()], nodes)
}

fn snapshot_req(
    members: &Membership<NodeId, Node>,
    vote: Vote,
    last: Option<LogId>,
    id: &str,
    offset: u64,
    data: Vec<u8>,
    done: bool,
) -> Vec<u8> {
    let req: InstallSnapshotRequest<TypeConfig> = InstallSnapshotRequest {
        vote,
        meta: SnapshotMeta {
            last_log_id: last,
            last_membership: StoredMembership::new(Some(LogId::default()), members.clone()),
            snapshot_id: id.into(),
        },
        offset,
        data,
        done,
    };
    codec::encode(&req).expect("encode")
}

/// What a replica answered: a gRPC code, and for OK whether openraft's own answer was
/// a success or a Raft error.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    RaftOk,
    RaftErr(String),
    Refused(Code, String),
}

async fn send(addr: SocketAddr, kind: Kind, payload: Vec<u8>) -> Outcome {
    match tokio::time::timeout(CALL * 2, send_once(addr, kind, payload)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Refused(Code::DeadlineExceeded, "no answer".into()),
    }
}

async fn send_once(addr: SocketAddr, kind: Kind, payload: Vec<u8>) -> Outcome {
    let mut client = RaftServiceClient::connect(url(addr))
        .await
        .expect("connect to a replica")
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(MAX_RAFT_MESSAGE);
    // No cluster id: accepted like a replica's not yet contacted by a leader, so the
    // guard under test is what decides.
    let msg = pb::RaftMessage {
        payload,
        cluster_id: String::new(),
    };
    let answer = match kind {
        Kind::Append => client.append_entries(msg).await,
        Kind::Vote => client.vote(msg).await,
        Kind::Snapshot => client.install_snapshot(msg).await,
    };
    let payload = match answer {
        Ok(resp) => resp.into_inner().payload,
        Err(status) => return Outcome::Refused(status.code(), status.message().to_string()),
    };
    let err = match kind {
        Kind::Append => {
            codec::decode::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(&payload)
                .expect("openraft's answer decodes")
                .err()
                .map(|e| e.to_string())
        }
        Kind::Vote => codec::decode::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(&payload)
            .expect("openraft's answer decodes")
            .err()
            .map(|e| e.to_string()),
        Kind::Snapshot => codec::decode::<
            Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
        >(&payload)
        .expect("openraft's answer decodes")
        .err()
        .map(|e| e.to_string()),
    };
    match err {
        None => Outcome::RaftOk,
        Some(e) => Outcome::RaftErr(e),
    }
}

/// The sender and term a payload claims, if it decodes as `kind`.
fn claimed(kind: Kind, payload: &[u8]) -> Option<Vote> {
    match kind {
        Kind::Append => codec::decode::<AppendEntriesRequest<TypeConfig>>(payload)
            .ok()
            .map(|r| r.vote),
        Kind::Vote => codec::decode::<VoteRequest<NodeId>>(payload)
            .ok()
            .map(|r| r.vote),
        Kind::Snapshot => codec::decode::<InstallSnapshotRequest<TypeConfig>>(payload)
            .ok()
            .map(|r| r.vote),
    }
}

// ---------------------------------------------------------------- crafted cases

#[derive(Clone, Debug)]
enum Expect {
    Code(Code),
    /// openraft answered (a success or its own error): the guard let it through.
    Answered,
    /// openraft answered with its own error.
    RaftError,
}

struct Case {
    name: String,
    kind: Kind,
    payload: Vec<u8>,
    expect: Expect,
}

/// The cluster as the crafted cases see it.
#[derive(Clone, Copy, Debug)]
struct Known {
    leader: NodeId,
    term: u64,
    last: u64,
}

fn crafted(k: Known, target: NodeId, members: &Membership<NodeId, Node>) -> Vec<Case> {
    use Code::{InvalidArgument as Invalid, PermissionDenied as Denied};
    let Known { leader, term, last } = k;
    // A member other than the target, to impersonate.
    let m = MEMBERS
        .into_iter()
        .find(|id| *id != target)
        .expect("another member");
    let next = term + 1;
    let prev = Some(lid(term, leader, last));
    let case = |name: &str, kind, payload, expect| Case {
        name: name.to_string(),
        kind,
        payload,
        expect,
    };
    let mut cases = vec![
        case(
            "issue 13: AppendEntries, term 2^64-1, non-member 99",
            Kind::Append,
            append(Vote::new(u64::MAX, 99), None, vec![], None),
            Expect::Code(Denied),
        ),
        case(
            "AppendEntries, committed vote of term 2^64-1, non-member 99",
            Kind::Append,
            append(leader_vote(u64::MAX, 99), None, vec![], None),
            Expect::Code(Denied),
        ),
        case(
            "AppendEntries from node 0",
            Kind::Append,
            append(leader_vote(next, 0), prev, vec![], None),
            Expect::Code(Denied),
        ),
        case(
            "AppendEntries naming the target itself as leader",
            Kind::Append,
            append(leader_vote(next, target), prev, vec![], None),
            Expect::Code(Denied),
        ),
        case(
            "issue 13: forged AppendEntries from non-member 99 committing an entry",
            Kind::Append,
            append(
                leader_vote(next, 99),
                prev,
                vec![blank(lid(next, 99, last + 1))],
                Some(lid(next, 99, last + 1)),
            ),
            Expect::Code(Denied),
        ),
        case(
            "AppendEntries of member, term 2^64-1",
            Kind::Append,
            append(leader_vote(u64::MAX, m), None, vec![], None),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries of member, term 2^48+1",
            Kind::Append,
            append(leader_vote(MAX_TERM + 1, m), prev, vec![], None),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries of member, uncommitted vote",
            Kind::Append,
            append(Vote::new(next, m), prev, vec![], None),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, prev_log_id at index 2^64-1",
            Kind::Append,
            append(
                leader_vote(next, m),
                Some(lid(term, leader, u64::MAX)),
                vec![],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, entries not consecutive",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![blank(lid(next, m, last + 1)), blank(lid(next, m, last + 3))],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, first entry not after prev_log_id",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![blank(lid(next, m, last))],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, entry of a term above the vote",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![blank(lid(next + 1, m, last + 1))],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, entry terms decreasing",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![
                    blank(lid(next, m, last + 1)),
                    blank(lid(term, leader, last + 2)),
                ],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, leader_commit far beyond, of an earlier leader",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![],
                Some(lid(0, 1, last + 1_000_000)),
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, leader_commit differing from the carried entry",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![blank(lid(next, m, last + 1))],
                Some(lid(term, leader, last + 1)),
            ),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, prev_log_id contradicting the committed log",
            Kind::Append,
            append(leader_vote(next, m), Some(lid(next, m, 1)), vec![], None),
            Expect::Code(Invalid),
        ),
        case(
            "AppendEntries, membership entry without voters",
            Kind::Append,
            append(
                leader_vote(next, m),
                prev,
                vec![Entry {
                    log_id: lid(next, m, last + 1),
                    payload: EntryPayload::Membership(Membership::new(vec![], ())),
                }],
                None,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "Vote from non-member 99",
            Kind::Vote,
            vote_req(Vote::new(next, 99), prev),
            Expect::Code(Denied),
        ),
        case(
            "Vote from node 0",
            Kind::Vote,
            vote_req(Vote::new(next, 0), prev),
            Expect::Code(Denied),
        ),
        case(
            "Vote naming the target itself",
            Kind::Vote,
            vote_req(Vote::new(next, target), prev),
            Expect::Code(Denied),
        ),
        case(
            "Vote of member, term 2^64-1",
            Kind::Vote,
            vote_req(Vote::new(u64::MAX, m), prev),
            Expect::Code(Invalid),
        ),
        case(
            "Vote of member carrying a committed vote",
            Kind::Vote,
            vote_req(leader_vote(next, m), prev),
            Expect::Code(Invalid),
        ),
        case(
            "Vote, last_log_id of a term above the vote",
            Kind::Vote,
            vote_req(Vote::new(next, m), Some(lid(next + 5, m, last))),
            Expect::Code(Invalid),
        ),
        case(
            "InstallSnapshot from non-member 99",
            Kind::Snapshot,
            snapshot_req(members, leader_vote(next, 99), prev, "x", 0, vec![1], false),
            Expect::Code(Denied),
        ),
        case(
            "InstallSnapshot, offset 2^64-1",
            Kind::Snapshot,
            snapshot_req(
                members,
                leader_vote(next, m),
                prev,
                "x",
                u64::MAX,
                vec![1],
                false,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "InstallSnapshot, offset 2^40",
            Kind::Snapshot,
            snapshot_req(
                members,
                leader_vote(next, m),
                prev,
                "x",
                1 << 40,
                vec![],
                false,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "InstallSnapshot, chunk ending past the size bound",
            Kind::Snapshot,
            snapshot_req(
                members,
                leader_vote(next, m),
                prev,
                "x",
                MAX_SNAPSHOT_BYTES - 1,
                vec![1, 2],
                false,
            ),
            Expect::Code(Invalid),
        ),
        case(
            "InstallSnapshot, vote of term 2^48+1",
            Kind::Snapshot,
            snapshot_req(
                members,
                leader_vote(MAX_TERM + 1, m),
                prev,
                "x",
                0,
                vec![1],
                false,
            ),
            Expect::Code(Invalid),
        ),
        case("empty payload", Kind::Append, vec![], Expect::Code(Invalid)),
        case(
            "unknown format version",
            Kind::Vote,
            {
                let mut p = vote_req(Vote::new(next, m), prev);
                p[0] = 0xff;
                p
            },
            Expect::Code(Invalid),
        ),
        case(
            "truncated AppendEntries",
            Kind::Append,
            {
                let p = append(
                    leader_vote(next, m),
                    prev,
                    vec![blank(lid(next, m, last + 1))],
                    None,
                );
                p[..p.len() / 2].to_vec()
            },
            Expect::Code(Invalid),
        ),
        case(
            "random bytes",
            Kind::Snapshot,
            (0..64u8)
                .map(|b| b.wrapping_mul(37).wrapping_add(11))
                .collect(),
            Expect::Code(Invalid),
        ),
    ];
    if target != leader {
        // The current leader's own vote gets past the guard; openraft then answers,
        // and nothing changes.
        let v = leader_vote(term, leader);
        cases.push(case(
            "AppendEntries past the log end (openraft answers Conflict)",
            Kind::Append,
            append(
                v,
                Some(lid(term, leader, last + 1000)),
                vec![blank(lid(term, leader, last + 1001))],
                None,
            ),
            Expect::Answered,
        ));
        cases.push(case(
            "InstallSnapshot, first chunk at offset 4096 (openraft's SnapshotMismatch)",
            Kind::Snapshot,
            snapshot_req(
                members,
                v,
                Some(lid(term, leader, last + 5)),
                "mid-stream",
                4096,
                vec![1],
                false,
            ),
            Expect::RaftError,
        ));
        cases.push(case(
            "InstallSnapshot, a whole snapshot that does not decode",
            Kind::Snapshot,
            snapshot_req(
                members,
                v,
                Some(lid(term, leader, last + 5)),
                "garbage",
                0,
                vec![0xAB; 100],
                true,
            ),
            Expect::Code(Invalid),
        ));
    }
    cases
}

// ---------------------------------------------------------------- random mutations

struct Fuzzer {
    rng: StdRng,
    members: Membership<NodeId, Node>,
    known: Known,
    /// Every replica's term is at least this; a member's vote below it is stale.
    floor: u64,
}

impl Fuzzer {
    fn term(&mut self) -> u64 {
        let k = self.known;
        match self.rng.gen_range(0..9) {
            0 => 0,
            1 => k.term.saturating_sub(1),
            2 => k.term,
            3 => k.term + 1,
            4 => MAX_TERM,
            5 => MAX_TERM + 1,
            6 => u64::MAX,
            7 => self.rng.gen(),
            _ => self.rng.gen_range(0..k.term + 3),
        }
    }

    fn index(&mut self) -> u64 {
        let last = self.known.last;
        match self.rng.gen_range(0..10) {
            0 => 0,
            1 => last.saturating_sub(self.rng.gen_range(0..5)),
            2 => last + self.rng.gen_range(0..5),
            3 => last + 1_000_000,
            4 => 1 << 56,
            5 => (1 << 56) + 1,
            6 => u64::MAX,
            7 => self.rng.gen(),
            _ => self.rng.gen_range(0..last + 10),
        }
    }

    fn node(&mut self) -> NodeId {
        match self.rng.gen_range(0..7) {
            0 => 0,
            1 => 99,
            2 => self.rng.gen(),
            n => MEMBERS[(n as usize - 3) % 3],
        }
    }

    fn log_id(&mut self) -> LogId {
        let (t, n, i) = (self.term(), self.node(), self.index());
        lid(t, n, i)
    }

    fn maybe_log_id(&mut self) -> Option<LogId> {
        self.rng.gen_bool(0.8).then(|| self.log_id())
    }

    /// A vote: any sender at any term, but a member only at a stale or an
    /// out-of-bounds term (see the module doc).
    fn vote(&mut self, target: NodeId, committed: bool) -> Vote {
        let node = match self.rng.gen_range(0..4) {
            0 => target,
            _ => self.node(),
        };
        let mut term = self.term();
        if MEMBERS.contains(&node) && node != target && term <= MAX_TERM && term >= self.floor {
            term = if self.floor > 0 && self.rng.gen_bool(0.5) {
                self.rng.gen_range(0..self.floor)
            } else {
                self.rng.gen_range(MAX_TERM + 1..=u64::MAX)
            };
        }
        let committed = if self.rng.gen_bool(0.1) {
            !committed
        } else {
            committed
        };
        if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        }
    }

    fn entries(&mut self, prev: Option<LogId>, vote: &Vote) -> Vec<Entry<TypeConfig>> {
        let n = self.rng.gen_range(0..5);
        let mut next = prev.map_or(0, |p| p.index.wrapping_add(1));
        let mut out = vec![];
        for _ in 0..n {
            let id = match self.rng.gen_range(0..4) {
                // Plausible: consecutive, of the vote's leader.
                0 | 1 => lid(vote.leader_id.term, vote.leader_id.node_id, next),
                2 => lid(self.term(), self.node(), next),
                _ => self.log_id(),
            };
            let payload = if self.rng.gen_bool(0.2) {
                let voters: std::collections::BTreeSet<NodeId> =
                    (0..self.rng.gen_range(0..4)).map(|_| self.node()).collect();
                EntryPayload::Membership(Membership::new(vec![voters], ()))
            } else {
                EntryPayload::Blank
            };
            out.push(Entry {
                log_id: id,
                payload,
            });
            next = id.index.wrapping_add(1);
        }
        out
    }

    fn message(&mut self, target: NodeId) -> (Kind, Vec<u8>) {
        let kind = match self.rng.gen_range(0..3) {
            0 => Kind::Append,
            1 => Kind::Vote,
            _ => Kind::Snapshot,
        };
        let payload = match self.rng.gen_range(0..3) {
            0 => self.mutated(kind, target),
            1 => self.leaders(kind, target),
            _ => self.wild(kind, target),
        };
        (kind, self.bytes(payload))
    }

    /// A message of the current leader (or, to the leader, of a member campaigning for
    /// the next term), with one to three fields replaced by wild values. Sent only when
    /// the guard refuses it (see [`Fuzzer::verdict`]).
    fn leaders(&mut self, kind: Kind, target: NodeId) -> Vec<u8> {
        let Known { leader, term, last } = self.known;
        let (lt, ln) = if target == leader {
            let other = MEMBERS.into_iter().find(|m| *m != target).unwrap_or(leader);
            (term + 1, other)
        } else {
            (term, leader)
        };
        let fields: Vec<u32> = (0..self.rng.gen_range(1..4))
            .map(|_| self.rng.gen_range(0..6))
            .collect();
        let hit = |f: u32| fields.contains(&f);
        match kind {
            Kind::Append => {
                let mut vote = Vote::new_committed(lt, ln);
                let mut prev = Some(lid(term, leader, last));
                let mut entries = vec![blank(lid(lt, ln, last + 1))];
                let mut lc = Some(lid(term, leader, last));
                if hit(0) {
                    vote = if self.rng.gen_bool(0.5) {
                        Vote::new(lt, ln)
                    } else {
                        self.vote(target, true)
                    };
                }
                if hit(1) {
                    prev = self.maybe_log_id();
                }
                if hit(2) {
                    entries[0].log_id = self.log_id();
                }
                if hit(3) {
                    lc = self.maybe_log_id();
                }
                if hit(4) {
                    entries.extend(self.entries(prev, &vote));
                }
                if hit(5) {
                    let voters = (0..self.rng.gen_range(0..3)).map(|_| self.node()).collect();
                    entries[0].payload =
                        EntryPayload::Membership(Membership::new(vec![voters], ()));
                }
                append(vote, prev, entries, lc)
            }
            Kind::Vote => {
                let mut vote = Vote::new(term + 1, ln);
                let mut last_id = Some(lid(term, leader, last));
                if hit(0) || hit(1) {
                    vote = Vote::new_committed(term + 1, ln);
                }
                if hit(2) || hit(3) {
                    last_id = Some(lid(term + 1 + self.rng.gen_range(1..5), ln, last));
                }
                if hit(4) || hit(5) {
                    last_id = self.maybe_log_id();
                }
                vote_req(vote, last_id)
            }
            Kind::Snapshot => {
                let mut vote = Vote::new_committed(lt, ln);
                let mut last_id = Some(lid(lt, ln, last + 5));
                let mut offset = 0;
                let mut data = vec![0u8; 16];
                if hit(0) {
                    vote = Vote::new(lt, ln);
                }
                if hit(1) || hit(5) {
                    last_id = self.maybe_log_id();
                }
                if hit(2) {
                    offset = match self.rng.gen_range(0..3) {
                        0 => MAX_SNAPSHOT_BYTES,
                        1 => u64::MAX,
                        _ => self.rng.gen(),
                    };
                }
                if hit(3) {
                    data = vec![0; self.rng.gen_range(0..64)];
                }
                let id = format!("leader-{}", self.rng.gen_range(0..3));
                snapshot_req(&self.members, vote, last_id, &id, offset, data, hit(4))
            }
        }
    }

    /// A member's stale vote (below every replica's term).
    fn stale_vote(&mut self, target: NodeId, committed: bool) -> Vote {
        let others: Vec<NodeId> = MEMBERS.into_iter().filter(|m| *m != target).collect();
        let node = others[self.rng.gen_range(0..others.len())];
        let term = self.rng.gen_range(0..self.floor.max(1));
        if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        }
    }

    /// A message a correct but stale member could send (consistent with the log below
    /// the committed index), with up to two fields replaced by wild values.
    fn mutated(&mut self, kind: Kind, target: NodeId) -> Vec<u8> {
        let last = self.known.last;
        let mutations = self.rng.gen_range(0..3);
        let fields: Vec<u32> = (0..mutations).map(|_| self.rng.gen_range(0..5)).collect();
        let hit = |f: u32| fields.contains(&f);
        match kind {
            Kind::Append => {
                let mut vote = self.stale_vote(target, true);
                let term = vote.leader_id.term;
                let pi = self.rng.gen_range(0..last.max(1));
                let mut prev = Some(lid(term.min(1), 1, pi)).filter(|_| pi > 0);
                let room = last.saturating_sub(pi + 1);
                let n = self.rng.gen_range(0..=room.min(3));
                let first = prev.map_or(0, |p| p.index + 1);
                let mut entries: Vec<Entry<TypeConfig>> = (0..n)
                    .map(|k| blank(lid(term, vote.leader_id.node_id, first + k)))
                    .collect();
                let mut lc = prev.filter(|_| self.rng.gen_bool(0.5));
                if hit(0) {
                    vote = self.vote(target, true);
                }
                if hit(1) {
                    prev = self.maybe_log_id();
                }
                if hit(2) && !entries.is_empty() {
                    let at = self.rng.gen_range(0..entries.len());
                    entries[at].log_id = self.log_id();
                }
                if hit(3) {
                    lc = self.maybe_log_id();
                }
                if hit(4) {
                    entries.extend(self.entries(prev, &vote));
                }
                append(vote, prev, entries, lc)
            }
            Kind::Vote => {
                let mut vote = self.stale_vote(target, false);
                let mut last_id = Some(lid(vote.leader_id.term, 1, self.rng.gen_range(0..=last)));
                if hit(0) || hit(2) {
                    vote = self.vote(target, false);
                }
                if hit(1) || hit(3) {
                    last_id = self.maybe_log_id();
                }
                vote_req(vote, last_id)
            }
            Kind::Snapshot => {
                let mut vote = self.stale_vote(target, true);
                let mut last_id = Some(lid(
                    vote.leader_id.term,
                    1,
                    self.rng.gen_range(0..last.max(1)),
                ));
                let mut offset = self.rng.gen_range(0..64);
                let mut data: Vec<u8> = (0..self.rng.gen_range(0..64))
                    .map(|_| self.rng.gen())
                    .collect();
                if hit(0) {
                    vote = self.vote(target, true);
                }
                if hit(1) {
                    last_id = self.maybe_log_id();
                }
                if hit(2) {
                    offset = self.rng.gen();
                }
                if hit(3) {
                    data = vec![0; self.rng.gen_range(0..4096)];
                }
                let id = format!("stale-{}", self.rng.gen_range(0..3));
                snapshot_req(
                    &self.members.clone(),
                    vote,
                    last_id,
                    &id,
                    offset,
                    data,
                    hit(4) || self.rng.gen_bool(0.3),
                )
            }
        }
    }

    /// A message with every field drawn at random.
    fn wild(&mut self, kind: Kind, target: NodeId) -> Vec<u8> {
        match kind {
            Kind::Append => {
                let vote = self.vote(target, true);
                let prev = self.maybe_log_id();
                let entries = self.entries(prev, &vote);
                let lc = self.maybe_log_id();
                append(vote, prev, entries, lc)
            }
            Kind::Vote => {
                let vote = self.vote(target, false);
                let last = self.maybe_log_id();
                vote_req(vote, last)
            }
            Kind::Snapshot => {
                let vote = self.vote(target, true);
                let last = self.maybe_log_id();
                let offset = match self.rng.gen_range(0..5) {
                    0 => 0,
                    1 => self.rng.gen_range(0..4096),
                    2 => MAX_SNAPSHOT_BYTES - self.rng.gen_range(0..16),
                    3 => u64::MAX - self.rng.gen_range(0..16),
                    _ => self.rng.gen(),
                };
                let len = self.rng.gen_range(0..256);
                let data = (0..len).map(|_| self.rng.gen()).collect();
                let id = format!("fuzz-{}", self.rng.gen_range(0..4));
                snapshot_req(
                    &self.members.clone(),
                    vote,
                    last,
                    &id,
                    offset,
                    data,
                    self.rng.gen_bool(0.5),
                )
            }
        }
    }

    /// Byte-level damage to a well-formed payload, some of the time.
    fn bytes(&mut self, mut p: Vec<u8>) -> Vec<u8> {
        match self.rng.gen_range(0..10) {
            0 => {
                let at = self.rng.gen_range(0..=p.len());
                p.truncate(at);
            }
            1 | 2 => {
                for _ in 0..self.rng.gen_range(1..4) {
                    if p.is_empty() {
                        break;
                    }
                    let at = self.rng.gen_range(0..p.len());
                    p[at] = self.rng.gen();
                }
            }
            3 => {
                let extra = self.rng.gen_range(1..32);
                p.extend((0..extra).map(|_| self.rng.gen::<u8>()));
            }
            4 => {
                let len = self.rng.gen_range(0..128);
                p = (0..len).map(|_| self.rng.gen()).collect();
            }
            _ => {}
        }
        p
    }

    /// For a payload that decodes as a message of a member other than the target, at a
    /// term that member could be in: whether the guard refuses it in a view that knows
    /// the members but nothing of the target's log (no committed log id, the lowest
    /// vote). Every rule the guard then applies it applies on the target too, which knows
    /// more (or outvotes the message, and openraft touches nothing); so a message this
    /// refuses cannot change the target's log. `None` for every other payload.
    fn verdict(&self, kind: Kind, target: NodeId, payload: &[u8]) -> Option<bool> {
        let vote = claimed(kind, payload)?;
        let (term, node) = (vote.leader_id.term, vote.leader_id.node_id);
        if !(MEMBERS.contains(&node) && node != target && term >= self.floor && term <= MAX_TERM) {
            return None;
        }
        let view = View {
            local: target,
            members: MEMBERS.into_iter().collect(),
            memberships: vec![],
            vote: Vote::default(),
            committed: None,
            leading: false,
        };
        let refused = match kind {
            Kind::Append => codec::decode::<AppendEntriesRequest<TypeConfig>>(payload)
                .map(|r| guard::check_append_entries(&view, &r).is_err()),
            Kind::Vote => codec::decode::<VoteRequest<NodeId>>(payload)
                .map(|r| guard::check_vote(&view, &r).is_err()),
            Kind::Snapshot => codec::decode::<InstallSnapshotRequest<TypeConfig>>(payload)
                .map(|r| guard::check_install_snapshot(&view, &r).is_err()),
        };
        Some(refused.unwrap_or(true))
    }
}

// ---------------------------------------------------------------- the test

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(vec![]));
    let record = seen.clone();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut s) = record.lock() {
            s.push(info.to_string());
        }
        default(info);
    }));
    seen
}

fn seed() -> u64 {
    match std::env::var("DISPATCHER_FUZZ_SEED") {
        Ok(s) => s
            .parse()
            .expect("DISPATCHER_FUZZ_SEED must be an unsigned integer"),
        Err(_) => rand::thread_rng().gen(),
    }
}

fn count() -> usize {
    match std::env::var("DISPATCHER_FUZZ_COUNT") {
        Ok(s) => s
            .parse()
            .expect("DISPATCHER_FUZZ_COUNT must be an unsigned integer"),
        Err(_) => 300,
    }
}

async fn persisted_vote(dir: &Path, id: NodeId) -> Option<Vote> {
    let identity = Identity {
        cluster: CLUSTER.into(),
        node_id: id,
    };
    // The stopped replica's tasks may hold the database a moment longer.
    let mut log = wait_for(DEADLINE, "the stopped replica's log store opens", || {
        let identity = identity.clone();
        async move {
            LogStore::open(&dir.join("raft"), &identity)
                .ok()
                .map(|(l, _)| l)
        }
    })
    .await;
    log.read_vote().await.expect("read the persisted vote")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crafted_and_random_raft_messages_neither_panic_nor_diverge_replicas() {
    let panics = count_panics();
    let seed = seed();
    println!("DISPATCHER_FUZZ_SEED={seed}");

    let mut cluster = Cluster::start(|_| {}).await;
    submit(&cluster, 1).await;
    for _ in 0..2 {
        let leader = wait_leader(&cluster).await[0].leader_id;
        cluster.bounce(leader).await;
    }
    submit(&cluster, 2).await;
    let before = converged(&cluster).await;
    let leader = before[0].leader_id;
    let term = before.iter().map(|s| s.term).max().unwrap_or(0);
    let known = Known {
        leader,
        term,
        last: before[0].last_log_index,
    };
    println!("before the attack: {known:?}");

    // Crafted messages, to every replica.
    let members = membership(&cluster);
    let mut wrong = vec![];
    let mut answered = vec![];
    for r in &cluster.replicas {
        for case in crafted(known, r.id, &members) {
            let got = send(r.addr, case.kind, case.payload).await;
            let ok = match (&case.expect, &got) {
                (Expect::Code(c), Outcome::Refused(g, _)) => c == g,
                (Expect::Answered, Outcome::RaftOk | Outcome::RaftErr(_)) => true,
                (Expect::RaftError, Outcome::RaftErr(_)) => true,
                _ => false,
            };
            if !ok {
                wrong.push(format!(
                    "replica {}: {}: expected {:?}, got {got:?}",
                    r.id, case.name, case.expect
                ));
            } else if let Outcome::RaftErr(e) = &got {
                answered.push(format!("replica {}: {}: openraft: {e}", r.id, case.name));
            }
        }
    }
    // Last, as it deposes the leader: a member's higher vote with nothing else reaches
    // openraft only after the leader stepped down to it (the inbox's step-down path).
    let depose = append(
        leader_vote(
            term + 1,
            MEMBERS
                .into_iter()
                .find(|m| *m != leader)
                .expect("a follower"),
        ),
        None,
        vec![],
        None,
    );
    match send(cluster.addr(leader), Kind::Append, depose).await {
        Outcome::RaftOk => {}
        other => wrong.push(format!("a higher vote to the leader: {other:?}")),
    }
    for line in &answered {
        println!("{line}");
    }
    assert!(wrong.is_empty(), "crafted cases:\n{}", wrong.join("\n"));

    // Just over the largest message a replica accepts.
    let oversized = vec![0u8; MAX_RAFT_MESSAGE];
    let got = send(cluster.addr(leader), Kind::Append, oversized).await;
    assert!(
        matches!(got, Outcome::Refused(Code::OutOfRange, _)),
        "an oversized message: {got:?}"
    );

    // The random stream, against the cluster as it is after the deposition.
    wait_leader(&cluster).await;
    let now = converged(&cluster).await;
    let floor = now.iter().map(|s| s.term).min().unwrap_or(0);
    let known = Known {
        leader: now[0].leader_id,
        term: now.iter().map(|s| s.term).max().unwrap_or(0),
        last: now[0].last_log_index,
    };
    let mut fuzz = Fuzzer {
        rng: StdRng::seed_from_u64(seed),
        members: membership(&cluster),
        known,
        floor,
    };
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let (mut sent, total) = (0, count());
    while sent < total {
        let target = MEMBERS[fuzz.rng.gen_range(0..3)];
        let (kind, payload) = fuzz.message(target);
        let live = match fuzz.verdict(kind, target, &payload) {
            // What the member could send: not sent (see the module doc).
            Some(false) => continue,
            Some(true) => "in a member's name at a live term: ",
            None => "",
        };
        sent += 1;
        let got = send(cluster.addr(target), kind, payload).await;
        let key = match &got {
            Outcome::RaftOk => format!("{live}openraft answered"),
            Outcome::RaftErr(_) => format!("{live}openraft returned an error"),
            Outcome::Refused(c @ (Code::InvalidArgument | Code::PermissionDenied), _) => {
                format!("{live}refused {c:?}")
            }
            Outcome::Refused(c, m) => {
                panic!("message {sent} ({kind:?} to {target}, seed {seed}): unexpected {c:?}: {m}")
            }
        };
        *tally.entry(key).or_default() += 1;
    }
    println!("{sent} random messages: {tally:?}");

    // The cluster is unharmed.
    submit(&cluster, 3).await;
    let after = converged(&cluster).await;
    for s in &after {
        assert!(s.term <= MAX_TERM, "replica {} at term {}", s.id, s.term);
    }
    let panicked = panics.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "panics: {panicked:?}");

    // No persisted vote names a non-member or an out-of-bounds term...
    cluster.stop().await;
    for r in &cluster.replicas {
        let vote = persisted_vote(&r.dir, r.id)
            .await
            .expect("a persisted vote");
        assert!(
            MEMBERS.contains(&vote.leader_id.node_id) && vote.leader_id.term <= MAX_TERM,
            "replica {} persisted the vote {vote}",
            r.id
        );
    }
    // ...and the replicas serve again from their data.
    cluster.restart().await;
    wait_leader(&cluster).await;
    submit(&cluster, 4).await;
    converged(&cluster).await;
    cluster.stop().await;
    let panicked = panics.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "panics: {panicked:?}");
}

/// A follower that fell behind a snapshot catches up through the RaftService, chunk by
/// chunk: the inbox assembles the chunks, checks the state decodes, and installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_replica_catches_up_from_a_snapshot_sent_in_many_chunks() {
    let panics = count_panics();
    let mut cluster = Cluster::start(|c| {
        c.raft.snapshot_after_logs = 10;
        c.raft.logs_kept_after_snapshot = 0;
        // A few hundred bytes per chunk: the state of a few jobs is several chunks.
        c.raft.snapshot_chunk_bytes = 256;
    })
    .await;
    submit(&cluster, 1).await;
    converged(&cluster).await;
    let leader = wait_leader(&cluster).await[0].leader_id;
    let lagging = MEMBERS
        .into_iter()
        .find(|m| *m != leader)
        .expect("a follower");
    cluster.stop_one(lagging).await;
    for n in 2..40 {
        submit(&cluster, n).await;
    }
    cluster.start_one(lagging).await;
    let all = converged(&cluster).await;
    let caught_up = all
        .iter()
        .find(|s| s.id == lagging)
        .expect("the lagging replica");
    assert!(caught_up.applied_index >= 40, "{caught_up:?}");
    cluster.stop().await;
    let panicked = panics.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "panics: {panicked:?}");
}
