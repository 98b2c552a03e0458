//! The memory store's ready queue: queued jobs in *lanes*, one lane per project and
//! concurrency group, so a claim reads only the head of each lane.
//!
//! A job may start when its project is below the claim's per-project limit and its concurrency
//! group (if any) has nothing running. Every job of a lane shares both conditions, so when the
//! head of a lane may not start, none of the lane may. A claim therefore walks the lanes' heads
//! in queue order (priority, then enqueue order) and takes the first head whose lane may run:
//! its cost grows with the number of lanes, not with the number of queued jobs. (With one
//! ordered set of every queued job, a project at its limit made each claim scan the whole queue
//! under the store's lock; a server taking jobs faster than it ran them slowed down as its
//! queue grew.)
//!
//! Jobs waiting for a retry time sit apart, ordered by that time, and join their lane once it
//! has passed.
//!
//! A lane left empty is kept for its next job (a server whose queue is short empties and fills
//! its project's lane with every job; making the lane again cost two copies of the project's
//! path, a map and the queue's first node each time), up to [`KEPT_EMPTY`] of them or as many
//! as there are lanes with jobs; past that, every empty lane is dropped, so lanes of projects
//! that no longer get jobs do not accumulate.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use crate::fast_hash::FastMap;
use crate::job::{Job, JobId};

/// Queue order: priority descending, then enqueue order; the job id makes it unique.
pub(super) type ReadyKey = (Reverse<i32>, u64, JobId);

type LaneId = u64;

/// How many empty lanes are kept at least before they are dropped (see the module docs).
const KEPT_EMPTY: usize = 64;

/// The queued jobs of one project and concurrency group.
struct Lane {
    project: String,
    group: Option<String>,
    queue: BTreeSet<ReadyKey>,
}

/// Queued jobs by lane (see the module docs).
#[derive(Default)]
pub(super) struct ReadyQueue {
    /// Lane ids by project, then concurrency group.
    ids: FastMap<String, FastMap<Option<String>, LaneId>>,
    lanes: FastMap<LaneId, Lane>,
    /// The first job of every lane that has one, in queue order.
    heads: BTreeSet<(ReadyKey, LaneId)>,
    /// Jobs whose retry time has not passed yet (as of the last claim), by that time.
    delayed: BTreeSet<(DateTime<Utc>, ReadyKey)>,
    next_lane: LaneId,
    len: usize,
    /// How many lanes are empty (kept for their next job).
    empty: usize,
}

impl ReadyQueue {
    /// How many jobs are queued, delayed ones included.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Queues `job` under `key`.
    pub(super) fn push(&mut self, key: ReadyKey, job: &Job) {
        self.len += 1;
        match job.retry_at {
            Some(at) => {
                self.delayed.insert((at, key));
            }
            None => self.insert(key, &job.project_path, &job.concurrency_group),
        }
    }

    /// Takes `job` (queued under `key`) out of the queue. Does nothing if it is not there.
    pub(super) fn remove(&mut self, key: ReadyKey, job: &Job) {
        if let Some(at) = job.retry_at {
            if self.delayed.remove(&(at, key)) {
                self.len -= 1;
                return;
            }
        }
        let Some(&lane_id) = self
            .ids
            .get(&*job.project_path)
            .and_then(|groups| groups.get(&job.concurrency_group))
        else {
            return;
        };
        let Some(lane) = self.lanes.get_mut(&lane_id) else {
            return;
        };
        let was_head = lane.queue.first() == Some(&key);
        if !lane.queue.remove(&key) {
            return;
        }
        self.len -= 1;
        if was_head {
            self.heads.remove(&(key, lane_id));
            self.advance(lane_id);
        }
    }

