//! The completer: the fenced writes of running jobs (their events and their outcomes),
//! coalesced across jobs into few statements and few commits.
//!
//! [`JobStore::append`](crate::store::JobStore::append) and
//! [`JobStore::finish`](crate::store::JobStore::finish) write at once, in their caller's task,
//! while no write is on its way ([`IN_FLIGHT`]); otherwise they hand their write to the
//! completer's task and wait for its answer. The task takes every write waiting when the
//! write on its way has been answered (nothing waits for a timer: the writes that arrive
//! while the database is busy form the next batch, with at most one write per job) and
//! writes the batch as
//!
//! - one statement for all the events (`aiwg_append_events`: an `UPDATE … FROM unnest(…)`
//!   fencing each row, numbering its events and moving the job's progress, with the `INSERT`
//!   of the events in the same statement): one commit. One write may carry many events of its
//!   job ([`JobStore::append_many`](crate::store::JobStore::append_many): an agent's output
//!   lines that waited while the write before them was on its way);
//! - for the outcomes, one read of the rows their leases hold (`aiwg_leased_jobs`) and one
//!   `UPDATE … FROM unnest(…)` (`aiwg_record_outcomes`) that fences each row again, checks
//!   that it did not change since it was read, and inserts the outcomes' events: one commit.
//!   The outcome itself is computed in Rust ([`apply::finish`]), the one place that knows the
//!   transitions. A job claimed through this store needs no read: the completer holds the job
//!   its claim returned, with the row's version ([`Known`]), and each event's statement
//!   answers with the row's new version (the completer moves the job's progress as the
//!   statement did). When the row changed elsewhere since (a heartbeat, a cancel request), the
//!   version check refuses the write and the outcome reads the row.
//!
//! The three are SQL functions (migration 0020) so that their plans read only the rows they
//! name, by primary key, whatever the table held when they were planned: each connection
//! keeps one generic plan of each, and one made while the table held a handful of jobs (a
//! fresh database) hashed the whole table and went on doing so as it grew, until the next
//! `ANALYZE`. The functions price sequential and bitmap scans out. None of them says
//! `status = 'running'`: the table's `CHECK` makes a row with a lease token a running one,
//! so the token alone fences the row, and without that condition no index of running jobs
//! can serve the statement. (With it, a generic plan made while the statistics showed few
//! running jobs read every running job through such an index as a bitmap, finished jobs'
//! dead entries included, on every batch: 2 200 pages for 22 rows in `pg_queue` after its
//! narrow burn-downs.)
//!
//! Every row is fenced on its own (its lease token, which only a running job has, and the
//! lease's expiry, in the statement that writes it), and a write whose row does not pass
//! answers [`StoreError::LeaseLost`] (or [`StoreError::NotFound`]) to its caller alone; the
//! others of the batch are written. A part of a batch that fails as a whole (a lost
//! connection) is written again one write at a time, so each caller gets its own answer.
//!
//! With relaxed event commits the events' statement does not wait for the disk; outcomes
//! always do (and so flush the events written before them).
//!
//! The outcomes of jobs one claim started together ([`Mates`]) are written together: the
//! first of them to come, while the claim was answered less than [`MATES_WAIT`] ago (or the
//! store's own setting), goes to the task instead of out at once, and so do the others after
//! it; the task waits for them (at most until that time) before it writes the batch. Quick
//! jobs claimed four at a time then cost one outcome statement and one commit per claim
//! instead of two or three (the first used to go out alone, the others waiting for it); a
//! job still running by then is not waited for.
//!
//! The events and the outcomes are written on a connection of their own each, kept from one
//! batch to the next while writes wait and handed back to the pool when none does
//! ([`KeptConnection`]): sqlx tests every connection handed back with a round trip.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::{Duration, Instant};
use uuid::Uuid;

use super::{db, json_err, listen::Notifier, open_job, row, to_i64, NewEvent};
use crate::coalesce::KeptConnection;
use crate::event::JobEvent;
use crate::job::{Job, JobId};
use crate::secrets::SecretKeyring;
use crate::store::{apply, Finish, Lease, StoreError};

/// The most writes in one batch.
const MAX_BATCH: usize = 512;

/// How often an outcome is read and written again after its row changed between the two.
const OUTCOME_ROUNDS: usize = 8;

/// Writes or batches on their way at once. While none is, a write goes out at once, from its
/// caller; while one is, writes queue and go out together as soon as it has been answered.
///
/// One, measured: with 2 engines of 32 workers draining 5 000 no-op jobs (`pg_queue`, wide
/// burn-down) one in flight drained 1 414–1 556 jobs/s, two 1 206–1 289, four 921–999 and
/// eight 739–776 (bigger batches, fewer statements: the database's CPU is the limit), while
/// with 4 workers per engine the figures of one and four were within each other's noise.
const IN_FLIGHT: usize = 1;

