//! Job storage: the [`JobStore`] trait, its lease semantics, and the in-memory store.
//!
//! A worker that claims a job gets a [`Lease`] (owner, attempt, fencing token, expiry). Every
//! write a worker makes afterwards — events, heartbeats, the final outcome — presents the lease,
//! and the store refuses it with [`StoreError::LeaseLost`] once the lease expired or another
//! worker holds the job. That fencing is what lets several engine instances share one store: a
//! worker that stalled past its lease can never overwrite the job its successor is running.
//!
//! Status changes happen only inside the store, together with the event that records them, and
//! always through [`JobStatus::check_transition`].

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::BackendError;
use crate::event::{JobEvent, JobEventKind};
use crate::job::{
    Approval, ApprovalDecision, IllegalTransition, Job, JobError, JobId, JobResult, JobStatus,
};

mod memory;
pub use memory::{MemoryStore, Retention};
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PgStore;

/// Proof that a worker owns a running job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// Who holds it (an engine instance's worker id).
    pub owner: String,
    /// The attempt it was claimed for.
    pub attempt: u32,
    /// A number that changes with every claim; writes carrying an older token are refused.
    pub token: u64,
    /// When it lapses unless extended by a heartbeat.
    #[serde(with = "crate::timestamp")]
    pub expires_at: DateTime<Utc>,
}

/// Why a store call failed. Compare errors by [`kind`](Self::kind).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No job with that id.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The lease expired or belongs to someone else now.
    #[error("the lease on job {0} is no longer held")]
    LeaseLost(JobId),
    /// The change is not allowed by the transition table.
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// The idempotency key was used before with a different request.
    #[error("idempotency key already used for job {existing} with a different request")]
    IdempotencyConflict {
        /// The job created with that key.
        existing: JobId,
    },
    /// The queue already holds `capacity` jobs.
    #[error("the queue is full ({capacity} jobs)")]
    QueueFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// The backend failed (connection, query, serialisation); the cause is its source.
    #[error("store backend error: {0}")]
    Backend(#[source] BackendError),
}

/// What kind of [`StoreError`] happened, for callers and tests that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// [`StoreError::NotFound`].
    NotFound,
    /// [`StoreError::LeaseLost`].
    LeaseLost,
    /// [`StoreError::IllegalTransition`].
    IllegalTransition,
    /// [`StoreError::IdempotencyConflict`].
    IdempotencyConflict,
    /// [`StoreError::QueueFull`].
    QueueFull,
    /// [`StoreError::Backend`].
    Backend,
}

impl StoreError {
    /// A backend failure without an underlying error.
    #[must_use]
    pub fn backend(context: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self::Backend(BackendError::new(context))
    }

    /// A backend failure caused by `source`.
    #[must_use]
    pub fn backend_from(
        context: impl Into<std::borrow::Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend(BackendError::with_source(context, source))
    }

    /// The kind of failure.
    #[must_use]
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Self::NotFound(_) => StoreErrorKind::NotFound,
            Self::LeaseLost(_) => StoreErrorKind::LeaseLost,
            Self::IllegalTransition(_) => StoreErrorKind::IllegalTransition,
            Self::IdempotencyConflict { .. } => StoreErrorKind::IdempotencyConflict,
            Self::QueueFull { .. } => StoreErrorKind::QueueFull,
            Self::Backend(_) => StoreErrorKind::Backend,
        }
    }

    /// Whether the backend failed (a retry later may succeed).
    #[must_use]
    pub fn is_backend(&self) -> bool {
        matches!(self, Self::Backend(_))
    }
}

/// A job to insert.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NewJob {
    /// The job, in status `queued`.
    pub job: Job,
    /// The request fingerprint, compared when the idempotency key was seen before.
    pub fingerprint: Option<String>,
    /// Refuse with [`StoreError::QueueFull`] when this many jobs are queued already.
    pub queue_capacity: Option<usize>,
}

