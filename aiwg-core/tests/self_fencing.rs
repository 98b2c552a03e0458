//! Self-fencing: a worker whose heartbeats stop succeeding stops its agent before its lease
//! runs out, so no other instance can ever run the job while this one still does.

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

/// A memory store whose heartbeats fail as a database outage would (a backend error), once
/// `outage` is set.
struct Outage {
    inner: MemoryStore,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl JobStore for Outage {
    async fn create(&self, new: NewJob) -> Result<Created, StoreError> {
        self.inner.create(new).await
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
    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> Result<Heartbeat, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::backend("the database is unreachable"));
        }
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
        self.inner.recover_expired(now).await
    }
    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        self.inner.counts().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_heartbeats_stops_its_agent_before_the_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Outage {
        inner: MemoryStore::new(),
        down: std::sync::atomic::AtomicBool::new(false),
    });
    let agent = ScriptedExecutor::hanging();
    let ttl = Duration::from_secs(3);
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
        .lease_ttl(ttl)
        // Lease recovery by this instance is what "another instance" would do: keep it out.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(agent.wait_started(1, Duration::from_secs(20)).await);
    store.down.store(true, std::sync::atomic::Ordering::SeqCst);

    // The agent is stopped, and at that moment the lease it ran under is still unexpired:
    // nobody else could have claimed the job yet.
    assert!(
        agent.wait_cancelled(1, Duration::from_secs(20)).await,
        "the agent was stopped"
    );
    let stopped_at = Utc::now();
    let held = store.inner.get(job.id).await.unwrap().unwrap();
    assert_eq!(held.status, JobStatus::Running, "no outcome was written");
    let claim = store
        .inner
        .claim(&ClaimRequest::new("other-instance", ttl))
        .await
        .unwrap();
    assert!(
        claim.is_none(),
        "the lease was still held when the agent stopped"
    );
    let expired = store.inner.recover_expired(stopped_at).await.unwrap();
    assert!(
        expired.is_empty(),
        "the lease had not expired when the agent stopped"
    );
    engine.shutdown(Duration::from_secs(1)).await;
}