/// The most jobs the completer holds as their last write left them ([`Known`]). A job
/// whose outcome never comes through this store (its worker gave it up silently) stays until
/// then; past this many, further jobs are not held, and their outcomes read their rows.
const KNOWN_MAX: usize = 1024;

/// How long after a claim was answered the outcomes of the jobs it started wait for each other
/// ([`Mates`]), unless the store says otherwise
/// ([`PgStore::with_outcome_gathering`](super::PgStore::with_outcome_gathering)). Jobs that
/// end within it are written together; a job still running then is not waited for, and
/// neither are the others once it is over. (Tokio's timer may add up to a millisecond: only
/// a job of the claim that never ends waits that long.)
pub(super) const MATES_WAIT: Duration = Duration::from_millis(1);

/// The jobs one claim started together, while their outcomes come: written in one batch when
/// they all come within [`MATES_WAIT`] of the claim's answer.
pub(super) struct Mates {
    /// Jobs the claim started.
    size: usize,
    /// Their outcomes taken by the completer's task so far.
    arrived: AtomicUsize,
    /// Set when an outcome went to the task to wait for the others: theirs follow it there.
    held: AtomicBool,
    /// Until when an outcome waits for the others.
    until: Instant,
}

impl Mates {
    /// While its outcomes are still to come and there is time: until when to wait.
    fn waits_until(&self, now: Instant) -> Option<Instant> {
        (self.arrived.load(Ordering::SeqCst) < self.size && now < self.until).then_some(self.until)
    }
}

/// What the completer needs of its store.
pub(super) struct Ctx {
    pub(super) pool: PgPool,
    pub(super) keyring: Option<SecretKeyring>,
    pub(super) relaxed: bool,
    pub(super) notifier: Notifier,
    /// The running jobs as their last write left them, by id ([`Known`]).
    pub(super) known: Mutex<HashMap<JobId, Known>>,
    /// The connections the events' and the outcomes' statements are written on while writes
    /// keep coming (released when none waits: [`Ctx::idle`]).
    pub(super) events: KeptConnection,
    pub(super) outcomes: KeptConnection,
    /// Writes handed to the task and not yet in a batch.
    pub(super) waiting: AtomicUsize,
    /// The running jobs claimed together with others, by id, until their outcome comes
    /// ([`Mates`]; at most [`KNOWN_MAX`]).
    pub(super) mates: Mutex<HashMap<JobId, Arc<Mates>>>,
    /// How long after their claim outcomes wait for their mates' ([`MATES_WAIT`]).
    pub(super) mates_wait: Duration,
}

/// A running job as its claim and its events since left it: the job the claim returned, its
/// progress moved by each step event as the event's statement moved it in the row, the row's
/// version (`xmin`) after the last of those statements, and the lease it was written under.
/// Its outcome is applied to this job instead of one read anew; the outcome's statement checks
/// the version, so a row that changed elsewhere since (a heartbeat, a cancel request) is read
/// again.
pub(super) struct Known {
    token: u64,
    version: String,
    job: Job,
}

impl Ctx {
    /// After a batch: when no write waits, the kept connections go back to the pool.
    fn idle(&self) {
        if self.waiting.load(Ordering::SeqCst) == 0 {
            self.events.release();
            self.outcomes.release();
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Known>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mates(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<Mates>>> {
        self.mates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that `ids` were claimed together, just now (nothing for a claim of one job).
    fn claimed_together(&self, ids: &[JobId]) {
        if ids.len() < 2 || self.mates_wait.is_zero() {
            return;
        }
        let mates = Arc::new(Mates {
            size: ids.len(),
            arrived: AtomicUsize::new(0),
            held: AtomicBool::new(false),
            until: Instant::now() + self.mates_wait,
        });
        let mut all = self.mates();
        // Jobs whose outcome never came here (given up, recovered elsewhere) are forgotten
        // with the others: their mates' outcomes then go out without waiting.
        if all.len() + ids.len() > KNOWN_MAX {
            all.clear();
        }
        for id in ids {
            all.insert(*id, Arc::clone(&mates));
        }
    }

    /// The mates of job `id`, whose outcome comes now, when it is to wait for them (or they
    /// wait for it) in the task.
    fn mates_of(&self, id: JobId) -> Option<Arc<Mates>> {
        let mates = self.mates().remove(&id)?;
        if mates.held.load(Ordering::SeqCst) {
            return Some(mates);
        }
        mates.waits_until(Instant::now())?;
        mates.held.store(true, Ordering::SeqCst);
        Some(mates)
    }

    /// Takes the jobs held for these leases (those written under another lease are dropped:
    /// their outcomes read the rows).
    fn take_known<'a>(
        &self,
        leases: impl Iterator<Item = &'a Lease>,
    ) -> HashMap<JobId, (Job, String)> {
        let mut known = self.known();
        leases
            .filter_map(|lease| {
                let held = known.remove(&lease.job_id)?;
                (held.token == lease.token).then_some((lease.job_id, (held.job, held.version)))
            })
            .collect()
    }

    /// Holds each job as its claim (`Some`: the row's version and the job) left it, and
    /// forgets the others.
    fn hold_known<'a>(&self, written: impl Iterator<Item = (&'a Lease, Option<(String, Job)>)>) {
        let mut known = self.known();
        for (lease, left) in written {
            let id = lease.job_id;
            match left {
                Some((version, job)) if known.len() < KNOWN_MAX || known.contains_key(&id) => {
                    let token = lease.token;
                    known.insert(
                        id,
                        Known {
                            token,
                            version,
                            job,
                        },
                    );
                }
                _ => {
                    known.remove(&id);
                }
            }
        }
    }

    /// Moves each held job as its event's statement moved its row (`Some`: the row's version
    /// after it), and forgets the jobs whose events were not written.
    fn move_known<'a>(&self, written: impl Iterator<Item = (&'a Append, Option<String>)>) {
        let mut known = self.known();
        for (a, version) in written {
            let id = a.lease.job_id;
            match (version, known.get_mut(&id)) {
                (Some(version), Some(held)) if held.token == a.lease.token => {
                    for ev in &a.evs {
                        apply::progress(&mut held.job, &ev.kind);
                    }
                    held.version = version;
                }
                (_, Some(_)) => {
                    known.remove(&id);
                }
                (_, None) => {}
            }
        }
    }
}

