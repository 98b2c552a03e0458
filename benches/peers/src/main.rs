//! aiwg's PostgreSQL queue beside two peers on the same database, in the same run: River's Rust
//! client (`riverqueue`) and Graphile Worker RS (`graphile_worker`). Issue 15 measured both when
//! it was filed and set the goal "clearly ahead of both here"; this is that comparison, repeatable.
//!
//! ```text
//! cargo run --release --manifest-path benches/peers/Cargo.toml
//! ```
//!
//! Every system runs no-op jobs (aiwg: a one-step workflow on a scripted executor that answers at
//! once; River: a function worker answering `Complete`; Graphile: a task handler answering `Ok`)
//! and is configured as fast as its documentation allows, not at its defaults:
//!
//! - **aiwg**: `PgStore` with its listener, as `pg_queue`'s burn-downs (default durability).
//! - **River**: one queue of `workers` workers, the fetch cooldown at its minimum
//!   (`FETCH_COOLDOWN_MIN`, 1 ms; at its default, 100 ms, it paces every fetch), leader election
//!   on (its default).
//! - **Graphile Worker RS**: `concurrency` = `workers`, a local queue of 100 jobs (batched
//!   fetches) and a 10 ms poll interval, as its own throughput bench configures it.
//!
//! Each client (engine) has its own pool of 16 connections. Every round gives every system a
//! fresh schema, migrated by its own migrations, dropped after the round.
//!
//! **Burn-down**: `AIWG_PEERS_JOBS` jobs (default 10 000) are queued before the clock starts (one
//! bulk insert each: `JobStore::create_many`, `insert_many`, `add_raw_jobs`); the clock runs from
//! starting 1 (then 2) clients of `AIWG_PEERS_WORKERS` workers each (default 32) until every job
//! ran and the database holds every job as completed (aiwg: no job queued or running; River: no
//! row not `completed`; Graphile: no row left, as it deletes what completed), polled every
//! millisecond once the workers ran the last job. Jobs/s, the machine's CPU time per job from
//! `/proc/stat` (PostgreSQL's included; in parentheses this process's, the clients' share) and the write-ahead log PostgreSQL wrote per job
//! (`pg_current_wal_lsn()` before and after: the cluster's, so nothing else should run).
//!
//! **Latency**: one client, idle; a job is queued and the clock stops when its worker starts it;
//! the next job is queued once that one completed. 200 samples after 10 not counted; p50 / p99.
//!
//! Last lines: `ratio aiwg_vs_<peer>_burn_down_<n>_client[s] <ours / theirs>` and
//! `ratio aiwg_vs_<peer>_latency_p50|p99 <theirs / ours>`: above 1, aiwg is ahead.
//!
//! Environment: `AIWG_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`; a
//! URL that names no `sslmode` gets `sslmode=disable`, so that no system pays for TLS and all pay
//! alike), `AIWG_PEERS_JOBS`, `AIWG_PEERS_WORKERS`, `AIWG_PEERS_ROUNDS` (default 3; each figure
//! is the median of its rounds, the systems alternating within a round), `AIWG_PEERS_ONLY`
//! (`burn_down` or `latency`), `AIWG_PEERS_SYSTEMS` (some of `aiwg,river,graphile`, for a
//! profile of one; the `ratio` lines need `aiwg`), `AIWG_PEERS_CLIENTS` (`1` or `2`: only the
//! burn-downs of that many clients, for a profile of one), `AIWG_PEERS_CALLS` (set: aiwg's
//! connections track their PL/pgSQL calls, and each aiwg burn-down prints the calls a job of
//! each function and the time a job spent in it).
//!
//! The process allocates with the system allocator, as `pg_queue` does; `--features jemalloc`
//! puts every system on jemalloc, as the example servers run.
//!
//! A run that panics leaves its schema behind (named `aiwg_peers_<system>_<pid>_<time>`).
//!
//! A standalone crate, its own workspace (as `fuzz/` is): the peers and the second SQLx (0.9)
//! they bring are built only by whoever runs this, never by the workspace's tests or CI.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// With `--features jemalloc`, the process (every system's client alike) allocates with jemalloc,
/// as the example servers do by default; without it, with the system allocator, as `pg_queue` does.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Connections per client (per engine).
const POOL: u32 = 16;
/// Latency samples per system, and the jobs sent first and not counted (the pool's first
/// connections).
const LATENCY_SAMPLES: usize = 200;
const LATENCY_WARM_UP: usize = 10;
/// Jobs a peer's bulk insert queues at a time (before the clock: the fill is not measured).
const INSERT_CHUNK: usize = 2_000;
/// How long any one wait may take before the run is declared stuck.
const PATIENCE: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// The database URL, with `sslmode=disable` when it names none.
fn database_url() -> String {
    let url = std::env::var("AIWG_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    if url.contains("sslmode=") {
        url
    } else if url.contains('?') {
        format!("{url}&sslmode=disable")
    } else {
        format!("{url}?sslmode=disable")
    }
}

