//! The PostgreSQL job store under load: burn-down throughput (jobs/s from a full queue to an
//! empty one, no-op executor) with one and with two engines sharing one database, and the
//! enqueue → start latency (p50/p99) — beside the raw sqlx round trip they are built on, an
//! `INSERT` plus an `UPDATE … FOR UPDATE SKIP LOCKED` claim, as the baseline. The burn-downs'
//! `ratio` lines compare the medians of their rounds; a line per engine setup before them gives
//! the lowest and highest ratio of a round against the baseline of the same round, which shows
//! how far the machine moved while the figures were taken, and on Linux one more line gives the
//! machine's CPU time per job and how busy the cores were (medians of the rounds): whether a
//! setup waited or ran out of CPU.
//!
//! `cargo bench -p aiwg-benches --bench pg_queue`. The database comes from
//! `AIWG_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`); without one the
//! bench prints why and does nothing. Everything runs in a fresh schema dropped at the end.
//! A URL without `sslmode` lets sqlx negotiate TLS where the server offers it (Debian's
//! PostgreSQL does, `ssl = on`), for every connection, the baseline's too; the baseline's many
//! small round trips pay more for it than the stores' batched ones, so the ratios come out
//! higher than without it. Add `?sslmode=disable` to the URL to measure the queue without TLS
//! (BENCHMARKS.md, session 33: one engine's narrow ratio 0.51–0.61 without against 0.63–0.74
//! with, the wide one 0.82–0.86 against 0.99–1.09).
//!
//! The *wide* burn-down drains a longer queue (`AIWG_PG_QUEUE_WIDE_JOBS`, default 5 000) with 2
//! engines of many workers (`AIWG_PG_QUEUE_WIDE_WORKERS`, default 32), beside bare claimers
//! taking and completing rows of a queue filled the same way. `AIWG_PG_QUEUE_ROUNDS` (default
//! 5) sets the rounds of the summary; `AIWG_PG_QUEUE_ONLY=wide` runs only the wide burn-down,
//! `AIWG_PG_QUEUE_ONLY=narrow` only the burn-downs of 300 jobs, `AIWG_PG_QUEUE_ONLY=latency`
//! only enqueue → start (1 and 2 engines, relaxed event commits) and its baseline,
//! `AIWG_PG_QUEUE_ONLY=submit` only the submit burst, `AIWG_PG_QUEUE_ONLY=commits` only the
//! commits per job, `AIWG_PG_QUEUE_ONLY=per_project` only
//! the wide burn-down with the jobs spread over 64 projects (`AIWG_PG_QUEUE_PROJECTS`) and one
//! job per project at a time (`per_project_concurrency: 1`, the configuration's default; `ratio
//! pg_wide_burn_down_2_engines_per_project`). Parts named together (`wide,per_project`) run
//! one after the other in one schema, as the full run does. `AIWG_PG_QUEUE_SIDE=ours` (or
//! `baseline`) runs only that side of the wide burn-downs, for a profile of it, and prints its
//! rate and no `ratio` line.
//!
//! The *submit burst*: many submits at once (`SUBMITTERS` tasks over 2 stores, each job
//! submitted on its own with `JobStore::create` into a bounded queue, as `Engine::submit`
//! does), beside the same tasks each inserting a row into a bare table
//! (`ratio pg_submit_burst_bounded`, submits/s against inserts/s).
//! On Linux the wide burn-down also prints the machine's CPU time per job for both
//! (`ratio pg_wide_cpu_per_job`, baseline / ours): on a machine whose disk and neighbours vary
//! it moves less than the rates do.
//!
//! Every pool here, the baseline's included, is built from `PgStore::pool_options`, the pool
//! the store's own `connect` makes.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aiwg_benches::pg::BenchSchema;
use aiwg_core::store::{JobStore, NewJob, PgStore};
use aiwg_core::test_util::{sample_job, ScriptedExecutor};
use aiwg_core::{Engine, JobRequest, Progress, Step, Workflow};
use criterion::{BenchmarkId, Criterion, Throughput};
use sqlx::postgres::PgPool;

