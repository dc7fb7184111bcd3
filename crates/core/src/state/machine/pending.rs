//! Why a queued job is not placed: a read-only query computed from the current state
//! each time it is asked, never stored, so the canonical encoding and the digest do not
//! know it exists.
//!
//! The reason names what has to change for the job to be placed, most permanent first:
//! the cluster itself (no TaskManager matches a node selector, or there are too few
//! slots even when all are free), then the slots that running jobs hold. The queue never
//! blocks a job that fits: every change in capacity tries the whole queue in order and a
//! job that does not fit lets the ones behind it go (backfill). So the jobs ahead in the
//! queue are never the reason on their own; they are counted because they are tried
//! first when slots free.
//!
//! Cost: a job that is not queued costs two map lookups. A queued job costs one pass over
//! the TaskManagers carrying the rarest label of each distinct node selector in it (the
//! label index), plus counting the jobs ahead of it. [`PendingReasons`] shares both across
//! the jobs of one listing, so listing a page of queued jobs stays linear.

use std::collections::BTreeMap;
use std::fmt;

use super::queue::{queue_key, QueueKey};
use super::DispatcherState;
use crate::state::placement::Capacity;
use crate::state::types::{Job, JobId};

/// Why a job waits in the placement queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingReason {
    /// No TaskManager is registered.
    NoTaskManagers {
        /// Slots the job needs.
        slots: u64,
    },
    /// The TaskManagers matching a node selector (maybe none) have fewer slots in all
    /// than the vertices with that selector need.
    SelectorTooSmall {
        /// The vertices with this selector, in spec order.
        vertices: Vec<String>,
        /// The node selector.
        selector: BTreeMap<String, String>,
        /// Slots those vertices need together.
        slots: u64,
        /// What the matching TaskManagers hold.
        matching: Capacity,
    },
    /// The job needs more slots than the whole cluster has.
    ClusterTooSmall {
        /// Slots the job needs.
        slots: u64,
        /// Slots in the cluster.
        total: u64,
        /// Registered TaskManagers.
        task_managers: u64,
    },
    /// Enough TaskManagers match a node selector, but too few of their slots are free.
    SelectorBusy {
        /// The vertices with this selector, in spec order.
        vertices: Vec<String>,
        /// The node selector.
        selector: BTreeMap<String, String>,
        /// Slots those vertices need together.
        slots: u64,
        /// What the matching TaskManagers hold.
        matching: Capacity,
        /// Queued jobs tried before this one when slots free.
        ahead: u64,
    },
    /// The cluster is big enough, but too few of its slots are free.
    ClusterBusy {
        /// Slots the job needs.
        slots: u64,
        /// Free slots in the cluster.
        free: u64,
        /// TaskManagers with a free slot.
        with_free: u64,
        /// Slots in the cluster.
        total: u64,
        /// Queued jobs tried before this one when slots free.
        ahead: u64,
    },
    /// Enough slots are free, for the job and for each node selector on its own, but
    /// gang placement, which gives each subtask a slot in turn, found none left that
    /// matches some vertex's selector after the vertices before it took theirs.
    Fragmented {
        /// Slots the job needs.
        slots: u64,
        /// Free slots in the cluster.
        free: u64,
        /// Queued jobs tried before this one when slots free.
        ahead: u64,
    },
}

