//! Two engines on one PostgreSQL database, in one process: work spreads, nothing runs twice,
//! cancels and events cross instances through LISTEN/NOTIFY, expired leases are recovered, and
//! the per-project limit holds across instances.
//!
//! Run with `cargo test -p aiwg-core --features postgres,test-util --test pg_engines`.
#![cfg(all(feature = "postgres", feature = "test-util"))]

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::{ClaimRequest, Finish, NewJob, PgStore, StoreError};
use aiwg_core::test_util::{sample_job, ScriptedExecutor};
use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, Engine, EventSink, Executor,
    ExecutorError, Health, JobEventKind, JobRequest, JobResult, JobStatus, JobStore, ProjectPolicy,
    Step, Workflow,
};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod hooked_store;
mod pg_support;
use hooked_store::{HookedStore, Watching};
use pg_support::test_db;

const WAIT: Duration = Duration::from_secs(60);

struct Env {
    _dir: tempfile::TempDir,
    policy: ProjectPolicy,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    for p in ["a", "b", "c", "d"] {
        std::fs::create_dir(dir.path().join(p)).unwrap();
    }
    let policy = ProjectPolicy::builder().root(dir.path()).build().unwrap();
    Env { _dir: dir, policy }
}

struct Node {
    engine: Engine,
    store: Arc<PgStore>,
    listener: JoinHandle<()>,
}

impl Node {
    async fn stop(self) {
        self.engine.shutdown(Duration::from_secs(5)).await;
        self.listener.abort();
    }
}

/// An engine on `store`, listening, with `exec` as agent `agent` and workflow `w` (one step).
async fn node(
    env: &Env,
    store: PgStore,
    exec: Arc<dyn Executor>,
    configure: impl FnOnce(aiwg_core::EngineBuilder) -> aiwg_core::EngineBuilder,
) -> Node {
    let store = Arc::new(store);
    let builder = Engine::builder()
        .store(store.clone())
        .policy(env.policy.clone())
        .executor("agent", exec)
        .workflow(Workflow::new("w").step(Step::prompt("run", "agent", "do {{guidance}}")))
        .queue_capacity(10_000)
        .poll_interval(Duration::from_millis(50));
    let engine = configure(builder).build().unwrap();
    let listener = store
        .listen(engine.cluster_listener())
        .await
        .expect("listen");
    Node {
        engine,
        store,
        listener,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_spread_over_two_engines_and_a_cancel_on_one_stops_a_job_on_the_other() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let ea = ScriptedExecutor::hanging();
    let eb = ScriptedExecutor::hanging();
    // Heartbeats every 40 s: within the waits below, only NOTIFY can carry the cancel.
    let cfg = |name: &'static str| {
        move |b: aiwg_core::EngineBuilder| {
            b.workers(2)
                .lease_ttl(Duration::from_secs(120))
                .instance_name(name)
        }
    };
    let a = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(ea.clone()),
        cfg("A"),
    )
    .await;
    let b = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(eb.clone()),
        cfg("B"),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let job = a
            .engine
            .submit(
                JobRequest::new("w")
                    .project_path("a")
                    .guidance(format!("{i}")),
            )
            .await
            .unwrap();
        ids.push(job.id);
    }
    // Each engine has two workers and every job hangs: all four run only if both take two.
    assert!(ea.wait_started(2, WAIT).await, "engine A took its share");
    if !eb.wait_started(2, WAIT).await {
        // Say where the jobs are: queued (B never claimed them) or running (claimed, not
        // started).
        let jobs = a.store.list(&Default::default()).await.unwrap().jobs;
        let owners: Vec<(uuid::Uuid, Option<String>)> =
            sqlx::query_as("SELECT id, lease_owner FROM aiwg_jobs")
                .fetch_all(a.store.pool())
                .await
                .unwrap_or_default();
        let states: Vec<String> = jobs
            .iter()
            .map(|j| {
                let owner = owners
                    .iter()
                    .find(|(id, _)| id == j.id.as_uuid())
                    .and_then(|(_, o)| o.clone());
                format!(
                    "{} {:?} attempt {} held by {owner:?}",
                    j.id, j.status, j.attempt
                )
            })
            .collect();
        panic!(
            "engine B did not take its share: A started {}, B started {}; jobs: {states:?}",
            ea.calls(),
            eb.calls()
        );
    }
    let on_b = eb.requests()[0].job_id;
    assert!(ids.contains(&on_b));
    let cancelled = tokio::time::timeout(WAIT, a.engine.cancel(on_b))
        .await
        .expect("cancel returned")
        .expect("cancel succeeded");
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(eb.cancelled(), 1, "the executor on B was stopped");
    assert_eq!(ea.cancelled(), 0);
    for id in ids.iter().filter(|id| **id != on_b) {
        let job = a.engine.cancel(*id).await.unwrap();
        assert_eq!(job.status, JobStatus::Cancelled);
    }
    assert_eq!((ea.calls(), eb.calls()), (2, 2), "nothing ran twice");
    assert_eq!((ea.cancelled(), eb.cancelled()), (2, 2));
    for id in &ids {
        let job = b.engine.get(*id).await.unwrap();
        assert_eq!(job.status, JobStatus::Cancelled);
        assert_eq!(job.attempt, 1);
    }
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