/// Jobs per burn-down batch.
const BATCH: usize = 300;
/// Workers per engine (and claimers in the baseline).
const WORKERS: usize = 4;
/// Jobs of the wide burn-down (`AIWG_PG_QUEUE_WIDE_JOBS`, default 5 000).
fn wide_jobs() -> usize {
    env_usize("AIWG_PG_QUEUE_WIDE_JOBS", 5_000)
}
/// Workers per engine in the wide burn-down (`AIWG_PG_QUEUE_WIDE_WORKERS`, default 32).
fn wide_workers() -> usize {
    env_usize("AIWG_PG_QUEUE_WIDE_WORKERS", 32)
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The shape of a burn-down: how many jobs, how many workers per engine.
#[derive(Clone, Copy)]
struct Shape {
    jobs: usize,
    workers: usize,
    /// 0: every job in one project, no per-project limit. Otherwise the jobs are spread over
    /// this many projects and each engine runs at most one job per project at a time
    /// (`per_project_concurrency: 1`, the configuration's default).
    projects: usize,
}

const NARROW: Shape = Shape {
    jobs: BATCH,
    workers: WORKERS,
    projects: 0,
};
/// Projects of the per-project wide burn-down (`AIWG_PG_QUEUE_PROJECTS`, default 64).
fn projects() -> usize {
    env_usize("AIWG_PG_QUEUE_PROJECTS", 64)
}
/// Latency samples per configuration.
const LATENCY_SAMPLES: usize = 200;
/// Jobs (or rows) sent through each configuration before its samples are taken, not counted:
/// the first ones wait for the pool's new connections (TCP, TLS where the server offers it,
/// authentication: milliseconds each), which with 200 samples would be the p99.
const LATENCY_WARM_UP: usize = 10;

/// A migrated store in the bench's schema (the baseline's pool and the stores' are the pool
/// the store's `connect` builds).
async fn store(db: &BenchSchema, relaxed: bool) -> Arc<PgStore> {
    let store = PgStore::from_pool(db.pool(16).await)
        .await
        .expect("store")
        .with_relaxed_event_commits(relaxed);
    store.migrate().await.expect("migrate");
    Arc::new(store)
}

struct Node {
    engine: Engine,
    listener: tokio::task::JoinHandle<()>,
}

async fn node(store: &Arc<PgStore>, exec: &ScriptedExecutor, shape: Shape) -> Node {
    let mut builder = Engine::builder();
    if shape.projects > 0 {
        builder = builder.per_project_concurrency(1);
    }
    let engine = builder
        .store(store.clone())
        .executor("noop", Arc::new(exec.clone()))
        .workflow(Workflow::new("noop").step(Step::prompt("run", "noop", "x")))
        .workers(shape.workers)
        .queue_capacity(shape.jobs * 10)
        .poll_interval(Duration::from_millis(200))
        .build()
        .expect("engine");
    let listener = store
        .listen(engine.cluster_listener())
        .await
        .expect("listen");
    Node { engine, listener }
}

async fn stop(nodes: Vec<Node>) {
    for n in nodes {
        n.engine.shutdown(Duration::from_secs(5)).await;
        n.listener.abort();
    }
}

/// The per-project burn-down's project directories (see [`project_dirs`]).
static PROJECT_DIRS: OnceLock<(tempfile::TempDir, Vec<String>)> = OnceLock::new();

/// The directories of the per-project burn-down's projects (`project-0` …), made once, when
/// first asked for, in a temporary directory of the current one, removed at the end of `main`
/// ([`remove_project_dirs`]): the engine checks a job's project again before its first step,
/// and fails a job whose directory does not exist.
fn project_dirs() -> &'static [String] {
    let (_, dirs) = PROJECT_DIRS.get_or_init(|| {
        // Under the current directory: the engine's default project root.
        let root = tempfile::Builder::new()
            .prefix(".aiwg-bench-projects")
            .tempdir_in(".")
            .expect("projects' directory");
        let dirs = (0..projects())
            .map(|i| {
                let dir = root.path().join(format!("project-{i}"));
                std::fs::create_dir(&dir).expect("project directory");
                dir.canonicalize()
                    .expect("project directory")
                    .display()
                    .to_string()
            })
            .collect();
        (root, dirs)
    });
    dirs
}

/// Removes the directories [`project_dirs`] made (a static is never dropped).
fn remove_project_dirs() {
    if let Some((root, _)) = PROJECT_DIRS.get() {
        let _ = std::fs::remove_dir_all(root.path());
    }
}

