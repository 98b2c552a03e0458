//! Batched claims and hand-overs between an engine's workers: a worker never claims a job
//! while one handed to it waits, so an engine never holds more jobs than it has workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::{
    CancelOutcome, ClaimRequest, Claimed, Created, Finish, Heartbeat, JobPage, JobQuery, Lease,
    NewJob, QueueCounts, StoreError,
};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{
    Engine, Job, JobEvent, JobEventKind, JobId, JobRequest, JobStatus, JobStore, MemoryStore, Step,
    Workflow,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(20);

/// A memory store whose first sweep of expired leases (which worker 0 runs between its look
/// at the hand-over queue and its claim) waits until the test lets it go, as a slow database
/// round trip would.
struct SlowSweep {
    inner: MemoryStore,
    armed: AtomicBool,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl JobStore for SlowSweep {
    async fn create(&self, new: NewJob) -> Result<Created, StoreError> {
        self.inner.create(new).await
    }
    async fn create_many(&self, new: Vec<NewJob>) -> Vec<Result<Created, StoreError>> {
        self.inner.create_many(new).await
    }
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        self.inner.list(query).await
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        self.inner.claim(request).await
    }
    async fn claim_many(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.inner.claim_many(request, max).await
    }
    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> Result<Heartbeat, StoreError> {
        self.inner.heartbeat(lease, ttl).await
    }
    async fn append(&self, lease: &Lease, kind: JobEventKind) -> Result<JobEvent, StoreError> {
        self.inner.append(lease, kind).await
    }
    async fn finish(&self, lease: &Lease, finish: Finish) -> Result<(Job, JobEvent), StoreError> {
        self.inner.finish(lease, finish).await
    }
    async fn request_cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        self.inner.request_cancel(id, reason).await
    }
    async fn events(&self, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError> {
        self.inner.events(id, after).await
    }
    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            let released = self.release.notified();
            self.entered.notify_one();
            released.await;
        }
        self.inner.recover_expired(now).await
    }
    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        self.inner.counts().await
    }
}

/// Worker 1 claims two jobs while worker 0 sweeps, keeps one and hands the other to worker 0.
/// Worker 0, back from its sweep, takes the handed job instead of claiming a third, which no
/// worker would be free to run (it used to: the third job then waited in the hand-over queue
/// behind two jobs that never end, claimed and never started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_from_a_sweep_takes_the_job_handed_to_it_instead_of_claiming() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SlowSweep {
        inner: MemoryStore::new(),
        armed: AtomicBool::new(true),
        entered: Notify::new(),
        release: Notify::new(),
    });
    let agent = ScriptedExecutor::hanging();
    let engine = Engine::builder()
        .store(store.clone())
        .executor("a", Arc::new(agent.clone()))
        .workflow(Workflow::new("w").step(Step::prompt("s", "a", "go")))
        .policy(
            aiwg_core::ProjectPolicy::builder()
                .root(dir.path())
                .build()
                .unwrap(),
        )
        .workers(2)
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    // Worker 0 is in its first sweep.
    tokio::time::timeout(WAIT, store.entered.notified())
        .await
        .expect("worker 0 swept");
    let submitted = engine
        .submit_many((0..3).map(|i| JobRequest::new("w").guidance(format!("{i}"))))
        .await;
    assert!(submitted.iter().all(Result::is_ok));
    // Worker 1 claimed for both idle workers and runs its own job.
    assert!(agent.wait_started(1, WAIT).await, "worker 1 started a job");
    store.release.notify_one();
    assert!(
        agent.wait_started(2, WAIT).await,
        "worker 0 started the job handed to it"
    );
    let held = store
        .inner
        .list(&JobQuery::default().status(JobStatus::Running))
        .await
        .unwrap()
        .jobs
        .len();
    let queued = store.inner.counts().await.unwrap().queued;
    assert_eq!(
        (held, queued),
        (2, 1),
        "two workers hold two jobs; the third stays queued"
    );
    engine.shutdown(Duration::from_millis(500)).await;
}
