//! The canonical encoding of the state, its digest and its restore, and the derived
//! indexes that a restore rebuilds (never decodes).
//!
//! Only the primary data is encoded, in ordered maps, so equal states give equal bytes on
//! every replica. Nothing here does I/O, reads a clock or draws a random number.
//!
//! Layout versions: the first layout (version 1) holds config, clock, sequence, cursor,
//! jobs and TaskManagers. Version 2 appends the access block (tokens, TaskManager
//! owners), and is written only when that block is not empty: a cluster that never used
//! tokens keeps writing version 1, byte for byte, so its digests are unchanged and an
//! older build can still read it. Decoding tries version 2, then version 1; neither can
//! be mistaken for the other (version 1 bytes end before the access block, and version 2
//! bytes leave the block as trailing bytes to a version 1 reader).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::queue::{queue_key, QueueKey};
use super::DispatcherState;
use crate::codec::{self, CodecError};
use crate::state::access::Token;
use crate::state::command::{ClusterConfig, Counters, Rejection, Response};
use crate::state::placement::SlotIndex;
use crate::state::types::{Job, JobId, Millis, TaskManager, TaskManagerId};

/// What the canonical encoding holds: the primary data only (layout version 1).
#[derive(Serialize)]
struct Encoded<'a> {
    config: &'a ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: &'a Option<TaskManagerId>,
    jobs: &'a BTreeMap<JobId, Job>,
    task_managers: &'a BTreeMap<TaskManagerId, TaskManager>,
}

/// Layout version 2: version 1 followed by the access block.
#[derive(Serialize)]
struct EncodedV2<'a> {
    base: Encoded<'a>,
    tokens: &'a BTreeMap<String, Token>,
    owners: &'a BTreeMap<TaskManagerId, String>,
}

#[derive(Deserialize)]
struct Decoded {
    config: ClusterConfig,
    clock: Millis,
    next_seq: u64,
    rr_cursor: Option<TaskManagerId>,
    jobs: BTreeMap<JobId, Job>,
    task_managers: BTreeMap<TaskManagerId, TaskManager>,
}

#[derive(Deserialize)]
struct DecodedV2 {
    base: Decoded,
    tokens: BTreeMap<String, Token>,
    owners: BTreeMap<TaskManagerId, String>,
}

impl DispatcherState {
    /// The canonical encoding: format-version byte, then bincode of the primary data in
    /// ordered maps. Equal states give equal bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let base = Encoded {
            config: &self.config,
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: &self.rr_cursor,
            jobs: &self.jobs,
            task_managers: &self.task_managers,
        };
        if self.tokens.is_empty() && self.owners.is_empty() {
            codec::encode(&base)
        } else {
            codec::encode(&EncodedV2 {
                base,
                tokens: &self.tokens,
                owners: &self.owners,
            })
        }
    }

    /// Restores a state from its canonical encoding (either layout), rebuilding the
    /// indexes.
    pub fn restore(bytes: &[u8]) -> Result<Self, CodecError> {
        let (d, tokens, owners) = match codec::decode::<DecodedV2>(bytes) {
            Ok(v2) => (v2.base, v2.tokens, v2.owners),
            Err(v2_error) => match codec::decode::<Decoded>(bytes) {
                Ok(v1) => (v1, BTreeMap::new(), BTreeMap::new()),
                // Neither layout: report the newer one's complaint.
                Err(_) => return Err(v2_error),
            },
        };
        let mut s = DispatcherState {
            config: d.config,
            clock: d.clock,
            next_seq: d.next_seq,
            rr_cursor: d.rr_cursor,
            jobs: d.jobs,
            task_managers: d.task_managers,
            tokens,
            owners,
            ..Default::default()
        };
        s.rebuild_indexes();
        Ok(s)
    }

    /// SHA-256 of the canonical encoding, in hex: replicas that applied the same log
    /// prefix have the same digest.
    pub fn digest(&self) -> Result<String, CodecError> {
        Ok(codec::digest_hex(&self.encode()?))
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
        for job in self.jobs.values() {
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
        let mut fresh = DispatcherState {
            config: self.config.clone(),
            clock: self.clock,
            next_seq: self.next_seq,
            rr_cursor: self.rr_cursor.clone(),
            jobs: self.jobs.clone(),
            task_managers: self.task_managers.clone(),
            tokens: self.tokens.clone(),
            owners: self.owners.clone(),
            ..Default::default()
        };
        fresh.rebuild_indexes();
        fresh.derived()
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
