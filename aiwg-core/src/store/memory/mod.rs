//! The in-memory [`JobStore`]: one mutex over its maps. Same lease semantics as a durable
//! store; nothing survives a restart.
//!
//! Layout: each job lives in its own allocation (`Box<Entry>`), found by its id in a hash map
//! (every write and read of a job finds it so), its id also kept in order for listing
//! ([`ids`]). The map's slots stay small however large a job is, and a queued job holds only
//! what it needs: the job, its place in the ready queue (a number; the queue itself is in
//! [`ready`]) and, once running, its lease's token and expiry. Its first event is not stored
//! but made again when read. Under 1 KiB per queued job (the `engine_memory` bench).

mod ids;
mod ready;

use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    apply, ApprovalOutcome, CancelOutcome, ClaimRequest, Claimed, Created, Finish, FinishedAfter,
    FinishedStep, Heartbeat, JobPage, JobQuery, JobStore, Lease, NewJob, QueueCounts, StoreError,
};
use crate::event::{JobEvent, JobEventKind};
use crate::fast_hash::{FastMap, FastSet};
use crate::job::{ApprovalDecision, Job, JobId, JobStatus};
use crate::tally::ProjectTally;
use crate::util::{earlier, later};

use self::ids::OrderedIds;
use self::ready::{ReadyKey, ReadyQueue};

/// What [`State::end_after`] answers: what it made of the job as the last event left it, that
/// event, and the ended job with its event.
type EndedAfter<T> = (T, JobEvent, (Job, JobEvent));

/// What the store keeps of a lease to fence writes with.
#[derive(Clone, Copy)]
struct Held {
    token: u64,
    expires_at: DateTime<Utc>,
}

/// An event the store keeps after the job's first. Most are its own copy; a step's agent
/// events written together ([`JobStore::append_many`]) are shared with the engine, which sends
/// that very copy to the job's subscribers: an agent's output is not copied line by line.
enum Kept {
    Own(JobEvent),
    Shared(Arc<JobEvent>),
}

impl Kept {
    fn event(&self) -> &JobEvent {
        match self {
            Self::Own(e) => e,
            Self::Shared(e) => e,
        }
    }
}

struct Entry {
    job: Job,
    /// The job's events after the first. The first (`queued`, at creation) is not kept: it is
    /// made again from the job's id, creation time and [`created_attempt`](Self::created_attempt)
    /// when read, so a queued job holds no event at all.
    later_events: Vec<Kept>,
    lease: Option<Held>,
    /// The enqueue number of a queued job, 0 when it is not queued (its [`ReadyKey`] is made
    /// of it, the job's priority and id).
    ready_seq: u64,
    /// The attempt the job was created with (its first event's).
    created_attempt: u32,
}

/// A job to file, made ready before the store's lock is taken: its entry boxed and the copy
/// the answer carries.
struct Filing {
    entry: Box<Entry>,
    fingerprint: Option<String>,
    queue_capacity: Option<usize>,
    copy: Job,
}

impl Filing {
    fn new(new: NewJob) -> Self {
        let NewJob {
            job,
            fingerprint,
            queue_capacity,
        } = new;
        let copy = job.clone();
        let entry = Box::new(Entry {
            later_events: Vec::new(),
            lease: None,
            ready_seq: 0,
            created_attempt: job.attempt,
            job,
        });
        Self {
            entry,
            fingerprint,
            queue_capacity,
            copy,
        }
    }
}

impl Entry {
    fn ready_key(&self) -> Option<ReadyKey> {
        (self.ready_seq != 0).then_some((Reverse(self.job.priority), self.ready_seq, self.job.id))
    }

    /// The first event, as it was recorded at creation.
    fn first_event(&self) -> JobEvent {
        JobEvent {
            job_id: self.job.id,
            seq: 1,
            at: self.job.created_at,
            kind: JobEventKind::status(None, JobStatus::Queued, self.created_attempt),
        }
    }