impl NewJob {
    /// A new job with no idempotency and no capacity check.
    #[must_use]
    pub fn new(job: Job) -> Self {
        Self {
            job,
            fingerprint: None,
            queue_capacity: None,
        }
    }

    /// Sets the fingerprint used with the job's idempotency key.
    #[must_use]
    pub fn fingerprint(mut self, fp: impl Into<String>) -> Self {
        self.fingerprint = Some(fp.into());
        self
    }

    /// Sets the queue capacity.
    #[must_use]
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = Some(capacity);
        self
    }
}

/// The result of [`JobStore::create`].
#[derive(Clone, Debug, PartialEq)]
pub enum Created {
    /// A new job, with its `queued` event.
    New(Job, JobEvent),
    /// The idempotency key was seen with the same request: the job created then.
    Existing(Job),
}

/// Filters for [`JobStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobQuery {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs of this workflow.
    pub workflow: Option<String>,
    /// Page size (clamped to 1..=500, default 50).
    pub limit: Option<usize>,
    /// Continue after this job (the previous page's `next_cursor`).
    pub cursor: Option<JobId>,
    /// Only jobs of this concurrency group.
    pub concurrency_group: Option<String>,
}

impl JobQuery {
    /// The effective page size.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, 500)
    }

    /// Filter by status.
    #[must_use]
    pub fn status(mut self, s: JobStatus) -> Self {
        self.status = Some(s);
        self
    }

    /// Filter by workflow.
    #[must_use]
    pub fn workflow(mut self, w: impl Into<String>) -> Self {
        self.workflow = Some(w.into());
        self
    }

    /// Page size.
    #[must_use]
    pub fn limit(mut self, n: usize) -> Self {
        self.limit = Some(n);
        self
    }

    /// Continue after `cursor`.
    #[must_use]
    pub fn after(mut self, cursor: JobId) -> Self {
        self.cursor = Some(cursor);
        self
    }
}

/// One page of jobs, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<Job>,
    /// Where the next page starts, if there is one.
    pub next_cursor: Option<JobId>,
}

/// A request for the next job to run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The claiming worker.
    pub owner: String,
    /// How long the lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// Skip projects that already run this many jobs (across every instance).
    pub per_project_limit: Option<usize>,
    /// "Now", for `retry_at` and lease expiry.
    pub now: DateTime<Utc>,
}

impl ClaimRequest {
    /// A claim by `owner` for `lease_ttl`, at the current time.
    #[must_use]
    pub fn new(owner: impl Into<String>, lease_ttl: Duration) -> Self {
        Self {
            owner: owner.into(),
            lease_ttl,
            per_project_limit: None,
            now: Utc::now(),
        }
    }

    /// Sets the per-project limit.
    #[must_use]
    pub fn per_project(mut self, limit: usize) -> Self {
        self.per_project_limit = Some(limit);
        self
    }
}

/// What [`JobStore::finish_after`] wrote.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FinishedAfter {
    /// The job as the last event left it (still `running`), and that event.
    pub last: (Job, JobEvent),
    /// The job as the attempt's end left it, and the event of that change.
    pub ended: (Job, JobEvent),
}

/// What [`JobStore::finish_after_step`] wrote.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct FinishedStep {
    /// The step's start.
    pub started: JobEvent,
    /// The step's end.
    pub finished: JobEvent,
    /// The job as the step's end left it (still `running`), when asked for.
    pub between: Option<Job>,
    /// The job as the attempt's end left it, and the event of that change.
    pub ended: (Job, JobEvent),
}

/// A claimed job: now `running` under `lease`, with the event that says so.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    /// The job as it is now.
    pub job: Job,
    /// The lease.
    pub lease: Lease,
    /// The `running` status event.
    pub event: JobEvent,
}

