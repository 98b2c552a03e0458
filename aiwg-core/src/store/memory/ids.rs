//! The memory store's job ids in order, for listing.
//!
//! The store finds a job by its id in a hash map; only [`JobStore::list`](crate::JobStore::list)
//! needs the ids in order (newest first, resuming before a cursor). Ids are UUID v7s made at
//! submit, so a new job's id is almost always the greatest yet: it goes at the end of a sorted
//! deque, and one that was made a moment before another submit's id goes a few places from
//! it. (An ordered set finds the end of its keys anew for every insert, comparing with about
//! forty of them in a store of ten thousand jobs.)
//!
//! A forgotten job's id is not taken out at once (from the middle of the deque that would move
//! every id after it): it is counted, and skipped when listing, since the map no longer holds
//! its job. Once the forgotten outnumber half the deque, the deque keeps only the ids of jobs
//! still held, so it never holds more than about twice as many ids as there are jobs.

use std::collections::VecDeque;

use crate::job::JobId;

/// Job ids, ascending, some of them of jobs no longer held (see the module docs).
#[derive(Default)]
pub(super) struct OrderedIds {
    ids: VecDeque<JobId>,
    /// How many of `ids` are of jobs no longer held.
    forgotten: usize,
}

impl OrderedIds {
    /// Adds `id` in its place; an id already there stays once.
    pub(super) fn insert(&mut self, id: JobId) {
        if self.ids.back().is_none_or(|last| *last < id) {
            self.ids.push_back(id);
            return;
        }
        let at = self.ids.partition_point(|x| *x < id);
        if self.ids.get(at) != Some(&id) {
            self.ids.insert(at, id);
        }
    }

    /// Notes that a job is no longer held; `held` says which ids still are, for when the
    /// deque is compacted.
    pub(super) fn forget(&mut self, held: impl Fn(&JobId) -> bool) {
        self.forgotten += 1;
        if self.forgotten > self.ids.len() / 2 {
            self.ids.retain(|id| held(id));
            self.forgotten = 0;
        }
    }

    /// The ids before `cursor` (all of them without one), ascending; the caller skips those
    /// of jobs no longer held.
    pub(super) fn before(
        &self,
        cursor: Option<JobId>,
    ) -> std::collections::vec_deque::Iter<'_, JobId> {
        let end = cursor.map_or(self.ids.len(), |c| self.ids.partition_point(|x| *x < c));
        self.ids.range(..end)
    }

    /// How many ids it holds, forgotten ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn id(n: u128) -> JobId {
        JobId::from(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn ids_stay_in_order_whatever_order_they_come_in() {
        let mut ids = OrderedIds::default();
        for n in [5, 9, 7, 10, 1, 8, 9, 5, 12] {
            ids.insert(id(n));
        }
        let all: Vec<JobId> = ids.before(None).copied().collect();
        assert_eq!(all, [1, 5, 7, 8, 9, 10, 12].map(id));
        let before_9: Vec<JobId> = ids.before(Some(id(9))).copied().collect();
        assert_eq!(before_9, [1, 5, 7, 8].map(id));
        // A cursor that is not (or no longer) there.
        let before_6: Vec<JobId> = ids.before(Some(id(6))).copied().collect();
        assert_eq!(before_6, [1, 5].map(id));
        assert_eq!(ids.before(Some(id(0))).count(), 0);
        assert_eq!(ids.before(Some(id(99))).count(), 7);
    }

    /// The forgotten ids are dropped once they are half the deque: it never holds more than
    /// about twice the ids still held, and never drops one still held.
    #[test]
    fn forgotten_ids_are_dropped_once_they_are_half_of_them() {
        let mut ids = OrderedIds::default();
        let mut held = BTreeSet::new();
        for n in 0..1_000u128 {
            ids.insert(id(n));
            held.insert(id(n));
            if n >= 10 {
                // Keep the ten newest, forgetting the oldest but one (not always the first).
                let old = *held.iter().nth(1).expect("more than one held");
                held.remove(&old);
                ids.forget(|i| held.contains(i));
            }
            assert!(
                ids.len() <= 2 * held.len() + 1,
                "{} ids for {}",
                ids.len(),
                held.len()
            );
            let listed: BTreeSet<JobId> = ids.before(None).copied().collect();
            assert!(held.is_subset(&listed), "every held id is listed");
        }
        assert_eq!(held.len(), 10);
    }
}
