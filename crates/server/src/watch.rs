//! Job watches: a job's states as this replica applies them, as a stream.
//!
//! A watch is served from the local applied state (any replica, no forwarding): it
//! sends the job's status when it starts, then each change, and ends after a terminal
//! state, when the job is purged, or when the replica shuts down (the client library
//! then re-attaches elsewhere).
//!
//! All watchers of one job share one [`Registry`] entry. The entry holds the job's view,
//! converted to protobuf once per applied change of that job whatever the number of
//! watchers, and hands it to them through a `tokio::sync::watch` channel: the channel
//! keeps only the latest view, so a slow watcher skips to it and nothing queues per
//! watcher. The registry looks only at the jobs that applied entries changed (the state
//! machine names them; see [`SharedState::take_watched_changes`]) and at the queued
//! ones, whose pending reason any change of capacity can move; a change of another job
//! wakes no watcher. An entry goes with its last watcher. Watchers are bounded per job
//! and in total ([`Limits`]). Each stream still holds its own encoded copy of an event
//! until its client reads it (tonic encodes per stream), so after a burst of large
//! events the registry has the allocator return the freed memory ([`crate::memory`]).
//!
//! Architecture invariant: reads the applied state only and never proposes; converts
//! under the state's read lock, never on the apply path (which only notes which jobs
//! changed), and on a blocking thread, not the async runtime's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::raft::sm_store::SharedState;
use dispatcher_core::state::{DispatcherState, JobId, PendingReason};
use dispatcher_proto::convert;
use dispatcher_proto::v1 as pb;

/// How long a watch waits for an unknown job to be applied locally: a follower may not
/// yet have applied a job that was just submitted.
pub const JOB_APPEAR_WAIT: Duration = Duration::from_secs(2);

/// Bytes of watch traffic after which, once it pauses for [`TRIM_QUIET`], the allocator
/// is asked to return free memory ([`crate::memory`]). Counted: each event handed to a
/// watcher, and, when a watch closes, the largest event it was sent. Every stream
/// encodes its own copy of an event, and its encoding buffer keeps that capacity while
/// the stream is open, so a big job fanned out to many watchers, and those watchers
/// closing, are bursts of large blocks that the allocator would otherwise keep.
pub const TRIM_AFTER_BYTES: u64 = 64 << 20;
/// How long watch traffic must pause before the trim.
pub const TRIM_QUIET: Duration = Duration::from_secs(1);

/// Default most watchers of one job on one replica.
pub const DEFAULT_MAX_PER_JOB: usize = 1_000;
/// Default most watchers on one replica.
pub const DEFAULT_MAX_TOTAL: usize = 10_000;

/// Bounds on open watches, per replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most watchers of one job (`--max-watchers-per-job`).
    pub per_job: usize,
    /// Most watchers in all, including those waiting for their job to appear
    /// (`--max-watchers`).
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_job: DEFAULT_MAX_PER_JOB,
            total: DEFAULT_MAX_TOTAL,
        }
    }
}

/// Why a watch cannot start.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The replica serves as many watchers as `--max-watchers` allows.
    #[error("this replica already serves {limit} job watches, the most --max-watchers allows; close one or watch through another replica")]
    Total {
        /// The bound.
        limit: usize,
    },
    /// The job has as many watchers as `--max-watchers-per-job` allows.
    #[error("job {job} already has {limit} watchers on this replica, the most --max-watchers-per-job allows; close one or watch through another replica")]
    PerJob {
        /// The job.
        job: JobId,
        /// The bound.
        limit: usize,
    },
    /// The job is not in this replica's applied state.
    #[error("job {0} not found")]
    Unknown(JobId),
}

/// Why a watch ended before a terminal status.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The job was purged from the state.
    Purged,
    /// The replica is shutting down.
    ShuttingDown,
}

/// A job's status as of an applied index, shared by all its watchers.
#[derive(Debug, PartialEq)]
pub struct JobView {
    /// The status without its spec (`spec` is `None`).
    status: pb::JobStatus,
    /// The spec, converted once per job.
    spec: Arc<pb::JobSpec>,
    /// The applied index the status reflects.
    index: u64,
    /// About how many bytes one event of it encodes to.
    size: u64,
}

