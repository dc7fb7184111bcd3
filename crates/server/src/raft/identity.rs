//! Who a replica belongs to: the cluster id, and the start-up decision of a replica
//! whose data directory is empty.
//!
//! **The cluster id** is 128 random bits, drawn once by the replica that bootstraps a
//! cluster (or, for data written before cluster ids existed, by the first leader that a
//! quorum acknowledges, see [`draw_when_leading`]) and stored in `cluster-id` in every
//! member's data directory. Every Raft message and every answer carries the sender's id
//! (`RaftMessage.cluster_id`); [`judge`] decides what to do with it: equal ids pass, a
//! different non-empty id is refused both ways (a replica of another cluster, or a wiped
//! replica that bootstrapped alone), an empty one passes (a replica not yet contacted by
//! a leader, or an older version during an upgrade), and a replica without an id adopts
//! the id of its first leader's AppendEntries or InstallSnapshot (how a new member, or a
//! member of an upgraded cluster, learns it).
//!
//! **Seen with data.** A replica also records, in the same file, every peer it has seen
//! carry this cluster's id: such a peer held the cluster's data. A replica that starts
//! with an empty directory asks the peers of `--initial-cluster` ([`probe`], the
//! `Identify` RPC) and [`decide`]s: bootstrap (only with `--initial-cluster-state new`,
//! as the lowest id, and when no peer reports an existing cluster), wait to be added, or
//! refuse because it is a voter that peers saw hold data (its log is lost; only
//! `dispatchctl cluster replace-node` brings it back safely: a voter that forgot what it
//! acknowledged can make a quorum forget a committed entry).
//!
//! Owns the `cluster-id` file, [`judge`] and [`decide`] (pure). Must never: know a gRPC
//! service (it dials peers with the generated client only), touch the Raft log, or adopt
//! an id over another one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dispatcher_proto::v1::raft_service_client::RaftServiceClient;
use dispatcher_proto::v1::{IdentifyRequest, IdentifyResponse};

use super::{NodeId, Raft};

/// The file, in the data directory, that holds the cluster id and the replicas seen
/// with data.
pub const FILE_NAME: &str = "cluster-id";

const HEADER: &str = "# dispatcher cluster identity; written by the replica, do not edit";

/// `--initial-cluster-state`: whether an empty data directory may start a cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitialClusterState {
    /// The cluster is being created: the lowest id of `--initial-cluster` bootstraps it,
    /// unless a peer answers with an existing cluster.
    #[default]
    New,
    /// The cluster exists: never bootstrap; wait to be added.
    Existing,
}

/// Why the identity file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: {reason}; it is written by the replica and must not be edited (restore it from a copy, or treat the replica as wiped: docs/operations.md, \"Replace a replica\")")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Stored {
    id: Option<String>,
    seen: BTreeSet<NodeId>,
}

impl Stored {
    fn encode(&self) -> String {
        let mut out = format!("{HEADER}\n");
        if let Some(id) = &self.id {
            out.push_str(&format!("cluster-id {id}\n"));
        }
        let seen: Vec<String> = self.seen.iter().map(|n| n.to_string()).collect();
        out.push_str(&format!("seen-with-data {}\n", seen.join(",")));
        out
    }

    fn decode(text: &str) -> Result<Stored, String> {
        let mut stored = Stored::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "cluster-id" if valid_id(value) => stored.id = Some(value.to_string()),
                "cluster-id" => return Err(format!("line {}: bad cluster id {value:?}", n + 1)),
                "seen-with-data" => {
                    for part in value.split(',').filter(|p| !p.is_empty()) {
                        let id = part
                            .parse()
                            .map_err(|_| format!("line {}: bad replica id {part:?}", n + 1))?;
                        stored.seen.insert(id);
                    }
                }
                other => return Err(format!("line {}: unknown key {other:?}", n + 1)),
            }
        }
        Ok(stored)
    }
}

/// A cluster id as drawn here: 32 lowercase hex digits.
fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What to do with the cluster id a peer's message carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass it on.
    Accept,
    /// Store this id as ours, then pass the message on.
    Adopt(String),
    /// Refuse the message: the peer belongs to another cluster.
    Refuse,
}

/// Decides on a message carrying `remote` (empty: none) at a replica whose id is
/// `local`. `may_adopt`: the message is a leader's AppendEntries or InstallSnapshot (or
/// the answer to ours), whose id a replica without one takes as its own.
pub fn judge(local: Option<&str>, remote: &str, may_adopt: bool) -> Verdict {
    match local {
        _ if remote.is_empty() => Verdict::Accept,
        Some(id) if id == remote => Verdict::Accept,
        Some(_) => Verdict::Refuse,
        None if may_adopt && valid_id(remote) => Verdict::Adopt(remote.to_string()),
        None => Verdict::Accept,
    }
}

