//! Batched claims and hand-overs between an engine's workers: a worker never claims a job
//! while one handed to it waits, so an engine never holds more jobs than it has workers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::JobQuery;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{JobRequest, JobStatus, Step, Workflow};

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

/// Under a per-project limit, a job submitted to a project that the jobs running here already
/// fill wakes no worker: its claim could only find the project full (under the configuration's
/// default of one job per project, every submit to a busy project cost a claim that found
/// nothing). When the job running there ends, its worker claims once, and takes it (it used
/// to wake an idle worker too, whose claim found nothing); a job of another project is
/// claimed at once. Time is paused: the runtime's clock moves on only when every task waits,
/// so "no claim within a second" means "none once the engine went idle".
#[tokio::test(start_paused = true)]
async fn a_job_for_a_project_full_of_jobs_running_here_waits_for_one_to_end_without_a_claim() {
    // One worker for p, one for q, one idle throughout.
    let (dir, store, agent) = two_projects();
    let engine = three_workers_one_job_per_project(&dir, &store, &agent).await;
    let in_p = |i: usize| {
        JobRequest::new("w")
            .project_path("p")
            .guidance(format!("{i}"))
    };
    let first = engine.submit(in_p(1)).await.unwrap();
    assert!(agent.wait_started(1, WAIT).await, "p's first job started");
    store.wait_claims(4).await;

    for i in 2..=3 {
        engine.submit(in_p(i)).await.unwrap();
    }
    let claimed_for_them = tokio::time::timeout(Duration::from_secs(1), store.wait_claims(5)).await;
    assert!(
        claimed_for_them.is_err(),
        "a worker claimed for jobs of a project full of jobs running here"
    );

    engine
        .submit(JobRequest::new("w").project_path("q"))
        .await
        .unwrap();
    assert!(agent.wait_started(2, WAIT).await, "q's job started at once");
    assert_eq!(store.claims_answered.load(Ordering::SeqCst), 5);

    engine.cancel(first.id).await.unwrap();
    assert!(
        agent.wait_started(3, WAIT).await,
        "p's next job started once the first ended"
    );
    let another_claim = tokio::time::timeout(Duration::from_secs(1), store.wait_claims(7)).await;
    assert!(
        another_claim.is_err(),
        "{} claims: the end of p's first job cost more than the one that took the next",
        store.claims_answered.load(Ordering::SeqCst)
    );
    assert_eq!(store.claims_answered.load(Ordering::SeqCst), 6);
    let running_in_p = store
        .inner
        .list(&JobQuery::default().status(JobStatus::Running))
        .await
        .unwrap()
        .jobs
        .iter()
        .filter(|j| j.project_path.ends_with("/p"))
        .count();
    assert_eq!(running_in_p, 1, "one job at a time in p");
    engine.shutdown(Duration::from_millis(500)).await;
}

/// A job submitted while a claim is on its way, to a project that claim is filling, wakes no
/// worker: the claim's answer, which counts the job it took, decides for it (a worker woken by
/// the submit used to wait for the claiming turn and find the project full). A job of another
/// project submitted meanwhile is claimed once the answer comes, and the first project's next
/// job once its running one ends.
#[tokio::test(start_paused = true)]
async fn a_job_submitted_while_a_claim_fills_its_project_waits_for_it_to_answer() {
    let (dir, store, agent) = two_projects();
    let engine = three_workers_one_job_per_project(&dir, &store, &agent).await;
    store.hold_next_claim.store(true, Ordering::SeqCst);
    let entered = store.claim_entered.notified();
    let first = engine
        .submit(JobRequest::new("w").project_path("p"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, entered)
        .await
        .expect("a claim took p's first job");
    // While that claim is on its way back: one more job in p, one in q.
    engine
        .submit(JobRequest::new("w").project_path("p"))
        .await
        .unwrap();
    engine
        .submit(JobRequest::new("w").project_path("q"))
        .await
        .unwrap();
    store.claim_release.notify_one();
    assert!(
        agent.wait_started(2, WAIT).await,
        "p's first job and q's started"
    );
    let another_claim = tokio::time::timeout(Duration::from_secs(1), store.wait_claims(6)).await;
    assert!(
        another_claim.is_err(),
        "{} claims: a worker claimed for p's second job while p was full",
        store.claims_answered.load(Ordering::SeqCst)
    );
    // The first three, the held one, and the one its answer woke for q.
    assert_eq!(store.claims_answered.load(Ordering::SeqCst), 5);

    engine.cancel(first.id).await.unwrap();
    assert!(
        agent.wait_started(3, WAIT).await,
        "p's second job started once the first ended"
    );
    engine.shutdown(Duration::from_millis(500)).await;
}

/// What the engine tells a store that announces jobs to other instances (PostgreSQL): a job
/// for a project full of jobs running here is seen to here (the end of one of them wakes a
/// claim here; no claim anywhere could take it before), without using up a promise of an idle
/// worker, so jobs of other projects still get one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_project_full_of_jobs_running_here_is_seen_to_here_without_a_promise() {
    let (dir, store, agent) = two_projects();
    let engine = engine_on(&store, &agent, dir.path())
        .workers(2)
        .per_project_concurrency(1)
        .build()
        .unwrap();
    let first = engine
        .submit(JobRequest::new("w").project_path("p"))
        .await
        .unwrap();
    assert!(agent.wait_started(1, WAIT).await, "p's first job started");
    let listener = engine.cluster_listener().upgrade().unwrap();
    let p = first.project_path.clone();
    let q = dir.path().join("q").canonicalize().unwrap();
    let q = q.to_str().unwrap();
    for _ in 0..3 {
        assert!(listener.promise_claim(&p), "p is full of jobs running here");
    }
    assert!(
        listener.promise_claim(q),
        "the idle worker is promised to q"
    );
    assert!(!listener.promise_claim(q), "no idle worker is left for q");
    assert!(listener.promise_claim(&p), "p still needs no promise");
    engine.shutdown(Duration::from_millis(500)).await;
}

