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

/// An agent's output that comes while its step's start is on its way (a slow round trip) is
/// written in few writes once the start is, in the order it was emitted, numbered without a
/// gap: not one write a line (on PostgreSQL, one commit a line, which recorded an agent's
/// output at about 2 000 lines a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_output_is_written_in_few_writes_in_its_order() {
    const LINES: usize = 2_500;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    let mut agent = ScriptedExecutor::succeeding("done").delay(Duration::from_millis(1));
    for i in 0..LINES {
        agent = agent.emit(aiwg_core::AgentEvent::Log {
            stream: aiwg_core::LogStream::Stdout,
            line: format!("line {i}"),
        });
    }
    // Two steps, so the first step's start is written while its agent runs.
    let engine = engine_on(&store, &agent, dir.path())
        .workflow(
            aiwg_core::Workflow::new("two")
                .step(aiwg_core::Step::prompt("s", "a", "go"))
                .step(aiwg_core::Step::prompt("t", "a", "go")),
        )
        .workers(1)
        .build()
        .unwrap();
    store.hold_next_start.store(true, Ordering::SeqCst);
    let entered = store.start_entered.notified();
    let job = engine.submit(JobRequest::new("two")).await.unwrap();
    tokio::time::timeout(WAIT, entered)
        .await
        .expect("the step's start is on its way");
    store.start_release.notify_one();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    let events = store.inner.events(job.id, 0).await.unwrap();
    assert!(
        events.iter().zip(1..).all(|(e, seq)| e.seq == seq),
        "gapless"
    );
    let lines: Vec<(&str, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            JobEventKind::Agent {
                step,
                event: aiwg_core::AgentEvent::Log { line, .. },
            } => Some((&step[..], line.clone())),
            _ => None,
        })
        .collect();
    let expected: Vec<(&str, String)> = ["s", "t"]
        .into_iter()
        .flat_map(|step| (0..LINES).map(move |i| (step, format!("line {i}"))))
        .collect();
    assert_eq!(lines, expected);
    // Each step's lines in at most three writes (1 024 a write at most).
    let writes = store.agent_writes.load(Ordering::SeqCst);
    assert!(writes <= 6, "{writes} writes for {} lines", 2 * LINES);
}
