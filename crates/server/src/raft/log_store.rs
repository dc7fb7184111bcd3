#![allow(clippy::result_large_err)] // openraft fixes the error type of the storage traits
//! The Raft log on sled: entries, the vote, the committed id and the last purged id.
//!
//! Layout (one sled database under `<data-dir>/raft`):
//! - tree `log`: big-endian `u64` index → codec-encoded `Entry`;
//! - tree `meta`: `vote`, `committed`, `last_purged`, and the replica's identity
//!   (`identity`: cluster name, node id, format version), each codec-encoded.
//!
//! Every value is a checked codec frame (`codec::encode_checked`, a CRC-32 per value):
//! a value whose bytes changed is refused on read, as a [`Corruption`] naming the
//! database and the way back, which stops the Raft core (the replica exits 1). Values
//! of older builds (bare codec encodings) are still read, unchecked, until rewritten.
//! [`LogStore::verify`] reads everything back at start-up (`integrity.rs`).
//!
//! Durability contract: sled's `flush` writes its buffers with `sync_file_range`, which
//! neither survives a power loss on every file system nor persists the file's growing
//! size. So after every flush we `fdatasync` sled's data file and every blob file sled
//! wrote since the last sync (sled writes large values and large tree nodes as separate
//! files under `blobs/` and never syncs them), then the `blobs/` directory. The append
//! callback fires, and `save_vote` returns, only after that.
//!
//! Appends and purges are synced by a task of their own (the flusher), not inside
//! `append` and `purge`: openraft 0.9 awaits both inside its core loop, so a sync there
//! stalls the whole core (no heartbeat sent or handled, no election timer reset) for as
//! long as the disk takes, and next to a snapshot of a few hundred MB being written an
//! `fdatasync` of the log can wait for the journal to carry those pages too. `append`
//! writes the entries into sled (readable at once) and queues its callback; the flusher
//! runs one sync for every callback queued meanwhile (group commit) and fires them in
//! order, so entries are still acknowledged only once durable. `purge` records the purge
//! point (readers skip entries at or below it) and the flusher makes it durable before
//! deleting the entries. The flusher's syncs run on tokio's blocking pool, which the
//! deterministic simulation (`raft-tests`) controls like every other sync.

use std::fmt::Debug;
use std::fs::File;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, LogState, RaftLogReader, StorageIOError, Vote};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::integrity::Corruption;
use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::timing;
use dispatcher_core::codec;

type Entry = openraft::Entry<TypeConfig>;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_IDENTITY: &[u8] = b"identity";

/// Who a data directory belongs to, written once when it is created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The cluster's name.
    pub cluster: String,
    /// This replica's id.
    pub node_id: NodeId,
}

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// sled could not open the directory.
    #[error("cannot open the Raft log in {path}: {source}")]
    Sled {
        /// The directory.
        path: PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The directory belongs to another cluster or replica.
    #[error("{path} belongs to cluster {found_cluster:?} node {found_node}, not cluster {cluster:?} node {node}")]
    WrongIdentity {
        /// The directory.
        path: PathBuf,
        /// Its cluster.
        found_cluster: String,
        /// Its node id.
        found_node: NodeId,
        /// The configured cluster.
        cluster: String,
        /// The configured node id.
        node: NodeId,
    },
    /// Written by a newer (or unknown) format.
    #[error("{path}: {source}")]
    Format {
        /// The directory.
        path: PathBuf,
        /// The codec's complaint.
        source: codec::CodecError,
    },
    /// Data failed its check.
    #[error(transparent)]
    Corrupt(#[from] Corruption),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// How far an append goes before it is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// sled flush, then `fdatasync` of its files: survives power loss. The default.
    Fsync,
    /// sled flush only (`sync_file_range`): what sled alone provides. Survives a process
    /// crash but not a power loss; only for measuring what durability costs.
    FlushOnly,
}

/// The sled-backed Raft log. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    durability: Durability,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    dir: Arc<PathBuf>,
    /// What a sync covers.
    disk: Arc<Disk>,
    /// Where appends and purges queue their work, started by the first one (the store
    /// may be opened outside a runtime).
    flusher: Arc<std::sync::OnceLock<mpsc::UnboundedSender<Job>>>,
}