/// Jobs started by a peer's workers, and a wake-up for whoever waits for a count.
#[derive(Debug, Default)]
struct Started {
    count: AtomicUsize,
    changed: Notify,
}

impl Started {
    fn hit(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Waits until at least `n` jobs started; panics after [`PATIENCE`].
    async fn wait_for(&self, n: usize) {
        let reached = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.count.load(Ordering::SeqCst) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(PATIENCE, reached)
            .await
            .unwrap_or_else(|_| panic!("{n} jobs did not start"));
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// Polls `done` every millisecond until it answers true; panics after [`PATIENCE`].
async fn until<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < PATIENCE, "{what}: still not done");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Enqueue → start, one job at a time: `queue` queues one (answering what `ended` needs of it),
/// `started(n)` waits until the `n`th started, `ended` until it completed (before the next is
/// queued); the first `warm_up` are not counted (the pool's first connections).
async fn sample_latency<J>(
    samples: usize,
    warm_up: usize,
    mut queue: impl AsyncFnMut() -> J,
    mut started: impl AsyncFnMut(usize),
    mut ended: impl AsyncFnMut(J),
) -> Vec<Duration> {
    let mut taken = Vec::with_capacity(samples);
    for i in 0..warm_up + samples {
        let start = Instant::now();
        let job = queue().await;
        started(i + 1).await;
        if i >= warm_up {
            taken.push(start.elapsed());
        }
        ended(job).await;
    }
    taken
}

/// A fresh schema's name for `system`.
fn schema_name(system: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("aiwg_peers_{system}_{}_{nanos}", std::process::id())
}

/// The machine's CPU time spent working (every process and the kernel; not idle, not waiting
/// for the disk), from `/proc/stat`; `None` off Linux.
fn machine_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0))
        .sum();
    Some(Duration::from_millis(busy * 10))
}

/// This process's CPU time (user and system, every thread): the clients' share of the
/// machine's, as every system's clients run here and PostgreSQL does not; `None` off Linux.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// What a timed burn-down took, the machine's CPU time over it, and the write-ahead log
/// PostgreSQL wrote meanwhile (the whole cluster's: nothing else should run).
#[derive(Clone, Copy)]
struct Cost {
    took: Duration,
    cpu: Option<Duration>,
    /// This process's share of `cpu` (the clients').
    clients_cpu: Option<Duration>,
    wal: u64,
}

/// Where the cluster's write-ahead log stands, in bytes.
async fn wal_position(probe: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
        .fetch_one(probe)
        .await
        .expect("the write-ahead log's position")
}

