//! A worker whose job's work has ended takes the next job while the job's outcome is written
//! (a database's round trip), as River's workers hand their completions to its completer. The
//! outcomes on their way are bounded (as many as workers), each job keeps its place in its
//! project until its outcome is written, the slot it frees wakes a claim, and a shutdown waits
//! for every outcome.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobRequest, JobStatus};

mod hooked_store;
use hooked_store::{engine_on, HookedStore, ONE_STEP_RAN};

const WAIT: Duration = Duration::from_secs(20);

/// How long a test watches for something that must not happen (it passes sooner only by
/// failing).
const NOT_MEANWHILE: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_the_next_job_while_the_last_ones_outcome_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    store.outcome_gate.send_replace(false);
    let agent = ScriptedExecutor::succeeding("done");
    let engine = engine_on(&store, &agent, dir.path())
        .workers(1)
        .build()
        .unwrap();
    let first = engine.submit(JobRequest::new("w")).await.unwrap();
    let second = engine.submit(JobRequest::new("w")).await.unwrap();

    store.wait_outcomes_held(1).await;
    assert!(
        agent.wait_started(2, WAIT).await,
        "the one worker started the second job while the first one's outcome was on its way"
    );
    let held = store.inner.get(first.id).await.unwrap().unwrap();
    assert_eq!(
        held.status,
        JobStatus::Running,
        "the first job runs until its outcome is written"
    );

    // One worker, one place for an outcome on its way: the second job's outcome waits for
    // the first's, and so does its worker, so a third job does not start.
    let third = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(
        !agent.wait_started(3, NOT_MEANWHILE).await,
        "no third job while both outcomes wait"
    );
    assert_eq!(store.outcomes_held.load(Ordering::SeqCst), 1);

    store.outcome_gate.send_replace(true);
    for job in [first.id, second.id, third.id] {
        let done = engine.wait(job, WAIT).await.unwrap();
        assert_eq!(done.status, JobStatus::Completed);
        assert_eq!(
            store.kinds(job).await,
            ONE_STEP_RAN,
            "every job's events, in order"
        );
    }
    engine.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_an_outcome_frees_wakes_a_claim_and_a_shutdown_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    store.outcome_gate.send_replace(false);
    let agent = ScriptedExecutor::succeeding("done");
    // One job per project at a time, and no polling to fall back on: the second job can only
    // start when the end of the first one wakes a worker.
    let engine = engine_on(&store, &agent, dir.path())
        .workers(2)
        .per_project_concurrency(1)
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let first = engine.submit(JobRequest::new("w")).await.unwrap();
    let second = engine.submit(JobRequest::new("w")).await.unwrap();

    store.wait_outcomes_held(1).await;
    assert!(
        !agent.wait_started(2, NOT_MEANWHILE).await,
        "the project is full until the first job's outcome is written"
    );
    store.outcome_gate.send_replace(true);
    let done = engine.wait(second.id, WAIT).await.unwrap();
    assert_eq!(
        done.status,
        JobStatus::Completed,
        "woken by the first's end"
    );

    // A shutdown lets the outcome on its way be written before it returns.
    store.outcome_gate.send_replace(false);
    let third = engine.submit(JobRequest::new("w")).await.unwrap();
    store.wait_outcomes_held(1).await;
    let stopping = tokio::spawn({
        let engine = engine.clone();
        async move { engine.shutdown(WAIT).await }
    });
    tokio::pin!(stopping);
    assert!(
        tokio::time::timeout(NOT_MEANWHILE, &mut stopping)
            .await
            .is_err(),
        "the shutdown waits for the outcome on its way"
    );
    store.outcome_gate.send_replace(true);
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("the shutdown ends")
        .unwrap();
    for job in [first.id, third.id] {
        let ended = store.inner.get(job).await.unwrap().unwrap();
        assert_eq!(ended.status, JobStatus::Completed);
    }
}