/// A message refused for its cluster id.
#[derive(Clone, Debug, thiserror::Error)]
#[error("replica {peer} belongs to cluster {theirs}, this replica to cluster {ours}: refused (a replica of another cluster, or one wiped and started alone; replace it with `dispatchctl cluster replace-node {peer} ADDR`, docs/operations.md)")]
pub struct Mismatch {
    /// The peer.
    pub peer: NodeId,
    /// Its cluster id.
    pub theirs: String,
    /// Ours.
    pub ours: String,
}

/// This replica's cluster identity, shared by the inbox side and the network side.
#[derive(Clone)]
pub struct ClusterIdentity {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    stored: Mutex<Stored>,
    /// When a mismatch was last logged (at most one ERROR per peer per 10 s).
    logged: Mutex<BTreeMap<NodeId, Instant>>,
}

const MISMATCH_REPORT_INTERVAL: Duration = Duration::from_secs(10);

impl ClusterIdentity {
    /// Reads the identity of the data directory `data_dir` (none yet if the file does
    /// not exist).
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(FILE_NAME);
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => Stored::decode(&text).map_err(|reason| IdentityError::Malformed {
                path: path.clone(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Stored::default(),
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        Ok(ClusterIdentity {
            inner: Arc::new(Inner {
                path,
                stored: Mutex::new(stored),
                logged: Mutex::default(),
            }),
        })
    }

    fn stored(&self) -> std::sync::MutexGuard<'_, Stored> {
        self.inner.stored.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cluster id, if this replica has one.
    pub fn id(&self) -> Option<String> {
        self.stored().id.clone()
    }

    /// The id as sent on the wire (empty: none).
    pub fn wire(&self) -> String {
        self.id().unwrap_or_default()
    }

    /// Replicas seen holding this cluster's data.
    pub fn seen_with_data(&self) -> Vec<NodeId> {
        self.stored().seen.iter().copied().collect()
    }

    /// Draws a new cluster id and stores it (bootstrap, or an upgraded cluster's
    /// leader). Refused if an id is already stored: ids are never replaced.
    pub fn draw(&self) -> Result<String, IdentityError> {
        let id = format!("{:032x}", rand::random::<u128>());
        self.set(&id)?;
        Ok(id)
    }

    fn set(&self, id: &str) -> Result<(), IdentityError> {
        let mut stored = self.stored();
        if stored.id.is_some() {
            return Ok(());
        }
        let mut next = stored.clone();
        next.id = Some(id.to_string());
        write_atomically(&self.inner.path, &next.encode())?;
        *stored = next;
        Ok(())
    }

    fn note_seen(&self, peer: NodeId) {
        let mut stored = self.stored();
        if stored.id.is_none() || stored.seen.contains(&peer) {
            return;
        }
        let mut next = stored.clone();
        next.seen.insert(peer);
        match write_atomically(&self.inner.path, &next.encode()) {
            Ok(()) => *stored = next,
            Err(e) => tracing::warn!(error = %e, peer, "cannot record a peer in the identity file"),
        }
    }

    /// Checks the cluster id `remote` of a message from (or an answer of) `peer`;
    /// adopts it when [`judge`] says so. A refusal is logged here (rate-limited).
    pub fn check(&self, peer: NodeId, remote: &str, may_adopt: bool) -> Result<(), Mismatch> {
        let local = self.id();
        match judge(local.as_deref(), remote, may_adopt) {
            Verdict::Accept => {}
            Verdict::Adopt(id) => match self.set(&id) {
                Ok(()) => tracing::info!(cluster_id = %id, leader = peer, "joined cluster"),
                // Not stored, so not adopted: the next message tries again.
                Err(e) => tracing::warn!(error = %e, "cannot store the cluster id"),
            },
            Verdict::Refuse => {
                let mismatch = Mismatch {
                    peer,
                    theirs: remote.to_string(),
                    ours: local.unwrap_or_default(),
                };
                self.log_mismatch(&mismatch);
                return Err(mismatch);
            }
        }
        if !remote.is_empty() {
            self.note_seen(peer);
        }
        Ok(())
    }

    fn log_mismatch(&self, mismatch: &Mismatch) {
        let now = Instant::now();
        let mut logged = self.inner.logged.lock().unwrap_or_else(|p| p.into_inner());
        let last = logged.get(&mismatch.peer);
        if last.is_some_and(|t| now.duration_since(*t) < MISMATCH_REPORT_INTERVAL) {
            return;
        }
        logged.insert(mismatch.peer, now);
        tracing::error!(
            peer = mismatch.peer,
            peer_cluster_id = %mismatch.theirs,
            cluster_id = %mismatch.ours,
            "{mismatch}"
        );
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// For data written before cluster ids existed: a leader without an id, acknowledged by
/// a quorum in its term, first gives its followers' answers two heartbeats to hand it
/// an id (a follower that already adopted one of an earlier leader), then draws one.
pub fn draw_when_leading(
    raft: Raft,
    identity: ClusterIdentity,
    local: NodeId,
    heartbeat: Duration,
) {
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        loop {
            if identity.id().is_some() {
                return;
            }
            let confirmed = {
                let m = metrics.borrow_and_update();
                m.current_leader == Some(local) && m.millis_since_quorum_ack.is_some()
            };
            if confirmed {
                tokio::time::sleep(heartbeat * 2).await;
                let still = {
                    let m = metrics.borrow();
                    m.current_leader == Some(local) && m.millis_since_quorum_ack.is_some()
                };
                if still && identity.id().is_none() {
                    match identity.draw() {
                        Ok(id) => tracing::info!(
                            cluster_id = %id,
                            "this cluster's data has no cluster id (written by an older version); drew one"
                        ),
                        Err(e) => tracing::warn!(error = %e, "cannot store a cluster id"),
                    }
                }
                continue;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// What one peer answered to `Identify`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerView {
    /// The peer.
    pub node_id: NodeId,
    /// Its cluster id (empty: none).
    pub cluster_id: String,
    /// Whether it holds Raft state.
    pub has_data: bool,
    /// Its membership's voters.
    pub voters: Vec<NodeId>,
    /// Its membership's learners.
    pub learners: Vec<NodeId>,
    /// Replicas it saw hold data.
    pub seen_with_data: Vec<NodeId>,
}

impl From<IdentifyResponse> for PeerView {
    fn from(r: IdentifyResponse) -> Self {
        PeerView {
            node_id: r.node_id,
            cluster_id: r.cluster_id,
            has_data: r.has_data,
            voters: r.voters,
            learners: r.learners,
            seen_with_data: r.seen_with_data,
        }
    }
}

/// What a replica with an empty data directory does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Draw a cluster id and initialise a new cluster.
    Bootstrap,
    /// Wait for a leader to contact it (it is, or will be, added).
    Wait(String),
    /// Refuse to start: the message says why and what to do.
    Refuse(String),
}

/// Decides what replica `local` (`address`: how the cluster reaches it), with an empty
/// data directory, does, from the peers' answers. Pure.
pub fn decide(
    local: NodeId,
    address: &str,
    state: InitialClusterState,
    bootstrapper: bool,
    answers: &[PeerView],
) -> Decision {
    let existing: Vec<&PeerView> = answers
        .iter()
        .filter(|a| a.has_data || !a.cluster_id.is_empty())
        .collect();
    if let Some(first) = existing.first() {
        // Every peer must still count it a voter: one that already sees it removed or
        // re-added as a learner (a replacement under way) wins over a lagging one.
        let voter = existing.iter().all(|a| a.voters.contains(&local));
        let had_data = existing.iter().any(|a| a.seen_with_data.contains(&local));
        let cluster = if first.cluster_id.is_empty() {
            "(no id yet)".to_string()
        } else {
            first.cluster_id.clone()
        };
        if voter && had_data {
            return Decision::Refuse(format!(
                "the data directory is empty, but replica {local} is a voter of cluster {cluster} (per replica {}) and held its data before: its log is lost, and rejoining with it could lose committed entries. Replace it: run `dispatchctl cluster replace-node {local} {address}` and start this replica again with its empty data directory (docs/operations.md, \"Replace a replica\")",
                first.node_id
            ));
        }
        return Decision::Wait(format!(
            "cluster {cluster} exists (per replica {}); waiting to be added or contacted by its leader",
            first.node_id
        ));
    }
    match state {
        InitialClusterState::New if bootstrapper => Decision::Bootstrap,
        InitialClusterState::New => {
            Decision::Wait("waiting for the new cluster's first leader to contact this replica".into())
        }
        InitialClusterState::Existing => Decision::Wait(
            "--initial-cluster-state existing: waiting to be added (dispatchctl cluster add-node or replace-node)".into(),
        ),
    }
}

/// Asks every peer (id and address, this replica excluded) `Identify`, each within
/// `timeout`; peers that do not answer are left out.
pub async fn probe(
    local: NodeId,
    peers: &BTreeMap<NodeId, String>,
    tls: Option<&crate::tls::PeerTls>,
    timeout: Duration,
) -> Vec<PeerView> {
    let calls = peers
        .iter()
        .filter(|(id, _)| **id != local)
        .map(|(id, addr)| async move {
            let endpoint = match crate::tls::peer_endpoint(*id, addr, tls) {
                Ok(e) => e.connect_timeout(timeout).timeout(timeout),
                Err(e) => {
                    tracing::warn!(peer = id, error = %e, "cannot ask peer for the cluster");
                    return None;
                }
            };
            // A peer that is starting has bound its port but serves nothing yet: the
            // connection is accepted and the handshake never ends. Bound it all.
            let call = async {
                let channel = endpoint.connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                RaftServiceClient::new(channel)
                    .identify(IdentifyRequest { node_id: local })
                    .await
            };
            let answer = tokio::time::timeout(timeout, call)
                .await
                .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")));
            match answer {
                Ok(r) => Some(PeerView::from(r.into_inner())),
                Err(status) => {
                    tracing::info!(peer = id, code = ?status.code(), message = status.message(), "peer did not identify itself");
                    None
                }
            }
        });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    #[test]
    fn equal_or_missing_ids_pass_and_different_ones_are_refused() {
        assert_eq!(judge(Some(A), A, true), Verdict::Accept);
        assert_eq!(judge(Some(A), "", true), Verdict::Accept);
        assert_eq!(judge(Some(A), B, false), Verdict::Refuse);
        assert_eq!(judge(Some(A), B, true), Verdict::Refuse);
    }

    #[test]
    fn a_replica_without_an_id_adopts_only_a_leaders() {
        assert_eq!(judge(None, A, true), Verdict::Adopt(A.into()));
        assert_eq!(judge(None, A, false), Verdict::Accept);
        assert_eq!(judge(None, "", true), Verdict::Accept);
        assert_eq!(judge(None, "not an id", true), Verdict::Accept);
    }

    #[test]
    fn the_file_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let identity = ClusterIdentity::load(dir.path()).unwrap();
        assert_eq!(identity.id(), None);
        let id = identity.draw().unwrap();
        identity.check(2, &id, false).unwrap();
        identity.check(3, "", false).unwrap();
        let again = ClusterIdentity::load(dir.path()).unwrap();
        assert_eq!(again.id(), Some(id.clone()));
        assert_eq!(again.seen_with_data(), vec![2]);
        // Never replaced.
        again.draw().unwrap();
        assert_eq!(again.id(), Some(id));
        std::fs::write(dir.path().join(FILE_NAME), "cluster-id xyz\n").unwrap();
        let err = ClusterIdentity::load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("cluster-id") && err.contains("bad cluster id"),
            "{err}"
        );
    }

    #[test]
    fn a_mismatch_is_refused_and_not_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let identity = ClusterIdentity::load(dir.path()).unwrap();
        identity.check(1, A, true).unwrap();
        let err = identity.check(2, B, true).unwrap_err();
        assert_eq!(identity.id().as_deref(), Some(A));
        assert!(err.to_string().contains("replace-node 2"), "{err}");
    }

    fn peer(id: NodeId, cluster: &str, voters: &[NodeId], seen: &[NodeId]) -> PeerView {
        PeerView {
            node_id: id,
            cluster_id: cluster.into(),
            has_data: true,
            voters: voters.to_vec(),
            learners: vec![],
            seen_with_data: seen.to_vec(),
        }
    }

    #[test]
    fn only_the_lowest_id_of_a_new_cluster_bootstraps_when_no_peer_has_one() {
        let new = InitialClusterState::New;
        assert_eq!(decide(1, "a:1", new, true, &[]), Decision::Bootstrap);
        let pristine = PeerView {
            node_id: 2,
            ..PeerView::default()
        };
        assert_eq!(
            decide(1, "a:1", new, true, &[pristine]),
            Decision::Bootstrap
        );
        assert!(matches!(
            decide(2, "a:2", new, false, &[]),
            Decision::Wait(_)
        ));
        let existing = InitialClusterState::Existing;
        assert!(matches!(
            decide(1, "a:1", existing, true, &[]),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn an_existing_cluster_is_never_bootstrapped_again() {
        let answers = [peer(2, A, &[1, 2, 3], &[3])];
        // Replica 1 is a voter nobody saw with data: a late first start; it waits.
        let d = decide(1, "a:1", InitialClusterState::New, true, &answers);
        assert!(matches!(d, Decision::Wait(ref m) if m.contains(A)), "{d:?}");
    }

    #[test]
    fn a_wiped_voter_is_refused_with_the_replace_command() {
        let answers = [peer(2, A, &[1, 2, 3], &[1, 3]), peer(3, A, &[1, 2, 3], &[])];
        let d = decide(1, "h:7001", InitialClusterState::New, true, &answers);
        match d {
            Decision::Refuse(m) => assert!(
                m.contains("dispatchctl cluster replace-node 1 h:7001"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // Once removed (or re-added as a learner) it waits to be caught up.
        let removed = [peer(2, A, &[2, 3], &[1, 3]), peer(3, A, &[1, 2, 3], &[1])];
        assert!(matches!(
            decide(1, "h:7001", InitialClusterState::Existing, true, &removed),
            Decision::Wait(_)
        ));
    }
}
