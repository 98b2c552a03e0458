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
use hooked_store::{engine_on, HookedStore, ONE_STEP_RAN};

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

/// An agent done at its first poll: its start goes whole with the outcome
/// (`JobStore::finish_after_step`, written in the outcome's task); done a moment later, while
/// its start is on its way: in a task of its own that the outcome waits for. Either way the
/// worker does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_steps_start_goes_with_the_outcome_while_its_worker_takes_the_next_job() {
    for at_once in [true, false] {
        last_start_goes_with_the_outcome(at_once).await;
    }
}

async fn last_start_goes_with_the_outcome(at_once: bool) {
    let held = HeldStart::new(at_once, false).await;
    let (store, engine, first, second) = (&held.store, &held.engine, held.first, held.second);
    assert_eq!(
        store.kinds(first).await,
        ["status", "status"],
        "nothing of the first job's end is written before its start"
    );

    store.start_release.notify_one();
    for job in [first, second] {
        let done = engine.wait(job, WAIT).await.unwrap();
        assert_eq!(done.status, JobStatus::Completed);
        assert_eq!(store.kinds(job).await, ONE_STEP_RAN);
    }
    engine.shutdown(Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_start_that_finds_the_lease_lost_after_its_agent_ended_writes_no_outcome() {
    for at_once in [true, false] {
        a_lost_last_start_writes_no_outcome(at_once).await;
    }
}

async fn a_lost_last_start_writes_no_outcome(at_once: bool) {
    let held = HeldStart::new(at_once, true).await;
    let (store, engine, first, second) = (&held.store, &held.engine, held.first, held.second);

    store.start_release.notify_one();
    // The second job's outcome waited for the one place for outcomes, which the first job
    // held until its start came back: that start was answered.
    let done = engine.wait(second, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    engine.shutdown(Duration::from_millis(500)).await;
    let lost = store.inner.get(first).await.unwrap().unwrap();
    assert_eq!(
        lost.status,
        JobStatus::Running,
        "no outcome under a lost lease: the job waits to be taken over"
    );
    assert_eq!(
        store.kinds(first).await,
        ["status", "status"],
        "nothing is written under a lost lease"
    );
}

/// Two jobs on one worker, the first one's step start held by the store (and lost when
/// `lose`): the worker has taken the second job while the first one's start is on its way.
struct HeldStart {
    _dir: tempfile::TempDir,
    store: Arc<HookedStore>,
    engine: aiwg_core::Engine,
    first: aiwg_core::JobId,
    second: aiwg_core::JobId,
}

impl HeldStart {
    async fn new(at_once: bool, lose: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(HookedStore::default());
        store.hold_next_start.store(true, Ordering::SeqCst);
        store.lose_held_start.store(lose, Ordering::SeqCst);
        // An agent done at once, with nothing to record: its start is still on its way.
        let agent = quick(at_once);
        let mut builder = engine_on(&store, &agent, dir.path()).workers(1);
        if lose {
            // No lease recovery during the test: the job stays as the lost start left it.
            builder = builder.poll_interval(Duration::from_secs(3600));
        }
        let engine = builder.build().unwrap();
        let first = engine.submit(JobRequest::new("w")).await.unwrap().id;
        tokio::time::timeout(WAIT, store.start_entered.notified())
            .await
            .expect("the first job's start is being written");
        let second = engine.submit(JobRequest::new("w")).await.unwrap().id;
        assert!(
            agent.wait_started(2, WAIT).await,
            "the one worker took the second job while the first one's start was on its way"
        );
        Self {
            _dir: dir,
            store,
            engine,
            first,
            second,
        }
    }
}

/// An agent that succeeds with nothing to record: at its first poll, or a moment later.
fn quick(at_once: bool) -> ScriptedExecutor {
    let agent = ScriptedExecutor::succeeding("done");
    if at_once {
        agent
    } else {
        agent.delay(Duration::from_millis(1))
    }
}
