//! One worker: claim a job, run its steps, record the outcome.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::{Engine, RunningJob, StopReason};
use crate::event::{JobEvent, JobEventKind};
use crate::executor::{
    AgentEvent, AgentRequest, AgentResult, EventSink, ExecutorError, StepEvents, Usage,
};
use crate::future_slot::FutureSlot;
use crate::job::{Approval, Job, JobError, JobId, JobResult, JobStatus, StepResult};
use crate::store::{ClaimRequest, Claimed, Finish, JobStore, Lease, StoreError};
use crate::workflow::{looks_like_an_injected_option, render, TemplateContext};

/// The most jobs one worker claims at once for itself and the other idle workers.
const MAX_CLAIM_BATCH: usize = 64;

/// A job claimed by one worker for another, with when its claim was sent: its lease is only
/// known to be ours until a lease after that, however long it waits to be started.
pub(super) struct Handed {
    claimed: Claimed,
    at: tokio::time::Instant,
    /// The claim got every job it asked for: there may be more.
    more: bool,
}

pub(super) async fn run(engine: Engine, n: usize) {
    let inner = &engine.inner;
    let owner = format!("{}/{n}", inner.settings.instance);
    let mut last_recovery = Instant::now();
    // Set when a job that ended here may have let another be claimed (see `after_job`): this
    // worker's next claim is owed to it, or, when it takes a handed job instead, another
    // worker's.
    let mut owed = false;
    let mut settling = FutureSlot::new();
    loop {
        // A job another worker claimed for this one comes first (even during a shutdown: it
        // is claimed, so it runs, or is cancelled by the shutdown like any running job).
        let handed = inner
            .handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        if let Some(Handed { claimed, at, more }) = handed {
            if std::mem::take(&mut owed) {
                inner.wake.notify_one();
            }
            // `busy` was counted for it when it was claimed.
            let ended = run_job(&engine, claimed, at).await;
            let freed = settle(&engine, &mut settling, ended.record(engine.clone())).await;
            job_ended(inner);
            owed = after_job(inner, more, freed).await;
            continue;
        }
        if inner.stop_claiming.is_cancelled() {
            break;
        }
        // One worker at a time sweeps expired leases, at most once per poll interval.
        if n == 0 && last_recovery.elapsed() >= inner.settings.poll_interval {
            last_recovery = Instant::now();
            match inner.store.recover_expired(Utc::now()).await {
                Ok(recovered) => {
                    for (job, ev) in recovered {
                        engine.publish(&job, ev).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "recovering expired leases failed"),
            }
            engine.expire_approvals().await;
        }
        // One worker at a time claims, for itself and for every other idle worker, in one
        // store call. Whoever gets the turn first looks at what was handed over: the claim it
        // waited for, or one that ended between the look above and the lock, may have handed
        // it a job. (Claiming instead would take a job no worker is free to run: the handed
        // one already counts as busy.)
        let mut claiming = match inner.claiming.try_lock() {
            Ok(guard) => guard,
            Err(_) => inner.claiming.lock().await,
        };
        let handed = !inner
            .handoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if handed || inner.stop_claiming.is_cancelled() {
            continue;
        }
        // While the jobs of the last claim still run beside it, the claiming worker waits a
        // moment for them, so that one claim brings work for all (see `gather`). Nothing is
        // handed over meanwhile: only the claiming turn hands jobs over.
        inner
            .gather
            .wait(&claiming, &inner.busy, &inner.stop_claiming)
            .await;
        let mut req = ClaimRequest::new(owner.clone(), inner.settings.lease_ttl);
        req.per_project_limit = inner.settings.per_project_concurrency;
        let idle = inner
            .settings
            .workers
            .saturating_sub(inner.busy.load(Ordering::Relaxed));
        let want = idle.clamp(1, MAX_CLAIM_BATCH);
        // This claim is the one a job's end here owed.
        owed = false;
        let claimed_at = tokio::time::Instant::now();
        inner.local_projects.claim_sent();
        let claimed = inner.store.claim_many(&req, want).await;
        claiming.claimed(claimed_at);
        // Counted in their projects before the claiming turn passes on; a submit made while
        // the claim was on its way may want a worker now (see `projects`).
        let wake_for_submits = inner
            .local_projects
            .claim_answered(claimed.iter().flatten().map(|c| &*c.job.project_path));
        // The jobs promised to the other instances are taken (or gone: claimed elsewhere,
        // cancelled) once a claim sent after the promise returns.
        if let Ok(batch) = &claimed {
            let taken = if batch.is_empty() {
                usize::MAX
            } else {
                batch.len()
            };
            let _ = inner
                .promised
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    Some(p.saturating_sub(taken))
                });
        }
        if wake_for_submits {
            inner.wake.notify_one();
        }
        match claimed {
            Ok(batch) if !batch.is_empty() => {
                // Counted busy at once, so that the next claim does not count them as idle.
                inner.busy.fetch_add(batch.len(), Ordering::Relaxed);
                let more = batch.len() >= want;
                let mut batch = batch.into_iter();
                let mine = batch.next();
                let others = batch.len();
                if others > 0 {
                    inner
                        .handoff
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(batch.map(|claimed| Handed {
                            claimed,
                            at: claimed_at,
                            more,
                        }));
                }
                drop(claiming);
                // Wake one worker per job handed over, and one more when the claim got all it
                // asked for: there may be more work. (Waking every idle worker would make all
                // but these claim for nothing.)
                for _ in 0..others {
                    inner.wake.notify_one();
                }
                if more {
                    inner.wake.notify_one();
                }
                if let Some(claimed) = mine {
                    let ended = run_job(&engine, claimed, claimed_at).await;
                    let freed = settle(&engine, &mut settling, ended.record(engine.clone())).await;
                    job_ended(inner);
                    owed = after_job(inner, more, freed).await;
                }
            }
            Ok(_) => {
                drop(claiming);
                wait(inner).await;
            }
            Err(e) => {
                drop(claiming);
                tracing::warn!(error = %e, "claiming a job failed");
                tokio::select! {
                    () = tokio::time::sleep(inner.settings.poll_interval) => {}
                    () = inner.stop_claiming.cancelled() => {}
                }
            }
        }
    }
}