/// The files of one database that a sync makes durable.
struct Disk {
    db: sled::Db,
    /// The log tree, for the flusher's deletes after a purge.
    log: sled::Tree,
    /// sled's data file, kept open to `fdatasync` it after every flush.
    data_file: File,
    /// sled's directory of blob files.
    blobs: PathBuf,
    /// Blob files already synced (sled never rewrites a blob file in place).
    synced_blobs: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl Disk {
    /// sled flush, then (when `durable`) fdatasync of new blob files and the data file.
    /// Blocking.
    fn sync(&self, durable: bool) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        self.db.flush().map_err(std::io::Error::other)?;
        if durable {
            sync_new_blobs(&self.blobs, &self.synced_blobs)?;
            self.data_file.sync_data()?;
        }
        crate::metrics::STORAGE
            .sync
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Work for the flusher, done in the order it was queued.
enum Job {
    /// An append waiting for its sync.
    Flush {
        callback: LogFlushed<TypeConfig>,
        durable: bool,
        /// When the append queued it (for `timing`).
        queued: Instant,
    },
    /// Delete the entries up to this index, once the purge point recorded before is
    /// durable.
    Purge { upto: u64, durable: bool },
    /// Answered once everything queued before it is done.
    Barrier(oneshot::Sender<()>),
}

/// The flusher: takes everything queued while the last round ran and does it on the
/// blocking pool, one sync per run of appends. Ends when every store is dropped.
async fn run_flusher(disk: Arc<Disk>, mut queue: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = queue.recv().await {
        let mut jobs = vec![first];
        while let Ok(job) = queue.try_recv() {
            jobs.push(job);
        }
        let disk = disk.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || run_jobs(&disk, jobs)).await {
            // The callbacks are dropped with the jobs: openraft sees its log I/O fail.
            tracing::error!(error = %e, "the Raft log flusher failed");
        }
    }
}

/// Does one round of queued work, in order. Blocking.
fn run_jobs(disk: &Arc<Disk>, jobs: Vec<Job>) {
    let mut waiting = Vec::new();
    for job in jobs {
        match job {
            Job::Flush {
                callback,
                durable,
                queued,
            } => waiting.push((callback, durable, queued)),
            Job::Purge { upto, durable } => {
                complete(disk, &mut waiting);
                purge_upto(disk, upto, durable);
            }
            Job::Barrier(done) => {
                complete(disk, &mut waiting);
                let _ = done.send(());
            }
        }
    }
    complete(disk, &mut waiting);
}

/// One sync for all the waiting appends, then their callbacks in order (a failed sync
/// reaches openraft through them and stops its core).
fn complete(disk: &Disk, waiting: &mut Vec<(LogFlushed<TypeConfig>, bool, Instant)>) {
    if waiting.is_empty() {
        return;
    }
    let started = Instant::now();
    let synced = disk.sync(waiting.iter().any(|(_, durable, _)| *durable));
    timing::entries_since("log_sync", waiting.len(), started);
    for (callback, _, queued) in waiting.drain(..) {
        timing::since("log_flushed", queued);
        let outcome = match &synced {
            Ok(()) => Ok(()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        };
        callback.log_io_completed(outcome);
    }
}

/// Entries deleted per sled batch after a purge. sled applies a batch under its global
/// write lock, which every other write (the next append) waits for: one batch of the
/// 13,000 entries a snapshot frees held appends long enough for a follower to miss its
/// leader's heartbeats and start an election (64 writers, 2026-11-28).
const PURGE_CHUNK: usize = 128;

/// Makes the purge point durable, then deletes the entries up to `upto` in the
/// background, a few at a time: a crash before that sync leaves the entries (readers
/// skip them), never a hole. A failure leaves them too, and is only logged: the next
/// purge deletes them.
fn purge_upto(disk: &Arc<Disk>, upto: u64, durable: bool) {
    if let Err(e) = disk.sync(durable) {
        tracing::warn!(upto, error = %e, "cannot make the purge point durable yet");
        return;
    }
    let disk = disk.clone();
    let delete = move || {
        let mut deleted = 0usize;
        loop {
            let keys: Vec<sled::IVec> = match disk
                .log
                .range(..=index_key(upto))
                .keys()
                .take(PURGE_CHUNK)
                .collect::<Result<_, _>>()
            {
                Ok(keys) => keys,
                Err(e) => {
                    tracing::warn!(upto, error = %e, "cannot delete purged log entries yet");
                    return;
                }
            };
            if keys.is_empty() {
                break;
            }
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
                deleted += 1;
            }
            if let Err(e) = disk.log.apply_batch(batch) {
                tracing::warn!(upto, error = %e, "cannot delete purged log entries yet");
                return;
            }
        }
        tracing::debug!(upto, deleted, "purged log entries deleted");
    };
    // On the blocking pool beside the flusher, so appends are not held behind it.
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(delete)),
        Err(_) => delete(),
    }
}

