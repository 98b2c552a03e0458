//! A job's events reach the engine's feed in the order they happened, even when a worker
//! claims the job before the submit that created it has published its `queued` event.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::engine::FeedItem;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobEventKind, JobRequest, JobStatus};
use futures_util::StreamExt;

mod hooked_store;
use hooked_store::{engine_on, HookedStore};

const WAIT: Duration = Duration::from_secs(20);

/// The submit's insert returns only after a worker claimed the job (a submitter descheduled
/// between the two, as on a busy machine). The worker, a polling one that found the job
/// between them, runs it at once; its `running`, step and `completed` events still come
/// after `queued` on the feed. (Before the fix, the feed showed the job run and complete,
/// then queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_comes_before_running_when_a_worker_claims_during_the_submit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    let agent = ScriptedExecutor::succeeding("done");
    let engine = engine_on(&store, &agent, dir.path())
        .workers(1)
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    let mut feed = engine.feed(Some(engine.feed_cursor()));
    store
        .hold_next_create_until_claimed
        .store(true, Ordering::SeqCst);
    let job = tokio::time::timeout(WAIT, engine.submit(JobRequest::new("w")))
        .await
        .expect("the submit ends once a worker claimed the job")
        .unwrap();
    let mut statuses = Vec::new();
    while statuses.last() != Some(&JobStatus::Completed) {
        let item = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("the job's events arrive")
            .expect("the feed goes on");
        if let FeedItem::Event { event, .. } = item {
            assert_eq!(event.job_id, job.id);
            if let JobEventKind::Status { to, .. } = event.kind {
                statuses.push(to);
            }
        }
    }
    assert_eq!(
        statuses,
        [JobStatus::Queued, JobStatus::Running, JobStatus::Completed]
    );
    engine.shutdown(Duration::from_secs(5)).await;
}