impl fmt::Display for PendingReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PendingReason::NoTaskManagers { slots } => {
                write!(
                    f,
                    "needs {}; no TaskManager is registered",
                    count(*slots, "slot")
                )
            }
            PendingReason::SelectorTooSmall {
                vertices,
                selector,
                slots,
                matching,
            } => {
                write!(
                    f,
                    "{} {} with {}; ",
                    Vertices(vertices),
                    count(*slots, "slot"),
                    Selector(selector)
                )?;
                match matching.task_managers {
                    0 => write!(f, "0 TaskManagers match"),
                    1 => write!(
                        f,
                        "1 TaskManager matches, with {}",
                        count(matching.slots, "slot")
                    ),
                    n => write!(
                        f,
                        "{n} TaskManagers match, with {} in all",
                        count(matching.slots, "slot")
                    ),
                }
            }
            PendingReason::ClusterTooSmall {
                slots,
                total,
                task_managers,
            } => write!(
                f,
                "needs {}; the cluster has {total} on {}",
                count(*slots, "slot"),
                count(*task_managers, "TaskManager")
            ),
            PendingReason::SelectorBusy {
                vertices,
                selector,
                slots,
                matching,
                ahead,
            } => write!(
                f,
                "{} {} with {}; {} free on {} of {} ({} in all){}",
                Vertices(vertices),
                count(*slots, "free slot"),
                Selector(selector),
                matching.free,
                matching.with_free,
                count(matching.task_managers, "matching TaskManager"),
                count(matching.slots, "slot"),
                Ahead(*ahead)
            ),
            PendingReason::ClusterBusy {
                slots,
                free,
                with_free,
                total,
                ahead,
            } => write!(
                f,
                "needs {}; {free} free on {} ({total} in the cluster){}",
                count(*slots, "free slot"),
                count(*with_free, "TaskManager"),
                Ahead(*ahead)
            ),
            PendingReason::Fragmented { slots, free, ahead } => write!(
                f,
                "needs {} and {free} {} free, but not every vertex finds one matching its \
                 node selector after earlier vertices take theirs{}",
                count(*slots, "free slot"),
                if *free == 1 { "is" } else { "are" },
                Ahead(*ahead)
            ),
        }
    }
}

/// `1 slot`, `2 slots`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The subject of a sentence about vertices, with its verb: `vertex 'a' needs`,
/// `vertices 'a' and 'b' need`; long lists end in `and 3 more`.
struct Vertices<'a>(&'a [String]);

impl fmt::Display for Vertices<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 3;
        match self.0 {
            [one] => return write!(f, "vertex '{one}' needs"),
            [] => return write!(f, "its vertices need"),
            _ => {}
        }
        let shown = &self.0[..self.0.len().min(SHOWN)];
        let rest = self.0.len() - shown.len();
        write!(f, "vertices ")?;
        for (i, name) in shown.iter().enumerate() {
            let sep = match i {
                0 => "",
                _ if i + 1 == shown.len() && rest == 0 => " and ",
                _ => ", ",
            };
            write!(f, "{sep}'{name}'")?;
        }
        if rest > 0 {
            write!(f, " and {rest} more")?;
        }
        write!(f, " need")
    }
}

/// A node selector as `dispatchctl taskmanager list` shows labels: `gpu=true,zone=a`.
struct Selector<'a>(&'a BTreeMap<String, String>);

impl fmt::Display for Selector<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

/// The jobs tried first when slots free, if any.
struct Ahead(u64);

impl fmt::Display for Ahead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => write!(
                f,
                "; 1 queued job of higher or equal priority is tried first"
            ),
            n => write!(
                f,
                "; {n} queued jobs of higher or equal priority are tried first"
            ),
        }
    }
}

/// Vertices of one job that share a node selector: they compete for the same
/// TaskManagers, so their slots are counted together.
struct Group<'a> {
    selector: &'a BTreeMap<String, String>,
    vertices: Vec<String>,
    slots: u64,
}

impl Group<'_> {
    fn too_small(&self, matching: Capacity) -> PendingReason {
        PendingReason::SelectorTooSmall {
            vertices: self.vertices.clone(),
            selector: self.selector.clone(),
            slots: self.slots,
            matching,
        }
    }

    fn busy(&self, matching: Capacity, ahead: u64) -> PendingReason {
        PendingReason::SelectorBusy {
            vertices: self.vertices.clone(),
            selector: self.selector.clone(),
            slots: self.slots,
            matching,
            ahead,
        }
    }
}

/// The groups of vertices with a non-empty node selector, in the spec order of their
/// first vertex.
fn selector_groups(job: &Job) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut by_selector: BTreeMap<&BTreeMap<String, String>, usize> = BTreeMap::new();
    for v in job
        .spec
        .vertices
        .iter()
        .filter(|v| !v.node_selector.is_empty())
    {
        let i = *by_selector.entry(&v.node_selector).or_insert_with(|| {
            groups.push(Group {
                selector: &v.node_selector,
                vertices: Vec::new(),
                slots: 0,
            });
            groups.len() - 1
        });
        if let Some(g) = groups.get_mut(i) {
            g.vertices.push(v.name.clone());
            g.slots += u64::from(v.parallelism);
        }
    }
    groups
}