/// Counts a job's work as ended (its worker is free), for the next claim and for the workers
/// gathering one (see `gather`).
fn job_ended(inner: &super::Inner) {
    inner.busy.fetch_sub(1, Ordering::SeqCst);
    inner.gather.job_ended();
}

/// What a worker does when a job it ran has ended, before it claims again. Answers whether
/// its next claim is owed to that end.
///
/// A job whose end may let another be claimed (`freed`: a slot of a per-project limit or of a
/// concurrency group, a retry queued, an outcome not known to be written) makes this worker
/// claim at once, for itself and every idle worker; only if it takes a job handed to it
/// instead does it wake another to claim (it used to wake one every time, whose claim, made
/// after this one, found nothing: under a per-project limit, an empty claim after every job).
/// Otherwise, when the claim that brought the job got fewer jobs than it asked for, the queue
/// was empty then, and whatever was queued since woke a worker (a submit, a decided approval,
/// another instance's notice): this one waits for such a wake-up (or the poll interval)
/// instead of claiming at once. A claim that finds nothing costs a store round trip, and one
/// on its way holds the claiming turn, so a job submitted meanwhile waited for it (issue 15:
/// two empty claims after every job on PostgreSQL).
async fn after_job(inner: &super::Inner, more: bool, freed: bool) -> bool {
    if !freed && !more {
        wait(inner).await;
    }
    freed
}

/// An idle worker waits for a wake-up (new work, a job handed over), the poll interval, or
/// the shutdown.
async fn wait(inner: &super::Inner) {
    let woken = inner.wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    // A job handed over between the last look and `enable` would not wake this worker.
    if !inner
        .handoff
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
    {
        return;
    }
    tokio::select! {
        () = woken => {}
        () = tokio::time::sleep(inner.settings.poll_interval) => {}
        () = inner.stop_claiming.cancelled() => {}
    }
}

/// What ended an attempt early.
enum Stop {
    Failed(JobError, bool),
    Cancelled(JobError),
    TimedOut(JobError),
    LeaseLost,
    /// Paused before this step until someone approves it.
    AwaitingApproval(String),
}

/// Writes an ended job's outcome (`record`, its [`Settle::record`]): here, when the store
/// writes it at once (in memory), or in a task of its own while this worker takes the next job
/// (a database's round trip). Answers whether the job's end may let another job be claimed now
/// (see [`after_job`]); an outcome written in its own task wakes a worker for that itself.
///
/// Not an `async fn`, as [`FutureSlot::poll_once`] is not: `record` (several kilobytes) goes
/// into the slot's box when this is called, and is not copied into this function's state first.
fn settle<'a, F>(
    engine: &'a Engine,
    slot: &'a mut FutureSlot<F>,
    record: F,
) -> impl Future<Output = bool> + 'a
where
    F: Future<Output = bool> + Send + 'static,
{
    let polled = slot.poll_once(record);
    async move {
        match polled.await {
            Ok(freed) => freed,
            Err(unfinished) => {
                let waker = engine.clone();
                engine.inner.tracker.spawn(async move {
                    if unfinished.await {
                        waker.inner.wake.notify_one();
                    }
                });
                false
            }
        }
    }
}

/// What a last step that ended well leaves for the outcome's write: its `StepFinished`
/// (written with the outcome) and, when its agent was done before its start was written, that
/// start (see [`LastStart`]), which the outcome waits for or writes instead of the worker.
/// (A start on its way goes on in a task of its own, not a future kept for later: a write on
/// its way may hold the store's turn to write, as the PostgreSQL store's completer does, and
/// must not wait unpolled while its worker waits for something else.)
struct LastStep {
    finished: JobEventKind,
    start: Option<LastStart>,
}

/// The last step's start, when its agent was done before it was written.
enum LastStart {
    /// Written in a task of its own: the agent was done before the start was written, but
    /// not at its first poll.
    OnItsWay(StartOnItsWay),
    /// Not written yet: the agent was done at its first poll and left nothing else to
    /// record, so the step goes whole with the outcome (`JobStore::finish_after_step`).
    WithOutcome(JobEventKind),
}

/// The last step's start, written in a task of its own.
type StartOnItsWay = tokio::task::JoinHandle<Result<(), Stop>>;

/// Waits for a start written in a task of its own: whether the lease still held then.
async fn lease_kept(start: StartOnItsWay) -> bool {
    matches!(start.await, Ok(Ok(())))
}

/// A step's start on its way to the store (see [`write_start`]).
type StartWrite = Pin<Box<dyn Future<Output = Result<(), Stop>> + Send>>;

/// Writes a step's start, fenced by the lease the job holds now, and announces it. Owned, so
/// that the last step's can go on after its worker has taken the next job.
fn write_start(engine: &Engine, lease: &Mutex<Arc<Lease>>, kind: JobEventKind) -> StartWrite {
    let engine = engine.clone();
    let lease = Arc::clone(&lease.lock().unwrap_or_else(|e| e.into_inner()));
    Box::pin(async move {
        let written = engine.inner.store.append(&lease, kind).await;
        if let Some(ev) = event_written(lease.job_id, written)? {
            engine.inner.broadcast(&Arc::new(ev));
        }
        Ok(())
    })
}

/// A job whose work has ended, with what is left to do: write its outcome (fenced by its
/// lease), announce it, and let go of the job. Its worker takes the next job meanwhile; the
/// job keeps its place in its project's count (here and, as a running row, in the store) and
/// one of the engine's places for outcomes on their way (as many as workers: a store that
/// falls behind holds the workers back, not an ever longer line of outcomes).
struct Settle {
    id: JobId,
    project: Arc<str>,
    lease: Lease,
    last: Option<LastStep>,
    finish: Option<Finish>,
    freed: bool,
    done: CancellationToken,
    _place: Option<OwnedSemaphorePermit>,
}