impl JobView {
    fn new(status: pb::JobStatus, spec: Arc<pb::JobSpec>, index: u64) -> JobView {
        use prost::Message as _;
        let size = (status.encoded_len() + spec.encoded_len() + 16) as u64;
        JobView {
            status,
            spec,
            index,
            size,
        }
    }

    /// The event a watcher is sent, with env values redacted unless `secrets`.
    pub fn event(&self, secrets: bool) -> pb::JobEvent {
        let mut job = pb::JobStatus {
            spec: Some(pb::JobSpec::clone(&self.spec)),
            ..self.status.clone()
        };
        if !secrets {
            convert::redact_secrets(&mut job);
        }
        pb::JobEvent {
            job: Some(job),
            applied_index: self.index,
        }
    }

    /// Whether the job will not change again (the watch is complete).
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }

    /// The applied index the view reflects.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// The status without its spec.
    pub fn status(&self) -> &pb::JobStatus {
        &self.status
    }
}

/// What a registry entry shows its watchers.
#[derive(Clone, Debug)]
enum View {
    Job(Arc<JobView>),
    Purged,
}

/// Whether a job in this status will not change again (the watch is complete).
pub fn is_terminal(s: &pb::JobStatus) -> bool {
    matches!(
        pb::JobState::try_from(s.state),
        Ok(pb::JobState::Finished | pb::JobState::Failed | pb::JobState::Canceled)
    )
}

/// The job's status as GetJob and WatchJob show it: with why it waits for slots, which
/// is derived from the whole state, so a watcher also sees the reason change.
pub fn job_status(state: &DispatcherState, id: &JobId) -> Option<pb::JobStatus> {
    let job = state.job(id)?;
    Some(convert::job_status(job, state.pending_reason(id).as_ref()))
}

/// One watched job.
struct Entry {
    watchers: usize,
    tx: watch::Sender<View>,
    /// The submission the spec belongs to (a purged id can be submitted again).
    seq: u64,
    spec: Arc<pb::JobSpec>,
    /// The pending reason of the last view: a queued job is looked at after every
    /// applied batch, the others only when the state machine says they changed.
    pending: Option<PendingReason>,
}

#[derive(Default)]
struct Inner {
    /// Watchers in all, counted from [`Registry::reserve`].
    total: usize,
    jobs: HashMap<JobId, Entry>,
    /// Watched jobs waiting for slots (their pending reason can change at any batch).
    queued: HashSet<JobId>,
}

/// The watched jobs of one replica and their shared views.
pub struct Registry {
    shared: SharedState,
    limits: Limits,
    inner: Mutex<Inner>,
    /// Statuses converted so far (first views and changes), for tests and figures.
    conversions: AtomicU64,
    /// Watch traffic since the last trim, as counted for [`TRIM_AFTER_BYTES`].
    churn: AtomicU64,
    /// Told when `churn` passes [`TRIM_AFTER_BYTES`].
    burst: tokio::sync::Notify,
    /// Trims so far.
    trims: AtomicU64,
}

/// One watcher's place in the total bound; dropping it frees the place.
pub struct Permit {
    registry: Arc<Registry>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.total = inner.total.saturating_sub(1);
    }
}

/// A watcher of one job: the latest view of its entry. Dropping the last one of a job
/// removes the entry.
pub struct Subscription {
    registry: Arc<Registry>,
    id: JobId,
    rx: watch::Receiver<View>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        let Some(entry) = inner.jobs.get_mut(&self.id) else {
            return;
        };
        entry.watchers = entry.watchers.saturating_sub(1);
        if entry.watchers == 0 {
            inner.jobs.remove(&self.id);
            inner.queued.remove(&self.id);
            self.registry.shared.set_watched(&self.id, false);
        }
    }
}

/// A candidate of one refresh: a watched job that may have changed.
struct Candidate {
    id: JobId,
    /// The state machine named it (else it is only queued).
    changed: bool,
    seq: u64,
    pending: Option<PendingReason>,
    last: View,
}