/// An engine of three workers on `store`, one job at a time per project, that never polls;
/// answered once each worker made its first claim.
async fn three_workers_one_job_per_project(
    dir: &tempfile::TempDir,
    store: &Arc<HookedStore>,
    agent: &ScriptedExecutor,
) -> aiwg_core::Engine {
    let engine = engine_on(store, agent, dir.path())
        .workers(3)
        .per_project_concurrency(1)
        // No claim comes from the poll interval during the test.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    // Each worker's first claim, at its start.
    store.wait_claims(3).await;
    engine
}

/// A root with projects `p` and `q`, a store that counts claims, and an agent whose jobs run
/// until they are cancelled.
fn two_projects() -> (tempfile::TempDir, Arc<HookedStore>, ScriptedExecutor) {
    let dir = tempfile::tempdir().unwrap();
    for project in ["p", "q"] {
        std::fs::create_dir(dir.path().join(project)).unwrap();
    }
    (
        dir,
        Arc::new(HookedStore::default()),
        ScriptedExecutor::hanging(),
    )
}

/// On a store whose claim is a round trip (here 20 ms), a worker whose quick job just ended
/// waits for the jobs running beside it before it claims, so that one claim brings a job for
/// every worker: 24 jobs, half of them quick and half taking a millisecond, on four workers
/// take six claims of four. (Claiming at once, the worker of a quick job claimed for the two
/// workers idle then, and the other two waited for that claim: twelve claims of two, each a
/// round trip.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_job_ended_gathers_the_others_before_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HookedStore::default());
    *store.claim_round_trip.lock().unwrap() = Some(Duration::from_millis(20));
    let quick = ScriptedExecutor::succeeding("done");
    let slow = ScriptedExecutor::succeeding("done").delay(Duration::from_millis(1));
    let engine = engine_on(&store, &quick, dir.path())
        .executor("slow", Arc::new(slow.clone()))
        .workflow(Workflow::new("slow").step(Step::prompt("s", "slow", "go")))
        .workers(4)
        // No claim comes from the poll interval during the test.
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    // Each worker's first claim, at its start, finds nothing.
    store.wait_claims(4).await;
    store.claim_sizes.lock().unwrap().clear();
    let submitted = engine
        .submit_many((0..24).map(|i| JobRequest::new(if i % 2 == 0 { "w" } else { "slow" })))
        .await;
    assert!(submitted.iter().all(Result::is_ok));
    assert!(quick.wait_started(12, WAIT).await, "every quick job ran");
    assert!(slow.wait_started(12, WAIT).await, "every slow job ran");
    let sizes: Vec<usize> = store
        .claim_sizes
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|n| *n > 0)
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 24);
    // Six claims of four; one more for a job held up longer than the wait (a busy machine).
    assert!(sizes.len() <= 7, "claims brought {sizes:?}");
    engine.shutdown(Duration::from_millis(500)).await;
}
