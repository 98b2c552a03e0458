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

#[tokio::test]
async fn memory_audit_store_passes_the_audit_store_suite() {
    use aiwg_core::audit::{AuditStore, MemoryAuditStore};
    aiwg_core::test_util::audit_store_suite(|| async {
        Arc::new(MemoryAuditStore::new()) as Arc<dyn AuditStore>
    })
    .await;
}

/// The memory trail holds at most `max_entries`, the oldest forgotten first, and forgets
/// entries older than `keep_for` as new ones arrive.
#[tokio::test]
async fn the_memory_audit_store_keeps_what_its_retention_says() {
    use std::time::Duration;

    use aiwg_core::audit::{
        AuditQuery, AuditRecord, AuditRetention, AuditStore, Decision, MemoryAuditStore,
    };

    let store = MemoryAuditStore::with_retention(AuditRetention::new(Duration::from_secs(3600), 5));
    for i in 0..20 {
        store
            .record(AuditRecord::new("api", Decision::Refused).workflow(format!("w{i}")))
            .await
            .unwrap();
    }
    let page = store.list(&AuditQuery::default()).await.unwrap();
    let kept: Vec<_> = page
        .entries
        .iter()
        .map(|e| e.workflow.clone().unwrap())
        .collect();
    assert_eq!(kept, ["w19", "w18", "w17", "w16", "w15"]);
    // An entry from two hours ago is forgotten at the next record.
    store
        .record(
            AuditRecord::new("api", Decision::Refused)
                .workflow("old")
                .at(chrono::Utc::now() - chrono::Duration::hours(2)),
        )
        .await
        .unwrap();
    store
        .record(AuditRecord::new("api", Decision::Accepted).workflow("new"))
        .await
        .unwrap();
    let page = store.list(&AuditQuery::default()).await.unwrap();
    assert!(page
        .entries
        .iter()
        .all(|e| e.workflow.as_deref() != Some("old")));
    assert_eq!(page.entries[0].workflow.as_deref(), Some("new"));
}