/// What one refresh found for a candidate.
enum Update {
    Purged,
    Job {
        status: Box<pb::JobStatus>,
        /// A new spec (the id was submitted again).
        spec: Option<(u64, Arc<pb::JobSpec>)>,
        pending: Option<PendingReason>,
        index: u64,
    },
}

impl Registry {
    /// An empty registry over the replica's applied state.
    pub fn new(shared: SharedState, limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            shared,
            limits,
            inner: Mutex::new(Inner::default()),
            conversions: AtomicU64::new(0),
            churn: AtomicU64::new(0),
            burst: tokio::sync::Notify::new(),
            trims: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; if something did, the counts are still sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Statuses converted so far.
    pub fn conversions(&self) -> u64 {
        self.conversions.load(Ordering::Relaxed)
    }

    /// Heap trims after bursts so far.
    pub fn trims(&self) -> u64 {
        self.trims.load(Ordering::Relaxed)
    }

    /// Watched jobs and watchers (those holding a [`Permit`]).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.jobs.len(), inner.total)
    }

    /// A place in the total bound, for one watcher.
    pub fn reserve(self: &Arc<Self>) -> Result<Permit, Refused> {
        let mut inner = self.lock();
        if inner.total >= self.limits.total {
            return Err(Refused::Total {
                limit: self.limits.total,
            });
        }
        inner.total += 1;
        Ok(Permit {
            registry: self.clone(),
        })
    }