/// The outcome of an attempt, written with [`JobStore::finish`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Finish {
    /// Every step succeeded.
    Completed(JobResult),
    /// The attempt failed. With `retry_at`, the job goes back to `queued`; without it, it ends
    /// `failed` (dead letter).
    Failed {
        /// What went wrong.
        error: JobError,
        /// What the steps that did run produced.
        result: Option<JobResult>,
        /// When to try again.
        retry_at: Option<DateTime<Utc>>,
    },
    /// Stopped on request.
    Cancelled {
        /// Why (user, shutdown).
        error: JobError,
        /// Partial results.
        result: Option<JobResult>,
    },
    /// Ran past a timeout.
    TimedOut {
        /// Which timeout.
        error: JobError,
        /// Partial results.
        result: Option<JobResult>,
    },
    /// Paused before a step with `approval: required`: the job becomes `awaiting_approval`,
    /// holding no lease, with the results of the steps before it kept for when it resumes.
    AwaitingApproval {
        /// The steps that ran.
        result: JobResult,
        /// What it waits for.
        approval: Approval,
    },
}

impl Finish {
    /// The status the job gets.
    #[must_use]
    pub fn status(&self) -> JobStatus {
        match self {
            Finish::Completed(_) => JobStatus::Completed,
            Finish::Failed {
                retry_at: Some(_), ..
            } => JobStatus::Queued,
            Finish::Failed { .. } => JobStatus::Failed,
            Finish::Cancelled { .. } => JobStatus::Cancelled,
            Finish::TimedOut { .. } => JobStatus::TimedOut,
            Finish::AwaitingApproval { .. } => JobStatus::AwaitingApproval,
        }
    }
}

/// The result of [`JobStore::decide_approval`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ApprovalOutcome {
    /// The job was waiting: approved, it is `queued` again; rejected, it is `cancelled`.
    Decided(Job, JobEvent),
    /// The job is not `awaiting_approval` (never was, already decided, or finished).
    NotWaiting(Job),
}

/// The result of [`JobStore::request_cancel`].
#[derive(Clone, Debug, PartialEq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled, with the event.
    Cancelled(Job, JobEvent),
    /// It is running: `cancel_requested` is set, and its worker must stop it. (A job
    /// `awaiting_approval` holds no worker and is cancelled at once, as `Cancelled`.)
    Requested(Job),
    /// It had already finished.
    AlreadyFinished(Job),
}

/// What a heartbeat learns.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// The extended lease.
    pub lease: Lease,
    /// Whether someone asked (possibly on another instance) to cancel the job.
    pub cancel_requested: bool,
}

/// Jobs by status, for the status endpoint and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Waiting jobs (including retries not yet due).
    pub queued: usize,
    /// Jobs under a lease.
    pub running: usize,
}

/// The receiving end of a store's cross-instance notifications: a store whose database is
/// shared by several instances (PostgreSQL) tells each instance's engine what happened
/// elsewhere. [`Engine::cluster_listener`](crate::Engine::cluster_listener) gives the engine's.
pub trait ClusterListener: Send + Sync + 'static {
    /// A job was queued (or a project slot freed) elsewhere: idle workers should look again.
    fn wake(&self);
    /// An event recorded by another instance, for this instance's live subscribers.
    fn remote_event(&self, event: JobEvent);
    /// Another instance received a cancel for `job`; stop it if it runs here.
    fn remote_cancel(&self, job: JobId);
    /// A job was just queued here in `project`: answers whether this instance will see to it,
    /// because it has an idle worker that will claim it (counted as promised), or because jobs
    /// it runs fill the project's per-project limit (the end of one of them wakes a claim
    /// here; no claim could take it before). The store then tells the other instances not to
    /// wake for it (their claims would find it taken, or the project full, and on a small
    /// machine compete with the one that takes it). The default promises nothing: every other
    /// instance wakes.
    fn promise_claim(&self, project: &str) -> bool {
        let _ = project;
        false
    }
    /// Whether this instance's claims are limited per project, so that a job without a
    /// concurrency group ending elsewhere may let one of them through (it wakes the engine
    /// only then). The default says yes: every end elsewhere wakes the engine.
    fn limits_claims_per_project(&self) -> bool {
        true
    }
}

