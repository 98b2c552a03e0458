//! The store conformance suite: every [`JobStore`] runs it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::step_names;
use crate::event::JobEventKind;
use crate::job::{Job, JobError, JobId, JobResult, JobStatus, Progress, StatusChange, TriggerInfo};
use crate::store::{
    CancelOutcome, ClaimRequest, Created, Finish, JobQuery, JobStore, NewJob, StoreError,
};

/// A queued job for store tests.
#[must_use]
pub fn sample_job(workflow: &str, project: &str, priority: i32) -> Job {
    let now = Utc::now();
    Job {
        id: JobId::new(),
        workflow: workflow.into(),
        project_path: project.into(),
        params: Default::default(),
        guidance: None,
        priority,
        status: JobStatus::Queued,
        attempt: 0,
        max_attempts: 2,
        timeout: Duration::from_secs(60),
        created_at: now,
        started_at: None,
        finished_at: None,
        retry_at: None,
        progress: Progress::pending(["a", "b"]),
        result: None,
        error: None,
        dead_letter: false,
        trigger: TriggerInfo::new("test").into(),
        history: vec![StatusChange {
            status: JobStatus::Queued,
            at: now,
            attempt: 0,
            reason: None,
        }],
        cancel_requested: false,
        idempotency_key: None,
        reply_credentials: Default::default(),
        concurrency_group: None,
        max_budget_usd: None,
        approvals: Vec::new(),
        resume_after_approval: false,
    }
}

async fn create(store: &dyn JobStore, job: Job) -> Job {
    match store.create(NewJob::new(job)).await.expect("create") {
        Created::New(job, ev) => {
            assert_eq!(ev.seq, 1);
            job
        }
        Created::Existing(_) => panic!("a fresh job was reported as existing"),
    }
}

/// Appends `StepStarted` of `step` (attempt 1) under `lease`.
async fn start_step(store: &dyn JobStore, lease: &crate::store::Lease, step: &str) {
    store
        .append(
            lease,
            JobEventKind::StepStarted {
                step: step.into(),
                agent: "x".into(),
                attempt: 1,
            },
        )
        .await
        .unwrap();
}

async fn finish_step(store: &dyn JobStore, lease: &crate::store::Lease, step: &str) {
    store
        .append(
            lease,
            JobEventKind::StepFinished {
                step: step.into(),
                ok: true,
                duration_ms: 1,
                error: None,
            },
        )
        .await
        .unwrap();
}

fn claim_req(owner: &str) -> ClaimRequest {
    ClaimRequest::new(owner, Duration::from_secs(60))
}

/// Runs every store check against fresh stores from `make`. Panics on the first failure.
pub async fn job_store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn JobStore>>,
{
    create_get_and_events(&*make().await).await;
    idempotency(&*make().await).await;
    queue_capacity(&*make().await).await;
    queue_capacity_under_concurrent_submits(make().await).await;
    known_keys_take_no_room(make().await).await;
    claim_order(&*make().await).await;
    retry_and_dead_letter(&*make().await).await;
    per_project_limit(&*make().await).await;
    per_project_limit_in_batches(&*make().await).await;
    per_project_limit_with_groups(&*make().await).await;
    concurrency_groups(&*make().await).await;
    fencing_and_recovery(&*make().await).await;
    cancel(&*make().await).await;
    approvals(&*make().await).await;
    listing(&*make().await).await;
    progress_and_counts(&*make().await).await;
    events_written_together(&*make().await).await;
    finish_after(&*make().await).await;
    finish_after_event(&*make().await).await;
    finish_after_step(&*make().await).await;
    batches(&*make().await).await;
    batch_order_with_keys(&*make().await).await;
}

async fn create_get_and_events(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    let got = store.get(job.id).await.unwrap().expect("stored");
    assert_eq!(got.id, job.id);
    assert_eq!(got.status, JobStatus::Queued);
    let evs = store.events(job.id, 0).await.unwrap();
    assert_eq!(evs.len(), 1);
    assert!(matches!(
        evs[0].kind,
        JobEventKind::Status {
            to: JobStatus::Queued,
            from: None,
            ..
        }
    ));
    assert!(store.events(job.id, 1).await.unwrap().is_empty());
    assert!(store.get(JobId::new()).await.unwrap().is_none());
    assert!(matches!(
        store.events(JobId::new(), 0).await,
        Err(StoreError::NotFound(_))
    ));
    let mut running = sample_job("w", "/p", 0);
    running.status = JobStatus::Running;
    assert!(
        store.create(NewJob::new(running)).await.is_err(),
        "only queued jobs may be created"
    );
}

async fn idempotency(store: &dyn JobStore) {
    let mut a = sample_job("w", "/p", 0);
    a.idempotency_key = Some("key-1".into());
    let first = match store
        .create(NewJob::new(a.clone()).fingerprint("fp1"))
        .await
        .unwrap()
    {
        Created::New(j, _) => j,
        Created::Existing(_) => panic!("first use is new"),
    };
    let mut again = sample_job("w", "/p", 0);
    again.idempotency_key = Some("key-1".into());
    match store
        .create(NewJob::new(again.clone()).fingerprint("fp1"))
        .await
        .unwrap()
    {
        Created::Existing(j) => assert_eq!(j.id, first.id),
        Created::New(..) => panic!("same key and fingerprint must return the first job"),
    }
    assert_eq!(
        store
            .create(NewJob::new(again).fingerprint("fp2"))
            .await
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::IdempotencyConflict { existing: first.id }.to_string())
    );
    assert_eq!(store.counts().await.unwrap().queued, 1);
}