    /// Subscribes to job `id` as [`Registry::subscribe`] does, on a blocking thread (the
    /// first watcher of a job converts it), waiting up to `wait` for the job to be
    /// applied here.
    pub async fn subscribe_within(
        self: &Arc<Self>,
        _permit: &Permit,
        id: &JobId,
        wait: Duration,
    ) -> Result<Subscription, Refused> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.shared.subscribe();
        loop {
            applied.borrow_and_update();
            let (registry, job) = (self.clone(), id.clone());
            let subscribed = tokio::task::spawn_blocking(move || registry.join(&job))
                .await
                .unwrap_or_else(|e| {
                    tracing::error!(error = %e, "a watch's subscription panicked");
                    Err(Refused::Unknown(id.clone()))
                });
            match subscribed {
                Err(Refused::Unknown(_)) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, applied.changed())
                .await
                .map_or(true, |r| r.is_err())
            {
                return Err(Refused::Unknown(id.clone()));
            }
        }
    }

    /// Subscribes to job `id`: joins its entry, or makes one from the applied state.
    /// `_permit` is the watcher's place in the total bound, held as long as the
    /// subscription.
    pub fn subscribe(
        self: &Arc<Self>,
        _permit: &Permit,
        id: &JobId,
    ) -> Result<Subscription, Refused> {
        self.join(id)
    }

    /// [`Registry::subscribe`], for a caller that holds a permit. The first watcher of a
    /// job converts it under the registry's lock, so that watchers arriving meanwhile
    /// join its entry instead of converting again.
    fn join(self: &Arc<Self>, id: &JobId) -> Result<Subscription, Refused> {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.get_mut(id) {
            if matches!(*entry.tx.borrow(), View::Purged) {
                return Err(Refused::Unknown(id.clone()));
            }
            if entry.watchers >= self.limits.per_job {
                return Err(Refused::PerJob {
                    job: id.clone(),
                    limit: self.limits.per_job,
                });
            }
            entry.watchers += 1;
            return Ok(Subscription {
                registry: self.clone(),
                id: id.clone(),
                rx: entry.tx.subscribe(),
            });
        }
        if self.limits.per_job == 0 {
            return Err(Refused::PerJob {
                job: id.clone(),
                limit: 0,
            });
        }
        // Note the job's changes before reading it: a change applied after the read is
        // then noted, one applied before is in what is read.
        self.shared.set_watched(id, true);
        let first = {
            let g = self.shared.read();
            g.state.job(id).map(|job| {
                let pending = g.state.pending_reason(id);
                let status = convert::job_status_without_spec(job, pending.as_ref());
                let spec = Arc::new(convert::job_spec_to_pb(&job.spec));
                let index = g.last_applied.map_or(0, |l| l.index);
                (job.seq, spec, pending, status, index)
            })
        };
        let Some((seq, spec, pending, status, index)) = first else {
            self.shared.set_watched(id, false);
            return Err(Refused::Unknown(id.clone()));
        };
        self.conversions.fetch_add(1, Ordering::Relaxed);
        let view = View::Job(Arc::new(JobView::new(status, spec.clone(), index)));
        let (tx, rx) = watch::channel(view);
        if pending.is_some() {
            inner.queued.insert(id.clone());
        }
        inner.jobs.insert(
            id.clone(),
            Entry {
                watchers: 1,
                tx,
                seq,
                spec,
                pending,
            },
        );
        Ok(Subscription {
            registry: self.clone(),
            id: id.clone(),
            rx,
        })
    }

    /// Brings every entry whose job changed up to the applied state: one conversion per
    /// changed job, published to all its watchers at once. Entries of unchanged jobs,
    /// and their watchers, are not touched.
    pub fn refresh(&self) {
        let changes = self.shared.take_watched_changes();
        let candidates: Vec<Candidate> = {
            let inner = self.lock();
            let candidate = |id: &JobId, changed: bool| {
                inner.jobs.get(id).map(|e| Candidate {
                    id: id.clone(),
                    changed,
                    seq: e.seq,
                    pending: e.pending.clone(),
                    last: e.tx.borrow().clone(),
                })
            };
            if changes.all {
                inner
                    .jobs
                    .keys()
                    .filter_map(|id| candidate(id, true))
                    .collect()
            } else {
                let queued = inner
                    .queued
                    .iter()
                    .filter(|id| !changes.jobs.contains(*id))
                    .filter_map(|id| candidate(id, false));
                changes
                    .jobs
                    .iter()
                    .filter_map(|id| candidate(id, true))
                    .chain(queued)
                    .collect()
            }
        };
        if candidates.is_empty() {
            return;
        }
        let updates: Vec<(Candidate, Update)> = {
            let g = self.shared.read();
            let index = g.last_applied.map_or(0, |l| l.index);
            let mut reasons = g.state.pending_reasons();
            candidates
                .into_iter()
                .filter_map(|c| {
                    let Some(job) = g.state.job(&c.id) else {
                        return Some((c, Update::Purged));
                    };
                    let pending = reasons.of(&c.id);
                    // Not named by the state machine: only the reason can have moved.
                    if !c.changed && pending == c.pending {
                        return None;
                    }
                    let spec = (job.seq != c.seq)
                        .then(|| (job.seq, Arc::new(convert::job_spec_to_pb(&job.spec))));
                    self.conversions.fetch_add(1, Ordering::Relaxed);
                    let status = Box::new(convert::job_status_without_spec(job, pending.as_ref()));
                    Some((
                        c,
                        Update::Job {
                            status,
                            spec,
                            pending,
                            index,
                        },
                    ))
                })
                .collect()
        };
        // Compared and published outside the state lock.
        let mut guard = self.lock();
        let Inner { jobs, queued, .. } = &mut *guard;
        for (c, update) in updates {
            let Some(entry) = jobs.get_mut(&c.id) else {
                continue; // its last watcher left meanwhile
            };
            // An entry made again since the candidates were taken read a state at least
            // this new, or will be told of what is newer.
            let same_entry = match (&*entry.tx.borrow(), &c.last) {
                (View::Job(a), View::Job(b)) => Arc::ptr_eq(a, b),
                (View::Purged, View::Purged) => true,
                _ => false,
            };
            if !same_entry {
                continue;
            }
            match update {
                Update::Purged => {
                    queued.remove(&c.id);
                    entry.pending = None;
                    if !matches!(c.last, View::Purged) {
                        entry.tx.send_replace(View::Purged);
                    }
                }
                Update::Job {
                    status,
                    spec,
                    pending,
                    index,
                } => {
                    if pending.is_some() {
                        queued.insert(c.id.clone());
                    } else {
                        queued.remove(&c.id);
                    }
                    entry.pending = pending;
                    let spec_changed = spec.is_some();
                    if let Some((seq, spec)) = spec {
                        entry.seq = seq;
                        entry.spec = spec;
                    }
                    let unchanged = !spec_changed
                        && matches!(&c.last, View::Job(last) if last.status == *status);
                    if !unchanged {
                        entry.tx.send_replace(View::Job(Arc::new(JobView::new(
                            *status,
                            entry.spec.clone(),
                            index,
                        ))));
                    }
                }
            }
        }
    }

    /// Refreshes after every applied batch until `stopping` turns true or the state is
    /// gone. The conversions run on a blocking thread. Follows the applied index from the
    /// call, not from the first poll, and looks once at once.
    pub fn run(
        self: Arc<Self>,
        mut stopping: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send {
        let mut applied = self.shared.subscribe();
        applied.mark_changed();
        async move {
            loop {
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = stopping.wait_for(|s| *s) => return,
                }
                applied.borrow_and_update();
                if self.lock().jobs.is_empty() {
                    // Nothing is noted for unwatched jobs; drop a replaced-state mark.
                    self.shared.take_watched_changes();
                    continue;
                }
                let registry = self.clone();
                if tokio::task::spawn_blocking(move || registry.refresh())
                    .await
                    .is_err()
                {
                    tracing::error!("a watch refresh panicked; watches stop getting changes");
                    return;
                }
            }
        }
    }
}