fn io_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

impl LogStore {
    /// Opens (or creates) the log under `dir`, checking that it belongs to `identity`.
    /// Returns the store and whether the directory was created just now.
    pub fn open(dir: &Path, identity: &Identity) -> Result<(Self, bool), OpenError> {
        let sled_err = |source: sled::Error| match source {
            // sled found its own checksums or structures wrong.
            sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => {
                OpenError::Corrupt(Corruption::new(dir, format!("sled: {source}")))
            }
            source => OpenError::Sled {
                path: dir.to_path_buf(),
                source,
            },
        };
        let db = sled::Config::new()
            .path(dir)
            // Flushing is ours to do, on every append, followed by an fdatasync.
            .flush_every_ms(None)
            .open()
            .map_err(sled_err)?;
        let log = db.open_tree("log").map_err(sled_err)?;
        let meta = db.open_tree("meta").map_err(sled_err)?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|source| OpenError::Io {
            path: data_path.clone(),
            source,
        })?;
        let disk = Arc::new(Disk {
            db: db.clone(),
            log: log.clone(),
            data_file,
            blobs: dir.join("blobs"),
            synced_blobs: Default::default(),
        });
        let store = LogStore {
            durability: Durability::Fsync,
            db,
            log,
            meta,
            dir: Arc::new(dir.to_path_buf()),
            disk,
            flusher: Arc::default(),
        };
        let fresh = match store.meta.get(KEY_IDENTITY).map_err(sled_err)? {
            Some(bytes) => {
                let found: Identity =
                    codec::decode_checked(&bytes).map_err(|source| match source {
                        codec::CodecError::UnsupportedVersion { .. } => OpenError::Format {
                            path: dir.to_path_buf(),
                            source,
                        },
                        source => OpenError::Corrupt(Corruption::new(
                            dir,
                            format!("the identity record: {source}"),
                        )),
                    })?;
                if &found != identity {
                    return Err(OpenError::WrongIdentity {
                        path: dir.to_path_buf(),
                        found_cluster: found.cluster,
                        found_node: found.node_id,
                        cluster: identity.cluster.clone(),
                        node: identity.node_id,
                    });
                }
                false
            }
            None => {
                let bytes =
                    codec::encode_checked(identity).map_err(|source| OpenError::Format {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                store.meta.insert(KEY_IDENTITY, bytes).map_err(sled_err)?;
                store.sync_blocking().map_err(|source| OpenError::Io {
                    path: data_path.clone(),
                    source,
                })?;
                true
            }
        };
        Ok((store, fresh))
    }

    /// Flushes sled and makes the flushed bytes durable.
    fn sync_blocking(&self) -> std::io::Result<()> {
        self.disk.sync(true)
    }

    /// Sets how far appends go before they are acknowledged (benchmarks compare the two).
    pub fn set_durability(&mut self, durability: Durability) {
        self.durability = durability;
    }

    /// Flush + fdatasync, off the async threads, including any blob file sled wrote
    /// since the last sync (sled writes large values *and* large tree nodes as separate
    /// blob files, and never syncs them).
    ///
    /// One blocking-pool hop does it all: sled's own `flush_async` goes through sled's
    /// thread pool and its one-shot future, which measured ~45 ms per append here.
    async fn sync(&self) -> std::io::Result<()> {
        let disk = self.disk.clone();
        let durable = self.durability != Durability::FlushOnly;
        tokio::task::spawn_blocking(move || disk.sync(durable))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Queues work for the flusher, starting it on first use.
    fn queue(&self, job: Job, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
        let sender = self.flusher.get_or_init(|| {
            let (sender, queue) = mpsc::unbounded_channel();
            tokio::spawn(run_flusher(self.disk.clone(), queue));
            sender
        });
        sender.send(job).map_err(|_| {
            io_err(
                subject,
                ErrorVerb::Write,
                std::io::Error::other("the Raft log's flusher has stopped"),
            )
        })
    }

    /// Waits until every append and purge queued so far is done.
    async fn settle(&self) -> Result<(), StorageError> {
        let (done, settled) = oneshot::channel();
        self.queue(Job::Barrier(done), ErrorSubject::Logs)?;
        settled.await.map_err(|_| {
            io_err(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                std::io::Error::other("the Raft log's flusher has stopped"),
            )
        })
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(
        &self,
        key: &[u8],
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let Some(bytes) = self
            .meta
            .get(key)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        codec::decode_checked(&bytes).map(Some).map_err(|e| {
            let what = String::from_utf8_lossy(key);
            io_err(
                subject,
                ErrorVerb::Read,
                Corruption::new(self.dir.as_ref(), format!("the {what} record: {e}")),
            )
        })
    }

    fn put_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = codec::encode_checked(value)
            .map_err(|e| io_err(subject.clone(), ErrorVerb::Write, e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| io_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(KEY_LAST_PURGED, ErrorSubject::Logs)
    }

    /// Whether nothing was ever written: no vote, no entry, nothing purged.
    pub async fn is_pristine(&mut self) -> Result<bool, StorageError> {
        let state = self.get_log_state().await?;
        Ok(state.last_log_id.is_none() && self.read_vote().await?.is_none())
    }

    /// Reads back everything stored, through its checks: the metadata records, then every
    /// log entry (checksum, the entry of its key's index, no hole after the purge point).
    /// Returns the number of entries read. Runs at start-up, before openraft reads
    /// anything, so that corruption is a refusal rather than a surprise later.
    pub async fn verify(&mut self) -> Result<u64, Corruption> {
        let dir = self.dir.as_ref().clone();
        let found = |what: String| Corruption::new(&dir, what);
        for key in [KEY_VOTE, KEY_COMMITTED, KEY_LAST_PURGED, KEY_IDENTITY] {
            let what = String::from_utf8_lossy(key).into_owned();
            let bytes = self
                .meta
                .get(key)
                .map_err(|e| found(format!("the {what} record does not read: {e}")))?;
            if let Some(bytes) = bytes {
                codec::verify_checked(&bytes)
                    .map_err(|e| found(format!("the {what} record: {e}")))?;
            }
        }
        self.read_vote()
            .await
            .map_err(|e| found(format!("the vote: {e}")))?;
        self.read_committed()
            .await
            .map_err(|e| found(format!("the committed id: {e}")))?;
        let purged = self
            .last_purged()
            .map_err(|e| found(format!("the purge point: {e}")))?;
        let log = self.log.clone();
        // Reading a large log takes a while: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            let found = |what: String| Corruption::new(&dir, what);
            let mut expect: Option<u64> = None;
            let mut count = 0u64;
            for item in log.iter() {
                let (k, v) = item.map_err(|e| found(format!("the log does not read: {e}")))?;
                let index = k
                    .as_ref()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| found(format!("a log key of {} bytes", k.len())))?;
                let entry = check_entry(&dir, &v, index)?;
                // Entries at or below the purge point may linger after a crash mid-purge.
                let live = purged.is_none_or(|p| index > p.index);
                if live {
                    let next = expect.or(purged.map(|p| p.index + 1));
                    if let Some(next) = next.filter(|n| *n != index) {
                        return Err(found(format!(
                            "the log has a hole: entry {index} follows entry {}",
                            next.saturating_sub(1)
                        )));
                    }
                    expect = Some(entry.log_id.index + 1);
                }
                count += 1;
            }
            Ok(count)
        })
        .await
        .map_err(|e| {
            Corruption::new(
                self.dir.as_ref(),
                format!("reading the log back failed: {e}"),
            )
        })?
    }

    /// The database's size on disk (bytes), for status and benchmarks.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Fsyncs the blob files not synced yet, then the directory if any was new. Forgets
/// names sled has since deleted.
fn sync_new_blobs(
    dir: &Path,
    synced: &std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut synced = synced.lock().unwrap_or_else(|p| p.into_inner());
    let mut present = std::collections::HashSet::new();
    let mut new = false;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if !synced.contains(&name) && entry.path().is_file() {
            File::open(entry.path())?.sync_data()?;
            new = true;
        }
        present.insert(name);
    }
    if new {
        File::open(dir)?.sync_all()?;
    }
    *synced = present;
    Ok(())
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_entry(dir: &Path, bytes: &[u8], index: u64) -> Result<Entry, StorageError> {
    check_entry(dir, bytes, index)
        .map_err(|e| io_err(ErrorSubject::LogIndex(index), ErrorVerb::Read, e))
}

/// Decodes the entry stored under key `index`, checking its checksum and that it is the
/// entry of that index.
fn check_entry(dir: &Path, bytes: &[u8], index: u64) -> Result<Entry, Corruption> {
    let entry: Entry = codec::decode_checked(bytes)
        .map_err(|e| Corruption::new(dir, format!("log entry {index}: {e}")))?;
    if entry.log_id.index != index {
        return Err(Corruption::new(
            dir,
            format!(
                "the log entry under index {index} is entry {}",
                entry.log_id.index
            ),
        ));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => Bound::Included(index_key(e)),
            Bound::Excluded(&e) => Bound::Excluded(index_key(e)),
            Bound::Unbounded => Bound::Unbounded,
        };
        // Entries at or below the purge point may linger after a crash mid-purge; they
        // are gone as far as Raft is concerned.
        let start = match self.last_purged()? {
            Some(p) => start.max(p.index + 1),
            None => start,
        };
        let mut out = Vec::new();
        for item in self.log.range((Bound::Included(index_key(start)), end)) {
            let (k, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                io_err(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    std::io::Error::other(format!("log key of {} bytes", k.len())),
                )
            })?);
            out.push(decode_entry(&self.dir, &v, index)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last = self
            .log
            .last()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let last_entry = match last {
            Some((k, v)) => {
                let index = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                Some(decode_entry(&self.dir, &v, index)?.log_id)
            }
            None => None,
        };
        // After a purge beyond the last entry (a snapshot install), or a crash between
        // recording a purge and deleting, the purge point is the last log id.
        let last_log_id = last_entry.max(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote, ErrorSubject::Vote)?;
        // The vote must be on disk before it is used.
        self.sync()
            .await
            .map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced on its own: it only lets a restart re-apply committed entries sooner,
        // and it reaches the disk with the next append or vote.
        self.put_meta(KEY_COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(KEY_COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let started = Instant::now();
        let mut batch = sled::Batch::default();
        let mut count = 0;
        for entry in entries {
            count += 1;
            let bytes = codec::encode_checked(&entry)
                .map_err(|e| io_err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        crate::metrics::STORAGE
            .append
            .observe(started.elapsed().as_secs_f64());
        timing::entries_since("log_write", count, started);
        // Entries are readable now; the flusher makes them durable, then calls back.
        let flush = Job::Flush {
            callback,
            durable: self.durability != Durability::FlushOnly,
            queued: Instant::now(),
        };
        self.queue(flush, ErrorSubject::Logs)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Appends still being synced are acknowledged first, so that no callback fires
        // for entries after they are gone.
        self.settle().await?;
        // Delete [log_id.index, +oo), newest first so that a crash midway leaves no hole.
        let keys: Vec<sled::IVec> = self
            .log
            .range(index_key(log_id.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        let mut batch = sled::Batch::default();
        for k in keys.iter().rev() {
            batch.remove(k.clone());
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
        self.sync()
            .await
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // openraft awaits this inside its core loop: a sync and thousands of deletes here
        // stalled the core after every snapshot. Record the purge point (readers skip the
        // entries up to it at once) and let the flusher make it durable, then delete.
        self.put_meta(KEY_LAST_PURGED, &log_id, ErrorSubject::Logs)?;
        let purge = Job::Purge {
            upto: log_id.index,
            durable: self.durability != Durability::FlushOnly,
        };
        self.queue(purge, ErrorSubject::Logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn identity() -> Identity {
        Identity {
            cluster: "c".into(),
            node_id: 1,
        }
    }

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// Writes entries 1..=n, a vote and a committed id as the current build does.
    async fn filled(dir: &Path, n: u64) -> LogStore {
        let (mut store, _) = LogStore::open(dir, &identity()).expect("open");
        let mut batch = sled::Batch::default();
        for i in 1..=n {
            batch.insert(
                &index_key(i),
                codec::encode_checked(&entry(i)).expect("encode"),
            );
        }
        store.log.apply_batch(batch).expect("append");
        store.save_vote(&Vote::new(1, 1)).await.expect("vote");
        store
            .save_committed(Some(entry(n).log_id))
            .await
            .expect("committed");
        store.sync_blocking().expect("sync");
        store
    }

    /// Flips one bit of the stored value under `key` in `tree`, through sled.
    fn flip(tree: &sled::Tree, key: &[u8]) {
        let mut v = tree.get(key).expect("get").expect("present").to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x01;
        tree.insert(key, v).expect("insert");
    }

    #[tokio::test]
    async fn a_stored_value_is_a_checked_frame_and_everything_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = filled(dir.path(), 5).await;
        let raw = store.log.get(index_key(3)).expect("get").expect("present");
        assert!(codec::is_checked(&raw));
        assert_eq!(store.verify().await.expect("verify"), 5);
        let got = store.try_get_log_entries(1..=5).await.expect("read");
        assert_eq!(got.len(), 5);
    }

    #[tokio::test]
    async fn a_flipped_entry_is_refused_at_verify_and_on_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = filled(dir.path(), 5).await;
        flip(&store.log, &index_key(3));
        let err = store.verify().await.expect_err("refused");
        let msg = err.to_string();
        assert_eq!(err.file, dir.path());
        assert!(msg.contains("log entry 3: checksum mismatch"), "{msg}");
        assert!(msg.contains("wipe its data directory"), "{msg}");
        // While running, the read that meets it fails (and stops the Raft core).
        let read = store.try_get_log_entries(1..=5).await.expect_err("refused");
        assert!(read.to_string().contains("checksum mismatch"), "{read}");
        assert!(store.try_get_log_entries(4..=5).await.is_ok());
    }

    #[tokio::test]
    async fn a_flipped_vote_or_committed_id_is_refused() {
        for key in [KEY_VOTE, KEY_COMMITTED] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut store = filled(dir.path(), 2).await;
            flip(&store.meta, key);
            let err = store.verify().await.expect_err("refused");
            let what = String::from_utf8_lossy(key).into_owned();
            assert!(err.found.contains(&format!("the {what} record")), "{err}");
            assert!(err.found.contains("checksum mismatch"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_hole_or_a_misplaced_entry_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = filled(dir.path(), 5).await;
        store.log.remove(index_key(3)).expect("remove");
        let err = store.verify().await.expect_err("a hole");
        assert!(err.found.contains("hole: entry 4 follows entry 2"), "{err}");
        let bytes = codec::encode_checked(&entry(9)).expect("encode");
        store.log.insert(index_key(3), bytes).expect("insert");
        let err = store.verify().await.expect_err("misplaced");
        assert!(err.found.contains("under index 3 is entry 9"), "{err}");
    }

    #[tokio::test]
    async fn data_written_before_checksums_still_opens_and_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            // What the previous build wrote: bare codec encodings, no frames.
            let db = sled::Config::new().path(dir.path()).open().expect("sled");
            let log = db.open_tree("log").expect("log");
            let meta = db.open_tree("meta").expect("meta");
            for i in 1..=3 {
                log.insert(index_key(i), codec::encode(&entry(i)).expect("encode"))
                    .expect("insert");
            }
            meta.insert(
                KEY_VOTE,
                codec::encode(&Vote::<NodeId>::new(2, 1)).expect("vote"),
            )
            .expect("insert");
            meta.insert(
                KEY_COMMITTED,
                codec::encode(&Some(entry(3).log_id)).expect("committed"),
            )
            .expect("insert");
            meta.insert(KEY_IDENTITY, codec::encode(&identity()).expect("identity"))
                .expect("insert");
            db.flush().expect("flush");
        }
        let (mut store, fresh) = LogStore::open(dir.path(), &identity()).expect("open");
        assert!(!fresh);
        assert_eq!(store.verify().await.expect("verify"), 3);
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new(2, 1))
        );
        assert_eq!(
            store.read_committed().await.expect("committed"),
            Some(entry(3).log_id)
        );
        assert_eq!(
            store.try_get_log_entries(1..=3).await.expect("read").len(),
            3
        );
        // New writes are checked frames beside the old values.
        let mut batch = sled::Batch::default();
        batch.insert(
            &index_key(4),
            codec::encode_checked(&entry(4)).expect("encode"),
        );
        store.log.apply_batch(batch).expect("append");
        assert_eq!(store.verify().await.expect("verify"), 4);
    }
}