    /// The events with `seq > after`, at most `limit` of them.
    fn events(&self, after: u64, limit: usize) -> Vec<JobEvent> {
        let first = (after == 0 && limit > 0).then(|| self.first_event());
        let start = usize::try_from(after.saturating_sub(1))
            .unwrap_or(usize::MAX)
            .min(self.later_events.len());
        let end = start
            .saturating_add(limit - usize::from(first.is_some()))
            .min(self.later_events.len());
        first
            .into_iter()
            .chain(
                self.later_events[start..end]
                    .iter()
                    .map(|e| e.event().clone()),
            )
            .collect()
    }
}

#[derive(Default)]
struct State {
    /// Every job kept, by id: hashed, as every write and read of a job finds it by its id.
    jobs: FastMap<JobId, Box<Entry>>,
    /// The same ids in order (creation order, as ids are UUID v7s), for [`JobStore::list`]
    /// alone; it may still hold ids of forgotten jobs ([`ids`]).
    ids: OrderedIds,
    ready: ReadyQueue,
    idempotency: FastMap<String, (String, JobId)>,
    running_per_project: ProjectTally,
    /// Concurrency groups with a running job.
    busy_groups: FastMap<String, JobId>,
    enqueue_seq: u64,
    lease_seq: u64,
    running: usize,
    /// Finished jobs, oldest first, for retention.
    finished: VecDeque<(DateTime<Utc>, JobId)>,
    /// Jobs `awaiting_approval`, with when their approval expires.
    waiting: FastMap<JobId, DateTime<Utc>>,
    /// The same by expiry, so the sweep reads only the approvals that expired.
    waiting_by_expiry: BTreeSet<(DateTime<Utc>, JobId)>,
    /// Jobs holding a lease, so the lease sweep reads only those (not every job kept).
    leased: FastSet<JobId>,
    /// Finished jobs forgotten by the retention while the lock was held, freed once it is
    /// released ([`Locked`]). Boxed as the map holds them: taken out whole, no entry copied.
    #[allow(clippy::vec_box)]
    forgotten: Vec<Box<Entry>>,
}

impl State {
    fn enqueue(&mut self, id: JobId) {
        self.enqueue_seq += 1;
        let seq = self.enqueue_seq;
        if let Some(e) = self.jobs.get_mut(&id) {
            e.ready_seq = seq;
            if let Some(key) = e.ready_key() {
                self.ready.push(key, &e.job);
            }
        }
    }

    fn dequeue(&mut self, id: JobId) {
        if let Some(e) = self.jobs.get_mut(&id) {
            if let Some(key) = e.ready_key() {
                e.ready_seq = 0;
                self.ready.remove(key, &e.job);
            }
        }
    }

    /// Notes that `job` waits for an approval.
    fn wait_for_approval(&mut self, job: &Job) {
        // Without a pending approval (not expected), every sweep looks at it.
        let expires = job
            .pending_approval()
            .map_or(DateTime::<Utc>::MIN_UTC, |a| a.expires_at);
        if let Some(old) = self.waiting.insert(job.id, expires) {
            self.waiting_by_expiry.remove(&(old, job.id));
        }
        self.waiting_by_expiry.insert((expires, job.id));
    }

    /// Notes that `id` no longer waits for an approval.
    fn stop_waiting(&mut self, id: JobId) {
        if let Some(expires) = self.waiting.remove(&id) {
            self.waiting_by_expiry.remove(&(expires, id));
        }
    }

    fn release(&mut self, id: JobId) {
        self.leased.remove(&id);
        if let Some(e) = self.jobs.get_mut(&id) {
            if e.lease.take().is_some() {
                self.running -= 1;
                self.running_per_project.remove(&e.job.project_path);
                if let Some(g) = &e.job.concurrency_group {
                    if self.busy_groups.get(g) == Some(&id) {
                        self.busy_groups.remove(g);
                    }
                }
            }
        }
    }

    fn record(entry: &mut Entry, kind: JobEventKind, now: DateTime<Utc>) -> JobEvent {
        let ev = Self::next_event(entry, kind, now);
        entry.later_events.push(Kept::Own(ev.clone()));
        ev
    }