/// Fills the queue with `jobs` jobs (one statement, before the clock starts), spread round
/// robin over `projects` projects (the current directory when 0).
async fn fill(store: &PgStore, jobs: usize, projects: usize) {
    let project = std::env::current_dir()
        .expect("cwd")
        .canonicalize()
        .expect("cwd")
        .display()
        .to_string();
    let jobs = (0..jobs)
        .map(|i| {
            let project = match projects {
                0 => project.clone(),
                n => project_dirs()[..n][i % n].clone(),
            };
            let mut job = sample_job("noop", &project, 0);
            job.progress = Progress::pending(["run".to_owned()]);
            NewJob::new(job)
        })
        .collect();
    for created in store.create_many(jobs).await {
        created.expect("create");
    }
}

/// Waits until every job of the burn-down ended: on the executor's count (no polling, no
/// sleep) until the last job started, then on the store's counts, polled every millisecond,
/// for the last outcomes.
async fn drained(store: &PgStore, exec: &ScriptedExecutor, jobs: usize) {
    assert!(
        exec.wait_started(jobs, Duration::from_secs(120)).await,
        "every job started"
    );
    loop {
        let c = store.counts().await.expect("counts");
        if c.queued == 0 && c.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Prints how many jobs ran more than once and the events of two of them (what their runs
/// left in the store says why).
async fn report_jobs_run_twice(store: &PgStore, exec: &ScriptedExecutor) {
    let mut runs = std::collections::HashMap::new();
    for r in exec.requests() {
        *runs.entry(r.job_id).or_insert(0) += 1;
    }
    let twice: Vec<_> = runs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    eprintln!(
        "{} jobs ran more than once; the events of two of them:",
        twice.len()
    );
    for id in twice.iter().take(2) {
        for e in store.events(*id, 0).await.unwrap_or_default() {
            eprintln!("  {id} {} {:?}", e.seq, e.kind);
        }
    }
}

/// How long a timed run took, and the machine's CPU time over it ([`machine_cpu`]).
struct Cost {
    took: Duration,
    cpu: Option<Duration>,
}

/// Fills the queue, then times engines on `stores` draining it (and the machine's CPU time
/// from the start of the engines to the queue drained).
async fn burn_down(stores: &[Arc<PgStore>], shape: Shape) -> Cost {
    fill(&stores[0], shape.jobs, shape.projects).await;
    let exec = ScriptedExecutor::succeeding("");
    let cpu = machine_cpu();
    let start = Instant::now();
    let mut nodes = Vec::new();
    for s in stores {
        nodes.push(node(s, &exec, shape).await);
    }
    drained(&stores[0], &exec, shape.jobs).await;
    let took = start.elapsed();
    let cpu = cpu_since(cpu);
    if exec.calls() != shape.jobs {
        report_jobs_run_twice(&stores[0], &exec).await;
    }
    assert_eq!(exec.calls(), shape.jobs, "every job ran once");
    stop(nodes).await;
    Cost { took, cpu }
}

/// Transactions committed in the bench's database so far (`pg_stat_database`; a backend
/// reports its counts when it goes idle for a while or exits).
async fn commits(admin: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(admin)
    .await
    .expect("pg_stat_database")
}

/// Commits per job of a burn-down on fresh stores: every transaction the engines' stores
/// committed from the start of the engines to their shutdown (claims, events, outcomes,
/// notifications, sweeps, empty claims), over `BATCH`. Exact only when nothing else uses the
/// database meanwhile.
async fn commits_per_job(db: &BenchSchema, engines: usize, relaxed: bool) -> f64 {
    let mut stores = Vec::new();
    for _ in 0..engines {
        stores.push(store(db, relaxed).await);
    }
    fill(&stores[0], BATCH, 0).await;
    // Let every backend report what it did so far.
    for s in &stores {
        s.pool().close().await;
    }
    let mut stores = Vec::new();
    for _ in 0..engines {
        stores.push(store(db, relaxed).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = commits(&db.admin).await;
    let exec = ScriptedExecutor::succeeding("");
    let mut nodes = Vec::new();
    for s in &stores {
        nodes.push(node(s, &exec, NARROW).await);
    }
    assert!(
        exec.wait_started(BATCH, Duration::from_secs(120)).await,
        "every job started"
    );
    // Shutting down lets the running jobs finish and record their outcomes.
    stop(nodes).await;
    for s in &stores {
        s.pool().close().await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = commits(&db.admin).await;
    // The two reads of `pg_stat_database` by `admin` are transactions too.
    (after - before - 1) as f64 / BATCH as f64
}

/// Closes the pools of the other parts before the commits are counted: a backend reports its
/// commits to `pg_stat_database` when it next ends a transaction a second or more after its
/// last report, or when it exits, so an idle connection of an earlier part reports its commits
/// late, into the count of the next part (after the submit burst, 18 commits per job counted
/// for 3 made).
async fn close_pools(raw: &PgPool, two: &[Arc<PgStore>], relaxed: &[Arc<PgStore>]) {
    raw.close().await;
    for s in two.iter().chain(relaxed) {
        s.pool().close().await;
    }
}

/// Prints the commits per job of the narrow burn-down: 1 engine, 2 engines, 1 engine with
/// relaxed event commits.
async fn commits_per_job_all(db: &BenchSchema) {
    let c1 = commits_per_job(db, 1, false).await;
    let c2 = commits_per_job(db, 2, false).await;
    let cr = commits_per_job(db, 1, true).await;
    println!();
    println!("commits per job (pg_stat_database.xact_commit over {BATCH} jobs):");
    println!("  1 engine {c1:.2}; 2 engines {c2:.2}; 1 engine, relaxed event commits {cr:.2}");
}

/// The baseline: `BATCH` inserts, then `WORKERS` claimers taking rows with
/// `UPDATE … FOR UPDATE SKIP LOCKED` until none is left.
async fn baseline(pool: &PgPool) -> Cost {
    let cpu = machine_cpu();
    let start = Instant::now();
    for i in 0..BATCH {
        sqlx::query("INSERT INTO bench_queue (priority, payload) VALUES (0, $1)")
            .bind(format!("job {i}"))
            .execute(pool)
            .await
            .expect("insert");
    }
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            while claim_one(&pool).await.is_some() {}
        }));
    }
    for t in tasks {
        t.await.expect("claimer");
    }
    let took = start.elapsed();
    Cost {
        took,
        cpu: cpu_since(cpu),
    }
}

/// The baseline of the wide burn-down: `jobs` rows inserted in one statement before the clock
/// starts (as the engines' queue is filled), then `claimers` tasks each taking a row with
/// `UPDATE … FOR UPDATE SKIP LOCKED` and marking it done with a second `UPDATE`, until none is
/// left: the bare two commits a job's start and end cost.
async fn baseline_wide(pool: &PgPool, jobs: usize, claimers: usize) -> Cost {
    sqlx::query("DELETE FROM bench_queue")
        .execute(pool)
        .await
        .expect("empty");
    sqlx::query(
        "INSERT INTO bench_queue (priority, payload) \
         SELECT 0, 'job ' || i FROM generate_series(1, $1) AS i",
    )
    .bind(i64::try_from(jobs).expect("jobs"))
    .execute(pool)
    .await
    .expect("fill");
    let cpu = machine_cpu();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..claimers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(id) = claim_one(&pool).await {
                sqlx::query("UPDATE bench_queue SET done = true WHERE id = $1")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .expect("complete");
            }
        }));
    }
    for t in tasks {
        t.await.expect("claimer");
    }
    let took = start.elapsed();
    let cpu = cpu_since(cpu);
    Cost { took, cpu }
}

