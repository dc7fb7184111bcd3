//! The canonical encoding of the state, its digest and its restore, and the derived
//! indexes that a restore rebuilds (never decodes).
//!
//! Only the primary data is encoded, in ordered maps, so equal states give equal bytes on
//! every replica. Nothing here does I/O, reads a clock or draws a random number.
//!
//! Layout versions: each version appends one block to the one before, and a state is
//! written in the oldest layout that holds all of it, so that a cluster which never used
//! a newer feature keeps writing the older layout byte for byte (its digests unchanged,
//! an older build still able to read it).
//! - Version 1: config, clock, sequence, cursor, jobs and TaskManagers.
//! - Version 2: the access block (tokens, TaskManager owners); written when either is
//!   not empty or a later block follows.
//! - Version 3: the resource limits; written once limits are set.
//!
//! Decoding reads the version 1 fields and then each block while bytes remain, so a
//! restore decodes once whatever the layout; bytes left after the last known block are
//! refused (a newer layout, or corruption).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::jobs::spec_bytes;
use super::queue::{queue_key, QueueKey};
use super::DispatcherState;
use crate::codec::{self, CodecError};
use crate::state::access::Token;
use crate::state::command::{ClusterConfig, Counters, Rejection, ResourceLimits, Response};
use crate::state::placement::SlotIndex;
use crate::state::types::{Job, JobId, Millis, TaskManager, TaskManagerId};

/// What the canonical encoding holds: the primary data only (layout version 1).
#[derive(Serialize)]
struct Encoded<'a> {
    config: &'a ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: &'a Option<TaskManagerId>,
    jobs: &'a imbl::OrdMap<JobId, Job>,
    task_managers: &'a imbl::OrdMap<TaskManagerId, TaskManager>,
}

/// Layout version 2: version 1 followed by the access block.
#[derive(Serialize)]
struct EncodedV2<'a> {
    base: Encoded<'a>,
    tokens: &'a BTreeMap<String, Token>,
    owners: &'a BTreeMap<TaskManagerId, String>,
}

/// Layout version 3: version 2 followed by the resource limits.
#[derive(Serialize)]
struct EncodedV3<'a> {
    v2: EncodedV2<'a>,
    limits: &'a ResourceLimits,
}

#[derive(Deserialize)]
struct Decoded {
    config: ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: Option<TaskManagerId>,
    jobs: imbl::OrdMap<JobId, Job>,
    task_managers: imbl::OrdMap<TaskManagerId, TaskManager>,
}

/// The primary data of a state at one applied index, taken in O(1) (the big maps are
/// persistent, so taking a view copies no job) and encoded without the state: replicas
/// build snapshots and digests from a view outside the state lock, so apply never waits
/// for them.
#[derive(Clone, Debug)]
pub struct StateView {
    config: ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: Option<TaskManagerId>,
    jobs: imbl::OrdMap<JobId, Job>,
    task_managers: imbl::OrdMap<TaskManagerId, TaskManager>,
    tokens: BTreeMap<String, Token>,
    owners: BTreeMap<TaskManagerId, String>,
    limits: Option<ResourceLimits>,
}

impl StateView {
    /// The jobs of the view, in id order: for readers that walk every job off the state
    /// lock (metrics).
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// The canonical encoding of the state the view was taken of (see
    /// [`DispatcherState::encode`]).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let base = Encoded {
            config: &self.config,
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: &self.rr_cursor,
            jobs: &self.jobs,
            task_managers: &self.task_managers,
        };
        if self.limits.is_none() && self.tokens.is_empty() && self.owners.is_empty() {
            return codec::encode(&base);
        }
        let v2 = EncodedV2 {
            base,
            tokens: &self.tokens,
            owners: &self.owners,
        };
        match &self.limits {
            Some(limits) => codec::encode(&EncodedV3 { v2, limits }),
            None => codec::encode(&v2),
        }
    }

    /// SHA-256 of the canonical encoding, in hex (see [`DispatcherState::digest`]).
    pub fn digest(&self) -> Result<String, CodecError> {
        Ok(codec::digest_hex(&self.encode()?))
    }

    /// The state of this primary data, its indexes rebuilt.
    fn into_state(self) -> DispatcherState {
        let mut s = DispatcherState {
            config: self.config,
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: self.rr_cursor,
            jobs: self.jobs,
            task_managers: self.task_managers,
            tokens: self.tokens,
            owners: self.owners,
            limits: self.limits,
            ..Default::default()
        };
        s.rebuild_indexes();
        s
    }
}