    /// [`record`](Self::record), keeping the event shared and answering the copy kept.
    fn record_shared(entry: &mut Entry, kind: JobEventKind, now: DateTime<Utc>) -> Arc<JobEvent> {
        let ev = Arc::new(Self::next_event(entry, kind, now));
        entry.later_events.push(Kept::Shared(Arc::clone(&ev)));
        ev
    }

    /// The job's next event, its progress moved by it.
    fn next_event(entry: &mut Entry, kind: JobEventKind, now: DateTime<Utc>) -> JobEvent {
        apply::progress(&mut entry.job, &kind);
        JobEvent {
            job_id: entry.job.id,
            seq: entry.later_events.len() as u64 + 2,
            at: now,
            kind,
        }
    }

    /// Notes that `id` just finished and forgets the finished jobs that retention no longer
    /// keeps (with their events and idempotency keys).
    fn finished(&mut self, id: JobId, now: DateTime<Utc>, retention: &Retention) {
        self.finished.push_back((now, id));
        let horizon = earlier(now, retention.finished_for);
        while let Some(&(at, old)) = self.finished.front() {
            if self.finished.len() <= retention.max_finished && at >= horizon {
                break;
            }
            self.finished.pop_front();
            if let Some(e) = self.jobs.remove(&old) {
                let jobs = &self.jobs;
                self.ids.forget(|id| jobs.contains_key(id));
                if let Some(key) = &e.job.idempotency_key {
                    if self.idempotency.get(key).is_some_and(|(_, j)| *j == old) {
                        self.idempotency.remove(key);
                    }
                }
                self.forgotten.push(e);
            }
        }
    }

    /// Files a job whose attempt just ended: back in the queue, waiting for an approval, or
    /// finished.
    fn after_finish(&mut self, job: &Job, now: DateTime<Utc>, retention: &Retention) {
        if job.status == JobStatus::Queued {
            self.enqueue(job.id);
        } else if job.status == JobStatus::AwaitingApproval {
            self.wait_for_approval(job);
        } else if job.is_terminal() {
            self.finished(job.id, now, retention);
        }
    }

    /// Files a job boxed by [`Filing::new`] (outside the lock: the box and the move of the job
    /// into it are not made while every other store call waits).
    fn create(&mut self, filing: Filing) -> Result<Created, StoreError> {
        let s = self;
        let Filing {
            entry,
            fingerprint,
            queue_capacity,
            copy,
        } = filing;
        if let Some(key) = &entry.job.idempotency_key {
            if let Some((fp, existing)) = s.idempotency.get(key) {
                let same = fingerprint.as_deref().is_none_or(|f| f == fp);
                return if same {
                    Ok(Created::Existing(s.jobs[existing].job.clone()))
                } else {
                    Err(StoreError::IdempotencyConflict {
                        existing: *existing,
                    })
                };
            }
        }
        if let Some(capacity) = queue_capacity {
            if s.ready.len() >= capacity {
                return Err(StoreError::QueueFull { capacity });
            }
        }
        if entry.job.status != JobStatus::Queued {
            return Err(StoreError::IllegalTransition(
                crate::job::IllegalTransition {
                    from: entry.job.status,
                    to: JobStatus::Queued,
                },
            ));
        }
        let id = entry.job.id;
        if let Some(key) = &entry.job.idempotency_key {
            s.idempotency
                .insert(key.clone(), (fingerprint.unwrap_or_default(), id));
        }
        let ev = entry.first_event();
        debug_assert_eq!(ev.kind, apply::created(&entry.job));
        s.jobs.insert(id, entry);
        s.ids.insert(id);
        s.enqueue(id);
        Ok(Created::New(copy, ev))
    }

