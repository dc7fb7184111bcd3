//! The state-machine store: applies committed entries to the dispatcher state, builds and
//! installs snapshots, and keeps the current snapshot durably on disk.
//!
//! The state itself lives in memory (`SharedState`, which the server layer reads). On
//! start-up the replica loads its snapshot file, and openraft replays the log entries
//! after it. Membership is kept next to the state and travels in every snapshot.
//!
//! Snapshot file: `<data-dir>/snapshot/current.snap`, the checked codec frame (CRC-32) of
//! `StoredSnapshot { meta, data }` where `data` is the state's canonical encoding. It is
//! written to `current.snap.tmp`, fsynced, renamed over the old one, and the directory
//! fsynced. Only a snapshot newer than the current one ever replaces it, so a slow build
//! that finishes after a newer snapshot was installed is dropped.
//!
//! A snapshot names the digest of its state in its id (`<leader>-<index>-<n>+sha256:<hex>`),
//! so the name travels with it to every replica that installs it. Loading the file checks
//! the CRC, the named digest and that the state decodes, and refuses the file otherwise
//! ([`Corruption`]); installing a snapshot checks the named digest too. Snapshots of older
//! builds (a bare encoding, an id without a digest) still load, checked as far as they
//! can be.

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

use super::integrity::Corruption;
use super::log_store::OpenError;
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

/// What separates a snapshot id from the digest of the state it names.
const DIGEST_IN_ID: &str = "+sha256:";

/// The state digest a snapshot names in its id, if it names one (snapshots built before
/// digests were named do not).
pub fn named_digest(meta: &SnapshotMeta) -> Option<&str> {
    meta.snapshot_id
        .rsplit_once(DIGEST_IN_ID)
        .map(|(_, digest)| digest)
}

/// Checks snapshot data against the digest its meta names; returns the digest.
pub fn check_named_digest(meta: &SnapshotMeta, data: &[u8]) -> Result<String, String> {
    let digest = codec::digest_hex(data);
    match named_digest(meta) {
        Some(named) if named != digest => Err(format!(
            "the state of snapshot {} has digest {digest}, not the one it names",
            meta.snapshot_id
        )),
        _ => Ok(digest),
    }
}

/// Decodes and checks a snapshot file's bytes: CRC, named digest, state.
fn load_snapshot(
    path: &Path,
    bytes: &[u8],
) -> Result<(StoredSnapshot, DispatcherState), Corruption> {
    let snap: StoredSnapshot = codec::decode_checked(bytes)
        .map_err(|e| Corruption::new(path, format!("the snapshot does not read: {e}")))?;
    check_named_digest(&snap.meta, &snap.data).map_err(|e| Corruption::new(path, e))?;
    let state = DispatcherState::restore(&snap.data)
        .map_err(|e| Corruption::new(path, format!("the snapshot's state does not decode: {e}")))?;
    Ok((snap, state))
}

/// The openraft state machine over `DispatcherState`.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: SharedState,
    dir: Arc<PathBuf>,
    /// The current snapshot. The mutex also serialises builders against installs.
    current: Arc<Mutex<Option<Arc<StoredSnapshot>>>>,
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
    /// Opens the store under `dir`, loading and checking the current snapshot if there
    /// is one (a snapshot that fails a check is a [`Corruption`]).
    pub async fn open(dir: &Path, config: ClusterConfig) -> Result<Self, OpenError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| OpenError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let path = dir.join("current.snap");
        let loaded = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                // Decoding and hashing a large snapshot takes seconds: off the runtime.
                let p = path.clone();
                let loaded = tokio::task::spawn_blocking(move || load_snapshot(&p, &bytes))
                    .await
                    .map_err(|e| OpenError::Io {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })??;
                Some(loaded)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(OpenError::Io { path, source }),
        };
        let shared = SharedState::new(DispatcherState::new(config));
        let current = loaded.map(|(snap, state)| {
            let mut g = shared.write();
            g.state = state;
            g.last_applied = snap.meta.last_log_id;
            g.membership = snap.meta.last_membership.clone();
            drop(g);
            Arc::new(snap)
        });
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
        // Encoding (hundreds of MB at 200k jobs) and writing both run off the runtime's
        // threads: openraft's core shares them.
        let dir = self.dir.as_ref().clone();
        let meta = snap.meta.clone();
        let snap = Arc::new(snap);
        let stored = snap.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = codec::encode_checked(stored.as_ref()).map_err(std::io::Error::other)?;
            write_durably(&dir, "current.snap", &bytes)
        })
        .await
        .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?
        .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?;
        *current = Some(snap);
        Ok(true)
    }
}

/// Bytes written between two syncs of a snapshot file.
const SNAPSHOT_SYNC_EVERY: usize = 8 << 20;