/// Where jobs and their events live. Implementations: [`MemoryStore`] and, with the `postgres`
/// feature, `PgStore`. Every implementation passes `test_util::job_store_suite`.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Inserts a queued job (or finds the one its idempotency key created).
    async fn create(&self, new: NewJob) -> Result<Created, StoreError>;

    /// Inserts several queued jobs: each gets the outcome [`create`](Self::create) would have
    /// given it, in order (a full queue refuses the jobs past its capacity; an idempotency key
    /// seen before finds its job). The default creates them one at a time; stores override it
    /// to write a batch at once.
    async fn create_many(&self, new: Vec<NewJob>) -> Vec<Result<Created, StoreError>> {
        let mut out = Vec::with_capacity(new.len());
        for n in new {
            out.push(self.create(n).await);
        }
        out
    }

    /// Reads a job.
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;

    /// Lists jobs newest first.
    async fn list(&self, query: &JobQuery) -> Result<JobPage, StoreError>;

    /// Claims the next runnable job: highest priority first, oldest first within a priority,
    /// `retry_at` due, project under its limit. The job becomes `running` with `attempt + 1`.
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError>;

    /// Claims up to `max` runnable jobs at once, in the order [`claim`](Self::claim) would
    /// take them and under the same rules, each with its own lease. An engine calls it for its
    /// idle workers: one round trip instead of one per worker. The default claims one at a
    /// time; stores override it.
    async fn claim_many(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.claim(request).await? {
                Some(c) => out.push(c),
                None => break,
            }
        }
        Ok(out)
    }

    /// Extends a lease.
    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> Result<Heartbeat, StoreError>;

    /// Appends an event to a running job (fenced by the lease). Step events also move the job's
    /// progress.
    async fn append(&self, lease: &Lease, kind: JobEventKind) -> Result<JobEvent, StoreError>;

    /// Appends events to a running job, in their order, as [`append`](Self::append) would one
    /// after the other (fenced by the lease), and answers them. A store may write them at once:
    /// the engine gives it a step's agent events that came while the write before them was on
    /// its way, so an agent's output is recorded at the agent's pace, not at one commit a
    /// line. The memory store writes them under one lock, PostgreSQL in one statement and one
    /// commit (a step's start or end, which moves the job's progress, in a write of its own):
    /// all of them or none, when none moves the job's progress. The default writes them one
    /// at a time and stops at the first error, the ones before it written.
    ///
    /// The events are answered shared: a store that keeps them in memory hands out the copy it
    /// keeps, which the engine sends to the job's subscribers as it is.
    async fn append_many(
        &self,
        lease: &Lease,
        kinds: Vec<JobEventKind>,
    ) -> Result<Vec<std::sync::Arc<JobEvent>>, StoreError> {
        let mut written = Vec::with_capacity(kinds.len());
        for kind in kinds {
            written.push(std::sync::Arc::new(self.append(lease, kind).await?));
        }
        Ok(written)
    }

    /// Ends an attempt (fenced by the lease) and releases the lease.
    async fn finish(&self, lease: &Lease, finish: Finish) -> Result<(Job, JobEvent), StoreError>;

    /// Appends `last` (the attempt's last event, the last step's `StepFinished`) and ends the
    /// attempt, as [`append`](Self::append) then [`finish`](Self::finish) would, fenced by the
    /// lease: a store may write both at once (PostgreSQL writes them in one statement, one row
    /// version instead of two). Answers the job as `last` left it with `last`'s event, and the
    /// ended job with its event.
    async fn finish_after(
        &self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
    ) -> Result<FinishedAfter, StoreError> {
        let last = self.append(lease, last).await?;
        let between = self
            .get(lease.job_id)
            .await?
            .ok_or(StoreError::NotFound(lease.job_id))?;
        let (job, event) = self.finish(lease, finish).await?;
        Ok(FinishedAfter {
            last: (between, last),
            ended: (job, event),
        })
    }

    /// [`finish_after`](Self::finish_after) for a caller with no use for the job as `last`
    /// left it (the engine, when nothing observes a step's end): answers `last`'s event and the
    /// ended job with its event. The same writes, or none; a store that keeps its jobs in
    /// memory saves a copy of the job.
    async fn finish_after_event(
        &self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
    ) -> Result<(JobEvent, (Job, JobEvent)), StoreError> {
        let done = self.finish_after(lease, last, finish).await?;
        Ok((done.last.1, done.ended))
    }

    /// Appends the last step's `started` and `finished` events and ends the attempt, as
    /// [`append`](Self::append) then [`finish_after`](Self::finish_after) would, fenced by the
    /// lease: the engine writes a last step whole with its outcome when its agent was done
    /// at its first poll, before the step's start was written (an executor that answers at
    /// once, as a host's own backend may), and left nothing else to record.
    /// A store may write all three at once (PostgreSQL writes them in one statement, one commit
    /// instead of two). A status event as either step event is refused and nothing is written;
    /// if `started` is not written (a lease no longer held), neither is the rest. Answers the
    /// two events, the job as `finished` left it when `with_job` (for the observers of a step's
    /// end, as `finish_after` answers it; without, as
    /// [`finish_after_event`](Self::finish_after_event) saves it), and the ended job with its
    /// event.
    async fn finish_after_step(
        &self,
        lease: &Lease,
        started: JobEventKind,
        finished: JobEventKind,
        finish: Finish,
        with_job: bool,
    ) -> Result<FinishedStep, StoreError> {
        apply::appendable(&started)?;
        apply::appendable(&finished)?;
        let started = self.append(lease, started).await?;
        if with_job {
            let done = self.finish_after(lease, finished, finish).await?;
            let (between, finished) = done.last;
            Ok(FinishedStep {
                started,
                finished,
                between: Some(between),
                ended: done.ended,
            })
        } else {
            let (finished, ended) = self.finish_after_event(lease, finished, finish).await?;
            Ok(FinishedStep {
                started,
                finished,
                between: None,
                ended,
            })
        }
    }

    /// Cancels a queued (or `awaiting_approval`) job at once, or marks a running one for its
    /// worker to stop.
    async fn request_cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError>;

    /// Records a decision on the approval a job waits for: approved, the job goes back to
    /// `queued` and its next run resumes at the approved step (same attempt); rejected, it ends
    /// `cancelled` (kind `rejected`). Atomic: of two concurrent decisions exactly one is
    /// `Decided`, the other sees `NotWaiting`.
    ///
    /// The default refuses: a store written before approvals existed cannot keep a waiting job.
    async fn decide_approval(
        &self,
        id: JobId,
        decision: ApprovalDecision,
    ) -> Result<ApprovalOutcome, StoreError> {
        let _ = (id, decision);
        Err(StoreError::backend(
            "this job store does not support approvals",
        ))
    }

    /// Ends every job whose approval expired before `now`: `cancelled`, kind
    /// `approval_timeout`. Each such job is returned once, whichever instance asks.
    async fn expire_approvals(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        let _ = now;
        Ok(Vec::new())
    }

    /// A job's events with `seq > after`, in order.
    async fn events(&self, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError>;

    /// At most `limit` of a job's events with `seq > after`, in order: what event streams
    /// replay history with, a page at a time, so a subscriber never holds a whole history. The
    /// default reads everything and keeps the first `limit`; stores override it.
    async fn events_page(
        &self,
        id: JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let mut all = self.events(id, after).await?;
        all.truncate(limit);
        Ok(all)
    }

    /// Requeues (or fails, when out of attempts) running jobs whose lease expired before `now`.
    async fn recover_expired(&self, now: DateTime<Utc>)
        -> Result<Vec<(Job, JobEvent)>, StoreError>;

    /// Counts of queued and running jobs.
    async fn counts(&self) -> Result<QueueCounts, StoreError>;
}