    fn claim(&mut self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        let s = self;
        let now = request.now;
        let jobs = &s.jobs;
        let busy_groups = &s.busy_groups;
        let running_per_project = &s.running_per_project;
        let found = s.ready.pop(
            now,
            |id| {
                jobs.get(&id)
                    .map(|e| (e.job.project_path.clone(), e.job.concurrency_group.clone()))
            },
            |project, group| {
                group.is_none_or(|g| !busy_groups.contains_key(g))
                    && request
                        .per_project_limit
                        .is_none_or(|limit| running_per_project.get(project) < limit)
            },
        );
        let Some(id) = found else { return Ok(None) };
        s.lease_seq += 1;
        let token = s.lease_seq;
        let entry = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        entry.ready_seq = 0;
        let kind = apply::claim(&mut entry.job, now)?;
        let lease = Lease {
            job_id: id,
            owner: request.owner.clone(),
            attempt: entry.job.attempt,
            token,
            expires_at: later(now, request.lease_ttl),
        };
        entry.lease = Some(Held {
            token,
            expires_at: lease.expires_at,
        });
        let event = State::record(entry, kind, now);
        let job = entry.job.clone();
        s.leased.insert(id);
        if let Some(g) = &job.concurrency_group {
            s.busy_groups.insert(g.clone(), id);
        }
        s.running_per_project.add(&job.project_path);
        s.running += 1;
        Ok(Some(Claimed { job, lease, event }))
    }

    /// Ends the attempt held by `lease`, releases the lease and files the job.
    fn end(
        &mut self,
        lease: &Lease,
        finish: Finish,
        now: DateTime<Utc>,
        retention: &Retention,
    ) -> Result<(Job, JobEvent), StoreError> {
        let entry = self.fenced(lease, now)?;
        let kind = apply::finish(&mut entry.job, finish, now)?;
        let ev = Self::record(entry, kind, now);
        entry.job.cancel_requested = false;
        let job = entry.job.clone();
        self.release(lease.job_id);
        self.after_finish(&job, now, retention);
        Ok((job, ev))
    }

    /// Records `last` and ends the attempt at `now` (both, or neither; one clock reading for
    /// both, and for a step's start written with them), answering what `between` makes
    /// of the job as `last` left it (a copy, or nothing), `last`'s event and the ended job with
    /// its event.
    fn end_after<T>(
        &mut self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
        between: impl FnOnce(&Job) -> T,
        now: DateTime<Utc>,
        retention: &Retention,
    ) -> Result<EndedAfter<T>, StoreError> {
        apply::appendable(&last)?;
        let entry = self.fenced(lease, now)?;
        // Checked before the last event is written: both are written, or neither.
        entry.job.status.check_transition(finish.status())?;
        let last = Self::record(entry, last, now);
        let between = between(&entry.job);
        let ended = self.end(lease, finish, now, retention)?;
        Ok((between, last, ended))
    }

    /// [`end_after`](Self::end_after) with the step's start written first: all three, or
    /// none.
    fn end_after_step<T>(
        &mut self,
        lease: &Lease,
        started: JobEventKind,
        last: JobEventKind,
        finish: Finish,
        between: impl FnOnce(&Job) -> T,
        retention: &Retention,
    ) -> Result<(JobEvent, EndedAfter<T>), StoreError> {
        apply::appendable(&started)?;
        apply::appendable(&last)?;
        let now = Utc::now();
        let entry = self.fenced(lease, now)?;
        entry.job.status.check_transition(finish.status())?;
        let started = Self::record(entry, started, now);
        let ended = self.end_after(lease, last, finish, between, now, retention)?;
        Ok((started, ended))
    }

    fn fenced(&mut self, lease: &Lease, now: DateTime<Utc>) -> Result<&mut Entry, StoreError> {
        let entry = self
            .jobs
            .get_mut(&lease.job_id)
            .ok_or(StoreError::NotFound(lease.job_id))?;
        match &entry.lease {
            Some(held) if held.token == lease.token && held.expires_at > now => Ok(&mut **entry),
            _ => Err(StoreError::LeaseLost(lease.job_id)),
        }
    }
}

/// How long and how many finished jobs the [`MemoryStore`] keeps (`storage.retention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished jobs older than this are forgotten (default 24 h).
    pub finished_for: Duration,
    /// At most this many finished jobs are kept, the oldest forgotten first (default 10 000).
    pub max_finished: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            finished_for: Duration::from_secs(24 * 3600),
            max_finished: 10_000,
        }
    }
}

