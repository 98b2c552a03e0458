//! A step's start is recorded while its agent starts: the agent does not wait for the commit,
//! its events are recorded only after the start, and a start that finds the lease lost stops
//! the agent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::executor::AgentEvent;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobEventKind, JobRequest, JobStatus};

mod hooked_store;
use hooked_store::{engine_on, HookedStore};

const WAIT: Duration = Duration::from_secs(20);

fn kinds(events: &[aiwg_core::JobEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_starts_while_its_start_is_written_and_its_events_come_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    store.hold_next_start.store(true, Ordering::SeqCst);
    let agent = ScriptedExecutor::succeeding("done").emit(AgentEvent::Text {
        text: "hello".into(),
    });
    let engine = engine_on(&store, &agent, dir.path()).build().unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();

    // The start's write is on its way (held), and the agent has already been called.
    tokio::time::timeout(WAIT, store.start_entered.notified())
        .await
        .expect("the step's start is being written");
    assert!(
        agent.wait_started(1, WAIT).await,
        "the agent started before its start was recorded"
    );
    let so_far = store.inner.events(job.id, 0).await.unwrap();
    assert_eq!(
        kinds(&so_far),
        ["status", "status"],
        "nothing of the agent is recorded before its start"
    );

    store.start_release.notify_one();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    let all = store.inner.events(job.id, 0).await.unwrap();
    assert_eq!(
        kinds(&all),
        [
            "status",
            "status",
            "step.started",
            "agent",
            "step.finished",
            "status"
        ]
    );
    engine.shutdown(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_finds_the_lease_lost_stops_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    store.lose_starts.store(true, Ordering::SeqCst);
    let agent = ScriptedExecutor::hanging();
    let engine = engine_on(&store, &agent, dir.path())
        // No lease recovery during the test: the job stays as the lost start left it.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(
        agent.wait_cancelled(1, WAIT).await,
        "the agent was stopped when its start found the lease lost"
    );
    let events = store.inner.events(job.id, 0).await.unwrap();
    assert!(
        !events
            .iter()
            .any(|e| !matches!(e.kind, JobEventKind::Status { .. })),
        "nothing is written under a lost lease: {:?}",
        kinds(&events)
    );
    engine.shutdown(Duration::from_millis(500)).await;
}