/// How an event moves its job's progress.
pub(super) enum Progress {
    /// It does not.
    Unchanged,
    /// `StepStarted` of this step.
    Started(Arc<str>),
    /// A successful `StepFinished` of this step.
    Finished(Arc<str>),
}

impl Progress {
    /// How `kind` moves its job's progress (what `apply::progress` does to a `Job`).
    pub(super) fn of(kind: &crate::event::JobEventKind) -> Self {
        use crate::event::JobEventKind as K;
        match kind {
            K::StepStarted { step, .. } => Self::Started(step.clone()),
            K::StepFinished { step, ok: true, .. } => Self::Finished(step.clone()),
            _ => Self::Unchanged,
        }
    }

    fn code(&self) -> i16 {
        match self {
            Self::Unchanged => 0,
            Self::Started(_) => 1,
            Self::Finished(_) => 2,
        }
    }

    fn step(&self) -> &str {
        match self {
            Self::Unchanged => "",
            Self::Started(s) | Self::Finished(s) => s,
        }
    }
}

/// A write of one job's events, numbered in their order.
struct Append {
    lease: Lease,
    /// The events (a write that moves the job's progress carries one).
    evs: Vec<NewEvent>,
    progress: Progress,
    reply: oneshot::Sender<Result<Vec<JobEvent>, StoreError>>,
}

struct Outcome {
    lease: Lease,
    /// The events written just before the outcome, in the same statement: the last step's
    /// `StepStarted` when its agent was done before it was written (`first`, only with a
    /// `last`, see [`JobStore::finish_after_step`](crate::store::JobStore::finish_after_step)),
    /// and its `StepFinished` (see
    /// [`JobStore::finish_after`](crate::store::JobStore::finish_after)).
    first: Option<Box<NewEvent>>,
    last: Option<Box<NewEvent>>,
    finish: Finish,
    at: DateTime<Utc>,
    /// The jobs claimed with this one, when its outcome waits for theirs ([`Mates`]).
    mates: Option<Arc<Mates>>,
    reply: oneshot::Sender<Result<Ended, StoreError>>,
}

/// What an outcome wrote: its first event (when it had one), the job as its last event left it
/// with that event (when it had one), and the ended job with its event.
pub(super) struct Ended {
    pub(super) first: Option<JobEvent>,
    pub(super) last: Option<(Job, JobEvent)>,
    pub(super) job: Job,
    pub(super) event: JobEvent,
}

// An outcome is the larger; boxing it would cost an allocation a job, to save moving a few
// hundred bytes through the completer's channel.
#[allow(clippy::large_enum_variant)]
enum Write {
    Append(Append),
    Finish(Outcome),
}

impl Write {
    fn job(&self) -> JobId {
        match self {
            Self::Append(a) => a.lease.job_id,
            Self::Finish(f) => f.lease.job_id,
        }
    }

    /// The mates of an outcome that waits for theirs.
    fn mates(&self) -> Option<&Mates> {
        match self {
            Self::Append(_) => None,
            Self::Finish(f) => f.mates.as_deref(),
        }
    }
}

/// The handle of a store's completer task. The task ends, after writing what it was given,
/// when the handle is dropped.
pub(super) struct Completer {
    tx: mpsc::UnboundedSender<Write>,
    ctx: Arc<Ctx>,
    /// One permit per write or batch on its way to the database ([`IN_FLIGHT`]).
    slots: Arc<Semaphore>,
}