/// A [`JobStore`] in memory. Cheap to create; share it behind an `Arc`.
///
/// Finished jobs are kept as [`Retention`] says (by default a day, and at most 10 000), so a
/// server that runs jobs forever holds steady memory; queued and running jobs are never
/// dropped.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    retention: Retention,
}

impl MemoryStore {
    /// An empty store with the default [`Retention`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store keeping finished jobs as `retention` says.
    #[must_use]
    pub fn with_retention(retention: Retention) -> Self {
        Self {
            state: Mutex::default(),
            retention: Retention {
                max_finished: retention.max_finished.max(1),
                ..retention
            },
        }
    }

    /// How many jobs (of any status) the store holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether it holds no job.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Locked<'_> {
        Locked {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            to_free: Vec::new(),
        }
    }
}

/// The store's state while its lock is held. Released, it frees the jobs the retention forgot
/// meanwhile after the lock, not under it: a finished job's entry (the job, its events) is
/// dozens of allocations, and freeing them under the lock made every other caller wait (in
/// the `engine` bench, once every finish forgets a job, freeing it was two thirds of the time
/// a finish held the lock).
struct Locked<'a> {
    // Fields drop in this order: the lock is released before the forgotten jobs are freed.
    state: std::sync::MutexGuard<'a, State>,
    #[allow(clippy::vec_box)]
    to_free: Vec<Box<Entry>>,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;

    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.to_free = std::mem::take(&mut self.state.forgotten);
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryStore")
            .field("jobs", &s.jobs.len())
            .field("queued", &s.ready.len())
            .field("running", &s.running)
            .finish()
    }
}

#[async_trait]
impl JobStore for MemoryStore {
    async fn create(&self, new: NewJob) -> Result<Created, StoreError> {
        // The job is boxed, and the answer's copy made, before the lock: the lock is held
        // only to file the job.
        let filing = Filing::new(new);
        self.lock().create(filing)
    }

