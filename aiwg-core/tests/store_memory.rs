//! The store conformance suite on the in-memory store.

use std::sync::Arc;

use aiwg_core::test_util::job_store_suite;
use aiwg_core::{JobStore, MemoryStore};

#[tokio::test]
async fn memory_store_passes_the_store_suite() {
    job_store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn JobStore> }).await;
}

/// Finished jobs are forgotten past `max_finished` (oldest first) with their events and
/// idempotency keys; queued and running jobs never are.
#[tokio::test]
async fn the_memory_store_keeps_finished_jobs_as_retention_says() {
    use std::time::Duration;

    use aiwg_core::store::Retention;
    use aiwg_core::test_util::ScriptedExecutor;
    use aiwg_core::{Engine, JobRequest, JobStatus, Step, Workflow};

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::with_retention(Retention {
        finished_for: Duration::from_secs(3600),
        max_finished: 3,
    }));
    let agent = ScriptedExecutor::succeeding("ok");
    let engine = Engine::builder()
        .store(store.clone())
        .executor("a", Arc::new(agent))
        .workflow(Workflow::new("w").step(Step::prompt("s", "a", "go")))
        .policy(
            aiwg_core::ProjectPolicy::builder()
                .root(dir.path())
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..10 {
        let job = engine
            .submit(JobRequest::new("w").idempotency_key(format!("k{i}")))
            .await
            .unwrap();
        let job = engine.wait(job.id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed);
        ids.push(job.id);
    }
    assert_eq!(
        store.len(),
        3,
        "only the newest three finished jobs are kept"
    );
    for old in &ids[..7] {
        assert!(store.get(*old).await.unwrap().is_none());
        assert!(store.events(*old, 0).await.is_err());
    }
    for kept in &ids[7..] {
        assert!(store.get(*kept).await.unwrap().is_some());
    }
    // A forgotten job's idempotency key is free again: a new job, not the old one.
    let again = engine
        .submit(JobRequest::new("w").idempotency_key("k0"))
        .await
        .unwrap();
    assert!(!ids.contains(&again.id));
    engine.shutdown(Duration::from_secs(1)).await;
}