async fn claim_one(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar(
        "UPDATE bench_queue SET taken = true WHERE id = (SELECT id FROM bench_queue \
         WHERE NOT taken ORDER BY priority DESC, id LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING id",
    )
    .fetch_optional(pool)
    .await
    .expect("claim")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report_latency(name: &str, mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort_unstable();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!("{name:<40} p50 {p50:>10.2?}  p99 {p99:>10.2?}");
    (p50, p99)
}

/// Enqueue → the executor starts, on idle engines (`nodes` engines on `stores`); also prints
/// the median of the two parts: until the submit answered (the job committed), and from then
/// until the executor started (wake-up, claim, the worker's start).
async fn engine_latency(name: &str, stores: &[Arc<PgStore>]) -> (Duration, Duration) {
    let exec = ScriptedExecutor::succeeding("");
    let mut nodes = Vec::new();
    for s in stores {
        nodes.push(node(s, &exec, NARROW).await);
    }
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    let mut submits = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_WARM_UP + LATENCY_SAMPLES {
        let engine = &nodes[i % nodes.len()].engine;
        let start = Instant::now();
        let job = engine
            .submit(JobRequest::new("noop"))
            .await
            .expect("submit");
        let submitted = start.elapsed();
        assert!(
            exec.wait_started(i + 1, Duration::from_secs(30)).await,
            "job started"
        );
        if i >= LATENCY_WARM_UP {
            submits.push(submitted);
            samples.push(start.elapsed());
        }
        engine
            .wait(job.id, Duration::from_secs(30))
            .await
            .expect("done");
    }
    stop(nodes).await;
    let mut rest: Vec<Duration> = samples.iter().zip(&submits).map(|(t, s)| *t - *s).collect();
    submits.sort_unstable();
    rest.sort_unstable();
    let figures = report_latency(name, samples);
    println!(
        "{:<40} submit p50 {:>10.2?}, then start p50 {:>10.2?}",
        "    of which",
        percentile(&submits, 0.5),
        percentile(&rest, 0.5)
    );
    figures
}

/// The baseline: one `INSERT`, then one `UPDATE … SKIP LOCKED` claim of it.
async fn baseline_latency(pool: &PgPool) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_WARM_UP + LATENCY_SAMPLES {
        let start = Instant::now();
        sqlx::query("INSERT INTO bench_queue (priority, payload) VALUES (0, $1)")
            .bind(format!("latency {i}"))
            .execute(pool)
            .await
            .expect("insert");
        claim_one(pool).await.expect("claimed");
        if i >= LATENCY_WARM_UP {
            samples.push(start.elapsed());
        }
    }
    samples
}