impl Settle {
    /// Writes the outcome and lets go of the job. Answers whether its end may let another job
    /// be claimed (see [`after_job`]).
    async fn record(self, engine: Engine) -> bool {
        let Self {
            id,
            project,
            lease,
            last,
            mut finish,
            mut freed,
            done,
            _place,
        } = self;
        let inner = &engine.inner;
        // Counted in its project (since its claim answered) until its outcome is written, and
        // before a claim is woken for the slot it frees (see `projects`).
        let _in_project = inner.local_projects.started(&project);
        // The last step's start first; one that finds the lease lost ends the attempt as it
        // would have before the step's end.
        let last = match last {
            Some(LastStep { finished, start }) => {
                let started = match start {
                    Some(LastStart::OnItsWay(start)) => {
                        if !lease_kept(start).await {
                            finish = None;
                        }
                        None
                    }
                    Some(LastStart::WithOutcome(started)) => Some(started),
                    None => None,
                };
                Some((finished, started))
            }
            None => None,
        };
        if let Some(finish) = finish {
            // The last step's event, written with the outcome, is announced before it; the
            // job as that step left it is asked for only when observers want it.
            let written = match last {
                // The whole last step with the outcome; the observers are given its end with
                // the job as that end left it, as below (a step's start is not theirs).
                Some((last, Some(started))) => {
                    let observed = !inner.observers.is_empty();
                    match inner
                        .store
                        .finish_after_step(&lease, started, last, finish, observed)
                        .await
                    {
                        Ok(step) => {
                            engine.inner.broadcast(&Arc::new(step.started));
                            let last = Arc::new(step.finished);
                            match &step.between {
                                Some(between) => announce(&engine, between, last).await,
                                None => engine.inner.broadcast(&last),
                            }
                            Ok(step.ended)
                        }
                        Err(e) => Err(e),
                    }
                }
                Some((last, None)) if !inner.observers.is_empty() => {
                    match inner.store.finish_after(&lease, last, finish).await {
                        Ok(done) => {
                            let (between, ev) = done.last;
                            announce(&engine, &between, Arc::new(ev)).await;
                            Ok(done.ended)
                        }
                        Err(e) => Err(e),
                    }
                }
                Some((last, None)) => inner
                    .store
                    .finish_after_event(&lease, last, finish)
                    .await
                    .map(|(ev, ended)| {
                        engine.inner.broadcast(&Arc::new(ev));
                        ended
                    }),
                None => inner.store.finish(&lease, finish).await,
            };
            match written {
                Ok((job, ev)) => {
                    // A retry is queued again.
                    freed |= job.status == JobStatus::Queued;
                    engine.publish(&job, ev).await;
                }
                Err(e) => {
                    freed = true;
                    tracing::warn!(error = %e, job = %id, "could not record the job's outcome");
                }
            }
        } else {
            freed = true;
            tracing::warn!(job = %id, "lease lost; another worker may take the job over");
        }
        inner
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        done.cancel();
        freed
    }
}