impl DispatcherState {
    /// A view of the primary data, for encoding elsewhere; O(1) in the number of jobs
    /// and TaskManagers.
    pub fn view(&self) -> StateView {
        StateView {
            config: self.config.clone(),
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: self.rr_cursor.clone(),
            jobs: self.jobs.clone(),
            task_managers: self.task_managers.clone(),
            tokens: self.tokens.clone(),
            owners: self.owners.clone(),
            limits: self.limits.clone(),
        }
    }

    /// The canonical encoding: format-version byte, then bincode of the primary data in
    /// ordered maps. Equal states give equal bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        self.view().encode()
    }

    /// Restores a state from its canonical encoding (any layout), rebuilding the
    /// indexes.
    pub fn restore(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = codec::Reader::new(bytes)?;
        let d: Decoded = r.read()?;
        let (mut tokens, mut owners, mut limits) = (BTreeMap::new(), BTreeMap::new(), None);
        if !r.is_empty() {
            tokens = r.read()?;
            owners = r.read()?;
        }
        if !r.is_empty() {
            limits = Some(r.read()?);
        }
        r.finish()?;
        let view = StateView {
            config: d.config,
            clock: d.clock,
            next_seq: d.next_seq,
            rr_cursor: d.rr_cursor,
            jobs: d.jobs,
            task_managers: d.task_managers,
            tokens,
            owners,
            limits,
        };
        Ok(view.into_state())
    }

    /// SHA-256 of the canonical encoding, in hex: replicas that applied the same log
    /// prefix have the same digest.
    pub fn digest(&self) -> Result<String, CodecError> {
        self.view().digest()
    }

    /// Recomputes every derived index from the primary data.
    pub(super) fn rebuild_indexes(&mut self) {
        self.rebuild_token_index();
        self.index = SlotIndex::default();
        self.queue.clear();
        self.restarts.clear();
        self.terminal.clear();
        self.counters = Counters::default();
        for tm in self.task_managers.values() {
            let free = tm.free_slots();
            self.index.add(tm, free);
            self.counters.total_slots += u64::from(tm.spec.slots);
            self.counters.free_slots += u64::from(free);
        }
        let ids: Vec<JobId> = self.jobs.keys().cloned().collect();
        for id in ids {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            // Never encoded: recomputed here, so it is right for snapshots written before
            // it existed too.
            job.spec_bytes = spec_bytes(&job.spec);
            self.counters.spec_bytes = self.counters.spec_bytes.saturating_add(job.spec_bytes);
            if !job.state.is_terminal() {
                self.counters.active_spec_bytes = self
                    .counters
                    .active_spec_bytes
                    .saturating_add(job.spec_bytes);
            }
            *self.counters.jobs_by_state.entry(job.state).or_default() += 1;
            if job.awaits_placement() {
                self.queue.insert(queue_key(job));
            }
            if let Some(due) = job.restart_due_at {
                self.restarts.insert((due, job.id.clone()));
            }
            if let Some(at) = job.finished_at {
                self.terminal.insert((at, job.id.clone()));
            }
        }
    }

    /// Derived data recomputed from scratch, for the invariant checker.
    pub(crate) fn derived_from_scratch(&self) -> DerivedView {
        self.view().into_state().derived()
    }

    /// The derived data as kept incrementally.
    pub(crate) fn derived(&self) -> DerivedView {
        let mut counters = self.counters.clone();
        counters.jobs_by_state.retain(|_, n| *n > 0);
        DerivedView {
            token_hashes: self.token_hashes.clone(),
            index: self.index.clone(),
            queue: self.queue.clone(),
            restarts: self.restarts.clone(),
            terminal: self.terminal.clone(),
            counters,
        }
    }

    /// RestoreState: seeds an empty cluster from a backup.
    pub(super) fn restore_state(&mut self, bytes: &[u8]) -> Result<Response, Rejection> {
        if !self.jobs.is_empty() || !self.task_managers.is_empty() || self.next_seq != 0 {
            return Err(Rejection::invalid(
                "state",
                "a backup can only be restored into a new, empty cluster",
            ));
        }
        // Decoding is deterministic: every replica gets the same state or the same error.
        let mut restored = DispatcherState::restore(bytes)
            .map_err(|e| Rejection::invalid("state", format!("not a valid backup: {e}")))?;
        // The new cluster's tokens (its bootstrap admin token) survive the restore beside
        // the backup's own, so that neither the new nor the old admin is locked out. On a
        // name clash (both bootstrap tokens are named `admin`) the new cluster's token
        // wins: whoever runs the restore holds it.
        for (name, token) in std::mem::take(&mut self.tokens) {
            restored.tokens.retain(|_, t| t.hash != token.hash);
            restored.tokens.insert(name, token);
        }
        restored.rebuild_token_index();
        // A backup from before limits existed keeps the new cluster's limits, or the
        // restore would silently lift them.
        if restored.limits.is_none() {
            restored.limits = self.limits.take();
        }
        // Every job is new; ids noted before (none can exist in an empty state) stay.
        restored.changed_jobs = std::mem::take(&mut self.changed_jobs);
        restored.changed_jobs.extend(restored.jobs.keys().cloned());
        *self = restored;
        Ok(Response::Restored {
            jobs: self.jobs.len() as u64,
            task_managers: self.task_managers.len() as u64,
        })
    }
}