/// Pure state changes shared by every store, so they agree on what a claim, an event or a
/// finish does to a job. Each returns the event to record (without its sequence number).
pub mod apply {
    use std::sync::Arc;

    use super::*;
    use crate::job::{Progress, StatusChange};

    fn set_status(
        job: &mut Job,
        to: JobStatus,
        now: DateTime<Utc>,
        reason: Option<String>,
        error: Option<JobError>,
    ) -> Result<JobEventKind, StoreError> {
        let from = job.status;
        from.check_transition(to)?;
        job.status = to;
        job.history.push(StatusChange {
            status: to,
            at: now,
            attempt: job.attempt,
            reason: reason.clone(),
        });
        if to.is_terminal() {
            job.finished_at = Some(now);
        }
        Ok(JobEventKind::Status {
            from: Some(from),
            to,
            attempt: job.attempt,
            reason,
            error,
        })
    }

    /// The event of a new job (it is created `queued`).
    #[must_use]
    pub fn created(job: &Job) -> JobEventKind {
        JobEventKind::status(None, JobStatus::Queued, job.attempt)
    }

    /// Whether a queued job may be claimed at `now`.
    #[must_use]
    pub fn is_due(job: &Job, now: DateTime<Utc>) -> bool {
        job.status == JobStatus::Queued && job.retry_at.is_none_or(|t| t <= now)
    }

