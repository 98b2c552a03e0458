//! Batched claims and hand-overs between an engine's workers: a worker never claims a job
//! while one handed to it waits, so an engine never holds more jobs than it has workers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::JobQuery;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobRequest, JobStatus};

mod hooked_store;
use hooked_store::{engine_on, HookedStore};

const WAIT: Duration = Duration::from_secs(20);

/// Worker 1 claims two jobs while worker 0 sweeps, keeps one and hands the other to worker 0.
/// Worker 0, back from its sweep, takes the handed job instead of claiming a third, which no
/// worker would be free to run (it used to: the third job then waited in the hand-over queue
/// behind two jobs that never end, claimed and never started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_from_a_sweep_takes_the_job_handed_to_it_instead_of_claiming() {
    let dir = tempfile::tempdir().unwrap();
    // The first lease sweep (which worker 0 runs between its look at the hand-over queue and
    // its claim) waits until the test lets it go, as a slow database round trip would.
    let store = Arc::new(HookedStore::default());
    store.hold_next_sweep.store(true, Ordering::SeqCst);
    let agent = ScriptedExecutor::hanging();
    let engine = engine_on(&store, &agent, dir.path())
        .workers(2)
        .poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    // Worker 0 is in its first sweep.
    tokio::time::timeout(WAIT, store.sweep_entered.notified())
        .await
        .expect("worker 0 swept");
    let submitted = engine
        .submit_many((0..3).map(|i| JobRequest::new("w").guidance(format!("{i}"))))
        .await;
    assert!(submitted.iter().all(Result::is_ok));
    // Worker 1 claimed for both idle workers and runs its own job.
    assert!(agent.wait_started(1, WAIT).await, "worker 1 started a job");
    store.sweep_release.notify_one();
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

/// A worker whose job ends while the queue is empty (its claim got fewer jobs than it asked
/// for) waits for a wake-up before it claims again, instead of claiming at once and waking
/// another worker to claim too: each of those found nothing, and on PostgreSQL a claim on its
/// way holds the claiming turn, so a job submitted just then waited for it. Here jobs run one
/// after another on 4 workers with no polling (at most two are busy at a time, so every claim
/// asks for at least two jobs and gets one): every claim after the workers' first is one a
/// submit asked for, where workers used to make two more for every job that ended. Every job
/// still runs, each woken by its submit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_job_ended_on_an_empty_queue_claims_only_when_woken() {
    const WORKERS: usize = 4;
    const JOBS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    let agent = ScriptedExecutor::succeeding("done");
    let engine = engine_on(&store, &agent, dir.path())
        .workers(WORKERS)
        // No claim comes from the poll interval during the test.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    for i in 0..JOBS {
        let job = engine
            .submit(JobRequest::new("w").guidance(format!("{i}")))
            .await
            .unwrap();
        let ended = engine.wait(job.id, WAIT).await.unwrap();
        assert_eq!(ended.status, JobStatus::Completed, "job {i}");
    }
    engine.shutdown(WAIT).await;
    let claims = store.claims.load(Ordering::SeqCst);
    // One claim per worker at its start and one per submit; a worker's first claim that comes
    // after a submit takes that job, and the submit's wake-up then finds nothing (at most
    // twice: the workers start before the second job is submitted).
    assert!(
        claims <= WORKERS + JOBS + 2,
        "{claims} claims for {JOBS} jobs run one after another on {WORKERS} workers"
    );
}