/// An outcome written: its first event with its number (when it had one), the job as its last
/// event left it with that event and its number (when it had one), the ended job, its event's
/// number and its event.
type Recorded = Result<Written, StoreError>;

/// See [`Recorded`].
type Written = (
    Option<(i64, NewEvent)>,
    Option<(Job, i64, NewEvent)>,
    Job,
    i64,
    NewEvent,
);

fn stopped() -> StoreError {
    StoreError::backend("postgres: the store's completer stopped")
}

impl Completer {
    /// Starts the task (on the current Tokio runtime).
    pub(super) fn start(ctx: Ctx) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(ctx);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(Arc::clone(&ctx), Arc::clone(&slots), rx));
        Self { tx, ctx, slots }
    }

    /// Hands `write` to the task, or, when fewer than [`IN_FLIGHT`] writes are on their way
    /// (and none waits), writes it at once in the caller's task: a store that is not busy
    /// costs its callers no hand-over. An outcome that waits for its mates' always goes to the
    /// task.
    async fn submit(&self, write: Write) -> Result<(), StoreError> {
        if write.mates().is_none() {
            if let Ok(_slot) = self.slots.try_acquire() {
                flush(&self.ctx, vec![write]).await;
                self.ctx.idle();
                return Ok(());
            }
        }
        self.ctx.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.send(write).map_err(|_| {
            self.ctx.waiting.fetch_sub(1, Ordering::SeqCst);
            stopped()
        })
    }

    /// Writes an event of a running job, fenced by `lease`.
    pub(super) async fn append(
        &self,
        lease: Lease,
        ev: NewEvent,
        progress: Progress,
    ) -> Result<JobEvent, StoreError> {
        self.append_many(lease, vec![ev], progress)
            .await?
            .pop()
            .ok_or_else(stopped)
    }

    /// Writes events of a running job in one write, numbered in their order, fenced by
    /// `lease`: all of them or none. `progress` is that of the last event; the events before
    /// it may not move the job's progress.
    pub(super) async fn append_many(
        &self,
        lease: Lease,
        evs: Vec<NewEvent>,
        progress: Progress,
    ) -> Result<Vec<JobEvent>, StoreError> {
        if evs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.submit(Write::Append(Append {
            lease,
            evs,
            progress,
            reply,
        }))
        .await?;
        answer.await.map_err(|_| stopped())?
    }

    /// Holds each claimed job as its claim left its row (`Some`: the row's version and the
    /// job): an outcome that comes before any step event (a pause for an approval, a job that
    /// failed before its first step) then reads no row.
    ///
    /// The jobs are also remembered as claimed together ([`Mates`]): their outcomes, when they
    /// come soon enough, are written together.
    pub(super) fn hold_claimed<'a>(
        &self,
        claimed: impl Iterator<Item = (&'a Lease, Option<(String, Job)>)>,
    ) {
        let mut ids = Vec::new();
        self.ctx
            .hold_known(claimed.inspect(|(lease, _)| ids.push(lease.job_id)));
        self.ctx.claimed_together(&ids);
    }

    /// Forgets what the completer holds of job `id` (its row is about to change elsewhere: a
    /// heartbeat).
    pub(super) fn forget(&self, id: JobId) {
        self.ctx.known().remove(&id);
    }

    /// Records the outcome of a running job's attempt, fenced by `lease`, after `first` and
    /// `last` when there are (a `first` only with a `last`).
    pub(super) async fn finish(
        &self,
        lease: Lease,
        first: Option<Box<NewEvent>>,
        last: Option<Box<NewEvent>>,
        finish: Finish,
        at: DateTime<Utc>,
    ) -> Result<Ended, StoreError> {
        debug_assert!(
            first.is_none() || last.is_some(),
            "a first event needs a last"
        );
        let (reply, answer) = oneshot::channel();
        let mates = self.ctx.mates_of(lease.job_id);
        self.submit(Write::Finish(Outcome {
            lease,
            first,
            last,
            finish,
            at,
            mates,
            reply,
        }))
        .await?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(ctx: Arc<Ctx>, slots: Arc<Semaphore>, mut rx: mpsc::UnboundedReceiver<Write>) {
    // Writes of a job that already has one in the batch being formed wait for the next batch,
    // so that a statement never updates a row twice.
    let mut carried: VecDeque<Write> = VecDeque::new();
    loop {
        let first = match carried.pop_front() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => arrived(w),
                None => break,
            },
        };
        // Wait for a slot: what arrives meanwhile joins the batch.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut ids = HashSet::from([first.job()]);
        let mut batch = vec![first];
        let mut later = VecDeque::new();
        while let Some(w) = carried.pop_front() {
            if batch.len() < MAX_BATCH && ids.insert(w.job()) {
                batch.push(w);
            } else {
                later.push_back(w);
            }
        }
        carried = later;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => take(w, &mut batch, &mut ids, &mut carried),
                Err(_) => break,
            }
        }
        // Outcomes that wait for their mates' (see `hold_until`).
        while batch.len() < MAX_BATCH {
            let Some(until) = hold_until(&batch, Instant::now()) else {
                break;
            };
            tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => take(w, &mut batch, &mut ids, &mut carried),
                    None => break,
                },
                () = tokio::time::sleep_until(until) => break,
            }
        }
        ctx.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            flush(&ctx, batch).await;
            ctx.idle();
            drop(slot);
        });
    }
    // The store is gone: let the batches on their way end.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
}

