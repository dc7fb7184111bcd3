//! The state-machine store: applies committed entries to the dispatcher state, builds and
//! installs snapshots, and keeps the current snapshot durably on disk.
//!
//! The state itself lives in memory (`SharedState`, which the server layer reads). On
//! start-up the replica loads its snapshot file, and openraft replays the log entries
//! after it. Membership is kept next to the state and travels in every snapshot.
//!
//! Snapshot file: `<data-dir>/snapshot/current.snap`, the codec encoding of
//! `StoredSnapshot { meta, data }` where `data` is the state's canonical encoding. It is
//! written to `current.snap.tmp`, fsynced, renamed over the old one, and the directory
//! fsynced. Only a snapshot newer than the current one ever replaces it, so a slow build
//! that finishes after a newer snapshot was installed is dropped.

use std::collections::{BTreeSet, HashSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, Snapshot, StorageIOError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::{Applied, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use dispatcher_core::codec;
use dispatcher_core::state::{ClusterConfig, DispatcherState, JobId};

type Entry = openraft::Entry<TypeConfig>;

/// The applied state: the dispatcher state, the last applied log id and membership.
#[derive(Debug)]
pub struct AppliedState {
    /// The dispatcher state.
    pub state: DispatcherState,
    /// Last applied log id.
    pub last_applied: Option<LogId>,
    /// Last applied membership.
    pub membership: StoredMembership,
}

/// The applied state, shared between the Raft state machine and the servers that read
/// it. Never held across an `.await`.
#[derive(Clone, Debug)]
pub struct SharedState {
    inner: Arc<RwLock<AppliedState>>,
    applied_tx: Arc<watch::Sender<u64>>,
    /// Changes of watched jobs, for the watch registry (`crate::watch`).
    watched: Arc<std::sync::Mutex<Watched>>,
}

/// Watched jobs that applied entries may have changed (see
/// [`SharedState::take_watched_changes`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct JobChanges {
    /// The watched jobs that applied entries may have created, changed or removed.
    pub jobs: BTreeSet<JobId>,
    /// The whole state was replaced (a snapshot was installed): any job may have changed.
    pub all: bool,
}

/// Which jobs are watched, and the changes noted for them. Only watched jobs are noted,
/// so this stays as small as the set of watched jobs.
#[derive(Debug, Default)]
struct Watched {
    ids: HashSet<JobId>,
    changes: JobChanges,
}

impl SharedState {
    fn new(state: DispatcherState) -> Self {
        let (applied_tx, _) = watch::channel(0);
        SharedState {
            inner: Arc::new(RwLock::new(AppliedState {
                state,
                last_applied: None,
                membership: StoredMembership::default(),
            })),
            applied_tx: Arc::new(applied_tx),
            watched: Arc::default(),
        }
    }

    fn watched(&self) -> std::sync::MutexGuard<'_, Watched> {
        // Nothing panics while holding it; if something did, the sets are still sets.
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (`true`) or stops noting the changes of job `id` for
    /// [`SharedState::take_watched_changes`]. A watch starts noting before it reads the
    /// job's first status, so that no change applied after that read goes unnoted.
    pub fn set_watched(&self, id: &JobId, watched: bool) {
        let mut w = self.watched();
        if watched {
            w.ids.insert(id.clone());
        } else {
            w.ids.remove(id);
            w.changes.jobs.remove(id);
        }
    }

    /// Takes the changes noted for watched jobs since the last call. Each applied batch
    /// notes its changes before it publishes its index, so a taker woken by
    /// [`SharedState::subscribe`] finds them.
    pub fn take_watched_changes(&self) -> JobChanges {
        std::mem::take(&mut self.watched().changes)
    }

    fn note_changes(&self, changed: BTreeSet<JobId>) {
        let mut w = self.watched();
        if w.ids.is_empty() {
            return;
        }
        let Watched { ids, changes } = &mut *w;
        changes
            .jobs
            .extend(changed.into_iter().filter(|id| ids.contains(id)));
    }

    fn note_replaced(&self) {
        let mut w = self.watched();
        if !w.ids.is_empty() {
            w.changes.all = true;
        }
    }

    /// Reads the applied state. A poisoned lock means a panic inside `apply`, which is a
    /// bug; the data is still the last consistent state, so readers go on.
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, AppliedState> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the last applied index (for streaming reads such as WatchJob).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn publish(&self, index: u64) {
        self.applied_tx.send_replace(index);
    }

    /// Digest of the state and the last applied index, read atomically. The lock is
    /// held only to take a view (O(1)); the encoding and hashing run on a blocking
    /// thread, so neither apply nor the runtime waits for them.
    pub async fn digest(&self) -> (Option<u64>, String) {
        let (view, applied) = {
            let g = self.read();
            (g.state.view(), g.last_applied.map(|l| l.index))
        };
        let digest = tokio::task::spawn_blocking(move || view.digest())
            .await
            .map_err(|e| e.to_string())
            .and_then(|d| d.map_err(|e| e.to_string()))
            .unwrap_or_else(|e| format!("unencodable: {e}"));
        (applied, digest)
    }
}

/// A snapshot as stored on disk.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The openraft state machine over `DispatcherState`.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: SharedState,
    dir: Arc<PathBuf>,
    /// The current snapshot. The mutex also serialises builders against installs.
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    /// Snapshots built by this replica, for unique ids.
    built: Arc<std::sync::atomic::AtomicU64>,
}