async fn queue_capacity(store: &dyn JobStore) {
    for _ in 0..2 {
        store
            .create(NewJob::new(sample_job("w", "/p", 0)).capacity(2))
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .create(NewJob::new(sample_job("w", "/p", 0)).capacity(2))
            .await
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::QueueFull { capacity: 2 }.to_string())
    );
    // A claimed job frees a queue slot.
    store.claim(&claim_req("w1")).await.unwrap().expect("claim");
    store
        .create(NewJob::new(sample_job("w", "/p", 0)).capacity(2))
        .await
        .unwrap();
}

/// Twenty submits at once into a queue with room for five more: exactly five get in, the
/// others are told the queue is full.
async fn queue_capacity_under_concurrent_submits(store: Arc<dyn JobStore>) {
    let submits: Vec<_> = (0..20)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .create(NewJob::new(sample_job("w", "/p", 0)).capacity(5))
                    .await
            })
        })
        .collect();
    let mut accepted = 0;
    for submit in submits {
        match submit.await.expect("submit task") {
            Ok(Created::New(..)) => accepted += 1,
            Err(StoreError::QueueFull { capacity: 5 }) => {}
            other => panic!("unexpected answer to a submit: {other:?}"),
        }
    }
    assert_eq!(
        accepted, 5,
        "a queue of 5 took exactly 5 of 20 submits at once"
    );
    assert_eq!(store.counts().await.unwrap().queued, 5);
}

/// A submit whose idempotency key a job already has is answered with that job (or refused as a
/// conflict), full queue or not, and takes no room from the other submits that arrive with it:
/// a queue with room for one more, and twenty submits at once of which one is new, takes the
/// new one.
async fn known_keys_take_no_room(store: Arc<dyn JobStore>) {
    let keyed = |key: &str, fingerprint: &str| {
        let mut job = sample_job("w", "/p", 0);
        job.idempotency_key = Some(key.to_owned());
        NewJob::new(job).fingerprint(fingerprint).capacity(3)
    };
    let mut made = Vec::new();
    for key in ["key-a", "key-b"] {
        match store.create(keyed(key, "fp")).await {
            Ok(Created::New(job, _)) => made.push(job.id),
            other => panic!("first use of {key}: {other:?}"),
        }
    }
    let fresh = 7;
    let submits: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&store);
            let new = if i == fresh {
                NewJob::new(sample_job("w", "/p", 0)).capacity(3)
            } else {
                keyed(if i % 2 == 0 { "key-a" } else { "key-b" }, "fp")
            };
            tokio::spawn(async move { (i, store.create(new).await) })
        })
        .collect();
    for submit in submits {
        match submit.await.expect("submit task") {
            (i, Ok(Created::New(..))) if i == fresh => {}
            (i, Ok(Created::Existing(job))) if i != fresh => {
                assert_eq!(job.id, made[i % 2], "submit {i} answered another key's job");
            }
            (i, other) => panic!("submit {i} (the new one is {fresh}): {other:?}"),
        }
    }
    assert_eq!(store.counts().await.unwrap().queued, 3);
    // Full now: a known key still gets its job, or its conflict; a new key does not get in.
    match store.create(keyed("key-a", "fp")).await {
        Ok(Created::Existing(job)) => assert_eq!(job.id, made[0]),
        other => panic!("known key, full queue: {other:?}"),
    }
    assert!(matches!(
        store.create(keyed("key-a", "other")).await,
        Err(StoreError::IdempotencyConflict { existing }) if existing == made[0]
    ));
    assert!(matches!(
        store.create(keyed("key-c", "fp")).await,
        Err(StoreError::QueueFull { capacity: 3 })
    ));
}

async fn claim_order(store: &dyn JobStore) {
    let low = create(store, sample_job("w", "/a", 0)).await;
    let high1 = create(store, sample_job("w", "/b", 5)).await;
    let high2 = create(store, sample_job("w", "/c", 5)).await;
    let mut order = Vec::new();
    while let Some(c) = store.claim(&claim_req("w1")).await.unwrap() {
        assert_eq!(c.job.status, JobStatus::Running);
        assert_eq!(c.job.attempt, 1);
        assert_eq!(c.lease.attempt, 1);
        assert_eq!(c.lease.owner, "w1");
        assert!(matches!(
            c.event.kind,
            JobEventKind::Status {
                to: JobStatus::Running,
                ..
            }
        ));
        order.push(c.job.id);
    }
    assert_eq!(
        order,
        [high1.id, high2.id, low.id],
        "priority first, FIFO within a priority"
    );
}