/// Derived data, compared by the invariant checker against a rebuild from scratch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DerivedView {
    token_hashes: BTreeMap<String, String>,
    index: SlotIndex,
    queue: BTreeSet<QueueKey>,
    restarts: BTreeSet<(Millis, JobId)>,
    terminal: BTreeSet<(Millis, JobId)>,
    counters: Counters,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, JobSpec, Role, TaskSpec};

    fn job(n: u32) -> JobId {
        JobId::parse(&format!("00000000-0000-4000-8000-{n:012}")).expect("uuid")
    }

    /// A state with jobs (one ended), a token and limits: every block of every layout.
    fn full_state() -> DispatcherState {
        let mut s = DispatcherState::new(ClusterConfig::default());
        let token = Token {
            name: "root".into(),
            role: Role::Admin,
            hash: "a".repeat(64),
            task_managers: vec![],
            created_at: 5,
        };
        let commands = [
            Command::CreateToken {
                token,
                bootstrap: true,
            },
            Command::SetResourceLimits {
                limits: ResourceLimits::default(),
                bootstrap: true,
            },
            Command::SubmitJob {
                job_id: job(1),
                spec: JobSpec::single_vertex("a", "v", 2, TaskSpec::Sleep { duration_ms: 5 }),
                now: 10,
            },
            Command::SubmitJob {
                job_id: job(2),
                spec: JobSpec::single_vertex("b", "v", 1, TaskSpec::Sleep { duration_ms: 5 }),
                now: 11,
            },
            Command::CancelJob {
                job_id: job(2),
                now: 12,
            },
        ];
        for c in commands {
            let name = c.name();
            if let Err(e) = s.apply(c) {
                panic!("{name}: {e}");
            }
        }
        s
    }

    fn base(s: &DispatcherState) -> Encoded<'_> {
        Encoded {
            config: &s.config,
            clock: s.clock,
            next_seq: s.next_seq,
            rr_cursor: &s.rr_cursor,
            jobs: &s.jobs,
            task_managers: &s.task_managers,
        }
    }

    /// Snapshots and backups written by builds before limits existed (layouts 1 and 2,
    /// written here by the same structs those builds used) restore, with no limits and
    /// with the spec sizes and byte counters recomputed.
    #[test]
    fn snapshots_of_older_layouts_restore_without_limits_and_with_sizes_recomputed() {
        let s = full_state();
        let v1 = codec::encode(&base(&s)).expect("encode v1");
        let v2 = codec::encode(&EncodedV2 {
            base: base(&s),
            tokens: &s.tokens,
            owners: &s.owners,
        })
        .expect("encode v2");
        for (layout, bytes) in [(1, &v1), (2, &v2)] {
            let r = DispatcherState::restore(bytes)
                .unwrap_or_else(|e| panic!("layout {layout} does not restore: {e}"));
            assert_eq!(r.resource_limits(), None, "layout {layout}");
            assert_eq!(r.jobs, s.jobs, "layout {layout}: jobs and their sizes");
            assert_eq!(r.counters, s.counters, "layout {layout}: byte counters");
            assert_eq!(r.tokens.len(), layout - 1, "layout {layout}: tokens");
            assert!(crate::state::invariants::check(&r).is_ok());
            // Written back in the layout it came in: its digest is what the old build had.
            assert_eq!(&r.encode().expect("encode"), bytes, "layout {layout}");
        }
        assert!(s.counters.spec_bytes > s.counters.active_spec_bytes);
        assert!(s.counters.active_spec_bytes > 0);

        let v3 = s.encode().expect("encode v3");
        assert!(v3.starts_with(&v2[..]), "layout 3 appends to layout 2");
        let r = DispatcherState::restore(&v3).expect("layout 3");
        assert_eq!(r.resource_limits(), Some(&ResourceLimits::default()));
        assert_eq!(r.digest().ok(), s.digest().ok());
    }
}
