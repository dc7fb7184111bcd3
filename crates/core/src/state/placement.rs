//! Free-slot indexes and the per-task slot choice of each placement strategy.
//!
//! The index is derived data: it is never encoded, and `DispatcherState::restore`
//! rebuilds it from the TaskManagers. It answers "which TaskManager gets the next
//! subtask" in O(log n) for unconstrained vertices, without looking at full
//! TaskManagers, so placing a job on a large, mostly full cluster stays cheap.
//! Vertices with a node selector look only at TaskManagers carrying the rarest of the
//! selected labels.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{PlacementStrategy, TaskManager, TaskManagerId};

/// What a set of TaskManagers holds: how many there are, their slots, and how many of
/// those are free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Number of TaskManagers.
    pub task_managers: u64,
    /// Their slots.
    pub slots: u64,
    /// Their free slots.
    pub free: u64,
    /// Number of them with at least one free slot.
    pub with_free: u64,
}

/// Free-slot indexes over the registered TaskManagers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotIndex {
    /// Free slot count of every registered TaskManager (including those with none free).
    free: BTreeMap<TaskManagerId, u32>,
    /// `(free, id)` for TaskManagers with at least one free slot: bin-pack takes the
    /// first, spread the lowest id among the largest `free`.
    by_free: BTreeSet<(u32, TaskManagerId)>,
    /// Ids of TaskManagers with at least one free slot, for round-robin.
    with_free: BTreeSet<TaskManagerId>,
    /// `(label key, label value)` to the TaskManagers carrying it.
    by_label: BTreeMap<(String, String), BTreeSet<TaskManagerId>>,
}

impl SlotIndex {
    /// Adds a TaskManager with `free` free slots.
    pub fn add(&mut self, tm: &TaskManager, free: u32) {
        let id = tm.spec.id.clone();
        for (k, v) in &tm.spec.labels {
            self.by_label
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(id.clone());
        }
        self.set_free(&id, free);
    }

    /// Removes a TaskManager.
    pub fn remove(&mut self, tm: &TaskManager) {
        let id = &tm.spec.id;
        if let Some(free) = self.free.remove(id) {
            self.by_free.remove(&(free, id.clone()));
            self.with_free.remove(id);
        }
        for (k, v) in &tm.spec.labels {
            let key = (k.clone(), v.clone());
            if let Some(set) = self.by_label.get_mut(&key) {
                set.remove(id);
                if set.is_empty() {
                    self.by_label.remove(&key);
                }
            }
        }
    }

    fn set_free(&mut self, id: &TaskManagerId, free: u32) {
        if let Some(old) = self.free.insert(id.clone(), free) {
            self.by_free.remove(&(old, id.clone()));
        }
        if free > 0 {
            self.by_free.insert((free, id.clone()));
            self.with_free.insert(id.clone());
        } else {
            self.with_free.remove(id);
        }
    }

    /// Free slot count of a TaskManager (0 if unknown).
    pub fn free_of(&self, id: &TaskManagerId) -> u32 {
        self.free.get(id).copied().unwrap_or(0)
    }

    /// Marks one slot of `id` as taken.
    pub fn take(&mut self, id: &TaskManagerId) {
        let free = self.free_of(id);
        debug_assert!(free > 0, "take on a full TaskManager {id}");
        self.set_free(id, free.saturating_sub(1));
    }

    /// Marks one slot of `id` as free again.
    pub fn give(&mut self, id: &TaskManagerId) {
        if self.free.contains_key(id) {
            let free = self.free_of(id);
            self.set_free(id, free + 1);
        }
    }