/// The wide burn-down, 2 engines on `two` against [`baseline_wide`], each the median of at
/// most three of `rounds`; prints its figures. With `projects` > 0 the jobs are spread over
/// that many projects and the engines run one job per project at a time (the figures are
/// then named `…_per_project`).
async fn wide_burn_down(raw: &PgPool, two: &[Arc<PgStore>], rounds: usize, projects: usize) {
    let rounds = rounds.min(3);
    let wide = Shape {
        jobs: wide_jobs(),
        workers: wide_workers(),
        projects,
    };
    let suffix = if projects > 0 { "_per_project" } else { "" };
    let claimers = (2 * wide.workers).min(30);
    let mut wide_runs: [Vec<Duration>; 2] = Default::default();
    // The machine's CPU time over each timed run (database, engines and bench alike).
    let mut cpu: [Option<Duration>; 2] = [Some(Duration::ZERO); 2];
    // `AIWG_PG_QUEUE_SIDE=ours|baseline` runs one side alone (for a profile of it); the
    // figures are then not printed.
    let side = std::env::var("AIWG_PG_QUEUE_SIDE").ok();
    if let Some(side) = side {
        let (mut took, mut cpu) = (Duration::ZERO, Some(Duration::ZERO));
        for _ in 0..rounds {
            let cost = if side == "baseline" {
                baseline_wide(raw, wide.jobs, claimers).await
            } else {
                burn_down(two, wide).await
            };
            took += cost.took;
            cpu = cpu.zip(cost.cpu).map(|(a, b)| a + b);
        }
        let jobs = (wide.jobs * rounds) as f64;
        println!(
            "wide burn-down, {side} alone{suffix}: {:.0} jobs/s, machine CPU {} a job, {} busy",
            jobs / took.as_secs_f64(),
            cpu.map_or("?".into(), |c| format!(
                "{:.0} us",
                c.as_secs_f64() * 1e6 / jobs
            )),
            cpu.map_or("?".into(), |c| format!(
                "{:.0} %",
                100.0 * c.as_secs_f64() / took.as_secs_f64() / cores()
            )),
        );
        return;
    }
    for _ in 0..rounds {
        for (i, cost) in [
            baseline_wide(raw, wide.jobs, claimers).await,
            burn_down(two, wide).await,
        ]
        .into_iter()
        .enumerate()
        {
            wide_runs[i].push(cost.took);
            cpu[i] = cpu[i].zip(cost.cpu).map(|(a, b)| a + b);
        }
    }
    let [wb, w2] = wide_runs.map(|mut r| {
        r.sort_unstable();
        r[r.len() / 2]
    });
    let wide_rate = |d: Duration| wide.jobs as f64 / d.as_secs_f64();
    println!();
    println!(
        "wide burn-down of {} jobs, 2 engines x {} workers (median of {} rounds){}:",
        wide.jobs,
        wide.workers,
        rounds,
        if projects > 0 {
            format!(", {projects} projects, one job per project at a time")
        } else {
            String::new()
        }
    );
    println!(
        "  baseline: {claimers} claimers, claim + complete  {:>9.0} items/s",
        wide_rate(wb)
    );
    println!(
        "  2 engines                                    {:>9.0} jobs/s  ({:.2} x baseline)",
        wide_rate(w2),
        wide_rate(w2) / wide_rate(wb)
    );
    let per_job = |d: Duration| d.as_secs_f64() * 1e6 / (wide.jobs * rounds) as f64;
    let cpu = match cpu {
        [Some(b), Some(o)] if !b.is_zero() && !o.is_zero() => Some((per_job(b), per_job(o))),
        _ => None,
    };
    if let Some((b, o)) = cpu {
        println!(
            "  machine CPU per job (database, engines, bench): baseline {b:.0} us, 2 engines {o:.0} us"
        );
    }
    println!(
        "ratio pg_wide_burn_down_2_engines{suffix} {:.3}",
        wide_rate(w2) / wide_rate(wb)
    );
    if let Some((b, o)) = cpu {
        println!("ratio pg_wide_cpu_per_job{suffix} {:.3}", b / o);
    }
}