    /// Takes the first job, in queue order, whose lane `may_run` allows (it is asked with the
    /// lane's project and concurrency group), after moving the delayed jobs whose retry time
    /// is not after `now` into their lanes.
    pub(super) fn pop(
        &mut self,
        now: DateTime<Utc>,
        jobs: impl Fn(JobId) -> Option<(std::sync::Arc<str>, Option<String>)>,
        mut may_run: impl FnMut(&str, Option<&str>) -> bool,
    ) -> Option<JobId> {
        while let Some(&(at, key)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            match jobs(key.2) {
                Some((project, group)) => self.insert(key, &project, &group),
                // Not expected: a queued job is always held. Forget the stray key.
                None => self.len -= 1,
            }
        }
        let (key, lane_id) = self
            .heads
            .iter()
            .find(|(_, lane_id)| {
                self.lanes
                    .get(lane_id)
                    .is_some_and(|lane| may_run(&lane.project, lane.group.as_deref()))
            })
            .copied()?;
        self.heads.remove(&(key, lane_id));
        if let Some(lane) = self.lanes.get_mut(&lane_id) {
            lane.queue.pop_first();
        }
        self.len -= 1;
        self.advance(lane_id);
        Some(key.2)
    }

    /// Adds `key` to the lane of `project` and `group`, making the lane if it has none.
    fn insert(&mut self, key: ReadyKey, project: &str, group: &Option<String>) {
        let id = match self.ids.get(project).and_then(|groups| groups.get(group)) {
            Some(&id) => id,
            None => {
                // Empty until `key` goes in below, as a kept lane would be.
                self.empty += 1;
                self.next_lane += 1;
                let id = self.next_lane;
                self.ids
                    .entry(project.to_owned())
                    .or_default()
                    .insert(group.clone(), id);
                self.lanes.insert(
                    id,
                    Lane {
                        project: project.to_owned(),
                        group: group.clone(),
                        queue: BTreeSet::new(),
                    },
                );
                id
            }
        };
        let Some(lane) = self.lanes.get_mut(&id) else {
            return;
        };
        let old_head = lane.queue.first().copied();
        if old_head.is_none() {
            self.empty -= 1;
        }
        lane.queue.insert(key);
        if old_head.is_none_or(|head| key < head) {
            if let Some(head) = old_head {
                self.heads.remove(&(head, id));
            }
            self.heads.insert((key, id));
        }
    }

    /// After a lane lost its head: makes its next job the head, or, if it is empty, keeps it
    /// for its next job unless the empty lanes are now too many (see the module docs).
    fn advance(&mut self, id: LaneId) {
        let Some(lane) = self.lanes.get(&id) else {
            return;
        };
        match lane.queue.first() {
            Some(&head) => {
                self.heads.insert((head, id));
            }
            None => {
                self.empty += 1;
                let with_jobs = self.lanes.len() - self.empty;
                if self.empty > KEPT_EMPTY.max(with_jobs) {
                    self.drop_empty_lanes();
                }
            }
        }
    }