/// Writes `name` in `dir` atomically and durably: temporary file, fsync, rename, fsync
/// of the directory.
///
/// The file is synced every [`SNAPSHOT_SYNC_EVERY`] bytes rather than once at the end:
/// with hundreds of MB dirty at once, the Raft log's own `fdatasync` waited for the
/// journal to carry them (ext4 orders data before metadata), long enough for followers
/// to miss heartbeats. A few MB at a time bounds that wait.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    for chunk in bytes.chunks(SNAPSHOT_SYNC_EVERY) {
        f.write_all(chunk)?;
        f.sync_data()?;
    }
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
        // The copy handed to openraft is made there too: a memcpy of 200 MB is not free.
        let (data, copy, digest) = tokio::task::spawn_blocking(move || {
            view.encode().map(|data| {
                let digest = codec::digest_hex(&data);
                let copy = data.clone();
                (data, copy, digest)
            })
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Read, e))?
        .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let n = self
            .built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{n}{DIGEST_IN_ID}{digest}", l.leader_id, l.index),
            None => format!("--{n}{DIGEST_IN_ID}{digest}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.store_if_newer(snap).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(copy)),
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
        let started = std::time::Instant::now();
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
        crate::timing::entries_since("apply", out.len(), started);
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
        let named = meta.clone();
        let (state, data) = tokio::task::spawn_blocking(move || {
            let state = check_named_digest(&named, &data)
                .map_err(std::io::Error::other)
                .and_then(|_| DispatcherState::restore(&data).map_err(std::io::Error::other));
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
        let Some(current) = self.current.lock().await.clone() else {
            return Ok(None);
        };
        let meta = current.meta.clone();
        let data = tokio::task::spawn_blocking(move || current.data.clone())
            .await
            .map_err(|e| snap_err(Some(&meta), ErrorVerb::Read, e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    async fn built(dir: &Path) -> (StateMachineStore, Snapshot<TypeConfig>) {
        let mut sm = StateMachineStore::open(dir, ClusterConfig::default())
            .await
            .expect("open");
        sm.shared.write().last_applied = Some(LogId::new(CommittedLeaderId::new(1, 1), 7));
        let snap = sm.build_snapshot().await.expect("build");
        (sm, snap)
    }

    #[tokio::test]
    async fn a_snapshot_names_its_state_digest_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (sm, snap) = built(dir.path()).await;
        let (_, digest) = sm.shared().digest().await;
        assert_eq!(named_digest(&snap.meta), Some(digest.as_str()));
        let bytes = std::fs::read(dir.path().join("current.snap")).expect("file");
        assert!(codec::is_checked(&bytes));
        let again = StateMachineStore::open(dir.path(), ClusterConfig::default())
            .await
            .expect("reopen");
        assert_eq!(again.shared().digest().await, (Some(7), digest));
    }

    #[tokio::test]
    async fn a_flipped_byte_anywhere_in_the_snapshot_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        built(dir.path()).await;
        let path = dir.path().join("current.snap");
        let good = std::fs::read(&path).expect("file");
        for i in (0..good.len()).step_by(7).chain([good.len() - 1]) {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).expect("write");
            let Err(OpenError::Corrupt(c)) =
                StateMachineStore::open(dir.path(), ClusterConfig::default()).await
            else {
                panic!("byte {i} flipped was not refused");
            };
            assert_eq!(c.file, path);
            assert!(c.to_string().contains("current.snap"), "{c}");
        }
    }

    #[tokio::test]
    async fn a_snapshot_whose_state_differs_from_its_named_digest_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, snap) = built(dir.path()).await;
        let mut meta = snap.meta.clone();
        meta.snapshot_id = format!("1-7-1{DIGEST_IN_ID}{}", "0".repeat(64));
        let data = snap.snapshot.into_inner();
        let err = check_named_digest(&meta, &data).expect_err("mismatch");
        assert!(err.contains("not the one it names"), "{err}");
        // A correct checksum over a wrong digest: refused on load as well.
        let path = dir.path().join("current.snap");
        let file = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        std::fs::write(&path, codec::encode_checked(&file).expect("encode")).expect("write");
        let opened = StateMachineStore::open(dir.path(), ClusterConfig::default()).await;
        assert!(matches!(opened, Err(OpenError::Corrupt(_))));
        // And on install.
        let mut sm = StateMachineStore::open(
            tempfile::tempdir().expect("t").path(),
            ClusterConfig::default(),
        )
        .await
        .expect("open");
        let installed = sm
            .install_snapshot(&meta, Box::new(Cursor::new(data)))
            .await;
        assert!(installed.is_err());
    }

    #[tokio::test]
    async fn a_snapshot_written_before_checksums_still_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, snap) = built(dir.path()).await;
        let mut meta = snap.meta.clone();
        meta.snapshot_id = "T1-N1-7-1".into();
        let file = StoredSnapshot {
            meta,
            data: snap.snapshot.into_inner(),
        };
        let path = dir.path().join("current.snap");
        std::fs::write(&path, codec::encode(&file).expect("old encoding")).expect("write");
        let sm = StateMachineStore::open(dir.path(), ClusterConfig::default())
            .await
            .expect("an old snapshot opens");
        assert_eq!(sm.shared().read().last_applied.map(|l| l.index), Some(7));
    }
}