/// Tasks submitting at once in the submit burst.
const SUBMITTERS: usize = 32;
/// Submits per round of the submit burst.
const BURST: usize = 4_000;

/// `SUBMITTERS` tasks, taking `targets` in turn, each calling `op` with its target until
/// `BURST` calls were made in all. Answers how long it took.
async fn burst<T, F>(targets: &[T], op: fn(T) -> F) -> Duration
where
    T: Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..SUBMITTERS)
        .map(|i| {
            let target = targets[i % targets.len()].clone();
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < BURST {
                    op(target.clone()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("burst task");
    }
    start.elapsed()
}

/// One submit of the burst: a job on its own into a bounded queue (room for all of them).
async fn submit_one(store: Arc<PgStore>) {
    store
        .create(NewJob::new(sample_job("noop", "/p", 0)).capacity(BURST * 100))
        .await
        .expect("submit");
}

/// One insert of the burst's baseline: a row into a bare table, one statement and commit.
async fn insert_one(pool: PgPool) {
    sqlx::query("INSERT INTO bench_queue (priority, payload) VALUES (0, 'job')")
        .execute(&pool)
        .await
        .expect("insert");
}

/// The submit burst beside its baseline, `rounds` rounds each (at most 3), medians. The queue
/// is emptied between rounds.
async fn submit_bursts(raw: &PgPool, two: &[Arc<PgStore>], rounds: usize) {
    let rounds = rounds.min(3);
    let mut runs: [Vec<Duration>; 2] = Default::default();
    for _ in 0..rounds {
        runs[0].push(burst(std::slice::from_ref(raw), insert_one).await);
        runs[1].push(burst(two, submit_one).await);
        for sql in ["DELETE FROM bench_queue", "DELETE FROM aiwg_jobs"] {
            sqlx::query(sql).execute(raw).await.expect("empty");
        }
    }
    let [b, o] = runs.map(|mut r| {
        r.sort_unstable();
        r[r.len() / 2]
    });
    let rate = |d: Duration| BURST as f64 / d.as_secs_f64();
    println!();
    println!("submit burst: {BURST} jobs, {SUBMITTERS} tasks at once (median of {rounds} rounds):");
    println!("  baseline: one INSERT per row    {:>9.0} rows/s", rate(b));
    println!(
        "  2 stores, bounded queue         {:>9.0} submits/s  ({:.2} x baseline)",
        rate(o),
        rate(o) / rate(b)
    );
    println!("ratio pg_submit_burst_bounded {:.3}", rate(o) / rate(b));
}

/// The machine's CPU time since a reading of [`machine_cpu`].
fn cpu_since(start: Option<Duration>) -> Option<Duration> {
    start.zip(machine_cpu()).map(|(b, a)| a.saturating_sub(b))
}

/// The CPU time the whole machine has spent working (every process, the kernel included; not
/// idle, not waiting for the disk), from `/proc/stat`; `None` where there is none (not Linux).
/// Less noisy than a rate on a machine whose disk and neighbours vary: it counts what a run
/// cost, not how long it waited.
fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal …
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(busy * 10))
}

/// The machine's cores (for how busy a run kept them).
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
}