/// Until when `batch` waits before it goes out: while an outcome of it waits for its mates'
/// ([`Mates`]), until their claim's time is up; not at all once it holds an event (that job's
/// worker waits for the event's answer, so a mate writing one could not send its outcome
/// before the batch goes).
fn hold_until(batch: &[Write], now: Instant) -> Option<Instant> {
    if batch.iter().any(|w| matches!(w, Write::Append(_))) {
        return None;
    }
    batch
        .iter()
        .filter_map(|w| w.mates()?.waits_until(now))
        .max()
}

/// Counts a write taken from the channel among its mates' outcomes (see [`Mates`]).
fn arrived(w: Write) -> Write {
    if let Some(mates) = w.mates() {
        mates.arrived.fetch_add(1, Ordering::SeqCst);
    }
    w
}

/// Puts a write taken from the channel in the batch, or, when the batch has one of its job
/// already, aside for the next.
fn take(w: Write, batch: &mut Vec<Write>, ids: &mut HashSet<JobId>, carried: &mut VecDeque<Write>) {
    let w = arrived(w);
    if ids.insert(w.job()) {
        batch.push(w);
    } else {
        carried.push_back(w);
    }
}

/// Writes a batch and answers its callers. A part (the events, the outcomes) that fails as a
/// whole is written again one write at a time, so that each caller gets its own answer.
async fn flush(ctx: &Ctx, batch: Vec<Write>) {
    let mut appends = Vec::new();
    let mut outcomes = Vec::new();
    for w in batch {
        match w {
            Write::Append(a) => appends.push(a),
            Write::Finish(f) => outcomes.push(f),
        }
    }
    // Different jobs (a batch holds one write per job): the two parts go out side by side.
    let (events, ends) = tokio::join!(write_events(ctx, &appends), write_outcomes(ctx, &outcomes));
    match events {
        Ok(seqs) => {
            for (a, seq) in appends.into_iter().zip(seqs) {
                answer_append(ctx, a, seq);
            }
        }
        Err(e) if appends.len() == 1 => {
            for a in appends {
                let _ = a.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "a batch of job events failed; writing them one by one");
            for a in appends {
                let answer = match write_events(ctx, std::slice::from_ref(&a)).await {
                    Ok(mut seqs) => seqs.pop().unwrap_or_else(|| Err(stopped())),
                    Err(e) => Err(e),
                };
                answer_append(ctx, a, answer);
            }
        }
    }
    match ends {
        Ok(done) => {
            for (f, done) in outcomes.into_iter().zip(done) {
                answer_finish(ctx, f, done);
            }
        }
        Err(e) if outcomes.len() == 1 => {
            for f in outcomes {
                let _ = f.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "a batch of job outcomes failed; writing them one by one");
            for f in outcomes {
                let answer = match write_outcomes(ctx, std::slice::from_ref(&f)).await {
                    Ok(mut done) => done.pop().unwrap_or_else(|| Err(stopped())),
                    Err(e) => Err(e),
                };
                answer_finish(ctx, f, answer);
            }
        }
    }
}

/// Answers a write of events with their numbers (`last`: the last one's), and announces them.
fn answer_append(ctx: &Ctx, a: Append, last: Result<i64, StoreError>) {
    let answer = last.map(|last| {
        let id = a.lease.job_id;
        let first = last - i64::try_from(a.evs.len()).unwrap_or(i64::MAX) + 1;
        (first..)
            .zip(a.evs)
            .map(|(seq, ev)| {
                ctx.notifier.announce_event(id, seq, &ev);
                ev.into_event(id, seq)
            })
            .collect()
    });
    let _ = a.reply.send(answer);
}

fn answer_finish(ctx: &Ctx, f: Outcome, done: Recorded) {
    let answer = done.map(|(first, last, job, seq, ev)| {
        let id = job.id;
        let first = first.map(|(seq, ev)| {
            ctx.notifier.announce_event(id, seq, &ev);
            ev.into_event(id, seq)
        });
        let last = last.map(|(between, seq, ev)| {
            ctx.notifier.announce_event(id, seq, &ev);
            (between, ev.into_event(id, seq))
        });
        ctx.notifier.announce_ended(&job, seq, &ev);
        Ended {
            first,
            last,
            job,
            event: ev.into_event(id, seq),
        }
    });
    let _ = f.reply.send(answer);
}