/// Runs `work` between two readings of the clock, of the machine's CPU time and of the
/// write-ahead log's position (read through `probe`).
async fn timed<Fut: std::future::Future<Output = ()>>(probe: &sqlx::PgPool, work: Fut) -> Cost {
    let wal = wal_position(probe).await;
    let cpu = machine_cpu();
    let clients_cpu = process_cpu();
    let start = Instant::now();
    work.await;
    let took = start.elapsed();
    let cpu = cpu.zip(machine_cpu()).map(|(b, a)| a.saturating_sub(b));
    let clients_cpu = clients_cpu
        .zip(process_cpu())
        .map(|(b, a)| a.saturating_sub(b));
    Cost {
        took,
        cpu,
        clients_cpu,
        wal: u64::try_from(wal_position(probe).await - wal).unwrap_or(0),
    }
}

/// aiwg: `PgStore` and engines, as the workspace's `pg_queue` bench runs them.
mod aiwg {
    use std::str::FromStr;
    use std::sync::Arc;
    use std::time::Duration;

    use aiwg_core::store::{JobStore, NewJob, PgStore};
    use aiwg_core::test_util::{sample_job, ScriptedExecutor};
    use aiwg_core::{Engine, JobRequest, Progress, Step, Workflow};
    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

    use super::{until, Cost, PATIENCE, POOL};

    pub(crate) struct Db {
        admin: PgPool,
        url: String,
        schema: String,
    }

    impl Db {
        pub(crate) async fn create(url: &str) -> Self {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect(url)
                .await
                .expect("aiwg: connect");
            let schema = super::schema_name("aiwg");
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&admin)
                .await
                .expect("aiwg: schema");
            Self {
                admin,
                url: url.to_owned(),
                schema,
            }
        }

        /// A migrated store of its own pool in the schema.
        pub(crate) async fn store(&self) -> Arc<PgStore> {
            let mut options = PgConnectOptions::from_str(&self.url)
                .expect("url")
                .options([("search_path", self.schema.as_str())]);
            if std::env::var_os("AIWG_PEERS_CALLS").is_some() {
                options = options.options([("track_functions", "pl")]);
            }
            let pool = PgStore::pool_options()
                .max_connections(POOL)
                .connect_with(options)
                .await
                .expect("aiwg: pool");
            let store = PgStore::from_pool(pool).await.expect("aiwg: store");
            store.migrate().await.expect("aiwg: migrate");
            Arc::new(store)
        }

        /// With `AIWG_PEERS_CALLS` set, prints the calls a job of each of the schema's
        /// functions that were called (their connections closed first, so that every backend
        /// has reported them).
        pub(crate) async fn print_calls(&self, jobs: usize) {
            if std::env::var_os("AIWG_PEERS_CALLS").is_none() {
                return;
            }
            let calls: Vec<(String, i64, f64)> = sqlx::query_as(
                "SELECT funcname::text, calls, self_time FROM pg_stat_user_functions \
                 WHERE schemaname = $1 ORDER BY calls DESC",
            )
            .bind(&self.schema)
            .fetch_all(&self.admin)
            .await
            .expect("aiwg: function statistics");
            for (name, calls, self_ms) in calls {
                eprintln!(
                    "aiwg calls: {name} {:.4} a job, {:.1} µs a job in it",
                    calls as f64 / jobs as f64,
                    self_ms * 1e3 / jobs as f64
                );
            }
        }