/// Emits "before", waits for the gate, emits "after", succeeds.
#[derive(Clone)]
struct Gated {
    gate: Arc<Semaphore>,
    started: Arc<Notify>,
}

#[async_trait]
impl Executor for Gated {
    async fn execute(
        &self,
        _request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        events.emit(AgentEvent::Text {
            text: "before".into(),
        });
        self.started.notify_one();
        tokio::select! {
            permit = self.gate.acquire() => drop(permit),
            () = cancel.cancelled() => return Err(ExecutorError::Cancelled),
        }
        events.emit(AgentEvent::Text {
            text: "after".into(),
        });
        // Too long for a NOTIFY payload: the listener reads it from the table.
        events.emit(AgentEvent::Text {
            text: "x".repeat(9000),
        });
        Ok(AgentResult::text("done"))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true, false)
    }

    fn kind(&self) -> &'static str {
        "gated"
    }

    async fn health(&self) -> Health {
        Health::healthy()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_engine_sees_events_produced_on_the_other() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let gated = Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: Arc::new(Notify::new()),
    };
    let b = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(gated.clone()),
        |b| b.workers(1),
    )
    .await;
    let job = b
        .engine
        .submit(JobRequest::new("w").project_path("b"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, gated.started.notified())
        .await
        .expect("started on B");
    // Engine A starts after the job is running on B, so it cannot run it.
    let ea = ScriptedExecutor::hanging();
    let a = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(ea.clone()),
        |b| b.workers(1),
    )
    .await;
    let mut all = a.engine.subscribe_all();
    let mut feed = a.engine.feed(None);
    let stream = a.engine.subscribe(job.id, 0).await.unwrap();
    gated.gate.add_permits(1);
    // The stream only ends after the terminal event, which only NOTIFY can bring to A.
    let events: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("A's subscriber reached the end");
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let last = events.last().unwrap();
    assert!(matches!(
        last.kind,
        JobEventKind::Status {
            to: JobStatus::Completed,
            ..
        }
    ));
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        JobEventKind::Agent { event: AgentEvent::Text { text }, .. } if text == "after"
    )));
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        JobEventKind::Agent { event: AgentEvent::Text { text }, .. } if text.len() == 9000
    )));
    // Every event written on B after A listened arrived on A's bus, once, in order.
    let stored = a.store.events(job.id, 0).await.unwrap();
    let last_seq = stored.last().unwrap().seq;
    // The job's stream may end before the listener has handed the last event on to the bus
    // (and, before it, the feed): wait for it there rather than read what is there now.
    let mut live: Vec<aiwg_core::JobEvent> = Vec::new();
    tokio::time::timeout(WAIT, async {
        while live.last().map(|e| e.seq) != Some(last_seq) {
            live.push(all.recv().await.expect("A's bus stays open"));
        }
    })
    .await
    .expect("A's bus carried the last event");
    let after_gate: Vec<u64> = live.iter().map(|e| e.seq).collect();
    assert!(!after_gate.is_empty());
    assert_eq!(
        after_gate,
        ((after_gate[0])..=stored.last().unwrap().seq).collect::<Vec<_>>()
    );
    // A's feed (`GET /events`) carries the same events of B's job, in order, with growing
    // cursors.
    let mut fed = Vec::new();
    while let Some(Some(item)) = futures_util::FutureExt::now_or_never(feed.next()) {
        match item {
            aiwg_core::engine::FeedItem::Event { cursor, event } => fed.push((cursor, event)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        fed.iter().map(|(_, e)| e.seq).collect::<Vec<_>>(),
        after_gate,
        "A's feed has B's events"
    );
    assert!(fed.windows(2).all(|w| w[0].0.seq < w[1].0.seq));
    assert_eq!(ea.calls(), 0, "engine A ran nothing");
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_recovered_by_another_engine() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    // The "crashed" instance: claims through the store and never heartbeats.
    let ghost = db.store_in(&schema, 2).await;
    let project = env.policy.roots()[0].join("c").display().to_string();
    let mut job = sample_job("w", &project, 0);
    job.max_attempts = 2;
    job.progress = aiwg_core::Progress::pending(["run".to_owned()]);
    let id = job.id;
    ghost.create(NewJob::new(job)).await.unwrap();
    let lost = ghost
        .claim(&ClaimRequest::new("ghost/0", Duration::from_millis(300)))
        .await
        .unwrap()
        .expect("ghost claims");
    assert_eq!(lost.job.id, id);

    let exec = ScriptedExecutor::succeeding("recovered");
    let b = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(exec.clone()),
        |b| b.workers(2).lease_ttl(Duration::from_secs(10)),
    )
    .await;
    let done = b.engine.wait(id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.result.unwrap().summary, "recovered");
    assert_eq!(exec.calls(), 1);
    let statuses: Vec<_> = done.history.iter().map(|h| h.status).collect();
    assert_eq!(
        statuses,
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Completed
        ]
    );
    let events = b.store.events(id, 0).await.unwrap();
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        JobEventKind::Status { to: JobStatus::Queued, error: Some(err), .. }
            if err.kind == "lease_lost"
    )));
    // The crashed worker is fenced out.
    assert!(matches!(
        ghost
            .finish(&lost.lease, Finish::Completed(JobResult::default()))
            .await
            .map(|_| ()),
        Err(StoreError::LeaseLost(j)) if j == id
    ));
    assert!(matches!(
        ghost
            .append(
                &lost.lease,
                JobEventKind::Log {
                    level: "info".into(),
                    message: "late".into()
                }
            )
            .await
            .map(|_| ()),
        Err(StoreError::LeaseLost(j)) if j == id
    ));
    assert!(matches!(
        ghost
            .heartbeat(&lost.lease, Duration::from_secs(1))
            .await
            .map(|_| ()),
        Err(StoreError::LeaseLost(j)) if j == id
    ));
    assert_eq!(b.store.events(id, 0).await.unwrap(), events);
    b.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_project_limit_holds_across_engines() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    // One executor shared by both engines: `max_running` is global.
    let exec = ScriptedExecutor::succeeding("ok").delay(Duration::from_millis(20));
    let cfg = |b: aiwg_core::EngineBuilder| b.workers(3).per_project_concurrency(1);
    let a = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(exec.clone()),
        cfg,
    )
    .await;
    let b = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(exec.clone()),
        cfg,
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let node = if i % 2 == 0 { &a } else { &b };
        ids.push(
            node.engine
                .submit(JobRequest::new("w").project_path("d"))
                .await
                .unwrap()
                .id,
        );
    }
    for id in &ids {
        let job = a.engine.wait(*id, WAIT).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed);
    }
    assert_eq!(exec.calls(), 8);
    assert_eq!(exec.max_running(), 1, "one job of the project at a time");
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_jobs_over_two_engines_end_exactly_once() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let ea = ScriptedExecutor::succeeding("a");
    let eb = ScriptedExecutor::succeeding("b");
    let cfg = |b: aiwg_core::EngineBuilder| b.workers(4);
    let a = node(
        &env,
        db.store_in(&schema, 6).await,
        Arc::new(ea.clone()),
        cfg,
    )
    .await;
    let b = node(
        &env,
        db.store_in(&schema, 6).await,
        Arc::new(eb.clone()),
        cfg,
    )
    .await;
    const N: usize = 2000;
    let mut ids = Vec::with_capacity(N);
    for i in 0..N {
        let node = if i % 2 == 0 { &a } else { &b };
        let project = ["a", "b", "c", "d"][i % 4];
        ids.push(
            node.engine
                .submit(JobRequest::new("w").project_path(project))
                .await
                .unwrap()
                .id,
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let node = if i % 2 == 0 { &b } else { &a };
        let job = node.engine.wait(*id, WAIT).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed, "{:?}", job.error);
        assert_eq!(job.attempt, 1);
    }
    assert_eq!(ea.calls() + eb.calls(), N, "every job ran exactly once");
    assert!(
        ea.calls() > 0 && eb.calls() > 0,
        "both engines worked: {} / {}",
        ea.calls(),
        eb.calls()
    );
    let counts = a.store.counts().await.unwrap();
    assert_eq!((counts.queued, counts.running), (0, 0));
    let pool = a.store.pool();
    let terminal: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM aiwg_job_events WHERE kind->>'kind' = 'status' \
         AND kind->>'to' IN ('completed', 'failed', 'cancelled', 'timed_out')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(terminal, N as i64, "one terminal event per job");
    let gaps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM aiwg_jobs j WHERE last_seq <> \
         (SELECT count(*) FROM aiwg_job_events e WHERE e.job_id = j.id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(gaps, 0, "event numbers have no gaps");
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

/// Quick jobs in a burst: each worker's outcomes and last steps' starts go on while it takes
/// the next job, bounded by the engine's places for outcomes. A write on its way must never
/// wait unpolled while its worker waits for a place (the store's completer would hold every
/// other write behind it, and the jobs whose outcomes wait would run again once their leases
/// lapsed): every job ends once, in its first attempt, well within its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_quick_jobs_ends_each_once_within_its_lease() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let exec = ScriptedExecutor::succeeding("done");
    let a = node(
        &env,
        db.store_in(&schema, 10).await,
        Arc::new(exec.clone()),
        |b| b.workers(32).lease_ttl(Duration::from_secs(3)),
    )
    .await;
    const N: usize = 3000;
    let ids: Vec<_> = a
        .engine
        .submit_many((0..N).map(|_| JobRequest::new("w")))
        .await
        .into_iter()
        .map(|r| r.unwrap().id)
        .collect();
    for id in &ids {
        let job = a.engine.wait(*id, WAIT).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed, "{:?}", job.error);
        assert_eq!(job.attempt, 1, "no job waited past its lease");
    }
    assert_eq!(exec.calls(), N, "every job ran exactly once");
    // Each job's start was written before its end, whichever wrote it (the worker, or the
    // outcome's task after the worker went on).
    for id in ids.iter().step_by(15) {
        let kinds: Vec<_> = a
            .store
            .events(*id, 0)
            .await
            .unwrap()
            .iter()
            .map(|e| e.kind.name())
            .collect();
        assert_eq!(
            kinds,
            [
                "status",
                "status",
                "step.started",
                "step.finished",
                "status"
            ]
        );
    }
    a.stop().await;
    db.cleanup().await;
}