    /// Drops every empty lane.
    fn drop_empty_lanes(&mut self) {
        let ids = &mut self.ids;
        self.lanes.retain(|_, lane| {
            if !lane.queue.is_empty() {
                return true;
            }
            if let Some(groups) = ids.get_mut(lane.project.as_str()) {
                groups.remove(&lane.group);
                if groups.is_empty() {
                    ids.remove(lane.project.as_str());
                }
            }
            false
        });
        self.empty = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::sample_job;

    fn job(project: &str) -> Job {
        sample_job("wf", project, 0)
    }

    fn key(job: &Job, seq: u64) -> ReadyKey {
        (Reverse(job.priority), seq, job.id)
    }

    #[test]
    fn a_blocked_project_does_not_hide_the_next_lane() {
        let mut q = ReadyQueue::default();
        let mut jobs = Vec::new();
        for (i, project) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let j = job(project);
            q.push(key(&j, i as u64), &j);
            jobs.push(j);
        }
        assert_eq!(q.len(), 4);
        let lookup = |_| None;
        // Project "a" may not run: the claim skips its whole lane and takes b's job.
        let got = q.pop(Utc::now(), lookup, |p, _| p != "a");
        assert_eq!(got, Some(jobs[3].id));
        assert_eq!(q.pop(Utc::now(), lookup, |p, _| p != "a"), None);
        // Then a's jobs come out in order; the empty lanes are kept for their next jobs.
        for j in &jobs[..3] {
            assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), Some(j.id));
        }
        assert_eq!(q.len(), 0);
        assert!(q.heads.is_empty());
        assert_eq!((q.lanes.len(), q.empty), (2, 2));
        assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), None);
        // A's next job goes into its lane as it was; then b's lane is the only empty one.
        let lanes_made = q.next_lane;
        let again = job("a");
        q.push(key(&again, 9), &again);
        assert_eq!((q.next_lane, q.lanes.len(), q.empty), (lanes_made, 2, 1));
        assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), Some(again.id));
    }

    /// A project per job, each job taken before the next comes: the empty lanes kept stay
    /// bounded, and those dropped are forgotten whole (a later job of theirs gets a new lane
    /// and is taken).
    #[test]
    fn empty_lanes_are_kept_up_to_a_bound() {
        let mut q = ReadyQueue::default();
        let lookup = |_| None;
        let busy = job("busy");
        q.push(key(&busy, 0), &busy);
        for i in 1..=300u64 {
            let j = job(&format!("p{i}"));
            q.push(key(&j, i), &j);
            assert_eq!(q.pop(Utc::now(), lookup, |p, _| p != "busy"), Some(j.id));
            let empty = q.lanes.values().filter(|l| l.queue.is_empty()).count();
            assert_eq!(empty, q.empty, "the count of empty lanes is right");
            assert!(q.empty <= KEPT_EMPTY, "{} empty lanes kept", q.empty);
            assert_eq!(
                q.ids.values().map(|groups| groups.len()).sum::<usize>(),
                q.lanes.len(),
                "every lane kept is found by its project, and no other"
            );
        }
        assert!(q.lanes.len() < 300, "empty lanes were dropped");
        let first = job("p1");
        q.push(key(&first, 301), &first);
        assert_eq!(
            q.pop(Utc::now(), lookup, |p, _| p != "busy"),
            Some(first.id)
        );
        assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), Some(busy.id));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn priority_orders_across_lanes_and_groups_are_lanes() {
        let mut q = ReadyQueue::default();
        let low = job("a");
        let mut grouped = job("a");
        grouped.concurrency_group = Some("pr-1".into());
        let high = sample_job("wf", "b", 10);
        q.push(key(&low, 1), &low);
        q.push(key(&grouped, 2), &grouped);
        q.push(key(&high, 3), &high);
        let lookup = |_| None;
        assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), Some(high.id));
        // The busy group holds back only its own lane.
        assert_eq!(q.pop(Utc::now(), lookup, |_, g| g.is_none()), Some(low.id));
        assert_eq!(q.pop(Utc::now(), lookup, |_, g| g.is_none()), None);
        assert_eq!(q.pop(Utc::now(), lookup, |_, _| true), Some(grouped.id));
    }

    #[test]
    fn delayed_jobs_join_their_lane_when_due_and_can_be_removed() {
        let mut q = ReadyQueue::default();
        let now = Utc::now();
        let mut later = job("p");
        later.retry_at = Some(now + chrono::Duration::seconds(60));
        let mut soon = job("p");
        soon.retry_at = Some(now - chrono::Duration::seconds(1));
        let gone = job("p");
        q.push(key(&later, 1), &later);
        q.push(key(&soon, 2), &soon);
        q.push(key(&gone, 3), &gone);
        q.remove(key(&gone, 3), &gone);
        assert_eq!(q.len(), 2);
        let lookup = |id| {
            [&later, &soon]
                .into_iter()
                .find(|j| j.id == id)
                .map(|j| (j.project_path.clone(), j.concurrency_group.clone()))
        };
        assert_eq!(q.pop(now, lookup, |_, _| true), Some(soon.id));
        assert_eq!(q.pop(now, lookup, |_, _| true), None);
        let then = now + chrono::Duration::seconds(61);
        assert_eq!(q.pop(then, lookup, |_, _| true), Some(later.id));
        q.remove(key(&later, 1), &later);
        assert_eq!(q.len(), 0);
    }
}