        pub(crate) async fn drop_schema(self) {
            sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
                .execute(&self.admin)
                .await
                .expect("aiwg: drop schema");
            self.admin.close().await;
        }
    }

    struct Node {
        engine: Engine,
        listener: tokio::task::JoinHandle<()>,
    }

    async fn node(store: &Arc<PgStore>, exec: &ScriptedExecutor, workers: usize) -> Node {
        let engine = Engine::builder()
            .store(store.clone())
            .executor("noop", Arc::new(exec.clone()))
            .workflow(Workflow::new("noop").step(Step::prompt("run", "noop", "x")))
            .workers(workers)
            .queue_capacity(1_000_000)
            .poll_interval(Duration::from_millis(200))
            .build()
            .expect("aiwg: engine");
        let listener = store
            .listen(engine.cluster_listener())
            .await
            .expect("aiwg: listen");
        Node { engine, listener }
    }

    async fn stop(nodes: Vec<Node>) {
        for n in nodes {
            n.engine.shutdown(Duration::from_secs(5)).await;
            n.listener.abort();
        }
    }

    /// Queues `jobs` jobs, then times `clients` engines draining them.
    pub(crate) async fn burn_down(
        probe: &sqlx::PgPool,
        url: &str,
        jobs: usize,
        clients: usize,
        workers: usize,
    ) -> Cost {
        let db = Db::create(url).await;
        let mut stores = Vec::new();
        for _ in 0..clients {
            stores.push(db.store().await);
        }
        let project = std::env::current_dir()
            .expect("cwd")
            .canonicalize()
            .expect("cwd")
            .display()
            .to_string();
        let news = (0..jobs)
            .map(|_| {
                let mut job = sample_job("noop", &project, 0);
                job.progress = Progress::pending(["run".to_owned()]);
                NewJob::new(job)
            })
            .collect();
        for created in stores[0].create_many(news).await {
            created.expect("aiwg: queue a job");
        }
        let exec = ScriptedExecutor::succeeding("");
        let mut nodes = Vec::new();
        let cost = super::timed(probe, async {
            for s in &stores {
                nodes.push(node(s, &exec, workers).await);
            }
            assert!(
                exec.wait_started(jobs, PATIENCE).await,
                "aiwg: every job ran"
            );
            until("aiwg: the queue drained", || async {
                let c = stores[0].counts().await.expect("aiwg: counts");
                c.queued == 0 && c.running == 0
            })
            .await;
        })
        .await;
        assert_eq!(exec.calls(), jobs, "aiwg: every job ran once");
        stop(nodes).await;
        for s in stores {
            s.pool().close().await;
        }
        db.print_calls(jobs).await;
        db.drop_schema().await;
        cost
    }

    /// Enqueue → start on one idle engine.
    pub(crate) async fn latency(
        url: &str,
        workers: usize,
        samples: usize,
        warm_up: usize,
    ) -> Vec<Duration> {
        let db = Db::create(url).await;
        let store = db.store().await;
        let exec = ScriptedExecutor::succeeding("");
        let n = node(&store, &exec, workers).await;
        let taken = super::sample_latency(
            samples,
            warm_up,
            async || {
                n.engine
                    .submit(JobRequest::new("noop"))
                    .await
                    .expect("aiwg: submit")
                    .id
            },
            async |count| assert!(exec.wait_started(count, PATIENCE).await, "aiwg: started"),
            async |id| {
                n.engine.wait(id, PATIENCE).await.expect("aiwg: done");
            },
        )
        .await;
        stop(vec![n]).await;
        store.pool().close().await;
        db.drop_schema().await;
        taken
    }
}

/// A peer's schema, named but not yet made, and the one connection (the peers' SQLx, 0.9) that
/// makes it, counts its rows and drops it.
struct PeerDb {
    admin: riverqueue::sqlx::PgPool,
    url: String,
    schema: String,
}

impl PeerDb {
    async fn connect(url: &str, system: &str) -> Self {
        let admin = riverqueue::sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("{system}: connect: {e}"));
        Self {
            admin,
            url: url.to_owned(),
            schema: schema_name(system),
        }
    }

    /// A pool of [`POOL`] connections for one client (the peers name their schema themselves).
    async fn client_pool(&self) -> riverqueue::sqlx::PgPool {
        riverqueue::sqlx::postgres::PgPoolOptions::new()
            .max_connections(POOL)
            .connect(&self.url)
            .await
            .expect("a client's pool")
    }

    async fn execute(&self, sql: String) {
        riverqueue::sqlx::query(riverqueue::sqlx::AssertSqlSafe(sql))
            .execute(&self.admin)
            .await
            .expect("a statement of the peer's schema");
    }

    /// `SELECT count(*)` of `from` (`{schema}` in it stands for the schema).
    async fn count(&self, from: &str) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM {}",
            from.replace("{schema}", &self.schema)
        );
        riverqueue::sqlx::query_scalar(riverqueue::sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.admin)
            .await
            .expect("a count of the peer's rows")
    }

    async fn drop_schema(self) {
        self.execute(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await;
        self.admin.close().await;
    }
}