async fn retry_and_dead_letter(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    assert_eq!(c.job.progress, Progress::pending(["a", "b"]));
    // The first attempt got through step `a` and into `b`.
    start_step(store, &c.lease, "a").await;
    finish_step(store, &c.lease, "a").await;
    start_step(store, &c.lease, "b").await;
    let later = Utc::now() + chrono::Duration::seconds(3600);
    let (j, ev) = store
        .finish(
            &c.lease,
            Finish::Failed {
                error: JobError::new("agent_failed", "boom"),
                result: None,
                retry_at: Some(later),
            },
        )
        .await
        .unwrap();
    assert_eq!(j.status, JobStatus::Queued);
    assert!(!j.dead_letter);
    assert!(matches!(
        ev.kind,
        JobEventKind::Status {
            from: Some(JobStatus::Running),
            to: JobStatus::Queued,
            ..
        }
    ));
    // Not due yet.
    assert!(store.claim(&claim_req("w1")).await.unwrap().is_none());
    let mut due = claim_req("w1");
    due.now = later + chrono::Duration::seconds(1);
    let c2 = store.claim(&due).await.unwrap().expect("due retry");
    assert_eq!(c2.job.id, job.id);
    assert_eq!(c2.job.attempt, 2);
    // The retry starts over: every step pending again, in the workflow's order.
    assert_eq!(c2.job.progress, Progress::pending(["a", "b"]));
    let (j, _) = store
        .finish(
            &c2.lease,
            Finish::Failed {
                error: JobError::new("agent_failed", "boom again"),
                result: Some(JobResult::default()),
                retry_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.dead_letter);
    assert_eq!(j.error.as_ref().unwrap().message, "boom again");
    assert!(j.finished_at.is_some());
    // Finishing again is refused: the lease is gone.
    assert_eq!(
        store
            .finish(&c2.lease, Finish::Completed(JobResult::default()))
            .await
            .map(|_| ())
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::LeaseLost(job.id).to_string())
    );
    let statuses: Vec<_> = j.history.iter().map(|h| h.status).collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Failed
        ]
    );
}

/// At most one job of a concurrency group runs; the others wait in order, and jobs of other
/// groups (or none) pass them.
async fn concurrency_groups(store: &dyn JobStore) {
    let grouped = |n: i32| {
        let mut j = sample_job("w", &format!("/g{n}"), 0);
        j.concurrency_group = Some("octo/app#7".into());
        j
    };
    let g1 = create(store, grouped(1)).await;
    let g2 = create(store, grouped(2)).await;
    let free = create(store, sample_job("w", "/free", 0)).await;
    let req = claim_req("w1");
    let c1 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c1.job.id, g1.id);
    assert_eq!(c1.job.concurrency_group.as_deref(), Some("octo/app#7"));
    let c2 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c2.job.id, free.id, "the second job of the group waits");
    assert!(store.claim(&req).await.unwrap().is_none());
    // The group is listed.
    let q = JobQuery {
        concurrency_group: Some("octo/app#7".into()),
        ..JobQuery::default()
    };
    let listed: Vec<_> = store
        .list(&q)
        .await
        .unwrap()
        .jobs
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(listed, [g2.id, g1.id]);
    store
        .finish(&c1.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let c3 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c3.job.id, g2.id, "the group is free again");
}

async fn per_project_limit(store: &dyn JobStore) {
    let a1 = create(store, sample_job("w", "/same", 0)).await;
    let _a2 = create(store, sample_job("w", "/same", 0)).await;
    let b = create(store, sample_job("w", "/other", 0)).await;
    let req = claim_req("w1").per_project(1);
    let c1 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c1.job.id, a1.id);
    let c2 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c2.job.id, b.id, "the second /same job must wait");
    assert!(store.claim(&req).await.unwrap().is_none());
    store
        .finish(&c1.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let c3 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(&*c3.job.project_path, "/same");
}

/// A batch claim under a per-project limit takes jobs in claim order across projects, no more
/// of a project than its room, and passes over a project at its limit, however many of its
/// jobs wait ahead (or above) the others.
async fn per_project_limit_in_batches(store: &dyn JobStore) {
    let mut jobs = Vec::new();
    for _ in 0..5 {
        jobs.push(create(store, sample_job("w", "/busy", 9)).await);
    }
    let other = create(store, sample_job("w", "/other", 0)).await;
    let low = create(store, sample_job("w", "/low", -1)).await;
    let second = create(store, sample_job("w", "/other", 0)).await;
    let req = claim_req("w1").per_project(2);
    let first = store.claim_many(&req, 3).await.unwrap();
    let ids: Vec<_> = first.iter().map(|c| c.job.id).collect();
    assert_eq!(
        ids,
        [jobs[0].id, jobs[1].id, other.id],
        "claim order, two /busy at most"
    );
    let rest = store.claim_many(&req, 10).await.unwrap();
    let ids: Vec<_> = rest.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [second.id, low.id], "the full project is passed over");
    assert!(store.claim_many(&req, 10).await.unwrap().is_empty());
    for c in first.iter().chain(&rest) {
        assert_eq!(c.job.status, JobStatus::Running);
        assert_eq!(c.lease.job_id, c.job.id);
    }
    // A slot freed in /busy lets exactly one more of its jobs start.
    store
        .finish(&first[0].lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let next = store.claim_many(&req, 10).await.unwrap();
    let ids: Vec<_> = next.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [jobs[2].id]);
    // A job not yet due does not count, and takes no room.
    let mut later = sample_job("w", "/later", 0);
    later.retry_at = Some(Utc::now() + chrono::Duration::hours(1));
    let later = create(store, later).await;
    let soon = create(store, sample_job("w", "/later", 0)).await;
    let got = store.claim_many(&req, 10).await.unwrap();
    let ids: Vec<_> = got.iter().map(|c| c.job.id).collect();
    assert_eq!(ids, [soon.id], "{} is not due", later.id);
}