    /// Claim: `queued` → `running`, next attempt, progress reset.
    pub fn claim(job: &mut Job, now: DateTime<Utc>) -> Result<JobEventKind, StoreError> {
        // A job resuming after an approval continues its attempt where it paused.
        let resuming = job.resume_after_approval;
        if !resuming {
            job.attempt = job.attempt.saturating_add(1);
        }
        let reason = resuming.then(|| "resumed after approval".to_owned());
        let ev = set_status(job, JobStatus::Running, now, reason, None);
        if ev.is_err() {
            if !resuming {
                job.attempt -= 1;
            }
            return ev;
        }
        job.retry_at = None;
        if resuming {
            return ev;
        }
        job.started_at = Some(now);
        // A first attempt's steps are all pending already: nothing to move (or allocate).
        if !(job.progress.completed.is_empty() && job.progress.in_progress.is_empty()) {
            let p = std::mem::take(&mut job.progress);
            job.progress = Progress::pending(
                p.completed
                    .into_iter()
                    .chain(p.in_progress)
                    .chain(p.pending),
            );
        }
        ev
    }

    /// Refuses a status event from a caller of [`JobStore::append`]: status changes are the
    /// store's to write.
    pub fn appendable(kind: &JobEventKind) -> Result<(), StoreError> {
        if matches!(kind, JobEventKind::Status { .. }) {
            return Err(StoreError::backend(
                "status events are written by the store itself",
            ));
        }
        Ok(())
    }

    /// The event of the claim of `job`, read from the job the claim made (what
    /// [`claim`] returns for it): a store that claims in SQL builds its event this way.
    #[must_use]
    pub fn claimed_event(job: &Job) -> JobEventKind {
        JobEventKind::Status {
            from: Some(JobStatus::Queued),
            to: JobStatus::Running,
            attempt: job.attempt,
            reason: job
                .resume_after_approval
                .then(|| "resumed after approval".to_owned()),
            error: None,
        }
    }

    /// Moves progress for step events.
    pub fn progress(job: &mut Job, kind: &JobEventKind) {
        match kind {
            JobEventKind::StepStarted { step, .. } => job.progress.start(step),
            JobEventKind::StepFinished { step, ok: true, .. } => job.progress.finish(step),
            _ => {}
        }
    }