/// River's Rust client.
mod river {
    use std::sync::Arc;
    use std::time::Duration;

    use riverqueue::database::{PostgresDatabase, SchemaName};
    use riverqueue::migrate::PostgresMigrator;
    use riverqueue::{
        BoxError, Client, Job, JobArgs, QueueConfig, WorkContext, WorkOutcome, Workers,
        FETCH_COOLDOWN_MIN,
    };
    use serde::{Deserialize, Serialize};

    use super::{until, Cost, PeerDb, Started, INSERT_CHUNK};

    #[derive(Clone, Debug, Deserialize, JobArgs, Serialize)]
    #[river(kind = "noop")]
    struct Noop {}

    /// The schema, made and migrated by River's migrator.
    async fn create(url: &str) -> PeerDb {
        let db = PeerDb::connect(url, "river").await;
        db.execute(format!("CREATE SCHEMA {}", db.schema)).await;
        PostgresMigrator::new(db.admin.clone())
            .with_schema(schema(&db))
            .migrate_up()
            .await
            .expect("river: migrate");
        db
    }

    fn schema(db: &PeerDb) -> SchemaName {
        SchemaName::new(db.schema.clone()).expect("river: schema name")
    }

    async fn database(db: &PeerDb) -> PostgresDatabase {
        PostgresDatabase::new(db.client_pool().await).with_schema(schema(db))
    }

    /// Rows not yet `completed`.
    async fn unfinished(db: &PeerDb) -> i64 {
        db.count("{schema}.river_job WHERE state <> 'completed'")
            .await
    }

    /// A client working the default queue with `workers` workers, each job counted in `started`.
    async fn client(db: &PeerDb, workers: usize, started: &Arc<Started>) -> Client {
        let mut registry = Workers::new();
        let started = started.clone();
        registry
            .add_fn(move |_: WorkContext, _: Job<Noop>| {
                let started = started.clone();
                async move {
                    started.hit();
                    Ok::<_, BoxError>(WorkOutcome::Complete)
                }
            })
            .expect("river: worker");
        Client::builder(database(db).await)
            .workers(registry)
            .fetch_cooldown(FETCH_COOLDOWN_MIN)
            .queue("default", QueueConfig::new(workers))
            .build()
            .expect("river: client")
    }

    pub(crate) async fn burn_down(
        probe: &sqlx::PgPool,
        url: &str,
        jobs: usize,
        clients: usize,
        workers: usize,
    ) -> Cost {
        let db = create(url).await;
        {
            let inserter = Client::builder(database(&db).await)
                .build()
                .expect("river: inserter");
            for first in (0..jobs).step_by(INSERT_CHUNK) {
                let n = INSERT_CHUNK.min(jobs - first);
                inserter
                    .insert_many((0..n).map(|_| Noop {}))
                    .await
                    .expect("river: insert");
            }
        }
        let started = Arc::new(Started::default());
        let mut idle = Vec::new();
        for _ in 0..clients {
            idle.push(client(&db, workers, &started).await);
        }
        let mut runs = Vec::new();
        let cost = super::timed(probe, async {
            for c in idle {
                runs.push((c.start().expect("river: start"), c));
            }
            started.wait_for(jobs).await;
            until("river: every job completed", || async {
                unfinished(&db).await == 0
            })
            .await;
        })
        .await;
        assert_eq!(started.count(), jobs, "river: every job ran once");
        for (mut run, _client) in runs {
            run.stop().await.expect("river: stop");
        }
        db.drop_schema().await;
        cost
    }