/// A last step whose agent is done at its first poll, with nothing to record, is written whole
/// with the job's outcome: its start, its end and the outcome in one statement (they share the
/// writing transaction), not the start on its own first. An observer (the outbound webhooks'
/// dispatcher) is still given the step's end with the job as that end left it, then the end.
/// An agent that takes a moment has its start written on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_last_step_is_written_with_its_outcome() {
    let Some(db) = test_db().await else { return };
    let env = env();
    for (observed, at_once) in [(false, true), (true, true), (false, false)] {
        let schema = db.schema().await;
        let watching = Arc::new(Watching::default());
        let agent = ScriptedExecutor::succeeding("done");
        let agent = if at_once {
            agent
        } else {
            agent.delay(Duration::from_millis(20))
        };
        let a = node(&env, db.store_in(&schema, 4).await, Arc::new(agent), |b| {
            let b = b.workers(1);
            if observed {
                b.observer(watching.clone())
            } else {
                b
            }
        })
        .await;
        let id = a.engine.submit(JobRequest::new("w")).await.unwrap().id;
        let job = a.engine.wait(id, WAIT).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed, "{:?}", job.error);
        let written: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, kind->>'kind', xmin::text FROM aiwg_job_events \
             WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.as_uuid())
        .fetch_all(a.store.pool())
        .await
        .unwrap();
        let kinds: Vec<_> = written.iter().map(|(_, k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "status",
                "status",
                "step_started",
                "step_finished",
                "status"
            ],
            "observed: {observed}"
        );
        let versions: Vec<_> = written[2..].iter().map(|(_, _, v)| v.as_str()).collect();
        if at_once {
            assert!(
                versions.iter().all(|v| *v == versions[0]),
                "the start, the end and the outcome written together (observed: {observed}): \
                 {versions:?}"
            );
        } else {
            assert_ne!(
                versions[0], versions[2],
                "a slower agent's start on its own"
            );
        }
        a.stop().await;
        if observed {
            let (running, completed) = (JobStatus::Running, JobStatus::Completed);
            let seen = watching.seen();
            assert_eq!(
                seen[seen.len() - 2..],
                [("step.finished", running), ("status", completed)],
                "the step's end with the job as it left it, then the end: {seen:?}"
            );
        }
    }
    db.cleanup().await;
}