    /// Ends an attempt.
    pub fn finish(
        job: &mut Job,
        finish: Finish,
        now: DateTime<Utc>,
    ) -> Result<JobEventKind, StoreError> {
        let to = finish.status();
        job.status.check_transition(to)?;
        let (result, error, retry_at) = match finish {
            Finish::Completed(r) => (Some(r), None, None),
            Finish::Failed {
                error,
                result,
                retry_at,
            } => (result, Some(error), retry_at),
            Finish::Cancelled { error, result } | Finish::TimedOut { error, result } => {
                (result, Some(error), None)
            }
            Finish::AwaitingApproval { result, approval } => {
                let reason = format!("waiting for approval of step `{}`", approval.step);
                job.approvals.push(approval);
                job.result = Some(Arc::new(result));
                job.retry_at = None;
                job.resume_after_approval = false;
                return set_status(job, to, now, Some(reason), None);
            }
        };
        job.resume_after_approval = false;
        if result.is_some() || to != JobStatus::Queued {
            job.result = result.map(Arc::new);
        }
        job.retry_at = retry_at;
        job.dead_letter = to == JobStatus::Failed;
        let reason = match (to, &error) {
            (JobStatus::Queued, Some(e)) => Some(format!("retry after {}: {}", e.kind, e.message)),
            (_, Some(e)) => Some(e.message.clone()),
            _ => None,
        };
        job.error = error.clone();
        set_status(job, to, now, reason, error)
    }

    /// A cancel of a queued job.
    pub fn cancel_queued(
        job: &mut Job,
        reason: &str,
        now: DateTime<Utc>,
    ) -> Result<JobEventKind, StoreError> {
        let error = JobError::new("cancelled", reason);
        job.error = Some(error.clone());
        set_status(
            job,
            JobStatus::Cancelled,
            now,
            Some(reason.to_owned()),
            Some(error),
        )
    }

    /// Records `decision` on the approval `job` waits for (see
    /// [`JobStore::decide_approval`]). `None` when the job is not waiting.
    pub fn decide(
        job: &mut Job,
        decision: ApprovalDecision,
        now: DateTime<Utc>,
    ) -> Option<JobEventKind> {
        job.pending_approval()?;
        let approval = job.approvals.last_mut()?;
        let step = approval.step.clone();
        let approved = decision.approved;
        let (kind, what) = match decision.via.as_str() {
            "timeout" => ("approval_timeout", "was not approved in time".to_owned()),
            _ if approved => ("", format!("approved by {}", decision.by)),
            _ => ("rejected", format!("rejected by {}", decision.by)),
        };
        approval.decision = Some(decision);
        let reason = format!("step `{step}` {what}");
        if approved {
            job.resume_after_approval = true;
            job.retry_at = None;
            return set_status(job, JobStatus::Queued, now, Some(reason), None).ok();
        }
        let error = JobError::new(kind, reason.clone());
        job.error = Some(error.clone());
        set_status(job, JobStatus::Cancelled, now, Some(reason), Some(error)).ok()
    }

    /// Whether the approval `job` waits for expired at `now`.
    #[must_use]
    pub fn approval_expired(job: &Job, now: DateTime<Utc>) -> bool {
        job.pending_approval().is_some_and(|a| a.expires_at <= now)
    }

    /// A running job whose lease lapsed: back to `queued`, or `failed` when out of attempts.
    pub fn expire(job: &mut Job, now: DateTime<Utc>) -> Result<JobEventKind, StoreError> {
        job.resume_after_approval = false;
        let error = JobError::new(
            "lease_lost",
            format!(
                "the worker running attempt {} stopped renewing its lease",
                job.attempt
            ),
        );
        if job.attempt < job.max_attempts {
            job.retry_at = None;
            set_status(
                job,
                JobStatus::Queued,
                now,
                Some(error.message.clone()),
                Some(error),
            )
        } else {
            job.error = Some(error.clone());
            job.dead_letter = true;
            set_status(
                job,
                JobStatus::Failed,
                now,
                Some(error.message.clone()),
                Some(error),
            )
        }
    }
}