    pub(crate) async fn latency(
        url: &str,
        workers: usize,
        samples: usize,
        warm_up: usize,
    ) -> Vec<Duration> {
        let db = create(url).await;
        let started = Arc::new(Started::default());
        let c = client(&db, workers, &started).await;
        let mut run = c.start().expect("river: start");
        run.wait_ready().await.expect("river: ready");
        let taken = super::sample_latency(
            samples,
            warm_up,
            async || {
                c.insert(Noop {}).await.expect("river: insert");
            },
            async |count| started.wait_for(count).await,
            async |()| {
                until("river: the job completed", async || {
                    unfinished(&db).await == 0
                })
                .await
            },
        )
        .await;
        run.stop().await.expect("river: stop");
        db.drop_schema().await;
        taken
    }
}

/// Graphile Worker RS.
mod graphile {
    use std::sync::Arc;
    use std::time::Duration;

    use graphile_worker::{
        IntoTaskHandlerResult, JobSpec, LocalQueueConfig, RawJobSpec, TaskHandler, Worker,
        WorkerContext, WorkerOptions, WorkerUtils,
    };
    use serde::{Deserialize, Serialize};

    use super::{until, Cost, PeerDb, Started, INSERT_CHUNK};

    #[derive(Clone, Debug, Deserialize, Serialize)]
    struct Noop {}

    /// The run's count of started jobs, as a worker extension.
    #[derive(Clone, Debug)]
    struct Count(Arc<Started>);

    impl TaskHandler for Noop {
        const IDENTIFIER: &'static str = "noop";

