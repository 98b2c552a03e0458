//! Self-fencing: a worker whose heartbeats stop succeeding stops its agent before its lease
//! runs out, so no other instance can ever run the job while this one still does.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::ClaimRequest;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobRequest, JobStatus};
use chrono::Utc;

mod hooked_store;
use hooked_store::{engine_on, HookedStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_heartbeats_stops_its_agent_before_the_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    // Heartbeats fail as a database outage would once `down` is set.
    let store = Arc::new(HookedStore::default());
    let agent = ScriptedExecutor::hanging();
    let ttl = Duration::from_secs(3);
    let engine = engine_on(&store, &agent, dir.path())
        .lease_ttl(ttl)
        // Lease recovery by this instance is what "another instance" would do: keep it out.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(agent.wait_started(1, Duration::from_secs(20)).await);
    store.down.store(true, Ordering::SeqCst);

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