    async fn create_many(&self, new: Vec<NewJob>) -> Vec<Result<Created, StoreError>> {
        let filings: Vec<Filing> = new.into_iter().map(Filing::new).collect();
        let mut s = self.lock();
        filings.into_iter().map(|f| s.create(f)).collect()
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.lock().jobs.get(&id).map(|e| e.job.clone()))
    }

    async fn list(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        let s = self.lock();
        let size = query.page_size();
        let mut jobs: Vec<Job> = s
            .ids
            .before(query.cursor)
            .rev()
            .filter_map(|id| s.jobs.get(id).map(|e| &e.job))
            .filter(|job| query.status.is_none_or(|st| job.status == st))
            .filter(|job| {
                query
                    .workflow
                    .as_deref()
                    .is_none_or(|w| &*job.workflow == w)
            })
            .filter(|job| {
                query
                    .concurrency_group
                    .as_ref()
                    .is_none_or(|g| job.concurrency_group.as_ref() == Some(g))
            })
            .take(size + 1)
            .cloned()
            .collect();
        let next_cursor = if jobs.len() > size {
            jobs.truncate(size);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next_cursor })
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        self.lock().claim(request)
    }

    async fn claim_many(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut s = self.lock();
        let mut out = Vec::with_capacity(max.min(64));
        while out.len() < max {
            match s.claim(request)? {
                Some(c) => out.push(c),
                None => break,
            }
        }
        Ok(out)
    }

    async fn heartbeat(&self, lease: &Lease, ttl_: Duration) -> Result<Heartbeat, StoreError> {
        let mut s = self.lock();
        let now = Utc::now();
        let entry = s.fenced(lease, now)?;
        let mut renewed = lease.clone();
        renewed.expires_at = later(now, ttl_);
        entry.lease = Some(Held {
            token: renewed.token,
            expires_at: renewed.expires_at,
        });
        Ok(Heartbeat {
            lease: renewed,
            cancel_requested: entry.job.cancel_requested,
        })
    }

    async fn append(&self, lease: &Lease, kind: JobEventKind) -> Result<JobEvent, StoreError> {
        apply::appendable(&kind)?;
        let mut s = self.lock();
        let now = Utc::now();
        let entry = s.fenced(lease, now)?;
        Ok(State::record(entry, kind, now))
    }

    async fn append_many(
        &self,
        lease: &Lease,
        kinds: Vec<JobEventKind>,
    ) -> Result<Vec<Arc<JobEvent>>, StoreError> {
        for kind in &kinds {
            apply::appendable(kind)?;
        }
        let mut s = self.lock();
        let now = Utc::now();
        let entry = s.fenced(lease, now)?;
        entry.later_events.reserve(kinds.len());
        Ok(kinds
            .into_iter()
            .map(|kind| State::record_shared(entry, kind, now))
            .collect())
    }

    async fn finish(&self, lease: &Lease, finish: Finish) -> Result<(Job, JobEvent), StoreError> {
        self.lock().end(lease, finish, Utc::now(), &self.retention)
    }

    async fn finish_after(
        &self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
    ) -> Result<FinishedAfter, StoreError> {
        let (between, last, ended) =
            self.lock()
                .end_after(lease, last, finish, Job::clone, Utc::now(), &self.retention)?;
        Ok(FinishedAfter {
            last: (between, last),
            ended,
        })
    }

    async fn finish_after_event(
        &self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
    ) -> Result<(JobEvent, (Job, JobEvent)), StoreError> {
        let (_, last, ended) =
            self.lock()
                .end_after(lease, last, finish, |_| (), Utc::now(), &self.retention)?;
        Ok((last, ended))
    }

    async fn finish_after_step(
        &self,
        lease: &Lease,
        started: JobEventKind,
        finished: JobEventKind,
        finish: Finish,
        with_job: bool,
    ) -> Result<FinishedStep, StoreError> {
        let (started, (between, finished, ended)) = self.lock().end_after_step(
            lease,
            started,
            finished,
            finish,
            |job| with_job.then(|| job.clone()),
            &self.retention,
        )?;
        Ok(FinishedStep {
            started,
            finished,
            between,
            ended,
        })
    }

    async fn request_cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        let mut s = self.lock();
        let now = Utc::now();
        let entry = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        match entry.job.status {
            JobStatus::Queued | JobStatus::AwaitingApproval => {
                let kind = apply::cancel_queued(&mut entry.job, reason, now)?;
                let ev = State::record(entry, kind, now);
                let job = entry.job.clone();
                s.dequeue(id);
                s.stop_waiting(id);
                s.finished(id, now, &self.retention);
                Ok(CancelOutcome::Cancelled(job, ev))
            }
            JobStatus::Running => {
                entry.job.cancel_requested = true;
                Ok(CancelOutcome::Requested(entry.job.clone()))
            }
            _ => Ok(CancelOutcome::AlreadyFinished(entry.job.clone())),
        }
    }

    async fn decide_approval(
        &self,
        id: JobId,
        decision: ApprovalDecision,
    ) -> Result<ApprovalOutcome, StoreError> {
        let mut s = self.lock();
        let now = Utc::now();
        let entry = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let Some(kind) = apply::decide(&mut entry.job, decision, now) else {
            return Ok(ApprovalOutcome::NotWaiting(entry.job.clone()));
        };
        let ev = State::record(entry, kind, now);
        let job = entry.job.clone();
        s.stop_waiting(id);
        if job.status == JobStatus::Queued {
            s.enqueue(id);
        } else {
            s.finished(id, now, &self.retention);
        }
        Ok(ApprovalOutcome::Decided(job, ev))
    }

    async fn expire_approvals(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        let mut s = self.lock();
        let expired: Vec<JobId> = s
            .waiting_by_expiry
            .iter()
            .take_while(|(expires, _)| *expires <= now)
            .map(|(_, id)| *id)
            .filter(|id| {
                s.jobs
                    .get(id)
                    .is_some_and(|e| apply::approval_expired(&e.job, now))
            })
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for id in expired {
            s.stop_waiting(id);
            let entry = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
            let decision = ApprovalDecision::new(false, "aiwg", "timeout");
            if let Some(kind) = apply::decide(&mut entry.job, decision, now) {
                let ev = State::record(entry, kind, now);
                out.push((entry.job.clone(), ev));
                s.finished(id, now, &self.retention);
            }
        }
        Ok(out)
    }

    async fn events(&self, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError> {
        let s = self.lock();
        let entry = s.jobs.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(entry.events(after, usize::MAX))
    }

    async fn events_page(
        &self,
        id: JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let s = self.lock();
        let entry = s.jobs.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(entry.events(after, limit))
    }

    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        let mut s = self.lock();
        let mut expired: Vec<JobId> = s
            .leased
            .iter()
            .filter(|id| {
                s.jobs
                    .get(id)
                    .and_then(|e| e.lease.as_ref())
                    .is_some_and(|l| l.expires_at <= now)
            })
            .copied()
            .collect();
        // In id order, whatever order the set holds them in.
        expired.sort_unstable();
        let mut out = Vec::new();
        for id in expired {
            s.release(id);
            let entry = s.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
            let kind = apply::expire(&mut entry.job, now)?;
            let ev = State::record(entry, kind, now);
            let job = entry.job.clone();
            if job.status == JobStatus::Queued {
                s.enqueue(id);
            } else if job.is_terminal() {
                s.finished(id, now, &self.retention);
            }
            out.push((job, ev));
        }
        Ok(out)
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        let s = self.lock();
        Ok(QueueCounts {
            queued: s.ready.len(),
            running: s.running,
        })
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use std::time::Duration;

    use super::{MemoryStore, Retention};
    use crate::job::JobResult;
    use crate::store::{ClaimRequest, Finish, JobStore, NewJob};
    use crate::test_util::sample_job;

    /// Durations meant as "forever" (as large as a `Duration` goes) keep finished jobs and
    /// leases without overflowing the clock's range: before, finishing a job panicked (under
    /// the store's lock, for every job after it).
    #[tokio::test]
    async fn durations_past_the_clocks_range_mean_forever() {
        // Beyond what a time delta holds, and within it but beyond the calendar's range.
        let million_years = Duration::from_secs(1_000_000 * 365 * 86_400);
        for forever in [Duration::MAX, million_years] {
            let store = MemoryStore::with_retention(Retention {
                finished_for: forever,
                max_finished: 10,
            });
            let req = ClaimRequest::new("w", forever);
            let mut ids = Vec::new();
            for _ in 0..2 {
                let job = sample_job("w", "/p", 0);
                ids.push(job.id);
                store.create(NewJob::new(job)).await.unwrap();
                let claimed = store.claim(&req).await.unwrap().unwrap();
                assert_eq!(
                    claimed.lease.expires_at,
                    chrono::DateTime::<chrono::Utc>::MAX_UTC
                );
                store.heartbeat(&claimed.lease, forever).await.unwrap();
                store
                    .finish(&claimed.lease, Finish::Completed(JobResult::default()))
                    .await
                    .unwrap();
            }
            for id in ids {
                assert!(store.get(id).await.unwrap().is_some(), "kept");
            }
        }
    }

    /// The jobs the retention forgets are freed once the lock is released, and nothing of
    /// them stays behind: the store holds the jobs it keeps and no others.
    #[tokio::test]
    async fn forgotten_jobs_are_freed_after_the_lock_and_none_is_kept() {
        let store = MemoryStore::with_retention(Retention {
            finished_for: Duration::from_secs(3600),
            max_finished: 2,
        });
        let req = ClaimRequest::new("w", Duration::from_secs(60));
        let mut ids = Vec::new();
        for _ in 0..5 {
            let job = sample_job("w", "/p", 0);
            ids.push(job.id);
            store.create(NewJob::new(job)).await.unwrap();
            let claimed = store.claim(&req).await.unwrap().unwrap();
            store
                .finish(&claimed.lease, Finish::Completed(JobResult::default()))
                .await
                .unwrap();
            let s = store.lock();
            assert!(
                s.forgotten.is_empty(),
                "freed when the last lock was released"
            );
            assert!(s.jobs.len() <= 2, "at most the two kept: {}", s.jobs.len());
        }
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(store.get(*id).await.unwrap().is_some(), i >= 3, "job {i}");
        }
    }
}