        async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
            if let Some(count) = ctx.get_ext::<Count>() {
                count.0.hit();
            }
            Ok::<(), String>(())
        }
    }

    /// A worker (migrating the schema on its first `init`) of its own pool.
    async fn worker(db: &PeerDb, workers: usize, started: &Arc<Started>) -> Arc<Worker> {
        let worker = WorkerOptions::default()
            .pg_pool(db.client_pool().await)
            .schema(db.schema.as_str())
            .concurrency(workers)
            .poll_interval(Duration::from_millis(10))
            .local_queue(LocalQueueConfig::default().with_size(100))
            .add_extension(Count(started.clone()))
            .define_job::<Noop>()
            .init()
            .await
            .expect("graphile: worker");
        Arc::new(worker)
    }

    /// Rows left (Graphile deletes a job when it completes).
    async fn left(db: &PeerDb) -> i64 {
        db.count("{schema}._private_jobs").await
    }

    async fn shut_down(runs: Vec<(Arc<Worker>, tokio::task::JoinHandle<()>)>) {
        for (worker, run) in runs {
            worker.request_shutdown();
            run.await.expect("graphile: run");
        }
    }

    fn start(worker: &Arc<Worker>) -> tokio::task::JoinHandle<()> {
        let worker = worker.clone();
        tokio::spawn(async move { worker.run().await.expect("graphile: run") })
    }

    pub(crate) async fn burn_down(
        probe: &sqlx::PgPool,
        url: &str,
        jobs: usize,
        clients: usize,
        workers: usize,
    ) -> Cost {
        let db = PeerDb::connect(url, "graphile").await;
        let started = Arc::new(Started::default());
        let mut idle = Vec::new();
        for _ in 0..clients {
            idle.push(worker(&db, workers, &started).await);
        }
        let utils = WorkerUtils::new(db.admin.clone(), db.schema.as_str());
        let specs: Vec<RawJobSpec> = (0..jobs)
            .map(|_| RawJobSpec {
                identifier: "noop".to_owned(),
                payload: serde_json::json!({}),
                spec: JobSpec::default(),
            })
            .collect();
        for chunk in specs.chunks(INSERT_CHUNK) {
            utils.add_raw_jobs(chunk).await.expect("graphile: add");
        }
        let mut runs = Vec::new();
        let cost = super::timed(probe, async {
            for w in &idle {
                runs.push((w.clone(), start(w)));
            }
            started.wait_for(jobs).await;
            until("graphile: every job completed", || async {
                left(&db).await == 0
            })
            .await;
        })
        .await;
        assert_eq!(started.count(), jobs, "graphile: every job ran once");
        shut_down(runs).await;
        db.drop_schema().await;
        cost
    }

    pub(crate) async fn latency(
        url: &str,
        workers: usize,
        samples: usize,
        warm_up: usize,
    ) -> Vec<Duration> {
        let db = PeerDb::connect(url, "graphile").await;
        let started = Arc::new(Started::default());
        let worker = worker(&db, workers, &started).await;
        let run = start(&worker);
        let utils = worker.create_utils();
        let taken = super::sample_latency(
            samples,
            warm_up,
            async || {
                utils
                    .add_job(Noop {}, JobSpec::default())
                    .await
                    .expect("graphile: add");
            },
            async |count| started.wait_for(count).await,
            async |()| until("graphile: the job completed", async || left(&db).await == 0).await,
        )
        .await;
        shut_down(vec![(worker, run)]).await;
        db.drop_schema().await;
        taken
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

const SYSTEMS: [&str; 3] = ["aiwg", "river", "graphile"];

/// The systems to run (`AIWG_PEERS_SYSTEMS`, a comma-separated list; default all), in the order
/// of [`SYSTEMS`]. The `ratio` lines need aiwg among them.
fn systems() -> Vec<&'static str> {
    let wanted = std::env::var("AIWG_PEERS_SYSTEMS").unwrap_or_default();
    let wanted: Vec<&str> = wanted
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    for w in &wanted {
        if !SYSTEMS.contains(w) {
            eprintln!("AIWG_PEERS_SYSTEMS: unknown system {w:?} (known: {SYSTEMS:?})");
            std::process::exit(2);
        }
    }
    SYSTEMS
        .into_iter()
        .filter(|s| wanted.is_empty() || wanted.contains(s))
        .collect()
}