fn sm_err(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snap_err(
    meta: Option<&SnapshotMeta>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(meta.map(|m| m.signature())),
        verb,
        AnyError::new(&e),
    )
    .into()
}

impl StateMachineStore {
    /// Opens the store under `dir`, loading the current snapshot if there is one.
    pub async fn open(dir: &Path, config: ClusterConfig) -> Result<Self, StorageError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        let path = dir.join("current.snap");
        let current: Option<StoredSnapshot> = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                Some(codec::decode(&bytes).map_err(|e| snap_err(None, ErrorVerb::Read, e))?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(snap_err(None, ErrorVerb::Read, e)),
        };
        let shared = SharedState::new(DispatcherState::new(config));
        if let Some(snap) = &current {
            let state = DispatcherState::restore(&snap.data)
                .map_err(|e| snap_err(Some(&snap.meta), ErrorVerb::Read, e))?;
            let mut g = shared.write();
            g.state = state;
            g.last_applied = snap.meta.last_log_id;
            g.membership = snap.meta.last_membership.clone();
        }
        if let Some(l) = current.as_ref().and_then(|s| s.meta.last_log_id) {
            shared.publish(l.index);
        }
        Ok(StateMachineStore {
            shared,
            dir: Arc::new(dir.to_path_buf()),
            current: Arc::new(Mutex::new(current)),
            built: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// The applied state, for readers.
    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Replaces the current snapshot with `snap` unless the current one is newer; persists
    /// it durably.
    /// Returns whether it was stored.
    async fn store_if_newer(&self, snap: StoredSnapshot) -> Result<bool, StorageError> {
        let mut current = self.current.lock().await;
        if let Some(cur) = current.as_ref() {
            if cur.meta.last_log_id > snap.meta.last_log_id {
                return Ok(false);
            }
        }
        let bytes =
            codec::encode(&snap).map_err(|e| snap_err(Some(&snap.meta), ErrorVerb::Write, e))?;
        let dir = self.dir.as_ref().clone();
        let meta = snap.meta.clone();
        tokio::task::spawn_blocking(move || write_durably(&dir, "current.snap", &bytes))
            .await
            .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?
            .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?;
        *current = Some(snap);
        Ok(true)
    }
}

/// Writes `name` in `dir` atomically and durably: temporary file, fsync, rename, fsync
/// of the directory.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Take a view under the read lock (O(1): the state's maps are persistent), then
        // encode it on a blocking thread: apply never waits for a snapshot, and neither
        // do the runtime's threads (a 200 MB state takes seconds to encode).
        let (view, last_applied, membership) = {
            let g = self.shared.read();
            (g.state.view(), g.last_applied, g.membership.clone())
        };
        let data = tokio::task::spawn_blocking(move || view.encode())
            .await
            .map_err(|e| sm_err(ErrorVerb::Read, e))?
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let n = self
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("--{n}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.store_if_newer(snap).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let g = self.shared.read();
        Ok((g.last_applied, g.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let (last, changed) = {
            let mut g = self.shared.write();
            for entry in entries {
                g.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => out.push(Applied::Internal),
                    EntryPayload::Normal(cmd) => {
                        trace_apply(entry.log_id.index, &cmd);
                        out.push(Applied::Command(g.state.apply(cmd)));
                    }
                    EntryPayload::Membership(m) => {
                        g.membership = StoredMembership::new(Some(entry.log_id), m);
                        out.push(Applied::Internal);
                    }
                }
            }
            (g.last_applied, g.state.take_changed_jobs())
        };
        self.shared.note_changes(changed);
        if let Some(l) = last {
            self.shared.publish(l.index);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Decoding a large snapshot takes seconds: off the runtime's threads.
        let (state, data) = tokio::task::spawn_blocking(move || {
            let state = DispatcherState::restore(&data);
            (state, data)
        })
        .await
        .map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
        let state = state.map_err(|e| snap_err(Some(meta), ErrorVerb::Read, e))?;
        let stored = self
            .store_if_newer(StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .await?;
        if !stored {
            // An equal or newer snapshot is already current; openraft only installs
            // snapshots newer than what was applied, so this is a benign race.
            tracing::debug!(snapshot = %meta.snapshot_id, "older snapshot not stored");
        }
        {
            let mut g = self.shared.write();
            g.state = state;
            g.last_applied = meta.last_log_id;
            g.membership = meta.last_membership.clone();
        }
        self.shared.note_replaced();
        if let Some(l) = meta.last_log_id {
            self.shared.publish(l.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.current.lock().await;
        Ok(current.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}

/// A debug event per applied command, with the job and TaskManager as fields, so that a
/// job can be followed from the edge's `rpc` span to `apply` on every replica.
fn trace_apply(index: u64, cmd: &dispatcher_core::state::Command) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let batch = match cmd {
        dispatcher_core::state::Command::Batch(commands) => commands.as_slice(),
        single => std::slice::from_ref(single),
    };
    for c in batch {
        tracing::debug!(
            index,
            command = c.name(),
            job_id = c.job_id().map(ToString::to_string),
            task_manager = c.task_manager().map(ToString::to_string),
            "applied"
        );
    }
}