/// The narrow burn-downs: `rounds` rounds (the summary's `AIWG_PG_QUEUE_ROUNDS`), each running
/// the baseline and every configuration once, one after the other; each figure is the median
/// of its rounds, so a burst of load on a shared machine moves one round, not the result.
async fn narrow_burn_downs(
    raw: &PgPool,
    one: &[Arc<PgStore>],
    two: &[Arc<PgStore>],
    relaxed: &[Arc<PgStore>],
    rounds: usize,
) {
    let mut runs: [Vec<Duration>; 4] = Default::default();
    // The machine's CPU time of each run, where it can be read (see `machine_cpu`).
    let mut cpus: [Vec<Option<Duration>>; 4] = Default::default();
    for _ in 0..rounds {
        for (i, cost) in [
            baseline(raw).await,
            burn_down(one, NARROW).await,
            burn_down(two, NARROW).await,
            burn_down(relaxed, NARROW).await,
        ]
        .into_iter()
        .enumerate()
        {
            runs[i].push(cost.took);
            cpus[i].push(cost.cpu);
        }
    }
    // The median CPU time a job (µs) and share of the cores kept busy, per setup: a run bound
    // by the machine's CPU (every core busy) gains nothing from more claims in flight.
    let cpu_use = |took: &[Duration], cpu: &[Option<Duration>]| {
        let cpu: Option<Vec<Duration>> = cpu.iter().copied().collect();
        let mut cpu = cpu?;
        let mut busy: Vec<f64> = cpu
            .iter()
            .zip(took)
            .map(|(c, t)| c.as_secs_f64() / t.as_secs_f64() / cores())
            .collect();
        cpu.sort_unstable();
        busy.sort_by(f64::total_cmp);
        let per_job = cpu[cpu.len() / 2].as_secs_f64() * 1e6 / BATCH as f64;
        Some((per_job, busy[busy.len() / 2] * 100.0))
    };
    let uses: Vec<_> = runs.iter().zip(&cpus).map(|(r, c)| cpu_use(r, c)).collect();
    // Each round's ratio against the baseline of the same round: how far the machine moved
    // while the figures were taken (the `ratio` lines stay medians of the rates).
    let spread = |ours: &[Duration]| {
        let ratios = ours
            .iter()
            .zip(&runs[0])
            .map(|(o, b)| b.as_secs_f64() / o.as_secs_f64());
        ratios.fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)))
    };
    let spreads = [spread(&runs[1]), spread(&runs[2]), spread(&runs[3])];
    let [base, t1, t2, tr] = runs.map(|mut r| {
        r.sort_unstable();
        r[r.len() / 2]
    });
    let rate = |d: Duration| BATCH as f64 / d.as_secs_f64();
    println!();
    println!(
        "burn-down of {BATCH} jobs, {WORKERS} workers per engine (median of {rounds} rounds):"
    );
    println!(
        "  baseline INSERT + SKIP LOCKED  {:>9.0} items/s",
        rate(base)
    );
    println!(
        "  1 engine                      {:>9.0} jobs/s  ({:.2} x baseline)",
        rate(t1),
        rate(t1) / rate(base)
    );
    println!(
        "  2 engines                     {:>9.0} jobs/s  ({:.2} x baseline)",
        rate(t2),
        rate(t2) / rate(base)
    );
    println!(
        "  1 engine, relaxed event commits {:>6.0} jobs/s  ({:.2} x baseline)",
        rate(tr),
        rate(tr) / rate(base)
    );
    for (name, (lo, hi)) in ["1 engine", "2 engines", "relaxed"].iter().zip(spreads) {
        println!("  {name}: each round against its own baseline {lo:.2}–{hi:.2} x");
    }
    if let [Some(b), Some(o), Some(t), Some(r)] = uses[..] {
        println!(
            "  machine CPU per job (cores busy): baseline {:.0} us ({:.0} %), 1 engine {:.0} us \
             ({:.0} %), 2 engines {:.0} us ({:.0} %), relaxed {:.0} us ({:.0} %)",
            b.0, b.1, o.0, o.1, t.0, t.1, r.0, r.1
        );
    }
    // Higher is better: throughput ours / baseline.
    println!("ratio pg_burn_down_1_engine {:.3}", rate(t1) / rate(base));
    println!("ratio pg_burn_down_2_engines {:.3}", rate(t2) / rate(base));
    println!("ratio pg_burn_down_relaxed {:.3}", rate(tr) / rate(base));
}