/// Per-project limits and concurrency groups together: a job whose group is busy is passed
/// over and the next job of its project starts instead; one job per group in a batch.
async fn per_project_limit_with_groups(store: &dyn JobStore) {
    let grouped = |project: &str| {
        let mut j = sample_job("w", project, 0);
        j.concurrency_group = Some("octo/app#9".into());
        j
    };
    let g1 = create(store, grouped("/a")).await;
    let g2 = create(store, grouped("/b")).await;
    let plain_b = create(store, sample_job("w", "/b", 0)).await;
    let g3 = create(store, grouped("/c")).await;
    let req = claim_req("w1").per_project(1);
    let got = store.claim_many(&req, 10).await.unwrap();
    let ids: Vec<_> = got.iter().map(|c| c.job.id).collect();
    assert_eq!(
        ids,
        [g1.id, plain_b.id],
        "one job of the group, and /b's next job instead of its grouped one"
    );
    assert!(store.claim_many(&req, 10).await.unwrap().is_empty());
    store
        .finish(&got[0].lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    // The group is free, /b is full: /c's grouped job starts, /b's waits.
    let c = store.claim(&req).await.unwrap().expect("the group is free");
    assert_eq!(c.job.id, g3.id, "{} waits for /b", g2.id);
}

async fn fencing_and_recovery(store: &dyn JobStore) {
    let mut job = sample_job("w", "/p", 0);
    job.max_attempts = 2;
    let job = create(store, job).await;
    let mut req = ClaimRequest::new("w1", Duration::from_millis(200));
    let c = store.claim(&req).await.unwrap().unwrap();
    // Heartbeat extends and reports no cancel.
    let hb = store
        .heartbeat(&c.lease, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!hb.cancel_requested);
    assert!(hb.lease.expires_at >= c.lease.expires_at);
    let ev = store
        .append(
            &hb.lease,
            JobEventKind::Log {
                level: "info".into(),
                message: "hi".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(ev.seq, 3);
    // A forged token is refused.
    let mut forged = hb.lease.clone();
    forged.token = forged.token.wrapping_add(1000);
    assert_eq!(
        store
            .append(
                &forged,
                JobEventKind::Log {
                    level: "info".into(),
                    message: "x".into()
                }
            )
            .await
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::LeaseLost(job.id).to_string())
    );
    // Status events cannot be appended directly.
    assert!(store
        .append(
            &hb.lease,
            JobEventKind::status(None, JobStatus::Completed, 1)
        )
        .await
        .is_err());
    // After expiry, recovery requeues and the old worker is fenced out.
    let after = hb.lease.expires_at + chrono::Duration::milliseconds(1);
    let recovered = store.recover_expired(after).await.unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].0.status, JobStatus::Queued);
    assert!(store.recover_expired(after).await.unwrap().is_empty());
    req.now = after;
    req.owner = "w2".into();
    let c2 = store.claim(&req).await.unwrap().unwrap();
    assert_eq!(c2.job.attempt, 2);
    assert_ne!(c2.lease.token, c.lease.token);
    assert_eq!(
        store
            .finish(&hb.lease, Finish::Completed(JobResult::default()))
            .await
            .map(|_| ())
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::LeaseLost(job.id).to_string())
    );
    assert_eq!(
        store
            .heartbeat(&hb.lease, Duration::from_secs(1))
            .await
            .map(|_| ())
            .err()
            .map(|e| e.to_string()),
        Some(StoreError::LeaseLost(job.id).to_string())
    );
    let (done, _) = store
        .finish(
            &c2.lease,
            Finish::Completed(JobResult {
                summary: "ok".into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.result.unwrap().summary, "ok");
    // Out of attempts: an expired lease fails the job.
    let mut once = sample_job("w", "/p", 0);
    once.max_attempts = 1;
    let once = create(store, once).await;
    let mut r = ClaimRequest::new("w1", Duration::from_millis(100));
    r.now = after;
    let c = store.claim(&r).await.unwrap().unwrap();
    assert_eq!(c.job.id, once.id);
    let rec = store
        .recover_expired(c.lease.expires_at + chrono::Duration::milliseconds(1))
        .await
        .unwrap();
    assert_eq!(rec[0].0.status, JobStatus::Failed);
    assert!(rec[0].0.dead_letter);
    assert_eq!(rec[0].0.error.as_ref().unwrap().kind, "lease_lost");
}

/// Pauses `job` (claimed by `owner`) before step `b`, after step `a`, for `wait`.
async fn pause(store: &dyn JobStore, owner: &str, wait: chrono::Duration) -> (Job, u32) {
    let c = store
        .claim(&claim_req(owner))
        .await
        .unwrap()
        .expect("a job");
    let attempt = c.job.attempt;
    let mut result = JobResult::default();
    result.steps.push(crate::job::StepResult {
        name: "a".into(),
        output: "did a".into(),
        ..Default::default()
    });
    let now = Utc::now();
    let (job, ev) = store
        .finish(
            &c.lease,
            Finish::AwaitingApproval {
                result,
                approval: crate::job::Approval::new("b", now, now + wait).in_attempt(attempt),
            },
        )
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::AwaitingApproval);
    assert!(!ev.is_terminal());
    assert_eq!(job.pending_approval().map(|a| a.step.as_str()), Some("b"));
    (job, attempt)
}