/// The peers to print a `ratio` line for: every system after aiwg, when aiwg ran.
fn peers(systems: &[&'static str]) -> Vec<(usize, &'static str)> {
    if systems.first() != Some(&"aiwg") {
        return Vec::new();
    }
    systems.iter().copied().enumerate().skip(1).collect()
}

async fn burn_down(
    probe: &sqlx::PgPool,
    system: &str,
    url: &str,
    jobs: usize,
    clients: usize,
    workers: usize,
) -> Cost {
    match system {
        "aiwg" => aiwg::burn_down(probe, url, jobs, clients, workers).await,
        "river" => river::burn_down(probe, url, jobs, clients, workers).await,
        _ => graphile::burn_down(probe, url, jobs, clients, workers).await,
    }
}

async fn latency(system: &str, url: &str, workers: usize) -> Vec<Duration> {
    let (n, w) = (LATENCY_SAMPLES, LATENCY_WARM_UP);
    match system {
        "aiwg" => aiwg::latency(url, workers, n, w).await,
        "river" => river::latency(url, workers, n, w).await,
        _ => graphile::latency(url, workers, n, w).await,
    }
}

/// The burn-downs: per number of clients, `rounds` rounds of every system in turn; prints each
/// system's median rate, CPU (the machine's, the clients') and write-ahead log per job, then the
/// ratios.
async fn burn_downs(probe: &sqlx::PgPool, url: &str, jobs: usize, workers: usize, rounds: usize) {
    let systems = systems();
    let only_clients = std::env::var("AIWG_PEERS_CLIENTS").ok();
    for clients in [1usize, 2] {
        if only_clients
            .as_deref()
            .is_some_and(|c| c != clients.to_string())
        {
            continue;
        }
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut wals: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        let mut clients_cpus: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
        for _ in 0..rounds {
            for (i, system) in systems.iter().enumerate() {
                let cost = burn_down(probe, system, url, jobs, clients, workers).await;
                rates[i].push(jobs as f64 / cost.took.as_secs_f64());
                if let Some(cpu) = cost.cpu {
                    cpus[i].push(cpu.as_secs_f64() * 1e6 / jobs as f64);
                }
                if let Some(cpu) = cost.clients_cpu {
                    clients_cpus[i].push(cpu.as_secs_f64() * 1e6 / jobs as f64);
                }
                wals[i].push(cost.wal as f64 / jobs as f64);
            }
        }
        let rates: Vec<f64> = rates.into_iter().map(median).collect();
        for (i, system) in systems.iter().enumerate() {
            let cpu = if cpus[i].is_empty() || clients_cpus[i].is_empty() {
                String::new()
            } else {
                format!(
                    ", machine CPU {:.0} µs a job (clients {:.0})",
                    median(cpus[i].clone()),
                    median(clients_cpus[i].clone())
                )
            };
            println!(
                "burn-down, {jobs} jobs, {clients} client(s) × {workers} workers: {system:<8} {:>8.0} jobs/s{cpu}, WAL {:.0} B a job",
                rates[i],
                median(wals[i].clone())
            );
        }
        let plural = if clients == 1 { "client" } else { "clients" };
        for (i, peer) in peers(&systems) {
            println!(
                "ratio aiwg_vs_{peer}_burn_down_{clients}_{plural} {:.3}",
                rates[0] / rates[i]
            );
        }
    }
}

/// Enqueue → start: `rounds` rounds of every system in turn, each system's samples of all rounds
/// together.
async fn latencies(url: &str, workers: usize, rounds: usize) {
    let systems = systems();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); systems.len()];
    for _ in 0..rounds {
        for (i, system) in systems.iter().enumerate() {
            samples[i].extend(latency(system, url, workers).await);
        }
    }
    let figures: Vec<(Duration, Duration)> = samples
        .into_iter()
        .map(|mut s| {
            s.sort_unstable();
            (percentile(&s, 0.5), percentile(&s, 0.99))
        })
        .collect();
    for (i, system) in systems.iter().enumerate() {
        println!(
            "enqueue → start, 1 client × {workers} workers: {system:<8} p50 {:>9.2?} p99 {:>9.2?}",
            figures[i].0, figures[i].1
        );
    }
    for (i, peer) in peers(&systems) {
        println!(
            "ratio aiwg_vs_{peer}_latency_p50 {:.3}",
            figures[i].0.as_secs_f64() / figures[0].0.as_secs_f64()
        );
        println!(
            "ratio aiwg_vs_{peer}_latency_p99 {:.3}",
            figures[i].1.as_secs_f64() / figures[0].1.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    let url = database_url();
    if let Err(e) = sqlx::postgres::PgConnectOptions::from_str(&url) {
        eprintln!("AIWG_TEST_DATABASE_URL is not a valid URL: {e}");
        std::process::exit(2);
    }
    let jobs = env_usize("AIWG_PEERS_JOBS", 10_000);
    let workers = env_usize("AIWG_PEERS_WORKERS", 32);
    let rounds = env_usize("AIWG_PEERS_ROUNDS", 3);
    let only = std::env::var("AIWG_PEERS_ONLY").unwrap_or_default();
    let probe = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap_or_else(|e| {
            eprintln!("no PostgreSQL at AIWG_TEST_DATABASE_URL: {e}");
            std::process::exit(2)
        });
    if only.is_empty() || only == "burn_down" {
        burn_downs(&probe, &url, jobs, workers, rounds).await;
    }
    if only.is_empty() || only == "latency" {
        latencies(&url, workers, rounds).await;
    }
}