/// Runs a job claimed at `claimed_at` (when its claim was sent) until its work ends; what is
/// left (its outcome) is [`Settle::record`]'s, see [`settle`].
async fn run_job(engine: &Engine, claimed: Claimed, claimed_at: tokio::time::Instant) -> Settle {
    let inner = &engine.inner;
    let Claimed {
        job,
        mut lease,
        event,
    } = claimed;
    // Counted in its project (since its claim answered) until its outcome is written: the
    // count goes on in `Settle::record`.
    let in_project = inner.local_projects.started(&job.project_path);
    // Not before the submit that created it published its `queued` event (see `announce`).
    inner.unannounced.wait(job.id).await;
    engine.publish(&job, event).await;
    let id = job.id;
    let token = CancellationToken::new();
    let reason = Arc::new(Mutex::new(None));
    let done = CancellationToken::new();
    let cancelled_meanwhile = {
        let mut running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(
            id,
            RunningJob {
                token: token.clone(),
                reason: Arc::clone(&reason),
                done: done.clone(),
            },
        );
        // A cancel that arrived between the claim and now is honoured at once.
        inner
            .pending_cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    };
    if job.cancel_requested || cancelled_meanwhile {
        stop(&reason, &token, StopReason::User("cancelled by request"));
    }

    // The lease is only known to be ours until `ttl` after the claim was sent. A job that
    // waited for a worker (handed over in a batch, slow observers) for a third of that is
    // renewed before anything runs; one whose lease may be gone does not run at all.
    let ttl = inner.settings.lease_ttl;
    let mut beat_base = claimed_at;
    if claimed_at.elapsed() >= ttl / 3 && !token.is_cancelled() {
        let sent = tokio::time::Instant::now();
        let beat =
            tokio::time::timeout_at(claimed_at + ttl, inner.store.heartbeat(&lease, ttl)).await;
        match beat {
            Ok(Ok(hb)) => {
                beat_base = sent;
                lease = hb.lease;
                if hb.cancel_requested {
                    stop(&reason, &token, StopReason::User("cancelled by request"));
                }
            }
            Ok(Err(StoreError::LeaseLost(_)) | Err(StoreError::NotFound(_))) | Err(_) => {
                tracing::warn!(job = %id, "the job's lease lapsed before it started");
                fence(&reason, &token);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, job = %id, "heartbeat failed");
            }
        }
    }

    // Heartbeats keep the lease; losing it stops the job without further writes. They run
    // beside the job's work in this same task (no task of their own to spawn and join).
    // Shared, so that each write reads it without copying its owner's name.
    let lease_cell = Mutex::new(Arc::new(lease));
    // The last step's `StepFinished`, written with the outcome, and its start when that was
    // still on its way (see `run_steps`).
    let mut last = None;
    let work = async {
        // A job about a pull request runs in a worktree at its head (when workspaces are on).
        let wants_worktree = inner.catalog.get(&job.workflow).and_then(|wf| wf.workspace)
            != Some(crate::workflow::WorkspaceMode::None);
        let workspaces = inner.workspaces.as_ref().filter(|_| wants_worktree);
        // A worktree is made from the project: the project is checked again first (without
        // one, before the first agent gets it; see `run_steps`).
        if workspaces.is_some() {
            if let Err(stop) = recheck_project(engine, &job) {
                return (Err(stop), JobResult::default());
            }
        }
        let steps = |recheck| Steps {
            lease: &lease_cell,
            token: &token,
            reason: &reason,
            recheck,
        };
        // Making the workspace counts against the job's timeout: a remote that stops sending
        // mid-fetch ends the job `timed_out` (and frees the repository's lock) instead of holding
        // a worker for ever.
        let preparing = tokio::time::Instant::now();
        let workspace = match workspaces {
            Some(ws) => tokio::select! {
                r = ws.prepare(&job) => Some(r),
                () = token.cancelled() => None,
                () = tokio::time::sleep_until(crate::util::deadline(preparing, job.timeout)) => {
                    Some(Err(crate::workspace::WorkspaceError::timed_out(job.timeout)))
                }
            },
            None => Some(Ok(None)),
        };
        let (outcome, worktree) = match workspace {
            None => (
                (
                    Err(stop_for(&reason).unwrap_or_else(|| {
                        Stop::Cancelled(JobError::new(
                            "cancelled",
                            "cancelled before the workspace was ready",
                        ))
                    })),
                    JobResult::default(),
                ),
                None,
            ),
            Some(Err(e)) if e.is_timeout() => (
                (
                    Err(Stop::TimedOut(JobError::new("timed_out", e.to_string()))),
                    JobResult::default(),
                ),
                None,
            ),
            Some(Err(e)) => (
                (
                    Err(Stop::Failed(
                        JobError::new("workspace_failed", e.to_string()),
                        false,
                    )),
                    JobResult::default(),
                ),
                None,
            ),
            Some(Ok(None)) => (
                run_steps(engine, &job, steps(workspaces.is_none()), &mut last).await,
                None,
            ),
            Some(Ok(Some(wt))) => {
                let mut at_head = job.clone();
                at_head.project_path = wt.path.display().to_string().into();
                // The steps have what the workspace left of the job's timeout.
                at_head.timeout = job.timeout.saturating_sub(preparing.elapsed());
                (
                    run_steps(engine, &at_head, steps(false), &mut last).await,
                    Some(wt),
                )
            }
        };
        if let (Some(ws), Some(wt)) = (&inner.workspaces, worktree) {
            let ok = matches!(outcome.0, Ok(()) | Err(Stop::AwaitingApproval(_)));
            ws.release(wt, ok).await;
        }
        outcome
    };
    let beat = heartbeat(
        inner.store.as_ref(),
        ttl,
        beat_base,
        &lease_cell,
        &reason,
        &token,
    );
    let outcome = tokio::select! {
        biased;
        outcome = work => outcome,
        never = beat => match never {},
    };
    let lease = lease_cell.into_inner().unwrap_or_else(|e| e.into_inner());
    let lease = Arc::try_unwrap(lease).unwrap_or_else(|shared| Lease::clone(&shared));

    let finish = match outcome {
        (Ok(()), result) => Some(Finish::Completed(result)),
        (Err(Stop::LeaseLost), _) => None,
        (Err(Stop::Cancelled(error)), result) => Some(Finish::Cancelled {
            error,
            result: Some(result),
        }),
        (Err(Stop::TimedOut(error)), result) => Some(Finish::TimedOut {
            error,
            result: Some(result),
        }),
        (Err(Stop::AwaitingApproval(step)), result) => {
            let timeout = inner
                .catalog
                .get(&job.workflow)
                .and_then(|wf| wf.approval_timeout)
                .unwrap_or(inner.settings.approval_timeout);
            let now = Utc::now();
            let expires_at = crate::util::later(now, timeout);
            metrics::counter!("aiwg_approval_requests_total", "workflow" => job.workflow.clone())
                .increment(1);
            Some(Finish::AwaitingApproval {
                result,
                approval: Approval::new(step, now, expires_at).in_attempt(job.attempt),
            })
        }
        (Err(Stop::Failed(error, retryable)), result) => {
            let retry_at = (retryable
                && job.attempt < job.max_attempts
                && !inner.stop_claiming.is_cancelled())
            .then(|| {
                let delay = inner.settings.backoff.delay(job.attempt);
                crate::util::later(Utc::now(), delay)
            });
            Some(Finish::Failed {
                error,
                result: Some(result),
                retry_at,
            })
        }
    };
    // Its end frees a slot a claim may have been refused for.
    let freed = inner.settings.per_project_concurrency.is_some() || job.concurrency_group.is_some();
    in_project.hand_over();
    let place = match Arc::clone(&inner.settling).try_acquire_owned() {
        Ok(place) => Some(place),
        Err(_) => Arc::clone(&inner.settling).acquire_owned().await.ok(),
    };
    Settle {
        id,
        project: job.project_path.clone(),
        lease,
        last,
        finish,
        freed,
        done,
        _place: place,
    }
}

/// What never happens: [`heartbeat`] does not return.
enum Never {}