/// Backends listening on `channel`.
async fn listeners(pool: &sqlx::PgPool, channel: &str) -> Vec<i32> {
    // `LISTEN "…"` at first, `LISTEN "…";` after a reconnection.
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE query IN ($1, $1 || ';') ORDER BY pid",
    )
    .bind(format!("LISTEN \"{channel}\""))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnects_after_losing_its_connection() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let gated = Gated {
        gate: Arc::new(Semaphore::new(0)),
        started: Arc::new(Notify::new()),
    };
    let b = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(gated.clone()),
        |b| b.workers(1),
    )
    .await;
    let job = b
        .engine
        .submit(JobRequest::new("w").project_path("a"))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, gated.started.notified())
        .await
        .expect("started on B");
    let a = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(ScriptedExecutor::hanging()),
        |b| b.workers(1),
    )
    .await;
    let channel = a.store.channel().to_owned();
    let before = listeners(db.admin(), &channel).await;
    assert_eq!(before.len(), 2, "both engines listen");
    for pid in &before {
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(db.admin())
            .await
            .unwrap();
        assert!(killed);
    }
    // Both listeners come back on new connections (a condition wait, bounded).
    tokio::time::timeout(WAIT, async {
        loop {
            let now = listeners(db.admin(), &channel).await;
            if now.len() == 2 && now.iter().all(|p| !before.contains(p)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the listeners reconnected");
    let stream = a.engine.subscribe(job.id, 0).await.unwrap();
    gated.gate.add_permits(1);
    let events: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("A still hears B after reconnecting");
    assert!(events.last().unwrap().is_terminal());
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

/// A database outage during a run: the jobs table is locked by another session, so the
/// worker's heartbeats hang. The worker stops its agent before its lease runs out (measured by
/// the database's clock against the lease it holds), so no other instance can run the job
/// while this one still does; once the database answers again the job is recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_stops_the_agent_before_the_lease_ends() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let agent = ScriptedExecutor::hanging();
    let a = node(
        &env,
        db.store_in(&schema, 4).await,
        Arc::new(agent.clone()),
        |b| {
            b.lease_ttl(Duration::from_secs(4))
                // Recovery by this instance would be another instance's job: keep it out.
                .poll_interval(Duration::from_secs(3600))
        },
    )
    .await;
    let job = a.engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(agent.wait_started(1, WAIT).await);
    let lease_end: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(&format!(
        "SELECT lease_expires_at FROM {schema}.aiwg_jobs WHERE id = $1"
    ))
    .bind(job.id.as_uuid())
    .fetch_one(db.admin())
    .await
    .unwrap();

    // The outage: every write to the jobs table now waits.
    let mut blocker = db.admin().begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {schema}.aiwg_jobs IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *blocker)
    .await
    .unwrap();
    assert!(
        agent.wait_cancelled(1, WAIT).await,
        "the agent was never stopped"
    );
    let stopped: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(db.admin())
        .await
        .unwrap();
    blocker.rollback().await.unwrap();
    // The last lease the worker held (it may have renewed it before the outage) ended after
    // the agent stopped.
    let held: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(&format!(
        "SELECT lease_expires_at FROM {schema}.aiwg_jobs WHERE id = $1"
    ))
    .bind(job.id.as_uuid())
    .fetch_one(db.admin())
    .await
    .unwrap();
    let held = held.unwrap_or(lease_end).max(lease_end);
    assert!(
        stopped < held,
        "the agent stopped at {stopped}, after its lease ended at {held}"
    );
    a.stop().await;
    db.cleanup().await;
}

/// A job queued on an instance with an idle worker is left to that instance: the other
/// instances are not woken for it (each would send a claim that finds it taken). A job queued
/// on a busy instance still wakes the others, and one of them runs it. Instance B here never
/// polls (its poll interval is an hour): it claims only when woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queued_where_a_worker_is_idle_wakes_no_other_instance() {
    let Some(db) = test_db().await else { return };
    let env = env();
    let schema = db.schema().await;
    let ea = ScriptedExecutor::hanging();
    let eb = ScriptedExecutor::hanging();
    let a = node(
        &env,
        db.store_in(&schema, 5).await,
        Arc::new(ea.clone()),
        |b| b.workers(2).instance_name("A"),
    )
    .await;
    // B: its claims counted, listening like any node.
    let b_store = Arc::new(db.store_in(&schema, 5).await);
    let counted = Arc::new(HookedStore::over(b_store.clone()));
    let b_engine = Engine::builder()
        .store(counted.clone())
        .policy(env.policy.clone())
        .executor("agent", Arc::new(eb.clone()))
        .workflow(Workflow::new("w").step(Step::prompt("run", "agent", "do {{guidance}}")))
        .workers(1)
        .poll_interval(Duration::from_secs(3600))
        .instance_name("B")
        .build()
        .unwrap();
    let b_listener = b_store
        .listen(b_engine.cluster_listener())
        .await
        .expect("listen");
    // B's one worker claims once when it starts, finds nothing, and waits to be woken.
    counted.wait_claims(1).await;

    // Two jobs on A, which has two idle workers: each is promised, B is not woken.
    for i in 1..=2 {
        a.engine
            .submit(
                JobRequest::new("w")
                    .project_path("a")
                    .guidance(format!("{i}")),
            )
            .await
            .unwrap();
        assert!(ea.wait_started(i, WAIT).await, "job {i} runs on A");
    }
    // A third, with both of A's workers busy: B is woken and runs it. Its notification comes
    // after the first two's, so had either woken B, B's claim for it would be counted first.
    let third = a
        .engine
        .submit(JobRequest::new("w").project_path("a").guidance("3"))
        .await
        .unwrap();
    assert!(eb.wait_started(1, WAIT).await, "the third job runs on B");
    assert_eq!(
        counted.claims.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "B claimed once at start and once for the third job, never for the first two"
    );
    assert_eq!((ea.calls(), eb.calls()), (2, 1));
    let on_b = counted.get(third.id).await.unwrap().unwrap();
    assert_eq!(on_b.status, JobStatus::Running);

    b_engine.shutdown(Duration::from_secs(5)).await;
    b_listener.abort();
    a.stop().await;
    db.cleanup().await;
}