    /// Chooses the TaskManager for the next subtask, or `None` if no TaskManager with a
    /// free slot matches the selector. `cursor` is the round-robin position (the last
    /// TaskManager round-robin chose).
    pub fn pick(
        &self,
        strategy: PlacementStrategy,
        cursor: Option<&TaskManagerId>,
        selector: &BTreeMap<String, String>,
        task_managers: &imbl::OrdMap<TaskManagerId, TaskManager>,
    ) -> Option<TaskManagerId> {
        if selector.is_empty() {
            return self.pick_any(strategy, cursor);
        }
        let candidates = self
            .matching(selector, task_managers)
            .filter(|id| self.free_of(id) > 0);
        match strategy {
            // Ties go to the lowest id: `candidates` iterates in id order and only a
            // strictly better candidate replaces the current choice.
            PlacementStrategy::Spread => candidates
                .fold(None, |best: Option<(&TaskManagerId, u32)>, id| {
                    let f = self.free_of(id);
                    match best {
                        Some((_, bf)) if bf >= f => best,
                        _ => Some((id, f)),
                    }
                })
                .map(|(id, _)| id.clone()),
            PlacementStrategy::BinPack => candidates
                .fold(None, |best: Option<(&TaskManagerId, u32)>, id| {
                    let f = self.free_of(id);
                    match best {
                        Some((_, bf)) if bf <= f => best,
                        _ => Some((id, f)),
                    }
                })
                .map(|(id, _)| id.clone()),
            PlacementStrategy::RoundRobin => {
                let all: Vec<&TaskManagerId> = candidates.collect();
                let after = cursor.and_then(|c| all.iter().find(|id| **id > c));
                after.or(all.first()).map(|id| (*id).clone())
            }
        }
    }

    /// What the TaskManagers matching a non-empty `selector` hold, for explaining why a
    /// job waits. Costs one pass over the TaskManagers carrying the rarest selected label.
    pub fn capacity(
        &self,
        selector: &BTreeMap<String, String>,
        task_managers: &imbl::OrdMap<TaskManagerId, TaskManager>,
    ) -> Capacity {
        let mut c = Capacity::default();
        for id in self.matching(selector, task_managers) {
            let free = u64::from(self.free_of(id));
            c.task_managers += 1;
            c.slots += task_managers
                .get(id)
                .map_or(0, |tm| u64::from(tm.spec.slots));
            c.free += free;
            c.with_free += u64::from(free > 0);
        }
        c
    }

    /// Number of TaskManagers with at least one free slot.
    pub fn with_free_count(&self) -> usize {
        self.with_free.len()
    }