/// Keeps a running job's lease (in `lease`) until the job's work ends (the caller stops
/// polling this then), and stops the job through `token` when the lease is, or may be, lost.
/// `base` is when the last renewal that succeeded (first, the claim) was sent. It never
/// returns: once it has stopped the job it waits for the work to end.
async fn heartbeat(
    store: &dyn JobStore,
    ttl: Duration,
    base: tokio::time::Instant,
    lease: &Mutex<Arc<Lease>>,
    reason: &Mutex<Option<StopReason>>,
    token: &CancellationToken,
) -> Never {
    // The first beat is a third of a lease after `base` (an immediate first tick would cost a
    // timer turn on every job).
    let period = ttl / 3;
    let mut tick = tokio::time::interval_at(base + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Self-fencing: the lease is only known to be ours until `ttl` after the last beat that
    // succeeded (first, the claim) was sent. A third of a lease before that, without a
    // successful beat (store down, slow, unreachable), the job is stopped here, so its agent
    // is gone before another instance may claim the job.
    let margin = ttl / 3;
    let mut fence_at = base + ttl.saturating_sub(margin);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(fence_at) => {
                fence(reason, token);
                break;
            }
        }
        let current = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sent = tokio::time::Instant::now();
        let beat = tokio::time::timeout_at(fence_at, store.heartbeat(&current, ttl)).await;
        match beat {
            Err(_elapsed) => {
                tracing::warn!(job = %current.job_id, "no heartbeat succeeded within the lease; stopping the job");
                fence(reason, token);
                break;
            }
            Ok(Ok(hb)) => {
                fence_at = sent + ttl.saturating_sub(margin);
                *lease.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(hb.lease);
                if hb.cancel_requested {
                    stop(reason, token, StopReason::User("cancelled by request"));
                }
            }
            Ok(Err(StoreError::LeaseLost(_)) | Err(StoreError::NotFound(_))) => {
                fence(reason, token);
                break;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, job = %current.job_id, "heartbeat failed");
            }
        }
    }
    std::future::pending().await
}

/// Stops a job whose lease is (or may be) no longer ours: no further write is attempted.
fn fence(reason: &Mutex<Option<StopReason>>, token: &CancellationToken) {
    stop(reason, token, StopReason::LeaseLost);
}

/// Stops the job through `token`, recording `why` unless an earlier reason is recorded.
fn stop(reason: &Mutex<Option<StopReason>>, token: &CancellationToken, why: StopReason) {
    record_stop(reason, why);
    token.cancel();
}

/// Records `why` the job stops unless an earlier reason is recorded (its agent already ended:
/// nothing to cancel).
fn record_stop(reason: &Mutex<Option<StopReason>>, why: StopReason) {
    reason
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(why);
}

async fn append(
    engine: &Engine,
    lease: &Mutex<Arc<Lease>>,
    job: &Job,
    kind: JobEventKind,
) -> Result<(), Stop> {
    let current = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let written = engine.inner.store.append(&current, kind).await;
    let Some(ev) = event_written(job.id, written)? else {
        return Ok(());
    };
    let ev = Arc::new(ev);
    if matches!(ev.kind, JobEventKind::StepFinished { ok: true, .. })
        && !engine.inner.observers.is_empty()
    {
        let snapshot = engine.inner.store.get(job.id).await.ok().flatten();
        announce(engine, snapshot.as_ref().unwrap_or(job), ev).await;
    } else {
        announce(engine, job, ev).await;
    }
    Ok(())
}

/// The most agent events of a step written together.
const EVENTS_PER_WRITE: usize = 1024;

/// Writes a step's agent events, `first` and those waiting after it (at most
/// [`EVENTS_PER_WRITE`] in all), in one write ([`JobStore::append_many`]), and sends them to
/// the job's subscribers. While a write is on its way the agent's next events wait, so they
/// are written together: its output is recorded at its own pace, not at one write (on
/// PostgreSQL, one commit) an event.
///
/// [`JobStore::append_many`]: crate::store::JobStore::append_many
async fn append_agent_events(
    engine: &Engine,
    lease: &Mutex<Arc<Lease>>,
    job: &Job,
    step: &Arc<str>,
    first: AgentEvent,
    rx: &mut StepEvents,
    partial: &mut Partial,
) -> Result<(), Stop> {
    let mut events = vec![first];
    rx.try_recv_many(EVENTS_PER_WRITE - 1, &mut events);
    let kinds: Vec<JobEventKind> = events
        .into_iter()
        .map(|event| {
            partial.note(&event);
            JobEventKind::Agent {
                step: Arc::clone(step),
                event,
            }
        })
        .collect();
    let current = lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let written = match engine.inner.store.append_many(&current, kinds).await {
        Ok(written) => written,
        Err(StoreError::LeaseLost(_)) => return Err(Stop::LeaseLost),
        Err(e) => {
            tracing::warn!(error = %e, job = %job.id, "could not record a step's events");
            return Ok(());
        }
    };
    for ev in &written {
        engine.inner.broadcast(ev);
    }
    Ok(())
}

/// What an event's write means for the job's work: the event when it was written; the lease
/// lost, which stops the job; or, when the store failed otherwise, nothing (the job goes on:
/// a warning says what was not recorded).
fn event_written(
    job: JobId,
    written: Result<JobEvent, StoreError>,
) -> Result<Option<JobEvent>, Stop> {
    match written {
        Ok(ev) => Ok(Some(ev)),
        Err(StoreError::LeaseLost(_)) => Err(Stop::LeaseLost),
        Err(e) => {
            tracing::warn!(error = %e, job = %job, "could not record an event");
            Ok(None)
        }
    }
}

/// Sends a written event of a running job to its subscribers and, for a step that finished
/// well, to the observers (with `job` as the event left it).
async fn announce(engine: &Engine, job: &Job, ev: Arc<JobEvent>) {
    engine.inner.broadcast(&ev);
    if matches!(ev.kind, JobEventKind::StepFinished { ok: true, .. }) {
        for o in &engine.inner.observers {
            o.on_event(job, &ev).await;
        }
    }
}

fn stop_for(reason: &Mutex<Option<StopReason>>) -> Option<Stop> {
    match *reason.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(StopReason::User(why)) => Some(Stop::Cancelled(JobError::new("cancelled", why))),
        Some(StopReason::Shutdown) => Some(Stop::Cancelled(JobError::new(
            "shutdown",
            "the server shut down before the job finished",
        ))),
        Some(StopReason::LeaseLost) => Some(Stop::LeaseLost),
        None => None,
    }
}

/// What [`run_steps`] runs a job's steps with.
struct Steps<'a> {
    lease: &'a Mutex<Arc<Lease>>,
    token: &'a CancellationToken,
    reason: &'a Mutex<Option<StopReason>>,
    /// Check the job's project against the policy again before the first agent gets it (not
    /// when it runs in a worktree, made after the same check).
    recheck: bool,
}