/// Enqueue → start with 1 and 2 engines and relaxed event commits, beside the baseline.
async fn latencies(
    raw: &PgPool,
    one: &[Arc<PgStore>],
    two: &[Arc<PgStore>],
    relaxed: &[Arc<PgStore>],
) {
    println!();
    println!(
        "enqueue -> start latency ({LATENCY_SAMPLES} samples each, after {LATENCY_WARM_UP} not counted):"
    );
    let (b50, b99) = report_latency(
        "  baseline INSERT + SKIP LOCKED",
        baseline_latency(raw).await,
    );
    let (l50, l99) = engine_latency("  1 engine", one).await;
    let (m50, m99) = engine_latency("  2 engines", two).await;
    engine_latency("  1 engine, relaxed event commits", relaxed).await;
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "  ratio to baseline: 1 engine p50 {:.1}x p99 {:.1}x; 2 engines p50 {:.1}x p99 {:.1}x",
        ratio(l50, b50),
        ratio(l99, b99),
        ratio(m50, b50),
        ratio(m99, b99)
    );
    // Higher is better: latency baseline / ours.
    println!("ratio pg_latency_p50_1_engine {:.3}", ratio(b50, l50));
    println!("ratio pg_latency_p99_1_engine {:.3}", ratio(b99, l99));
    println!("ratio pg_latency_p50_2_engines {:.3}", ratio(b50, m50));
    println!("ratio pg_latency_p99_2_engines {:.3}", ratio(b99, m99));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = match rt.block_on(BenchSchema::create("pg_queue")) {
        Ok(db) => db,
        Err(why) => {
            println!("pg_queue: skipped ({why})");
            return;
        }
    };
    let (one, two, relaxed, raw) = rt.block_on(async {
        let a = store(&db, false).await;
        let b = store(&db, false).await;
        let r = store(&db, true).await;
        let raw = db.pool(32).await;
        sqlx::query(
            "CREATE TABLE bench_queue (id bigserial PRIMARY KEY, priority int NOT NULL, \
             payload text NOT NULL, taken boolean NOT NULL DEFAULT false, \
             done boolean NOT NULL DEFAULT false)",
        )
        .execute(&raw)
        .await
        .expect("baseline table");
        sqlx::query("CREATE INDEX ON bench_queue (priority DESC, id) WHERE NOT taken")
            .execute(&raw)
            .await
            .expect("baseline index");
        (vec![a.clone()], vec![a, b], vec![r], raw)
    });

    let rounds = env_usize("AIWG_PG_QUEUE_ROUNDS", 5);
    let only = std::env::var("AIWG_PG_QUEUE_ONLY").unwrap_or_default();
    if !only.is_empty() {
        rt.block_on(async {
            // Parts named together run one after the other in one schema, as in the full
            // run (which leaves each part what the earlier ones left behind).
            for part in only.split(',') {
                match part.trim() {
                    "wide" => wide_burn_down(&raw, &two, rounds, 0).await,
                    "per_project" => wide_burn_down(&raw, &two, rounds, projects()).await,
                    "submit" => submit_bursts(&raw, &two, rounds).await,
                    "narrow" => narrow_burn_downs(&raw, &one, &two, &relaxed, rounds).await,
                    "latency" => latencies(&raw, &one, &two, &relaxed).await,
                    // Last, whatever its place in the list (see below).
                    "commits" => {}
                    other => println!("pg_queue: AIWG_PG_QUEUE_ONLY={other} names no part"),
                }
            }
            if only.split(',').any(|p| p.trim() == "commits") {
                close_pools(&raw, &two, &relaxed).await;
                commits_per_job_all(&db).await;
            }
            drop(raw);
            db.drop_schema().await;
        });
        remove_project_dirs();
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("pg_burn_down");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("baseline_insert_then_skip_locked", |bch| {
        bch.to_async(&rt).iter_custom(|iters| {
            let raw = raw.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += baseline(&raw).await.took;
                }
                total
            }
        })
    });
    for (name, stores) in [
        ("engines", &one),
        ("engines", &two),
        ("relaxed_event_commits", &relaxed),
    ] {
        group.bench_with_input(
            BenchmarkId::new(name, stores.len()),
            stores,
            |bch, stores| {
                bch.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += burn_down(stores, NARROW).await.took;
                    }
                    total
                })
            },
        );
    }
    group.finish();
    c.final_summary();

    // Timed runs for the summary (criterion's own report is above), one part after the other.
    rt.block_on(async {
        narrow_burn_downs(&raw, &one, &two, &relaxed, rounds).await;
        latencies(&raw, &one, &two, &relaxed).await;
        wide_burn_down(&raw, &two, rounds, 0).await;
        wide_burn_down(&raw, &two, rounds, projects()).await;
        submit_bursts(&raw, &two, rounds).await;
        close_pools(&raw, &two, &relaxed).await;
        commits_per_job_all(&db).await;
        drop(raw);
        db.drop_schema().await;
    });
    remove_project_dirs();
}