async fn approvals(store: &dyn JobStore) {
    use crate::job::ApprovalDecision;
    use crate::store::ApprovalOutcome;
    // A waiting job holds no lease and is not claimable.
    let job = create(store, sample_job("w", "/p", 0)).await;
    let (_, attempt) = pause(store, "w1", chrono::Duration::hours(1)).await;
    assert!(store.claim(&claim_req("w2")).await.unwrap().is_none());
    assert_eq!(store.counts().await.unwrap().running, 0);
    // Approving puts it back in the queue; the next claim resumes the same attempt with the
    // results so far.
    let ApprovalOutcome::Decided(approved, ev) = store
        .decide_approval(job.id, ApprovalDecision::new(true, "alice", "api"))
        .await
        .unwrap()
    else {
        panic!("a waiting job is decided");
    };
    assert_eq!(approved.status, JobStatus::Queued);
    assert!(approved.resume_after_approval);
    assert!(matches!(
        ev.kind,
        crate::event::JobEventKind::Status {
            to: JobStatus::Queued,
            ..
        }
    ));
    assert!(approved.step_approved("b"));
    assert_eq!(approved.approvals[0].decision.as_ref().unwrap().by, "alice");
    // A second decision finds nothing waiting.
    assert!(matches!(
        store
            .decide_approval(job.id, ApprovalDecision::new(true, "bob", "api"))
            .await
            .unwrap(),
        ApprovalOutcome::NotWaiting(j) if j.status == JobStatus::Queued
    ));
    let c = store
        .claim(&claim_req("w2"))
        .await
        .unwrap()
        .expect("resumed");
    assert_eq!(c.job.id, job.id);
    assert_eq!(c.job.attempt, attempt, "resuming is not a new attempt");
    assert_eq!(c.job.result.as_ref().unwrap().steps[0].output, "did a");
    let (done, _) = store
        .finish(&c.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    assert!(!done.resume_after_approval);

    // Rejecting ends it cancelled, with the results so far.
    let job = create(store, sample_job("w", "/p", 0)).await;
    pause(store, "w1", chrono::Duration::hours(1)).await;
    let ApprovalOutcome::Decided(rejected, ev) = store
        .decide_approval(job.id, ApprovalDecision::new(false, "carol", "github"))
        .await
        .unwrap()
    else {
        panic!("a waiting job is decided");
    };
    assert_eq!(rejected.status, JobStatus::Cancelled);
    assert!(ev.is_terminal());
    assert_eq!(rejected.error.as_ref().unwrap().kind, "rejected");
    assert_eq!(rejected.result.as_ref().unwrap().steps.len(), 1);

    // A cancel ends a waiting job at once.
    let job = create(store, sample_job("w", "/p", 0)).await;
    pause(store, "w1", chrono::Duration::hours(1)).await;
    assert!(matches!(
        store.request_cancel(job.id, "stop").await.unwrap(),
        CancelOutcome::Cancelled(j, _) if j.status == JobStatus::Cancelled
    ));

    // An expired approval ends the job once, whoever sweeps.
    let job = create(store, sample_job("w", "/p", 0)).await;
    pause(store, "w1", chrono::Duration::milliseconds(1)).await;
    let later = Utc::now() + chrono::Duration::seconds(1);
    let expired = store.expire_approvals(later).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].0.id, job.id);
    assert_eq!(expired[0].0.status, JobStatus::Cancelled);
    assert_eq!(
        expired[0].0.error.as_ref().unwrap().kind,
        "approval_timeout"
    );
    assert!(store.expire_approvals(later).await.unwrap().is_empty());
    // A job that is not waiting is not decided, and an unknown one is not found.
    assert!(matches!(
        store
            .decide_approval(job.id, ApprovalDecision::new(true, "x", "api"))
            .await
            .unwrap(),
        ApprovalOutcome::NotWaiting(_)
    ));
    assert!(matches!(
        store
            .decide_approval(JobId::new(), ApprovalDecision::new(true, "x", "api"))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

async fn cancel(store: &dyn JobStore) {
    let queued = create(store, sample_job("w", "/p", 0)).await;
    match store.request_cancel(queued.id, "stop").await.unwrap() {
        CancelOutcome::Cancelled(j, ev) => {
            assert_eq!(j.status, JobStatus::Cancelled);
            assert!(ev.is_terminal());
        }
        other => panic!("queued job should be cancelled at once, got {other:?}"),
    }
    assert!(
        store.claim(&claim_req("w1")).await.unwrap().is_none(),
        "a cancelled job is not claimable"
    );
    assert!(matches!(
        store.request_cancel(queued.id, "again").await.unwrap(),
        CancelOutcome::AlreadyFinished(j) if j.status == JobStatus::Cancelled
    ));
    let running = create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    assert_eq!(c.job.id, running.id);
    assert!(matches!(
        store.request_cancel(running.id, "stop").await.unwrap(),
        CancelOutcome::Requested(_)
    ));
    assert!(
        store
            .heartbeat(&c.lease, Duration::from_secs(60))
            .await
            .unwrap()
            .cancel_requested
    );
    let (j, _) = store
        .finish(
            &c.lease,
            Finish::Cancelled {
                error: JobError::new("cancelled", "stop"),
                result: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(j.status, JobStatus::Cancelled);
    assert!(matches!(
        store.request_cancel(JobId::new(), "x").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn listing(store: &dyn JobStore) {
    let mut ids = Vec::new();
    for i in 0..7 {
        let wf = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(create(store, sample_job(wf, "/p", 0)).await.id);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let mut q = JobQuery::default().limit(3);
        q.cursor = cursor;
        let page = store.list(&q).await.unwrap();
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, ids, "newest first, every job once");
    let odd = store
        .list(&JobQuery::default().workflow("odd"))
        .await
        .unwrap();
    assert_eq!(odd.jobs.len(), 3);
    assert!(odd.jobs.iter().all(|j| &*j.workflow == "odd"));
    store.claim(&claim_req("w1")).await.unwrap().unwrap();
    let running = store
        .list(&JobQuery::default().status(JobStatus::Running))
        .await
        .unwrap();
    assert_eq!(running.jobs.len(), 1);
    let queued = store
        .list(&JobQuery::default().status(JobStatus::Queued))
        .await
        .unwrap();
    assert_eq!(queued.jobs.len(), 6);
}

async fn progress_and_counts(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    assert_eq!(c.job.id, job.id);
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (1, 1));
    start_step(store, &c.lease, "a").await;
    let j = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(step_names(&j.progress.in_progress), ["a"]);
    assert_eq!(step_names(&j.progress.pending), ["b"]);
    finish_step(store, &c.lease, "a").await;
    let j = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(step_names(&j.progress.completed), ["a"]);
    assert!(j.progress.in_progress.is_empty());
    let evs = store.events(job.id, 0).await.unwrap();
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    store
        .finish(&c.lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (1, 0));
}

/// `append_many` writes a running job's events as `append` would one after the other: numbered
/// in their order after the job's last event, a step's start among them moving the progress;
/// nothing under a lease no longer held.
async fn events_written_together(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    let line = |text: &str| JobEventKind::Agent {
        step: "a".into(),
        event: crate::executor::AgentEvent::Log {
            stream: crate::executor::LogStream::Stdout,
            line: text.into(),
        },
    };
    let text_of = |kind: &JobEventKind| match kind {
        JobEventKind::Agent {
            event: crate::executor::AgentEvent::Log { line, .. },
            ..
        } => line.clone(),
        JobEventKind::StepStarted { step, .. } => format!("started {step}"),
        other => panic!("unexpected event {other:?}"),
    };
    assert!(store
        .append_many(&c.lease, Vec::new())
        .await
        .unwrap()
        .is_empty());
    let kinds = vec![
        line("one"),
        JobEventKind::StepStarted {
            step: "a".into(),
            agent: "x".into(),
            attempt: 1,
        },
        line("two"),
        line("three"),
    ];
    let written = store.append_many(&c.lease, kinds).await.unwrap();
    let answered: Vec<(u64, String)> = written.iter().map(|e| (e.seq, text_of(&e.kind))).collect();
    let expected: Vec<(u64, String)> = [(3, "one"), (4, "started a"), (5, "two"), (6, "three")]
        .map(|(seq, text)| (seq, text.to_owned()))
        .into();
    assert_eq!(answered, expected);
    assert!(written.iter().all(|e| e.job_id == job.id));
    let stored: Vec<(u64, String)> = store.events(job.id, 2).await.unwrap()[..]
        .iter()
        .map(|e| (e.seq, text_of(&e.kind)))
        .collect();
    assert_eq!(stored, expected);
    let j = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(step_names(&j.progress.in_progress), ["a"]);
    // Many lines at once, then one more alone: numbered on, without a gap.
    let many: Vec<JobEventKind> = (0..300).map(|i| line(&format!("line {i}"))).collect();
    let written = store.append_many(&c.lease, many).await.unwrap();
    assert_eq!(written.first().map(|e| e.seq), Some(7));
    assert_eq!(written.last().map(|e| e.seq), Some(306));
    assert_eq!(text_of(&written[299].kind), "line 299");
    assert_eq!(
        store.append(&c.lease, line("after")).await.unwrap().seq,
        307
    );
    // A lease no longer held writes nothing.
    let mut forged = c.lease.clone();
    forged.token = forged.token.wrapping_add(1000);
    assert!(matches!(
        store.append_many(&forged, vec![line("x"), line("y")]).await,
        Err(StoreError::LeaseLost(id)) if id == job.id
    ));
    let all = store.events(job.id, 0).await.unwrap();
    assert_eq!(all.len(), 307);
    assert!(all.iter().zip(1..).all(|(e, seq)| e.seq == seq));
}

/// `finish_after` writes the last event and the outcome as `append` then `finish` would, or
/// neither: under a lease no longer held, or with a status event as the last event.
async fn finish_after(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    start_step(store, &c.lease, "a").await;
    let finished = JobEventKind::StepFinished {
        step: "a".into(),
        ok: true,
        duration_ms: 1,
        error: None,
    };
    let result = JobResult {
        summary: "done".into(),
        ..JobResult::default()
    };
    // A status event is the store's to write: refused, nothing written.
    assert!(store
        .finish_after(
            &c.lease,
            JobEventKind::status(Some(JobStatus::Running), JobStatus::Completed, 1),
            Finish::Completed(result.clone()),
        )
        .await
        .is_err());
    assert_eq!(store.events(job.id, 0).await.unwrap().len(), 3);
    let mut stale = c.lease.clone();
    stale.token += 1;
    assert!(matches!(
        store
            .finish_after(&stale, finished.clone(), Finish::Completed(result.clone()))
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(
        store.events(job.id, 0).await.unwrap().len(),
        3,
        "nothing written under a lease not held"
    );

    let done = store
        .finish_after(&c.lease, finished.clone(), Finish::Completed(result))
        .await
        .unwrap();
    let (between, last) = &done.last;
    assert_eq!((last.seq, &last.kind), (4, &finished));
    assert_eq!(between.status, JobStatus::Running);
    assert_eq!(step_names(&between.progress.completed), ["a"]);
    let (ended, ev) = &done.ended;
    assert_eq!(ev.seq, 5);
    assert!(matches!(
        ev.kind,
        JobEventKind::Status {
            from: Some(JobStatus::Running),
            to: JobStatus::Completed,
            ..
        }
    ));
    assert_eq!(ended.status, JobStatus::Completed);
    assert_eq!(step_names(&ended.progress.completed), ["a"]);
    assert_eq!(
        ended.result.as_ref().map(|r| r.summary.as_str()),
        Some("done")
    );
    let stored = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(stored.status, JobStatus::Completed);
    assert_eq!(step_names(&stored.progress.completed), ["a"]);
    let evs = store.events(job.id, 0).await.unwrap();
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(&evs[3], last);
    assert_eq!(&evs[4], ev);
    // The lease is released: the job is no longer running.
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 0));
}

/// `finish_after_event` writes what `finish_after` writes, or nothing, and answers the same
/// events and ended job (without the job between them).
async fn finish_after_event(store: &dyn JobStore) {
    let job = create(store, sample_job("w", "/p", 0)).await;
    let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
    start_step(store, &c.lease, "a").await;
    let finished = JobEventKind::StepFinished {
        step: "a".into(),
        ok: false,
        duration_ms: 1,
        error: Some(JobError::new("agent_failed", "boom")),
    };
    let failed = || Finish::Failed {
        error: JobError::new("agent_failed", "boom"),
        result: None,
        retry_at: None,
    };
    // A status event is the store's to write; a lease not held writes nothing.
    assert!(store
        .finish_after_event(
            &c.lease,
            JobEventKind::status(Some(JobStatus::Running), JobStatus::Completed, 1),
            failed(),
        )
        .await
        .is_err());
    let mut stale = c.lease.clone();
    stale.token += 1;
    assert!(matches!(
        store
            .finish_after_event(&stale, finished.clone(), failed())
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(store.events(job.id, 0).await.unwrap().len(), 3);

    let (last, (ended, ev)) = store
        .finish_after_event(&c.lease, finished.clone(), failed())
        .await
        .unwrap();
    assert_eq!((last.seq, &last.kind), (4, &finished));
    assert_eq!(ev.seq, 5);
    assert_eq!(ended.status, JobStatus::Failed);
    assert_eq!(
        ended.error.as_ref().map(|e| e.kind.as_str()),
        Some("agent_failed")
    );
    let evs = store.events(job.id, 0).await.unwrap();
    assert_eq!((&evs[3], &evs[4]), (&last, &ev));
    assert_eq!(store.get(job.id).await.unwrap().unwrap(), ended);
    let counts = store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 0));
}

/// `finish_after_step` writes a last step's start, its end and the outcome as `append` then
/// `finish_after` would, or none of them: under a lease no longer held, or with a status event
/// as either step event; it answers the job between the step's end and the outcome when asked.
async fn finish_after_step(store: &dyn JobStore) {
    for with_job in [false, true] {
        let job = create(store, sample_job("w", "/p", 0)).await;
        let c = store.claim(&claim_req("w1")).await.unwrap().unwrap();
        assert_eq!(c.job.id, job.id);
        let started = JobEventKind::StepStarted {
            step: "a".into(),
            agent: "x".into(),
            attempt: 1,
        };
        let finished = JobEventKind::StepFinished {
            step: "a".into(),
            ok: true,
            duration_ms: 1,
            error: None,
        };
        let completed = || {
            Finish::Completed(JobResult {
                summary: "done".into(),
                ..JobResult::default()
            })
        };
        let status = || JobEventKind::status(Some(JobStatus::Running), JobStatus::Completed, 1);
        // A status event is the store's to write; a lease not held writes nothing.
        for (first, last) in [(status(), finished.clone()), (started.clone(), status())] {
            assert!(store
                .finish_after_step(&c.lease, first, last, completed(), with_job)
                .await
                .is_err());
        }
        let mut stale = c.lease.clone();
        stale.token += 1;
        assert!(matches!(
            store
                .finish_after_step(
                    &stale,
                    started.clone(),
                    finished.clone(),
                    completed(),
                    with_job
                )
                .await,
            Err(StoreError::LeaseLost(_))
        ));
        assert_eq!(
            store.events(job.id, 0).await.unwrap().len(),
            2,
            "nothing written under a lease not held, nor with a status event"
        );

        let step = store
            .finish_after_step(
                &c.lease,
                started.clone(),
                finished.clone(),
                completed(),
                with_job,
            )
            .await
            .unwrap();
        assert_eq!((step.started.seq, &step.started.kind), (3, &started));
        assert_eq!((step.finished.seq, &step.finished.kind), (4, &finished));
        match &step.between {
            Some(between) => {
                assert!(with_job, "the job between, only when asked for");
                assert_eq!(between.status, JobStatus::Running);
                assert_eq!(step_names(&between.progress.completed), ["a"]);
            }
            None => assert!(!with_job, "the job between, asked for"),
        }
        let (ended, ev) = &step.ended;
        assert_eq!(ev.seq, 5);
        assert!(matches!(
            ev.kind,
            JobEventKind::Status {
                from: Some(JobStatus::Running),
                to: JobStatus::Completed,
                ..
            }
        ));
        assert_eq!(ended.status, JobStatus::Completed);
        assert_eq!(step_names(&ended.progress.completed), ["a"]);
        assert!(ended.progress.in_progress.is_empty());
        let evs = store.events(job.id, 0).await.unwrap();
        assert_eq!(
            evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            (&evs[2], &evs[3], &evs[4]),
            (&step.started, &step.finished, ev)
        );
        assert_eq!(&store.get(job.id).await.unwrap().unwrap(), ended);
        let counts = store.counts().await.unwrap();
        assert_eq!((counts.queued, counts.running), (0, 0));
    }
}

/// A batch enters the queue in the order given, jobs with a new idempotency key among the
/// others (a store may write those one at a time): jobs of one priority are claimed in that
/// order.
async fn batch_order_with_keys(store: &dyn JobStore) {
    let jobs: Vec<Job> = (0..5)
        .map(|i| {
            let mut job = sample_job("w", &format!("/o{i}"), 0);
            if i % 2 == 1 {
                job.idempotency_key = Some(format!("order-key-{i}"));
            }
            job
        })
        .collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    for created in store
        .create_many(jobs.into_iter().map(NewJob::new).collect())
        .await
    {
        assert!(matches!(created, Ok(Created::New(..))), "{created:?}");
    }
    let mut claimed = Vec::new();
    while let Some(c) = store.claim(&claim_req("w")).await.unwrap() {
        claimed.push(c.job.id);
    }
    assert_eq!(claimed, ids, "claimed in the order submitted");
}

/// `create_many` answers each job as `create` would (capacity, idempotency, order), and
/// `claim_many` takes jobs in claim order, each under its own lease, one per concurrency group.
async fn batches(store: &dyn JobStore) {
    let mut keyed = sample_job("w", "/p", 0);
    keyed.idempotency_key = Some("batch-key".into());
    let first = create(store, keyed.clone()).await;
    let mut again = sample_job("w", "/p", 0);
    again.idempotency_key = Some("batch-key".into());
    let grouped = |n: i32| {
        let mut j = sample_job("w", &format!("/g{n}"), 0);
        j.concurrency_group = Some("batch-group".into());
        j
    };
    let jobs = vec![
        sample_job("w", "/a", 0),
        grouped(1),
        grouped(2),
        sample_job("w", "/b", 0),
        sample_job("w", "/c", 0),
    ];
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let mut batch: Vec<NewJob> = jobs
        .into_iter()
        .map(|j| NewJob::new(j).capacity(5))
        .collect();
    batch.insert(1, NewJob::new(again).capacity(5));
    let answers = store.create_many(batch).await;
    assert_eq!(answers.len(), 6);
    match &answers[1] {
        Ok(Created::Existing(j)) => assert_eq!(j.id, first.id),
        other => panic!("a known key finds its job, got {other:?}"),
    }
    // One job was queued before: four more fit in a capacity of five, the last is refused.
    for answer in [&answers[0], &answers[2], &answers[3], &answers[4]] {
        match answer {
            Ok(Created::New(job, ev)) => {
                assert_eq!(ev.seq, 1);
                assert_eq!(ev.job_id, job.id);
                assert_eq!(job.status, JobStatus::Queued);
            }
            other => panic!("expected a new job, got {other:?}"),
        }
    }
    assert!(
        matches!(answers[5], Err(StoreError::QueueFull { capacity: 5 })),
        "{:?}",
        answers[5]
    );
    assert!(
        store.get(ids[4]).await.unwrap().is_none(),
        "a refused job is not stored"
    );
    for id in &ids[..4] {
        let evs = store.events(*id, 0).await.unwrap();
        assert_eq!(evs.len(), 1, "one queued event each");
    }

    // Claim order: the keyed job, then the batch in order; one job of the group.
    let claimed = store.claim_many(&claim_req("w1"), 10).await.unwrap();
    let order: Vec<JobId> = claimed.iter().map(|c| c.job.id).collect();
    assert_eq!(order, [first.id, ids[0], ids[1], ids[3]]);
    let mut tokens: Vec<u64> = claimed.iter().map(|c| c.lease.token).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 4, "every claim has its own lease");
    for c in &claimed {
        assert_eq!(c.job.status, JobStatus::Running);
        assert_eq!((c.job.attempt, c.lease.attempt), (1, 1));
        assert_eq!(c.lease.job_id, c.job.id);
        assert_eq!(c.event.seq, 2);
        let stored = store.get(c.job.id).await.unwrap().unwrap();
        assert_eq!(stored.status, JobStatus::Running);
    }
    assert!(
        store
            .claim_many(&claim_req("w2"), 10)
            .await
            .unwrap()
            .is_empty(),
        "the group's second job waits"
    );
    // Each lease fences its own job only.
    assert!(matches!(
        store
            .append(
                &crate::store::Lease {
                    job_id: claimed[1].job.id,
                    ..claimed[2].lease.clone()
                },
                JobEventKind::Log {
                    level: "info".into(),
                    message: "x".into()
                }
            )
            .await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .finish(&claimed[2].lease, Finish::Completed(JobResult::default()))
        .await
        .unwrap();
    let next = store.claim_many(&claim_req("w2"), 10).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.job.id).collect::<Vec<_>>(),
        [ids[2]],
        "the group is free again"
    );
    assert_eq!(store.counts().await.unwrap().queued, 0);
    create(store, sample_job("w", "/d", 0)).await;
    assert!(store
        .claim_many(&claim_req("w2"), 0)
        .await
        .unwrap()
        .is_empty());
}