/// Pending reasons of several jobs read under one view of the state (a ListJobs page):
/// the capacity behind each node selector and the queue positions are computed once.
pub struct PendingReasons<'a> {
    state: &'a DispatcherState,
    capacities: BTreeMap<&'a BTreeMap<String, String>, Capacity>,
    /// Position of every queued job, built in one pass the first time a listing needs
    /// one; `None` for a one-job query, which counts the jobs ahead of it directly.
    positions: Option<BTreeMap<&'a JobId, u64>>,
    many: bool,
}

impl DispatcherState {
    /// Why the job waits for slots; `None` if it is not in the placement queue (it is
    /// placed, winding down, waiting for a restart delay, terminal, or unknown).
    pub fn pending_reason(&self, id: &JobId) -> Option<PendingReason> {
        PendingReasons {
            state: self,
            capacities: BTreeMap::new(),
            positions: None,
            many: false,
        }
        .of(id)
    }

    /// A query for the pending reasons of many jobs under this view of the state.
    pub fn pending_reasons(&self) -> PendingReasons<'_> {
        PendingReasons {
            state: self,
            capacities: BTreeMap::new(),
            positions: None,
            many: true,
        }
    }
}

impl<'a> PendingReasons<'a> {
    /// Why the job waits for slots, as [`DispatcherState::pending_reason`].
    pub fn of(&mut self, id: &JobId) -> Option<PendingReason> {
        let state = self.state;
        let job = state.jobs.get(id)?;
        let key = queue_key(job);
        if !job.awaits_placement() || !state.queue.contains(&key) {
            return None;
        }
        let slots = job.tasks.len() as u64;
        if state.task_managers.is_empty() {
            return Some(PendingReason::NoTaskManagers { slots });
        }
        let groups = selector_groups(job);
        let capacities: Vec<Capacity> = groups.iter().map(|g| self.capacity(g.selector)).collect();
        let groups = || groups.iter().zip(capacities.iter().copied());
        // First what only a change to the cluster can fix.
        if let Some((g, c)) = groups().find(|(g, c)| c.slots < g.slots) {
            return Some(g.too_small(c));
        }
        let counters = &state.counters;
        if counters.total_slots < slots {
            return Some(PendingReason::ClusterTooSmall {
                slots,
                total: counters.total_slots,
                task_managers: state.task_managers.len() as u64,
            });
        }
        // Then the slots that running jobs hold.
        let ahead = self.ahead(&key);
        if let Some((g, c)) = groups().find(|(g, c)| c.free < g.slots) {
            return Some(g.busy(c, ahead));
        }
        if counters.free_slots < slots {
            return Some(PendingReason::ClusterBusy {
                slots,
                free: counters.free_slots,
                with_free: state.index.with_free_count() as u64,
                total: counters.total_slots,
                ahead,
            });
        }
        Some(PendingReason::Fragmented {
            slots,
            free: counters.free_slots,
            ahead,
        })
    }

    fn capacity(&mut self, selector: &'a BTreeMap<String, String>) -> Capacity {
        let state = self.state;
        *self
            .capacities
            .entry(selector)
            .or_insert_with(|| state.index.capacity(selector, &state.task_managers))
    }

    /// Queued jobs before `key`: higher priority, or equal priority and submitted
    /// earlier.
    fn ahead(&mut self, key: &QueueKey) -> u64 {
        let state = self.state;
        let queue = &state.queue;
        if !self.many {
            return queue.range(..key).count() as u64;
        }
        let positions = self.positions.get_or_insert_with(|| {
            queue
                .iter()
                .zip(0..)
                .map(|((_, _, id), i)| (id, i))
                .collect()
        });
        positions.get(&key.2).copied().unwrap_or(0)
    }
}