    /// The TaskManagers carrying every label of a non-empty `selector`, in id order
    /// (none for an empty one). Only those carrying the rarest selected label are
    /// looked at, so a selector for a rare label stays cheap on a large cluster.
    fn matching<'a>(
        &'a self,
        selector: &'a BTreeMap<String, String>,
        task_managers: &'a imbl::OrdMap<TaskManagerId, TaskManager>,
    ) -> impl Iterator<Item = &'a TaskManagerId> + 'a {
        // A label that no TaskManager carries leaves no candidate at all.
        let rarest = selector
            .iter()
            .try_fold(None, |rarest: Option<&BTreeSet<TaskManagerId>>, (k, v)| {
                let set = self.by_label.get(&(k.clone(), v.clone()))?;
                Some(Some(match rarest {
                    Some(r) if r.len() <= set.len() => r,
                    _ => set,
                }))
            })
            .flatten();
        rarest.into_iter().flatten().filter(move |id| {
            task_managers.get(*id).is_some_and(|tm| {
                selector
                    .iter()
                    .all(|(k, v)| tm.spec.labels.get(k) == Some(v))
            })
        })
    }

    fn pick_any(
        &self,
        strategy: PlacementStrategy,
        cursor: Option<&TaskManagerId>,
    ) -> Option<TaskManagerId> {
        match strategy {
            PlacementStrategy::BinPack => self.by_free.first().map(|(_, id)| id.clone()),
            PlacementStrategy::Spread => {
                let (max, _) = self.by_free.last()?;
                self.by_free
                    .range((*max, TaskManagerId(String::new()))..)
                    .next()
                    .map(|(_, id)| id.clone())
            }
            PlacementStrategy::RoundRobin => {
                use std::ops::Bound::{Excluded, Unbounded};
                let next = match cursor {
                    Some(c) => self.with_free.range((Excluded(c), Unbounded)).next(),
                    None => None,
                };
                next.or_else(|| self.with_free.first()).cloned()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::types::TaskManagerSpec;

    fn tm(id: &str, slots: u32, labels: &[(&str, &str)]) -> TaskManager {
        TaskManager {
            spec: TaskManagerSpec {
                id: id.into(),
                instance: "i".into(),
                address: String::new(),
                slots,
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            },
            slots: vec![None; slots as usize],
            registered_at: 0,
        }
    }

    fn cluster(
        tms: &[TaskManager],
        free: &[u32],
    ) -> (SlotIndex, imbl::OrdMap<TaskManagerId, TaskManager>) {
        let mut index = SlotIndex::default();
        let mut map = imbl::OrdMap::new();
        for (t, f) in tms.iter().zip(free) {
            index.add(t, *f);
            map.insert(t.spec.id.clone(), t.clone());
        }
        (index, map)
    }

    #[test]
    fn spread_takes_most_free_and_bin_pack_the_fullest_ties_to_lowest_id() {
        let tms = [
            tm("a", 4, &[]),
            tm("b", 4, &[]),
            tm("c", 4, &[]),
            tm("d", 4, &[]),
        ];
        let (index, map) = cluster(&tms, &[1, 3, 3, 0]);
        let none = BTreeMap::new();
        let spread = index.pick(PlacementStrategy::Spread, None, &none, &map);
        assert_eq!(spread, Some("b".into()));
        let pack = index.pick(PlacementStrategy::BinPack, None, &none, &map);
        assert_eq!(pack, Some("a".into()));
    }

    #[test]
    fn round_robin_continues_after_the_cursor_and_wraps_skipping_full_ones() {
        let tms = [tm("a", 2, &[]), tm("b", 2, &[]), tm("c", 2, &[])];
        let (index, map) = cluster(&tms, &[2, 0, 2]);
        let none = BTreeMap::new();
        let a: TaskManagerId = "a".into();
        let c: TaskManagerId = "c".into();
        let rr = |cur| index.pick(PlacementStrategy::RoundRobin, cur, &none, &map);
        assert_eq!(rr(None), Some("a".into()));
        assert_eq!(rr(Some(&a)), Some("c".into()));
        assert_eq!(rr(Some(&c)), Some("a".into()));
    }

    #[test]
    fn a_selector_only_matches_task_managers_with_every_label_and_room() {
        let tms = [
            tm("a", 2, &[("rack", "r1"), ("disk", "ssd")]),
            tm("b", 2, &[("rack", "r1")]),
            tm("c", 2, &[("rack", "r1"), ("disk", "ssd")]),
        ];
        let (mut index, map) = cluster(&tms, &[0, 2, 1]);
        let sel: BTreeMap<String, String> =
            [("rack".into(), "r1".into()), ("disk".into(), "ssd".into())].into();
        assert_eq!(
            index.pick(PlacementStrategy::Spread, None, &sel, &map),
            Some("c".into())
        );
        index.take(&"c".into());
        assert_eq!(
            index.pick(PlacementStrategy::Spread, None, &sel, &map),
            None
        );
        let unknown: BTreeMap<String, String> = [("zone".into(), "z9".into())].into();
        assert_eq!(
            index.pick(PlacementStrategy::BinPack, None, &unknown, &map),
            None
        );
    }

    #[test]
    fn capacity_counts_only_task_managers_with_every_selected_label() {
        let tms = [
            tm("a", 2, &[("rack", "r1"), ("disk", "ssd")]),
            tm("b", 3, &[("rack", "r1")]),
            tm("c", 4, &[("rack", "r1"), ("disk", "ssd")]),
        ];
        let (index, map) = cluster(&tms, &[0, 3, 1]);
        let sel: BTreeMap<String, String> =
            [("rack".into(), "r1".into()), ("disk".into(), "ssd".into())].into();
        assert_eq!(
            index.capacity(&sel, &map),
            Capacity {
                task_managers: 2,
                slots: 6,
                free: 1,
                with_free: 1
            }
        );
        let unknown: BTreeMap<String, String> = [("gpu".into(), "true".into())].into();
        assert_eq!(index.capacity(&unknown, &map), Capacity::default());
        assert_eq!(index.with_free_count(), 2);
    }

    #[test]
    fn take_and_give_move_a_task_manager_in_and_out_of_the_free_sets() {
        let tms = [tm("a", 1, &[])];
        let (mut index, map) = cluster(&tms, &[1]);
        let none = BTreeMap::new();
        index.take(&"a".into());
        assert_eq!(
            index.pick(PlacementStrategy::Spread, None, &none, &map),
            None
        );
        index.give(&"a".into());
        assert_eq!(
            index.pick(PlacementStrategy::RoundRobin, None, &none, &map),
            Some("a".into())
        );
        index.remove(&tms[0]);
        assert_eq!(index, SlotIndex::default());
    }
}