/// Turns the writes that matched no row (`None`) into [`StoreError::LeaseLost`] or, for a job
/// that does not exist, [`StoreError::NotFound`].
async fn fenced<'e, E, T>(
    exec: E,
    ids: impl Iterator<Item = JobId>,
    written: Vec<Option<T>>,
) -> Result<Vec<Result<T, StoreError>>, StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let ids: Vec<JobId> = ids.collect();
    let missing: Vec<Uuid> = ids
        .iter()
        .zip(&written)
        .filter(|(_, w)| w.is_none())
        .map(|(id, _)| *id.as_uuid())
        .collect();
    let existing: HashSet<Uuid> = if missing.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar("SELECT id FROM aiwg_jobs WHERE id = ANY($1)")
            .bind(&missing)
            .fetch_all(exec)
            .await
            .map_err(db)?
            .into_iter()
            .collect()
    };
    Ok(ids
        .into_iter()
        .zip(written)
        .map(|(id, w)| match w {
            Some(v) => Ok(v),
            None if existing.contains(id.as_uuid()) => Err(StoreError::LeaseLost(id)),
            None => Err(StoreError::NotFound(id)),
        })
        .collect())
}

/// One statement (`aiwg_append_events`): fences each write's row, numbers its events, moves the
/// job's progress for step events and inserts the events (relaxed: without waiting for the
/// disk). Answers per write, with its last event's number; `Err` when the statement failed
/// (nothing of it was written) or when none of the writes was.
async fn write_events(
    ctx: &Ctx,
    appends: &[Append],
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
    let n = appends.len();
    let (mut ids, mut tokens, mut ats) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut counts, mut modes, mut steps) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let events: usize = appends.iter().map(|a| a.evs.len()).sum();
    let (mut owners, mut places, mut ev_ats, mut kinds) = (
        Vec::with_capacity(events),
        Vec::with_capacity(events),
        Vec::with_capacity(events),
        Vec::with_capacity(events),
    );
    for (owner, a) in (1i32..).zip(appends) {
        ids.push(*a.lease.job_id.as_uuid());
        tokens.push(to_i64(a.lease.token));
        // Fenced at its last event's time (the events come in the order they were made).
        ats.push(a.evs.last().map_or_else(Utc::now, |ev| ev.at));
        counts.push(i32::try_from(a.evs.len()).unwrap_or(i32::MAX));
        modes.push(a.progress.code());
        steps.push(a.progress.step());
        for (place, ev) in (1i32..).zip(&a.evs) {
            owners.push(owner);
            places.push(place);
            ev_ats.push(ev.at);
            kinds.push(ev.text.as_str());
        }
    }
    let append = sqlx::query(
        "SELECT ord, last_seq, version \
         FROM aiwg_append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(&ats)
    .bind(&counts)
    .bind(&modes)
    .bind(&steps)
    .bind(&owners)
    .bind(&places)
    .bind(&ev_ats)
    .bind(&kinds)
    .bind(ctx.relaxed);
    let rows = ctx
        .events
        .run(db, async |conn| append.fetch_all(conn).await.map_err(db))
        .await?;
    let mut seqs = vec![None; n];
    let mut versions: Vec<Option<String>> = vec![None; n];
    for row in rows {
        let ord: i64 = row.try_get("ord").map_err(db)?;
        let seq: i64 = row.try_get("last_seq").map_err(db)?;
        let version: String = row.try_get("version").map_err(db)?;
        let Some(i) = usize::try_from(ord - 1).ok().filter(|&i| i < n) else {
            continue;
        };
        seqs[i] = Some(seq);
        versions[i] = Some(version);
    }
    ctx.move_known(appends.iter().zip(versions));
    // The events are written: a failure from here on is not theirs (see `answered_or`).
    let written: Vec<Option<Result<i64, StoreError>>> = seqs.iter().map(|s| s.map(Ok)).collect();
    match fenced(&ctx.pool, appends.iter().map(|a| a.lease.job_id), seqs).await {
        Ok(answers) => Ok(answers),
        Err(e) => answered_or(written, e),
    }
}