impl Registry {
    /// Counts watch traffic (see [`TRIM_AFTER_BYTES`]); a burst past it wakes
    /// [`Registry::trim_after_bursts`].
    fn note_churn(&self, bytes: u64) {
        let before = self.churn.fetch_add(bytes, Ordering::Relaxed);
        if before < TRIM_AFTER_BYTES && before + bytes >= TRIM_AFTER_BYTES {
            self.burst.notify_one();
        }
    }

    /// After each burst of watch traffic past [`TRIM_AFTER_BYTES`], once it paused for
    /// `quiet` ([`TRIM_QUIET`] on a replica), returns the allocator's free memory to the
    /// system (on a blocking thread), until `stopping` turns true.
    pub async fn trim_after_bursts(
        self: Arc<Self>,
        quiet: Duration,
        mut stopping: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = self.burst.notified() => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            loop {
                let seen = self.churn.load(Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(quiet) => {}
                    _ = stopping.wait_for(|s| *s) => return,
                }
                if self.churn.load(Ordering::Relaxed) == seen {
                    break;
                }
            }
            let churn = self.churn.swap(0, Ordering::Relaxed);
            self.trims.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let released = tokio::task::spawn_blocking(crate::memory::trim)
                .await
                .unwrap_or(false);
            tracing::debug!(churn, released, took = ?started.elapsed(), "trimmed the heap after a burst of watch events");
        }
    }
}

/// One open watch: its places in the bounds and the views it is sent.
pub struct Watcher {
    sub: Subscription,
    _permit: Permit,
    stopping: watch::Receiver<bool>,
    started: bool,
    done: bool,
    /// The largest event sent: about what the stream's encoding buffer holds.
    largest: u64,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.sub.registry.note_churn(self.largest);
    }
}

impl Watcher {
    /// A watch of `sub`'s job that ends when `stopping` turns true.
    pub fn new(permit: Permit, sub: Subscription, stopping: watch::Receiver<bool>) -> Self {
        Watcher {
            sub,
            _permit: permit,
            stopping,
            started: false,
            done: false,
            largest: 0,
        }
    }

    /// The next view to send: the current one first, then each new one; `None` after a
    /// terminal view or an end.
    pub async fn next(&mut self) -> Option<Result<Arc<JobView>, End>> {
        if self.done {
            return None;
        }
        if self.started {
            let shutting_down = tokio::select! {
                changed = self.sub.rx.changed() => changed.is_err(),
                _ = self.stopping.wait_for(|s| *s) => true,
            };
            if shutting_down {
                self.done = true;
                return Some(Err(End::ShuttingDown));
            }
        }
        self.started = true;
        let view = self.sub.rx.borrow_and_update().clone();
        match view {
            View::Purged => {
                self.done = true;
                Some(Err(End::Purged))
            }
            View::Job(v) => {
                self.done = v.is_terminal();
                self.sub.registry.note_churn(v.size);
                self.largest = self.largest.max(v.size);
                Some(Ok(v))
            }
        }
    }
}

#[cfg(test)]
mod tests;