/// Checks a job's project against the policy again (see [`ProjectPolicy::recheck`]): the
/// directory the job was admitted with may have been removed, or swapped for a symlink, since
/// its submit (which may also have been answered from `admitted`). A refusal fails the job,
/// without retry.
///
/// [`ProjectPolicy::recheck`]: crate::policy::ProjectPolicy::recheck
fn recheck_project(engine: &Engine, job: &Job) -> Result<(), Stop> {
    engine.inner.policy.recheck(&job.project_path).map_err(|e| {
        tracing::warn!(job = %job.id, error = %e, "the job's project is refused");
        Stop::Failed(JobError::new("project_rejected", e.to_string()), false)
    })
}

/// Runs the job's steps. The last step's successful `StepFinished` is not written here but
/// left in `last`, to be written with the job's outcome
/// ([`JobStore::finish_after`](crate::store::JobStore::finish_after)): one write instead of two.
async fn run_steps(
    engine: &Engine,
    job: &Job,
    steps: Steps<'_>,
    last: &mut Option<LastStep>,
) -> (Result<(), Stop>, JobResult) {
    let Steps {
        lease,
        token,
        reason,
        mut recheck,
    } = steps;
    let inner = &engine.inner;
    let mut result = JobResult::default();
    let Some(crate::workflow::Named {
        workflow: wf,
        steps: names,
        ..
    }) = inner.catalog.get_named(&job.workflow)
    else {
        let e = JobError::new(
            "unknown_workflow",
            format!("workflow `{}` is no longer configured", job.workflow),
        );
        return (Err(Stop::Failed(e, false)), result);
    };
    let deadline = crate::util::deadline(tokio::time::Instant::now(), job.timeout);
    let mut outputs: BTreeMap<String, String> = BTreeMap::new();
    let mut structured: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut last_session: Option<String> = None;
    let mut usage: Option<Usage> = None;
    let mut output_used = 0usize;
    let mut truncation_recorded = false;

    // A retry starts its steps afresh, but what the earlier attempts spent stays spent: the
    // budget caps the whole job, and its cost is every attempt's (the last attempt's result
    // carries the sum so far).
    if !job.resume_after_approval {
        result.cost_usd = job.result.as_ref().and_then(|r| r.cost_usd);
    }
    // A job resuming after an approval continues with the results of the steps it ran.
    if job.resume_after_approval {
        if let Some(done) = &job.result {
            result = JobResult::clone(done);
            result.steps.retain(|s| !s.partial);
            for s in &result.steps {
                outputs.insert(s.name.clone(), s.output.clone());
                if let Some(v) = &s.structured {
                    structured.insert(s.name.clone(), v.clone());
                }
            }
            last_session.clone_from(&result.session_id);
            usage = result.usage;
        }
    }

    let final_step = wf.steps.len().saturating_sub(1);
    for (index, (step, name)) in wf.steps.iter().zip(names).enumerate() {
        if let Some(stop) = stop_for(reason) {
            return (Err(stop), result);
        }
        if result.steps.iter().any(|s| s.name == step.name) {
            continue;
        }
        let spent = result.cost_usd.unwrap_or(0.0);
        if let Some(cap) = job.max_budget_usd.filter(|cap| spent >= *cap) {
            let e = JobError::new(
                "budget_exceeded",
                format!(
                    "the job spent ${spent:.4} of its ${cap:.4} budget before step `{}`",
                    step.name
                ),
            );
            return (Err(Stop::Failed(e, false)), result);
        }
        if step.approval == crate::workflow::ApprovalGate::Required
            && !job.step_approved(&step.name)
        {
            return (Err(Stop::AwaitingApproval(step.name.clone())), result);
        }
        let Some((agent_name, executor)) = inner.registry.named(step.agent.as_deref()) else {
            let e = JobError::new(
                "unknown_agent",
                format!(
                    "agent `{}` is not registered",
                    step.agent.as_deref().unwrap_or_default()
                ),
            );
            return (Err(Stop::Failed(e, false)), result);
        };
        if std::mem::take(&mut recheck) {
            if let Err(stop) = recheck_project(engine, job) {
                return (Err(stop), result);
            }
        }
        let ctx = TemplateContext {
            guidance: job.guidance.as_deref(),
            project_path: &job.project_path,
            params: &job.params,
            trigger: &job.trigger,
            step_outputs: &outputs,
            step_structured: &structured,
        };
        // The prompt, or the argument vector of a command step.
        let rendered = match (&step.prompt, &step.command) {
            (_, Some(argv)) => {
                let args = argv
                    .iter()
                    .map(|a| render(a, &ctx))
                    .collect::<Result<Vec<_>, _>>();
                // A value put into an argument may not make it an option (an agent's output or
                // a forge's field starting with `-`).
                if let Ok(args) = &args {
                    if let Some(i) = argv.iter().zip(args).position(|(template, arg)| {
                        looks_like_an_injected_option(template, arg, &job.params)
                    }) {
                        let e = JobError::new(
                            "invalid_request",
                            format!(
                                "step `{}`: argument {} (`{}`) would start with `-` from the value put into it; a value may not look like an option",
                                step.name,
                                i + 1,
                                argv[i]
                            ),
                        );
                        return (Err(Stop::Failed(e, false)), result);
                    }
                }
                args.map(|v| (String::new(), Some(v)))
            }
            (Some(p), None) => render(p, &ctx).map(|p| (p, None)),
            (None, None) => Ok((String::new(), None)),
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let step_timeout = step.timeout.map_or(remaining, |t| t.min(remaining));
        let job_bound = step.timeout.is_none_or(|t| t >= remaining);
        let mut request = match rendered {
            Ok((prompt, command)) => AgentRequest::of_step(
                job.id,
                step.name.clone(),
                prompt,
                command,
                PathBuf::from(&*job.project_path),
            )
            .with_timeout(step_timeout.max(Duration::from_millis(1)))
            .with_params(BTreeMap::clone(&job.params)),
            Err(e) => {
                return (
                    Err(Stop::Failed(
                        JobError::new("invalid_request", e.to_string()),
                        false,
                    )),
                    result,
                )
            }
        };
        if step.resume {
            request.resume_session = last_session.clone();
        }
        request.max_budget_usd = job.max_budget_usd.map(|cap| cap - spent);
        request.output_schema.clone_from(&step.output_schema);
        if let Err(e) = request.validate() {
            return (
                Err(Stop::Failed(
                    JobError::new("invalid_request", e.to_string()),
                    false,
                )),
                result,
            );
        }
        if step_timeout.is_zero() {
            let e = JobError::new(
                "timed_out",
                format!("the job ran past its timeout of {:?}", job.timeout),
            );
            return (Err(Stop::TimedOut(e)), result);
        }
        // The step's start is recorded while the executor starts, not before: the agent does
        // not wait a commit to begin. Its events are recorded only after the start (the
        // `rx` branch waits for it), and a start that finds the lease lost stops the step as
        // a lost lease does.
        let start_kind = JobEventKind::StepStarted {
            step: Arc::clone(name),
            agent: Arc::clone(&agent_name),
            attempt: job.attempt,
        };

        let started = Instant::now();
        let step_token = token.child_token();
        let budget = inner.settings.max_output_bytes.saturating_sub(output_used);
        let (sink, mut rx) = EventSink::queued(budget, inner.settings.max_line_bytes);
        let probe = sink.clone();
        let exec = executor.execute(request, sink, step_token.clone());
        tokio::pin!(exec);
        let timer = tokio::time::sleep(step_timeout);
        tokio::pin!(timer);
        let mut timed_out = false;
        let mut lost = false;
        let mut partial = Partial::default();
        // The last step's agent is given one poll before its start is written: one that is
        // done then (an executor that answers at once) and left nothing else to record goes
        // whole with the outcome, the step's start included (`JobStore::finish_after_step`:
        // one write instead of two on a database).
        let at_once = if index == final_step {
            std::future::poll_fn(|cx| Poll::Ready(exec.as_mut().poll(cx))).await
        } else {
            Poll::Pending
        };
        let mut last_start = None;
        let outcome = match at_once {
            Poll::Ready(r) if rx.is_empty() && !probe.truncated() => {
                last_start = Some(LastStart::WithOutcome(start_kind));
                r
            }
            // Done at its first poll with events to record: its start is written before them.
            Poll::Ready(r) => {
                if write_start(engine, lease, start_kind).await.is_err() {
                    record_stop(reason, StopReason::LeaseLost);
                }
                r
            }
            Poll::Pending => {
                let mut start_write = write_start(engine, lease, start_kind);
                let mut start_written = false;
                let outcome = loop {
                    tokio::select! {
                        biased;
                        r = &mut start_write, if !start_written => {
                            start_written = true;
                            if r.is_err() {
                                lost = true;
                                fence(reason, &step_token);
                            }
                        }
                        r = &mut exec => break r,
                        ev = rx.recv(), if start_written => {
                            let written =
                                append_agent_events(engine, lease, job, name, ev, &mut rx, &mut partial)
                                    .await;
                            if written.is_err() && !lost {
                                lost = true;
                                fence(reason, &step_token);
                            }
                        }
                        () = &mut timer, if !timed_out => {
                            timed_out = true;
                            step_token.cancel();
                        }
                    }
                };
                // The agent was done before its start was written. The last step's start, when
                // the agent left nothing more to record, goes with the outcome: the worker does
                // not wait for it (see `Settle::record`). Otherwise it is written before anything
                // that follows.
                if !start_written {
                    if index == final_step && rx.is_empty() && !probe.truncated() {
                        last_start = Some(LastStart::OnItsWay(inner.tracker.spawn(start_write)));
                    } else if start_write.await.is_err() {
                        record_stop(reason, StopReason::LeaseLost);
                    }
                }
                outcome
            }
        };
        while let Some(ev) = rx.try_recv() {
            let _ = append_agent_events(engine, lease, job, name, ev, &mut rx, &mut partial).await;
        }
        output_used = output_used.saturating_add(probe.output_bytes());
        if probe.truncated() && !truncation_recorded {
            truncation_recorded = true;
            let kind = JobEventKind::OutputTruncated {
                step: Arc::clone(name),
                limit_bytes: u64::try_from(inner.settings.max_output_bytes).unwrap_or(u64::MAX),
            };
            let _ = append(engine, lease, job, kind).await;
        }
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

        let checked = match (stop_for(reason), timed_out, outcome) {
            (Some(stop), _, _) => Err(stop),
            (None, true, _) => {
                let msg = if job_bound {
                    format!(
                        "the job ran past its timeout of {}",
                        humantime::format_duration(job.timeout)
                    )
                } else {
                    format!(
                        "step `{}` ran past its timeout of {}",
                        step.name,
                        humantime::format_duration(step_timeout)
                    )
                };
                Err(Stop::TimedOut(JobError::new("timed_out", msg)))
            }
            (None, false, Ok(out)) => Ok(out),
            (None, false, Err(e)) => Err(match e {
                ExecutorError::Cancelled => {
                    Stop::Cancelled(JobError::new("cancelled", e.to_string()))
                }
                ExecutorError::TimedOut(_) => {
                    Stop::TimedOut(JobError::new("timed_out", e.to_string()))
                }
                ExecutorError::Limit {
                    partial: ref got, ..
                } => {
                    partial.absorb(got);
                    Stop::Failed(JobError::new(e.kind(), e.to_string()), false)
                }
                e => Stop::Failed(JobError::new(e.kind(), e.to_string()), e.is_retryable()),
            }),
        };
        let checked = match checked {
            Ok(mut out) => match check_structured(step, &mut out) {
                Ok(()) => Ok(out),
                Err(e) => {
                    partial.absorb(&out);
                    Err(Stop::Failed(e, false))
                }
            },
            Err(stop) => Err(stop),
        };
        let out = match checked {
            Ok(out) => out,
            Err(stop) => {
                // The last step's start first, wherever it was to go.
                let start_kept = match last_start.take() {
                    Some(LastStart::OnItsWay(start)) => lease_kept(start).await,
                    Some(LastStart::WithOutcome(kind)) => {
                        append(engine, lease, job, kind).await.is_ok()
                    }
                    None => true,
                };
                if !start_kept {
                    return (Err(Stop::LeaseLost), result);
                }
                let error = match &stop {
                    Stop::Failed(e, _) | Stop::Cancelled(e) | Stop::TimedOut(e) => Some(e.clone()),
                    Stop::LeaseLost | Stop::AwaitingApproval(_) => return (Err(stop), result),
                };
                // The work done so far is kept: what the agent wrote, its session (to resume
                // later) and what it cost.
                if let Some(c) = partial.cost_usd {
                    result.cost_usd = Some(result.cost_usd.unwrap_or(0.0) + c);
                }
                if partial.session_id.is_some() {
                    result.session_id.clone_from(&partial.session_id);
                }
                result.steps.push(StepResult {
                    name: step.name.clone(),
                    agent: agent_name.to_string(),
                    output: partial.text,
                    session_id: partial.session_id,
                    cost_usd: partial.cost_usd,
                    exit_code: None,
                    duration_ms,
                    structured: None,
                    partial: true,
                });
                let kind = JobEventKind::StepFinished {
                    step: Arc::clone(name),
                    ok: false,
                    duration_ms,
                    error,
                };
                let _ = append(engine, lease, job, kind).await;
                return (Err(stop), result);
            }
        };
        let finished = JobEventKind::StepFinished {
            step: Arc::clone(name),
            ok: true,
            duration_ms,
            error: None,
        };
        if index == final_step {
            *last = Some(LastStep {
                finished,
                start: last_start.take(),
            });
        } else if let Err(stop) = append(engine, lease, job, finished).await {
            return (Err(stop), result);
        }
        if out.session_id.is_some() {
            last_session.clone_from(&out.session_id);
        }
        if let Some(c) = out.cost_usd {
            result.cost_usd = Some(result.cost_usd.unwrap_or(0.0) + c);
        }
        if let Some(u) = out.usage {
            usage = Some(usage.unwrap_or_default().add(u));
        }
        // Later steps' templates read the outputs; after the last step nothing does.
        if index < final_step {
            outputs.insert(step.name.clone(), out.output.clone());
        }
        result.summary.clone_from(&out.output);
        result.session_id.clone_from(&last_session);
        result.usage = usage;
        result.steps.push(StepResult {
            name: step.name.clone(),
            agent: agent_name.to_string(),
            output: out.output,
            session_id: out.session_id,
            cost_usd: out.cost_usd,
            exit_code: out.exit_code,
            duration_ms,
            structured: out.structured.clone(),
            partial: false,
        });
        if let Some(v) = out.structured.filter(|_| index < final_step) {
            structured.insert(step.name.clone(), v);
        }
    }
    (Ok(()), result)
}

/// The most text of a stopped step kept in its partial result.
const MAX_PARTIAL_TEXT: usize = 64 * 1024;

/// What a running step produced so far, from its events: kept when the step stops early.
#[derive(Default)]
struct Partial {
    text: String,
    session_id: Option<String>,
    cost_usd: Option<f64>,
}

impl Partial {
    fn note(&mut self, ev: &AgentEvent) {
        match ev {
            AgentEvent::Init {
                session_id: Some(id),
                ..
            } => self.session_id = Some(id.clone()),
            AgentEvent::Text { text } => {
                if !self.text.is_empty() {
                    self.text.push('\n');
                }
                self.text.push_str(text);
                if self.text.len() > MAX_PARTIAL_TEXT {
                    let mut cut = self.text.len() - MAX_PARTIAL_TEXT;
                    while !self.text.is_char_boundary(cut) {
                        cut += 1;
                    }
                    self.text.drain(..cut);
                }
            }
            AgentEvent::Usage {
                cost_usd: Some(c), ..
            } => self.cost_usd = Some(*c),
            _ => {}
        }
    }

    /// Takes what an executor returned with its error (or an invalid answer) over what the
    /// events said.
    fn absorb(&mut self, got: &AgentResult) {
        if !got.output.is_empty() {
            self.text.clone_from(&got.output);
        }
        if got.session_id.is_some() {
            self.session_id.clone_from(&got.session_id);
        }
        if got.cost_usd.is_some() {
            self.cost_usd = got.cost_usd;
        }
    }
}

/// Checks a step's answer against its `output_schema`: the agent's structured answer, or its
/// text parsed as JSON. A missing or invalid answer fails the step (`invalid_output`, not
/// retried), keeping the raw answer.
fn check_structured(step: &crate::workflow::Step, out: &mut AgentResult) -> Result<(), JobError> {
    let Some(schema) = &step.output_schema else {
        return Ok(());
    };
    let invalid = |why: String| {
        Err(JobError::new(
            "invalid_output",
            format!("step `{}` answered {why}", step.name),
        ))
    };
    let value = match out.structured.take() {
        Some(v) => v,
        None => match serde_json::from_str::<serde_json::Value>(strip_fence(&out.output)) {
            Ok(v) => v,
            Err(e) => return invalid(format!("something that is not JSON ({e})")),
        },
    };
    let validator = match jsonschema::validator_for(schema) {
        Ok(v) => v,
        Err(e) => return invalid(format!("but its output_schema is invalid: {e}")),
    };
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .take(5)
        .map(|e| format!("{} at `{}`", e, e.instance_path()))
        .collect();
    if !errors.is_empty() {
        if out.output.is_empty() {
            out.output = value.to_string();
        }
        return invalid(format!(
            "JSON that does not match its output_schema: {}",
            errors.join("; ")
        ));
    }
    out.structured = Some(value);
    Ok(())
}

/// The JSON inside a Markdown code fence, or the text itself.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    t.strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.strip_suffix("```"))
        .map_or(t, str::trim)
}