/// Records the outcomes: reads the rows their leases still hold (with their row versions),
/// unless the completer holds them as their last step event left them ([`Known`]), applies
/// each outcome to its job, and writes them all with their events in one statement that
/// fences every row again and checks that it did not change since it was read (a heartbeat,
/// a cancel request); a row that did is read and written again. One or two round trips and
/// one commit for the batch, no lock held between them.
async fn write_outcomes(ctx: &Ctx, outcomes: &[Outcome]) -> Result<Vec<Recorded>, StoreError> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    let n = outcomes.len();
    let mut answers: Vec<Option<Recorded>> = (0..n).map(|_| None).collect();
    // Outcomes whose row the fence refused (answered LeaseLost or NotFound at the end).
    let mut refused: Vec<usize> = Vec::new();
    let mut pending: Vec<usize> = (0..n).collect();
    // The jobs held as their last step event left them need no read, the first time round.
    let mut read = ctx.take_known(outcomes.iter().map(|f| &f.lease));
    let mut conn = ctx.outcomes.take().await.map_err(db)?;
    // Once a round has committed, an error is not the whole batch's: its committed outcomes
    // are answered as written and only the rest get the error (written again one by one,
    // a committed outcome would find its lease gone and be answered `LeaseLost`).
    let rounds: Result<(), StoreError> = async {
        for _ in 0..OUTCOME_ROUNDS {
            if pending.is_empty() {
                break;
            }
            let reading: Vec<&Outcome> = pending
                .iter()
                .map(|&i| &outcomes[i])
                .filter(|f| !read.contains_key(&f.lease.job_id))
                .collect();
            if !reading.is_empty() {
                let ids: Vec<Uuid> = reading.iter().map(|f| *f.lease.job_id.as_uuid()).collect();
                let tokens: Vec<i64> = reading.iter().map(|f| to_i64(f.lease.token)).collect();
                let ats: Vec<DateTime<Utc>> = reading.iter().map(|f| f.at).collect();
                let rows =
                    sqlx::query("SELECT job, state, version FROM aiwg_leased_jobs($1, $2, $3)")
                        .bind(&ids)
                        .bind(&tokens)
                        .bind(&ats)
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(db)?;
                for row in &rows {
                    let job = open_job(ctx.keyring.as_ref(), row)?;
                    let version: String = row.try_get("version").map_err(db)?;
                    read.insert(job.id, (job, version));
                }
            }
            // Apply each outcome (after its last event) to its job.
            let mut writes: Vec<(usize, Option<Job>, Job, NewEvent, String)> =
                Vec::with_capacity(pending.len());
            for &i in &pending {
                let f = &outcomes[i];
                let Some((mut job, version)) = read.remove(&f.lease.job_id) else {
                    refused.push(i);
                    continue;
                };
                if let Some(first) = &f.first {
                    apply::progress(&mut job, &first.kind);
                }
                let between = f.last.as_ref().map(|last| {
                    apply::progress(&mut job, &last.kind);
                    job.clone()
                });
                let applied = apply::finish(&mut job, f.finish.clone(), f.at).and_then(|kind| {
                    apply::progress(&mut job, &kind);
                    job.cancel_requested = false;
                    NewEvent::new(kind, f.at)
                });
                match applied {
                    Ok(ev) => writes.push((i, between, job, ev, version)),
                    Err(e) => answers[i] = Some(Err(e)),
                }
            }
            pending.clear();
            if writes.is_empty() {
                break;
            }
            let m = writes.len();
            let (mut w_ids, mut tokens, mut ats, mut versions) = (
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
            );
            let (mut statuses, mut retry_ats, mut states, mut approvals, mut ev_ats, mut kinds) = (
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
                Vec::with_capacity(m),
            );
            let (mut last_ats, mut last_kinds) = (Vec::with_capacity(m), Vec::with_capacity(m));
            let (mut first_ats, mut first_kinds) = (Vec::with_capacity(m), Vec::with_capacity(m));
            for (i, _, job, ev, version) in &writes {
                let f = &outcomes[*i];
                w_ids.push(*job.id.as_uuid());
                tokens.push(to_i64(f.lease.token));
                ats.push(f.at);
                versions.push(version.as_str());
                statuses.push(job.status.as_str());
                retry_ats.push(job.retry_at);
                states.push(row::state_json(job).map_err(json_err)?);
                approvals.push(job.pending_approval().map(|a| a.expires_at));
                ev_ats.push(ev.at);
                kinds.push(ev.text.as_str());
                last_ats.push(f.last.as_ref().map(|l| l.at));
                last_kinds.push(f.last.as_ref().map(|l| l.text.as_str()));
                first_ats.push(f.first.as_ref().map(|l| l.at));
                first_kinds.push(f.first.as_ref().map(|l| l.text.as_str()));
            }
            let rows = sqlx::query(
                "SELECT id, last_seq FROM aiwg_record_outcomes($1, $2, $3, $4, $5, $6, $7, $8, $9, \
                     $10, $11, $12, $13, $14)",
            )
            .bind(&w_ids)
            .bind(&tokens)
            .bind(&ats)
            .bind(&versions)
            .bind(&statuses)
            .bind(&retry_ats)
            .bind(&states)
            .bind(&approvals)
            .bind(&ev_ats)
            .bind(&kinds)
            .bind(&last_ats)
            .bind(&last_kinds)
            .bind(&first_ats)
            .bind(&first_kinds)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            let mut seqs: HashMap<Uuid, i64> = HashMap::with_capacity(rows.len());
            for row in rows {
                seqs.insert(
                    row.try_get("id").map_err(db)?,
                    row.try_get("last_seq").map_err(db)?,
                );
            }
            for (i, between, job, ev, _) in writes {
                match seqs.get(job.id.as_uuid()) {
                    Some(&seq) => {
                        let last = between
                            .zip(outcomes[i].last.as_deref().cloned())
                            .map(|(b, l)| (b, seq - 1, l));
                        let first = outcomes[i].first.as_deref().cloned().map(|e| (seq - 2, e));
                        answers[i] = Some(Ok((first, last, job, seq, ev)));
                    }
                    // Changed since it was read, or its lease ended meanwhile: read it again.
                    None => pending.push(i),
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = rounds {
        return answered_or(answers, e);
    }
    ctx.outcomes.keep(conn);
    for i in pending {
        answers[i] = Some(Err(StoreError::backend(
            "postgres: the job kept changing while its outcome was written",
        )));
    }
    if !refused.is_empty() {
        match fenced(
            &ctx.pool,
            refused.iter().map(|&i| outcomes[i].lease.job_id),
            refused.iter().map(|_| None::<()>).collect(),
        )
        .await
        {
            Ok(lost) => {
                for (i, e) in refused.into_iter().zip(lost) {
                    let e = e
                        .err()
                        .unwrap_or(StoreError::LeaseLost(outcomes[i].lease.job_id));
                    answers[i] = Some(Err(e));
                }
            }
            Err(e) => return answered_or(answers, e),
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(stopped())))
        .collect())
}

/// The answers of a batch whose writing failed with `e` part way: `Err(e)` for the batch when
/// none of it was written (its writes are then made again one by one), else the written
/// answers as they are and `e` for the others.
fn answered_or<T>(
    answers: Vec<Option<Result<T, StoreError>>>,
    e: StoreError,
) -> Result<Vec<Result<T, StoreError>>, StoreError> {
    if !answers.iter().any(|a| matches!(a, Some(Ok(_)))) {
        return Err(e);
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(e.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobResult;

    /// A batch that failed after some of it was written answers those as written: written
    /// again one by one, they would be written twice (events) or refused (outcomes).
    #[test]
    fn a_batch_that_failed_part_way_keeps_what_was_written() {
        let e = || StoreError::backend("the connection was lost");
        let id = JobId::new();
        let partly = answered_or(
            vec![Some(Ok(7)), None, Some(Err(StoreError::LeaseLost(id)))],
            e(),
        )
        .expect("answers");
        assert!(matches!(partly[0], Ok(7)));
        assert!(
            matches!(&partly[1], Err(StoreError::Backend(_))),
            "{:?}",
            partly[1]
        );
        assert!(matches!(partly[2], Err(StoreError::LeaseLost(j)) if j == id));
        // Nothing written: the batch's error, so that its writes are made again.
        assert!(answered_or::<i64>(vec![None, Some(Err(StoreError::LeaseLost(id)))], e()).is_err());
    }

    fn lease() -> Lease {
        Lease {
            job_id: JobId::new(),
            owner: "w".into(),
            attempt: 1,
            token: 1,
            expires_at: Utc::now(),
        }
    }

    fn mates(size: usize, arrived: usize, until: Instant) -> Arc<Mates> {
        Arc::new(Mates {
            size,
            arrived: AtomicUsize::new(arrived),
            held: AtomicBool::new(true),
            until,
        })
    }

    fn outcome(mates: Option<Arc<Mates>>) -> Write {
        Write::Finish(Outcome {
            lease: lease(),
            first: None,
            last: None,
            finish: Finish::Completed(JobResult::default()),
            at: Utc::now(),
            mates,
            reply: oneshot::channel().0,
        })
    }

    fn event() -> Write {
        let kind = crate::JobEventKind::Log {
            level: "info".into(),
            message: "m".into(),
        };
        Write::Append(Append {
            lease: lease(),
            evs: vec![NewEvent::new(kind, Utc::now()).unwrap()],
            progress: Progress::Unchanged,
            reply: oneshot::channel().0,
        })
    }

    #[test]
    fn a_batch_waits_for_mates_still_to_come_until_their_time_is_up() {
        let now = Instant::now();
        let soon = now + Duration::from_millis(1);
        let later = now + Duration::from_millis(2);
        // Two of three came: wait until the later of the two claims' times.
        let batch = vec![
            outcome(Some(mates(3, 2, soon))),
            outcome(Some(mates(2, 1, later))),
        ];
        assert_eq!(hold_until(&batch, now), Some(later));
        // All came, or no mates: no wait.
        assert_eq!(hold_until(&[outcome(Some(mates(2, 2, later)))], now), None);
        assert_eq!(hold_until(&[outcome(None)], now), None);
        // The time is up: no wait.
        assert_eq!(hold_until(&batch, later), None);
    }

    #[test]
    fn a_batch_with_an_event_does_not_wait() {
        let now = Instant::now();
        let later = now + Duration::from_millis(2);
        let batch = vec![outcome(Some(mates(2, 1, later))), event()];
        assert_eq!(hold_until(&batch, now), None);
    }
}
