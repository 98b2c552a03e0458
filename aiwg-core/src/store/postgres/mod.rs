//! The PostgreSQL store (feature `postgres`): see [`PgStore`].

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row, Transaction};
use uuid::Uuid;

use super::{
    apply, ApprovalOutcome, CancelOutcome, ClaimRequest, Claimed, Created, Finish, FinishedAfter,
    FinishedStep, Heartbeat, JobPage, JobQuery, JobStore, Lease, NewJob, QueueCounts, StoreError,
};
use crate::coalesce::KeptConnection;
use crate::event::{JobEvent, JobEventKind};
use crate::job::{ApprovalDecision, Job, JobId, JobStatus};

mod admit;
mod completer;
mod listen;
mod row;

use row::{job_columns, state_columns};

/// The jobs' migrations. Each concept of aiwg that keeps data in PostgreSQL (jobs here, the
/// webhook outbox in [`dispatch`](crate::dispatch), inbound de-duplication in `aiwg-webhook`)
/// owns its migrations, with versions unique across aiwg, so they compose on one database:
/// missing versions (the other concepts') are ignored.
static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("migrations/jobs")
};

/// Kind JSON longer than this is not sent inline in a notification (the listener reads the
/// event row instead): `NOTIFY` payloads are limited to 8000 bytes, and the JSONB text form can
/// be up to half again as long as the compact form.
const INLINE_KIND_MAX: usize = 5000;

/// How a claim's transaction begins: without JIT compilation, in the same round trip. The
/// planner's estimate of how many queued rows pass a claim's filter is poor on a table that
/// churns as a queue does; with a long queue the estimated cost of the pick passed
/// `jit_above_cost`, and every claim spent tens of milliseconds compiling itself (see
/// `aiwg_claim` in migration 0008, which turns it off for the one-statement claim).
const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL jit = off";

/// Jobs recovered per transaction by [`JobStore::recover_expired`].
const RECOVER_BATCH: i64 = 100;

/// The longest lease accepted (longer TTLs are clamped): about 100 years.
const MAX_TTL_MICROS: i64 = 100 * 366 * 24 * 3600 * 1_000_000;

/// A [`JobStore`] in PostgreSQL, shared by every engine instance that connects to the same
/// database and schema.
///
/// # Layout
///
/// Jobs (migration `0001_jobs.sql`): `aiwg_jobs` keeps each job's *document*, what never
/// changes after the submit, as JSONB (`job`, written once), and its *state*, what does, in
/// columns of their own (`status`, `attempt`, `progress`, `history`, `result`, `error` and the
/// rest, migration 0030: a claim or an outcome writes those, never the document), with copies of
/// the fields queries filter and sort on (priority, project, workflow, enqueue order) and the
/// lease (owner, token, expiry); `aiwg_job_events` keeps the event history, keyed by
/// `(job_id, seq)`. A job is read as its document and its state put back together. All tables
/// live in the pool's current schema. The outbound webhook outbox
/// ([`PgDispatchStore`](crate::dispatch::PgDispatchStore)) and inbound de-duplication
/// (`aiwg_webhook::PgDeliveryStore`) are separate stores with their own tables and
/// migrations; all three can share one pool ([`Self::pool`]).
///
/// # Concurrency
///
/// - Claims take the next queued job with `FOR UPDATE SKIP LOCKED`, highest priority first and
///   then in enqueue order, so concurrent claimers never wait for each other nor take the same
///   job.
/// - The per-project limit counts running jobs of the project whose lease is still live. The
///   count and the claim happen under a transaction-scoped advisory lock on the project (a hash
///   of the schema and the path), so two instances cannot both see "one slot left" and both
///   take it.
///   The lock is taken only when a limit is set and lives only as long as the claim's
///   transaction, so a crashed instance can never leave a project locked.
/// - Lease tokens come from a sequence. Every fenced write (`append`, `heartbeat`, `finish`)
///   checks the token, the `running` status and the expiry in the same statement (or under the
///   row lock of the same transaction) as the write.
/// - Event numbers come from the job row's `last_seq`, incremented by the statement that inserts
///   the event, which holds the row lock: no gaps, no duplicates.
/// - Time comparisons use the later of the caller's clock and the database's, so the caller's
///   `now` (used by tests to move time forward) is honoured while instances with a slow clock
///   still agree with the database on which leases expired.
///
/// # Notifications
///
/// Every event is announced on a channel named after the schema once its transaction committed:
/// a background task of the store (the *notifier*) gathers the events written meanwhile, and
/// under load those of a 5 ms window, into one `NOTIFY` (up to about 7 KB of payload; the
/// kinds of small events ride along, the others are read back from `aiwg_job_events` by the
/// listener). Keeping `NOTIFY` out of the
/// transactions that write events matters: PostgreSQL serialises the commits of every
/// transaction that notifies, flush to disk included, so a `NOTIFY` per event would make all
/// the workers of all the instances commit one at a time. A cancel request of a running job
/// still notifies in its own transaction. [`Self::listen`] hands those to another
/// instance's engine through its [`ClusterListener`](crate::store::ClusterListener). Use one
/// `PgStore` per engine: events are tagged with the store's instance id and a
/// listener skips the ones its own store wrote (its engine published those already). A
/// notification is lost if the database or the store's process dies between the commit and
/// the announcement, as notifications already were when a listener's connection dropped:
/// other instances then see the event at their next read of the job, and poll for queued
/// work.
///
/// # Migrations
///
/// [`Self::connect`] runs the embedded migrations (a PostgreSQL advisory lock makes that safe
/// when several instances start at once). Hosts that run migrations themselves use
/// [`Self::connect_without_migrations`] or [`Self::from_pool`] and
/// [`Self::migrator`]. sqlx records applied migrations in `_sqlx_migrations`; aiwg's
/// migrators ignore versions they do not know (the other aiwg concepts' migrations share that
/// table), but a host that uses sqlx migrations of its own should still give aiwg its own
/// schema (`search_path`) so version numbers cannot collide.
///
/// Instances of different versions may share a database across most migrations, but not across
/// 0030 (a job's state moved from its document to columns): once it has run, every instance
/// must be of a version that has it. It moves the jobs already stored in the same transaction.
///
/// # Durability and speed
///
/// Every state change is committed before the call that made it returns and, by default,
/// flushed to disk. A one-step job needs five such changes (create, claim, step started, step
/// finished, outcome); what keeps them from costing five transactions and five flushes each:
///
/// - a submit ([`JobStore::create`]) is one statement: the room in a bounded queue is
///   checked by `aiwg_queue_has_room` (migration 0007), which takes the queue's advisory lock
///   and then counts, so the bound holds across instances (the count is a sum of tallies that
///   triggers keep as jobs enter and leave the queue, migration 0013, not a count of the
///   rows: a backlog made every submit slower). The lock is held until the insert
///   commits, so submits into a bounded queue would each wait for the one before and its
///   flush; the store's *admitter* sends the submits that arrive while one is on its way as
///   one statement: one lock, one count, one commit for all of them (migration 0011; with 32
///   submitters at once 3 100-4 300 submits/s instead of 380-470); a batch without
///   idempotency keys is inserted before it takes the lock, and what the count then leaves no
///   room for is deleted again (migration 0029), so only the count and the commit wait for
///   the lock. A submit whose idempotency key another took meanwhile finds that job.
///   [`JobStore::create_many`] sends its batch of jobs without keys as one such statement;
/// - a claim ([`JobStore::claim_many`], and [`JobStore::claim`] without a per-project limit)
///   is one statement for many jobs, `aiwg_claim` (migration 0008): it picks, moves the jobs
///   to `running` in SQL (`aiwg_claimed_state`, migration 0030, the twin of
///   [`apply::claim`], tested against it) and records their events. Jobs of concurrency
///   groups take a transaction that checks the group under its lock. Under a per-project
///   limit the claim is one statement too, `aiwg_claim_limited` (migration 0012): it reads
///   the first jobs of the projects with room
///   (not the queue), and counts each project's running jobs under the project's lock; a
///   project whose lock another claim holds is passed over while others have room
///   (migration 0016: two instances' claims no longer wait for each other's commits). No claim
///   is JIT-compiled (a long queue made the planner's cost estimate pass `jit_above_cost`),
///   and the claim keeps one plan (migration 0010: planned anew on every call, it spent more
///   time planning than running), one that walks the queue in claim order whatever the
///   statistics of its moment said (migration 0017: no sort of the queue);
/// - the last step's `step_finished` is written with the outcome, in the outcome's statement
///   ([`JobStore::finish_after`]);
/// - the fenced writes of running jobs (every [`JobStore::append`] and [`JobStore::finish`])
///   go through the store's *completer*, a background task that writes whatever is waiting
///   when it is ready: the events of all the jobs in one statement (`UPDATE … FROM
///   unnest(…)`, one commit), the outcomes in one read and one write (one commit), each
///   caller answered on its own (a fenced-out row answers [`StoreError::LeaseLost`] to its
///   caller only). Nothing
///   waits for a timer: while no write is on its way a write goes out at once from its
///   caller, and the writes that arrive while one is form the next batch. A step event is
///   one statement with no read (the job's progress is moved in SQL);
/// - notifications are batched too (see *Notifications*; at most one `NOTIFY` per store every
///   5 ms under load, the first one after a quiet spell at once);
/// - a statement costs one round trip: the pool of [`PgStore::connect`] (and of
///   [`PgStore::pool_options`], for hosts that build theirs) checks a connection before
///   handing it out only after it has been idle for a while, where sqlx's default checks every
///   time;
/// - a step's event changes no indexed column of `aiwg_jobs`, whose pages keep room for it
///   (fill factor 70, migration 0009), so it is written without touching the table's indexes.
///
/// [`with_relaxed_event_commits`](Self::with_relaxed_event_commits) lets the progress events
/// skip the flush (the outcome still waits for it, and flushes the events before it).
///
/// # Example
///
/// ```no_run
/// # async fn run() -> Result<(), aiwg_core::store::StoreError> {
/// use std::sync::Arc;
/// use aiwg_core::store::PgStore;
/// use aiwg_core::Engine;
///
/// let store = Arc::new(PgStore::connect("postgres://aiwg@db.internal/aiwg").await?);
/// let engine = Engine::builder().store(store.clone()).build().unwrap();
/// // Wake on jobs queued elsewhere, follow their events, obey remote cancels.
/// let _listener = store.listen(engine.cluster_listener()).await?;
/// # Ok(()) }
/// ```
pub struct PgStore {
    pool: PgPool,
    channel: String,
    instance: String,
    relaxed_events: bool,
    /// See [`PgStore::with_outcome_gathering`].
    outcome_gathering: std::time::Duration,
    keyring: Option<crate::secrets::SecretKeyring>,
    notifier: listen::Notifier,
    /// Started at the first fenced write, with the store's final settings.
    completer: std::sync::OnceLock<completer::Completer>,
    /// Started at the first submit, with the store's final settings.
    admitter: std::sync::OnceLock<admit::Admitter>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("channel", &self.channel)
            .field("instance", &self.instance)
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::backend_from("postgres", e)
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::backend_from("postgres: job JSON", e)
}

fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn now() -> DateTime<Utc> {
    micros(Utc::now())
}

fn ttl_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros())
        .unwrap_or(i64::MAX)
        .min(MAX_TTL_MICROS)
}

/// The notification channel for a schema (at most 63 bytes, PostgreSQL's identifier limit).
fn channel_for(schema: &str) -> String {
    let name = format!("aiwg_{schema}");
    if name.len() <= 63 && !name.contains(['\0', '"']) {
        name
    } else {
        let d = Sha256::digest(schema.as_bytes());
        format!("aiwg_{}", hex::encode(&d[..12]))
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn secret_err(e: crate::secrets::SecretError) -> StoreError {
    StoreError::backend_from("postgres: job credentials", e)
}

/// The job as it is written: its credentials sealed with `keyring`.
fn seal_job<'a>(
    keyring: Option<&crate::secrets::SecretKeyring>,
    job: &'a Job,
) -> Result<std::borrow::Cow<'a, Job>, StoreError> {
    let creds = &job.reply_credentials;
    if creds.is_empty() || creds.is_sealed() {
        return Ok(std::borrow::Cow::Borrowed(job));
    }
    let keyring = keyring.ok_or_else(|| secret_err(crate::secrets::SecretError::NoKey))?;
    let mut sealed = job.clone();
    sealed.reply_credentials = creds.sealed(keyring, job.id.as_uuid().as_bytes());
    Ok(std::borrow::Cow::Owned(sealed))
}

/// A job read with its row (its document and its state as one JSON object, `state`, as the
/// claim and outcome functions return it), its credentials opened. Credentials that do not
/// open (no key, a key dropped from the keyring too early, a damaged value) are left out with a
/// warning: the job stays readable and runnable, only its chat reply is lost.
fn open_job(
    keyring: Option<&crate::secrets::SecretKeyring>,
    row: &PgRow,
) -> Result<Job, StoreError> {
    let Json(doc): Json<row::Document> = row.try_get("job").map_err(db)?;
    let Json(state): Json<row::State<'static>> = row.try_get("state").map_err(db)?;
    Ok(opened(keyring, row::job(doc, state)))
}

/// [`open_job`] for a row read with [`job_columns`]: the document and the state's columns.
fn open_job_columns(
    keyring: Option<&crate::secrets::SecretKeyring>,
    row: &PgRow,
) -> Result<Job, StoreError> {
    let Json(doc): Json<row::Document> = row.try_get("job").map_err(db)?;
    let state = row::State::read(row).map_err(db)?;
    Ok(opened(keyring, row::job(doc, state)))
}

/// `job` with its credentials opened (see [`open_job`]).
fn opened(keyring: Option<&crate::secrets::SecretKeyring>, mut job: Job) -> Job {
    if job.reply_credentials.is_sealed() {
        job.reply_credentials = job
            .reply_credentials
            .opened(keyring, job.id.as_uuid().as_bytes())
            .unwrap_or_else(|e| {
                tracing::warn!(job = %job.id, error = %e, "the job's reply credentials do not open; it will not reply");
                crate::ReplyCredentials::default()
            });
    }
    job
}

/// The SQL that follows a `WITH u AS (… RETURNING id, last_seq …)` CTE: inserts the event with
/// `seq = u.last_seq`, selecting `u`'s columns. Parameters `$p` and `$p+1`: event time, kind
/// JSON text. Listeners hear of the event once it is committed (see [`PgStore::announce`]).
fn event_tail(p: usize) -> String {
    format!(
        ", e AS (INSERT INTO aiwg_job_events (job_id, seq, at, kind) \
             SELECT id, last_seq, ${p}, ${k}::jsonb FROM u) \
         SELECT u.* FROM u",
        k = p + 1,
    )
}

/// An event about to be written.
#[derive(Clone)]
struct NewEvent {
    at: DateTime<Utc>,
    kind: JobEventKind,
    text: String,
}

impl NewEvent {
    fn new(kind: JobEventKind, at: DateTime<Utc>) -> Result<Self, StoreError> {
        let text = serde_json::to_string(&kind).map_err(json_err)?;
        Ok(Self { at, kind, text })
    }

    fn into_event(self, job_id: JobId, seq: i64) -> JobEvent {
        JobEvent {
            job_id,
            seq: to_u64(seq),
            at: self.at,
            kind: self.kind,
        }
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

impl PgStore {
    /// Writes `run` (events that move no job's progress, taken) in one write of the completer
    /// and adds them to `written`.
    async fn append_run(
        &self,
        lease: &Lease,
        run: &mut Vec<NewEvent>,
        written: &mut Vec<std::sync::Arc<JobEvent>>,
    ) -> Result<(), StoreError> {
        if run.is_empty() {
            return Ok(());
        }
        let evs = std::mem::take(run);
        let events = self
            .completer()
            .append_many(lease.clone(), evs, completer::Progress::Unchanged)
            .await?;
        written.extend(events.into_iter().map(std::sync::Arc::new));
        Ok(())
    }

    /// How long a pooled connection may sit idle before the pool of
    /// [`pool_options`](Self::pool_options) checks it with a round trip before handing it out.
    pub const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

    /// Connects (a pool of up to 10 connections) and runs the embedded migrations.
    ///
    /// The URL may carry `options=-c search_path=<schema>` to keep aiwg's tables in their own
    /// schema. Errors never contain the URL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect_without_migrations(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without running migrations (the host runs them, see [`PgStore::migrator`]).
    pub async fn connect_without_migrations(url: &str) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|_| StoreError::backend("postgres: invalid database URL"))?;
        let pool = Self::pool_options()
            .max_connections(10)
            .connect_with(options)
            .await
            .map_err(db)?;
        Self::from_pool(pool).await
    }

    /// The pool options [`connect`](Self::connect) uses, for hosts that build the pool
    /// themselves ([`from_pool`](Self::from_pool)): sqlx's defaults, except that a connection is
    /// checked (a round trip to the server) before it is handed out only when it has been idle
    /// for [`PING_IDLE_AFTER`](Self::PING_IDLE_AFTER).
    ///
    /// sqlx checks every connection it hands out by default, which doubles the round trips of
    /// every statement on a busy store (issue 15: one in two round trips of a burn-down was
    /// that check). A connection used a moment ago is as likely to be alive as one just
    /// checked; one that broke since (the server restarted) fails its statement, the pool drops
    /// it, and the store's callers see the error as they would a failure in the middle of a
    /// statement: the claim loop and the completer try again, a submit answers an error.
    ///
    /// sqlx also checks every connection handed back to the pool, with no option to turn that
    /// off; the store's writers that batch (the admitter, the completer) keep their connection
    /// from one batch to the next while writes wait, and hand it back once none does
    /// ([`KeptConnection`]).
    pub fn pool_options() -> PgPoolOptions {
        Self::pool_options_checking_after(Self::PING_IDLE_AFTER)
    }

    /// [`pool_options`](Self::pool_options) with another idle time before a connection is
    /// checked: `Duration::ZERO` checks every connection handed out (sqlx's default), a long one
    /// checks almost none.
    pub fn pool_options_checking_after(idle: Duration) -> PgPoolOptions {
        PgPoolOptions::new()
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= idle {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
    }

    /// Uses an existing pool. Runs no migrations: call [`migrate`](Self::migrate) or run
    /// [`migrator`](Self::migrator) yourself. The tables live in the pool's current schema (the
    /// first existing schema of its `search_path`).
    pub async fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        let schema = crate::util::current_schema(&pool)
            .await
            .map_err(StoreError::Backend)?;
        let channel = channel_for(&schema);
        let instance = Uuid::now_v7().simple().to_string();
        Ok(Self {
            notifier: listen::Notifier::start(pool.clone(), channel.clone(), instance.clone()),
            pool,
            channel,
            instance,
            relaxed_events: false,
            outcome_gathering: completer::MATES_WAIT,
            keyring: None,
            completer: std::sync::OnceLock::new(),
            admitter: std::sync::OnceLock::new(),
        })
    }

    /// Seals each job's [`ReplyCredentials`](crate::ReplyCredentials) (a Slack `response_url`,
    /// a Discord interaction token) with `keyring` before writing it (see [`crate::secrets`]).
    /// Without a keyring, creating a job that carries credentials fails with
    /// [`SecretError::NoKey`](crate::secrets::SecretError::NoKey), which names the variable
    /// to set: they are never written in the clear.
    #[must_use]
    pub fn with_keyring(mut self, keyring: crate::secrets::SecretKeyring) -> Self {
        self.keyring = Some(keyring);
        self.completer = std::sync::OnceLock::new();
        self.admitter = std::sync::OnceLock::new();
        self
    }

    /// A job read with [`job_columns`], its credentials opened (see [`open_job_columns`]).
    fn job_of(&self, row: &PgRow) -> Result<Job, StoreError> {
        open_job_columns(self.keyring.as_ref(), row)
    }

    /// The store's completer (see [`completer`]), started at the first call.
    fn completer(&self) -> &completer::Completer {
        self.completer.get_or_init(|| {
            completer::Completer::start(completer::Ctx {
                pool: self.pool.clone(),
                keyring: self.keyring.clone(),
                relaxed: self.relaxed_events,
                notifier: self.notifier.clone(),
                known: Default::default(),
                events: KeptConnection::new(self.pool.clone()),
                outcomes: KeptConnection::new(self.pool.clone()),
                waiting: Default::default(),
                mates: Default::default(),
                mates_wait: self.outcome_gathering,
            })
        })
    }

    /// The store's admitter (see [`admit`]), started at the first call.
    fn admitter(&self) -> &admit::Admitter {
        self.admitter.get_or_init(|| {
            admit::Admitter::start(admit::Ctx {
                kept: KeptConnection::new(self.pool.clone()),
                keyring: self.keyring.clone(),
                notifier: self.notifier.clone(),
                lock_key: self.capacity_lock_key(),
            })
        })
    }

    /// Runs the embedded migrations (idempotent; safe when several instances start at once).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::backend_from("postgres: migration failed", e))
    }

    /// The jobs' embedded migrations (from `aiwg-core/migrations/jobs`), for hosts that run them
    /// with their own tooling.
    #[must_use]
    pub fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The `LISTEN`/`NOTIFY` channel (derived from the schema, so stores in different schemas
    /// of one database do not hear each other).
    #[must_use]
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// This store's instance id, sent with its notifications.
    #[must_use]
    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Deletes jobs that finished before `before` (by the database's clock), with their events;
    /// returns how many. Queued
    /// and running jobs are never touched. Nothing calls this by itself: hosts that keep the
    /// database small run it now and then (any instance; concurrent calls are harmless).
    pub async fn purge_finished(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM aiwg_jobs WHERE id IN (SELECT id FROM aiwg_jobs \
                 WHERE status NOT IN ('queued', 'running') \
                   AND updated_at < $1 \
                 LIMIT 1000 FOR UPDATE SKIP LOCKED)",
            )
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected();
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }

    /// Commits progress events (everything [`JobStore::append`] writes: step, agent and log
    /// events) without waiting for the disk (`synchronous_commit = off` for those transactions
    /// only). Claims, finishes, cancels, recoveries and new jobs stay durable.
    ///
    /// What it risks: a database crash (not a clean restart) may lose the last few hundred
    /// milliseconds of progress events of jobs that were running at the time (never those of a
    /// job whose end was recorded: that commit flushes them first); those jobs are recovered
    /// through their leases as usual, and a subscriber that already saw a lost event may see its
    /// sequence number reused. Fencing is unchanged: every event is still checked against its
    /// lease when it is written, and a write refused for a lost lease answers
    /// [`StoreError::LeaseLost`] to its caller. In exchange each step costs two disk flushes
    /// fewer. Off by default.
    ///
    /// The completer's events are committed this way, in a statement of their own, and its
    /// outcomes durably, beside them: a job's events are written before its outcome is sent,
    /// and the outcome's durable commit flushes the log up to itself, events included.
    #[must_use]
    pub fn with_relaxed_event_commits(mut self, relaxed: bool) -> Self {
        self.relaxed_events = relaxed;
        self.completer = std::sync::OnceLock::new();
        self
    }

    /// How long after a claim the outcomes of the jobs it started together wait for one
    /// another, so that they are written in one statement and one commit (default 1 ms;
    /// `Duration::ZERO`: each outcome is written as it comes, or with whatever outcomes came
    /// while the one before it was being written). Only jobs that end within it are waited
    /// for: an outcome waits at most until then, and not at all once it has passed, so a job
    /// that runs longer costs its mates at most this (and a tick of Tokio's timer, a
    /// millisecond). Quick jobs claimed four at a time then cost one outcome statement per
    /// claim instead of two or three.
    #[must_use]
    pub fn with_outcome_gathering(mut self, wait: std::time::Duration) -> Self {
        self.outcome_gathering = wait;
        self.completer = std::sync::OnceLock::new();
        self
    }

    fn bind_event<'q>(&'q self, q: PgQuery<'q>, ev: &'q NewEvent) -> PgQuery<'q> {
        q.bind(ev.at).bind(&ev.text)
    }

    /// Tells the other instances about a committed event (through the store's notifier: one
    /// `NOTIFY` for many events, outside the transactions that write them).
    fn announce(&self, job_id: JobId, seq: i64, ev: &NewEvent) {
        self.notifier.announce_event(job_id, seq, ev);
    }

    /// The advisory lock that serialises submits into a bounded queue (shared by every
    /// instance on this schema), so the queued count they check holds.
    fn capacity_lock_key(&self) -> i64 {
        crate::util::advisory_lock_key(&self.channel, "queue capacity")
    }

    /// Tells a missing job from a lost lease after a fenced write matched no row.
    async fn lost<'e, E>(&self, exec: E, id: JobId) -> StoreError
    where
        E: sqlx::Executor<'e, Database = Postgres>,
    {
        match sqlx::query("SELECT 1 FROM aiwg_jobs WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_optional(exec)
            .await
        {
            Ok(Some(_)) => StoreError::LeaseLost(id),
            Ok(None) => StoreError::NotFound(id),
            Err(e) => db(e),
        }
    }

    /// Changes every job `select` finds (its `$1` is now, `$2` the batch size), a batch per
    /// transaction, with `change` (`None`: leave that job alone); each change is written with
    /// its event and announced after the commit.
    async fn sweep(
        &self,
        select: &'static str,
        now: DateTime<Utc>,
        change: impl Fn(&mut Job, DateTime<Utc>) -> Result<Option<JobEventKind>, StoreError>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        let at = micros(now);
        let mut out = Vec::new();
        loop {
            let mut tx = self.pool.begin().await.map_err(db)?;
            let rows = sqlx::query(select)
                .bind(at)
                .bind(RECOVER_BATCH)
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            let n = rows.len();
            let mut batch = Vec::with_capacity(n);
            for row in rows {
                let mut job = self.job_of(&row)?;
                let Some(kind) = change(&mut job, at)? else {
                    continue;
                };
                let ev = NewEvent::new(kind, at)?;
                let seq = self.write_changed(&mut tx, &job, &ev).await?;
                batch.push((job, seq, ev));
            }
            tx.commit().await.map_err(db)?;
            for (job, seq, ev) in batch {
                let id = job.id;
                self.announce(id, seq, &ev);
                out.push((job, ev.into_event(id, seq)));
            }
            if i64::try_from(n).unwrap_or(i64::MAX) < RECOVER_BATCH {
                return Ok(out);
            }
        }
    }

    /// Writes a locked job after a state change together with its event, in `tx`. `queued`
    /// jobs get a new enqueue number; the lease is dropped unless the job is `running`.
    async fn write_changed(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        job: &Job,
        ev: &NewEvent,
    ) -> Result<i64, StoreError> {
        let sql = format!(
            concat!(
                "WITH u AS (UPDATE aiwg_jobs SET status = $2, \
                 queue_seq = CASE WHEN $2 = 'queued' THEN nextval('aiwg_queue_seq') END, \
                 retry_at = $3, cancel_requested = $4, (",
                state_columns!(),
                ") = (SELECT * FROM aiwg_job_columns($5)), last_seq = last_seq + 1, \
                 lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, \
                 approval_expires_at = $6, updated_at = now() \
             WHERE id = $1 RETURNING id, last_seq){}"
            ),
            event_tail(7)
        );
        let q = sqlx::query(&sql)
            .bind(job.id.as_uuid())
            .bind(job.status.as_str())
            .bind(job.retry_at)
            .bind(job.cancel_requested)
            .bind(Json(row::State::of(job)))
            .bind(job.pending_approval().map(|a| a.expires_at));
        let row = self
            .bind_event(q, ev)
            .fetch_one(&mut **tx)
            .await
            .map_err(db)?;
        row.try_get("last_seq").map_err(db)
    }

    /// Job `id`, its row locked for `tx` (`FOR UPDATE`).
    async fn locked_job(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        id: JobId,
    ) -> Result<Job, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        match row {
            Some(row) => self.job_of(&row),
            None => Err(StoreError::NotFound(id)),
        }
    }

    async fn find_by_key(&self, key: &str) -> Result<Option<(String, Job)>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT COALESCE(fingerprint, '') AS fingerprint, ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| Ok((r.try_get("fingerprint").map_err(db)?, self.job_of(&r)?)))
            .transpose()
    }

    /// Claims up to `max` jobs. No per-project limit (see [`JobStore::claim_many`]).
    ///
    /// One statement, one round trip (`aiwg_claim`, migration 0008), picks the jobs, moves
    /// them to `running` (in SQL: `aiwg_claimed_state`, the twin of [`apply::claim`]) and
    /// records their events. A job of a concurrency group needs its group checked under the
    /// group's lock: when the statement comes upon one, it claims nothing and the batch is
    /// claimed by [`Self::claim_batch_grouped`] instead, in the same order.
    async fn claim_batch(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let at = micros(request.now);
        // The claim functions (this one and `aiwg_claim_limited`) return no row version
        // (`xmin`): the transaction's id is the version of every row they wrote, as they write
        // in the statement's own transaction, with no subtransaction.
        let rows = sqlx::query(
            "SELECT grouped, id, last_seq, lease_token, lease_expires_at, job, state, \
                 CASE WHEN last_seq IS NOT NULL THEN pg_current_xact_id()::xid::text END \
                     AS version \
             FROM aiwg_claim($1, $2, $3, $4)",
        )
        .bind(at)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(&request.owner)
        .bind(ttl_micros(request.lease_ttl))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut grouped = false;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            grouped |= row.try_get::<i64, _>("grouped").map_err(db)? > 0;
            if row
                .try_get::<Option<i64>, _>("last_seq")
                .map_err(db)?
                .is_none()
            {
                continue; // no job claimed: the one row carries the count alone
            }
            out.push(self.claimed(request, at, row)?);
        }
        if grouped {
            return self.claim_batch_grouped(request, max).await;
        }
        // The rows of jobs (the statement adds one without, carrying the count).
        let jobs = rows
            .iter()
            .filter(|row| matches!(row.try_get::<Option<i64>, _>("last_seq"), Ok(Some(_))));
        self.hold_claimed(&out, jobs);
        Ok(out)
    }

    /// Claims up to `max` jobs with at most `limit` running per project, in one statement
    /// (`aiwg_claim_limited`, migration 0012): it reads the heads of the projects with room,
    /// counts each project's running jobs under the project's advisory lock (and each
    /// concurrency group's under the group's), and moves the jobs it may start to `running`.
    async fn claim_limited(
        &self,
        request: &ClaimRequest,
        max: usize,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let at = micros(request.now);
        let rows = sqlx::query(
            "SELECT id, last_seq, lease_token, lease_expires_at, job, state, \
                 pg_current_xact_id()::xid::text AS version \
             FROM aiwg_claim_limited($1, $2, $3, $4, $5, $6)",
        )
        .bind(at)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(&request.owner)
        .bind(ttl_micros(request.lease_ttl))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(&self.channel)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let out = rows
            .iter()
            .map(|row| self.claimed(request, at, row))
            .collect::<Result<Vec<_>, _>>()?;
        self.hold_claimed(&out, rows.iter());
        Ok(out)
    }

    /// Hands the completer the jobs a claim started, as their rows now hold them (`rows`, one
    /// per job of `claimed`, in order, with its version after the claim, `version`): their
    /// outcomes are then written without reading the rows again. Were a version wrong, the
    /// outcome's statement would refuse it and read the row, as after a heartbeat.
    fn hold_claimed<'a>(&self, claimed: &[Claimed], rows: impl Iterator<Item = &'a PgRow>) {
        self.completer()
            .hold_claimed(claimed.iter().zip(rows).map(|(c, row)| {
                let version = row.try_get::<Option<String>, _>("version").ok().flatten();
                (&c.lease, version.map(|v| (v, c.job.clone())))
            }));
    }

    /// A job a claim statement moved to `running` (its row: `id`, `last_seq`, `lease_token`,
    /// `lease_expires_at`, `job`, `state`), with its lease and its event, announced.
    fn claimed(
        &self,
        request: &ClaimRequest,
        at: DateTime<Utc>,
        row: &PgRow,
    ) -> Result<Claimed, StoreError> {
        let seq: i64 = row.try_get("last_seq").map_err(db)?;
        let job = open_job(self.keyring.as_ref(), row)?;
        let lease = Lease {
            job_id: job.id,
            owner: request.owner.clone(),
            attempt: job.attempt,
            token: to_u64(row.try_get("lease_token").map_err(db)?),
            expires_at: row.try_get("lease_expires_at").map_err(db)?,
        };
        let ev = NewEvent::new(apply::claimed_event(&job), at)?;
        self.announce(job.id, seq, &ev);
        let event = ev.into_event(job.id, seq);
        Ok(Claimed { job, lease, event })
    }

    /// Claims up to `max` jobs in one transaction, jobs of concurrency groups among them: one
    /// statement picks and locks them, one updates them all, records their `running` events
    /// and notifies. Concurrency groups are honoured (one job per free group, under the
    /// group's lock).
    async fn claim_batch_grouped(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let at = micros(request.now);
        let mut tx = self.pool.begin_with(BEGIN_CLAIM).await.map_err(db)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j \
             WHERE j.status = 'queued' \
               AND (j.retry_at IS NULL OR j.retry_at <= GREATEST($1::timestamptz, now())) \
               AND (j.job->>'concurrency_group' IS NULL \
                    OR NOT EXISTS (SELECT 1 FROM aiwg_jobs g WHERE g.status = 'running' \
                      AND g.job->>'concurrency_group' = j.job->>'concurrency_group' \
                      AND g.lease_expires_at > GREATEST($1::timestamptz, now()))) \
             ORDER BY j.priority DESC, j.queue_seq \
             LIMIT $2 FOR UPDATE OF j SKIP LOCKED",
        ))
        .bind(at)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        if rows.is_empty() {
            // Rolled back here, not left to the pool (which rolls a dropped transaction back
            // from a task of its own, some time later): `FOR UPDATE` keeps the lock it took on
            // a row that another claim changed while this statement ran (the row is then not
            // returned), and that job's fenced writes wait for it.
            tx.rollback().await.map_err(db)?;
            return Ok(Vec::new());
        }
        let mut groups: Vec<String> = Vec::new();
        let mut picked: Vec<(Job, NewEvent)> = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut job = self.job_of(row)?;
            if let Some(group) = &job.concurrency_group {
                if groups.contains(group) || !self.group_is_free(&mut tx, group, at).await? {
                    continue;
                }
                groups.push(group.clone());
            }
            let kind = apply::claim(&mut job, at)?;
            apply::progress(&mut job, &kind);
            let ev = NewEvent::new(kind, at)?;
            picked.push((job, ev));
        }
        if picked.is_empty() {
            tx.rollback().await.map_err(db)?;
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(picked.len());
        let mut states = Vec::with_capacity(picked.len());
        let mut kinds = Vec::with_capacity(picked.len());
        for (job, ev) in &picked {
            ids.push(*job.id.as_uuid());
            states.push(row::state_json(job).map_err(json_err)?);
            kinds.push(ev.text.clone());
        }
        let rows = sqlx::query(concat!(
            "WITH t AS (SELECT * FROM unnest($1::uuid[], $2::text[]::jsonb[], $3::text[]) \
                 AS t(id, state, kind)), \
             u AS (UPDATE aiwg_jobs a SET status = 'running', queue_seq = NULL, \
                 retry_at = NULL, lease_owner = $4, \
                 lease_token = nextval('aiwg_lease_token_seq'), \
                 lease_expires_at = GREATEST($5::timestamptz, now()) \
                     + $6 * interval '1 microsecond', (",
            state_columns!(),
            ") = (SELECT * FROM aiwg_job_columns(t.state)), \
                 last_seq = a.last_seq + 1, updated_at = now() \
                 FROM t WHERE a.id = t.id \
                 RETURNING a.id, a.last_seq, a.lease_token, a.lease_expires_at, t.kind, \
                     a.xmin::text AS version), \
             e AS (INSERT INTO aiwg_job_events (job_id, seq, at, kind) \
                 SELECT id, last_seq, $5, kind::jsonb FROM u) \
             SELECT u.id, u.last_seq, u.lease_token, u.lease_expires_at, u.version \
             FROM u",
        ))
        .bind(&ids)
        .bind(&states)
        .bind(&kinds)
        .bind(&request.owner)
        .bind(at)
        .bind(ttl_micros(request.lease_ttl))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut by_id: std::collections::HashMap<Uuid, PgRow> = rows
            .into_iter()
            .map(|r| Ok((r.try_get::<Uuid, _>("id").map_err(db)?, r)))
            .collect::<Result<_, StoreError>>()?;
        let mut out = Vec::with_capacity(picked.len());
        let mut held = Vec::with_capacity(picked.len());
        for (job, ev) in picked {
            let Some(row) = by_id.remove(job.id.as_uuid()) else {
                return Err(StoreError::backend(
                    "postgres: a job locked for a claim was not updated",
                ));
            };
            let seq: i64 = row.try_get("last_seq").map_err(db)?;
            let lease = Lease {
                job_id: job.id,
                owner: request.owner.clone(),
                attempt: job.attempt,
                token: to_u64(row.try_get("lease_token").map_err(db)?),
                expires_at: row.try_get("lease_expires_at").map_err(db)?,
            };
            self.announce(job.id, seq, &ev);
            let event = ev.into_event(job.id, seq);
            out.push(Claimed { job, lease, event });
            held.push(row);
        }
        self.hold_claimed(&out, held.iter());
        Ok(out)
    }

    /// Inserts `batch` (jobs without a key) in one statement and puts each answer at its slot
    /// of `out`; empties both.
    async fn insert_run(
        &self,
        out: &mut [Option<Result<Created, StoreError>>],
        slots: &mut Vec<usize>,
        batch: &mut Vec<NewJob>,
    ) {
        if batch.is_empty() {
            return;
        }
        let answers = match self.pool.acquire().await {
            Ok(mut conn) => {
                admit::insert(self.admitter().ctx(), &mut conn, std::mem::take(batch)).await
            }
            Err(e) => Err(db(e)),
        };
        batch.clear();
        match answers {
            Ok(answers) => {
                for (slot, answer) in slots.drain(..).zip(answers) {
                    out[slot] = Some(answer.unwrap_or_else(|| {
                        Err(StoreError::backend(
                            "postgres: a job without a key was not inserted",
                        ))
                    }));
                }
            }
            Err(e) => {
                for slot in slots.drain(..) {
                    out[slot] = Some(Err(e.clone()));
                }
            }
        }
        slots.clear();
    }

    /// Whether no job of `group` runs, under a transaction-scoped lock on the group, so two
    /// instances never start two jobs of one group. A group whose lock another claim holds
    /// counts as taken (that claim decides for it): waiting for the lock instead let two claims
    /// that locked their groups in opposite orders wait for each other until PostgreSQL broke
    /// the deadlock, failing one of them.
    async fn group_is_free(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        group: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(crate::util::advisory_lock_key(
                &self.channel,
                &format!("concurrency:{group}"),
            ))
            .fetch_one(&mut **tx)
            .await
            .map_err(db)?;
        if !locked {
            return Ok(false);
        }
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aiwg_jobs WHERE status = 'running' \
             AND job->>'concurrency_group' = $1 \
             AND lease_expires_at > GREATEST($2::timestamptz, now())",
        )
        .bind(group)
        .bind(at)
        .fetch_one(&mut **tx)
        .await
        .map_err(db)?;
        Ok(running == 0)
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn create(&self, new: NewJob) -> Result<Created, StoreError> {
        // With the submits that arrive meanwhile, in one statement (see `admit`).
        let Some(key) = new.job.idempotency_key.clone() else {
            return self.admitter().create(new).await?.unwrap_or_else(|| {
                Err(StoreError::backend(
                    "postgres: a job without a key was not inserted",
                ))
            });
        };
        // Inserted first: a key is new far more often than not (a forge's redeliveries are
        // de-duplicated before they get here), and looking it up first cost every keyed submit
        // a round trip. Taken (the insert did nothing) or refused by a full queue (a known key
        // takes no room, see `admit::insert`), the key's job is looked up. Three tries at most:
        // a key whose job was deleted between the insert and the look-up is tried again.
        for _ in 0..3 {
            let refused = match self.admitter().create(new.clone()).await? {
                Some(Ok(created)) => return Ok(created),
                Some(Err(e @ StoreError::QueueFull { .. })) => Some(e),
                Some(Err(e)) => return Err(e),
                None => None,
            };
            if let Some((fp, existing)) = self.find_by_key(&key).await? {
                let same = new.fingerprint.as_deref().is_none_or(|f| f == fp);
                return if same {
                    Ok(Created::Existing(existing))
                } else {
                    Err(StoreError::IdempotencyConflict {
                        existing: existing.id,
                    })
                };
            }
            if let Some(full) = refused {
                return Err(full);
            }
        }
        Err(StoreError::backend(
            "postgres: the idempotency key kept changing hands",
        ))
    }

    async fn create_many(&self, new: Vec<NewJob>) -> Vec<Result<Created, StoreError>> {
        // Jobs with an idempotency key (rare in batches) take the one-at-a-time path, which
        // knows how to find the job their key created, and whose known key takes no room in
        // a bounded queue (in the batch's statement it would); the jobs between them go in
        // one statement each run, written before the keyed job after them, so that the jobs
        // enter the queue (and take its room) in the order given.
        let mut out: Vec<Option<Result<Created, StoreError>>> = Vec::with_capacity(new.len());
        let (mut slots, mut batch) = (Vec::new(), Vec::new());
        for n in new {
            if n.job.idempotency_key.is_some() {
                self.insert_run(&mut out, &mut slots, &mut batch).await;
                out.push(Some(self.create(n).await));
            } else {
                slots.push(out.len());
                batch.push(n);
                out.push(None);
            }
        }
        self.insert_run(&mut out, &mut slots, &mut batch).await;
        out.into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(StoreError::backend(
                        "postgres: a job of the batch was not answered",
                    ))
                })
            })
            .collect()
    }

    async fn claim_many(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        match request.per_project_limit {
            Some(limit) => self.claim_limited(request, max, limit).await,
            None => self.claim_batch(request, max).await,
        }
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(|r| self.job_of(r)).transpose()
    }

    async fn list(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        let size = query.page_size();
        let mut qb: QueryBuilder<'_, Postgres> = QueryBuilder::new(concat!(
            "SELECT ",
            job_columns!(),
            " FROM aiwg_jobs j WHERE TRUE"
        ));
        if let Some(status) = query.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(wf) = &query.workflow {
            qb.push(" AND workflow = ").push_bind(wf.as_str());
        }
        if let Some(cursor) = query.cursor {
            qb.push(" AND id < ").push_bind(*cursor.as_uuid());
        }
        if let Some(group) = &query.concurrency_group {
            qb.push(" AND job->>'concurrency_group' = ")
                .push_bind(group.as_str());
        }
        qb.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::try_from(size + 1).unwrap_or(i64::MAX));
        let rows = qb.build().fetch_all(&self.pool).await.map_err(db)?;
        let mut jobs = rows
            .iter()
            .map(|r| self.job_of(r))
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if jobs.len() > size {
            jobs.truncate(size);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Ok(JobPage { jobs, next_cursor })
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        Ok(self.claim_many(request, 1).await?.pop())
    }

    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> Result<Heartbeat, StoreError> {
        // The row's version changes: an outcome must read it again.
        if let Some(completer) = self.completer.get() {
            completer.forget(lease.job_id);
        }
        let row = sqlx::query(
            "UPDATE aiwg_jobs SET lease_expires_at = GREATEST($3::timestamptz, now()) \
                 + $4 * interval '1 microsecond', updated_at = now() \
             WHERE id = $1 AND status = 'running' AND lease_token = $2 \
               AND lease_expires_at > GREATEST($3::timestamptz, now()) \
             RETURNING lease_expires_at, cancel_requested",
        )
        .bind(lease.job_id.as_uuid())
        .bind(to_i64(lease.token))
        .bind(now())
        .bind(ttl_micros(ttl))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Err(self.lost(&self.pool, lease.job_id).await);
        };
        let mut renewed = lease.clone();
        renewed.expires_at = row.try_get("lease_expires_at").map_err(db)?;
        Ok(Heartbeat {
            lease: renewed,
            cancel_requested: row.try_get("cancel_requested").map_err(db)?,
        })
    }

    async fn append(&self, lease: &Lease, kind: JobEventKind) -> Result<JobEvent, StoreError> {
        apply::appendable(&kind)?;
        // A step event also moves the job's progress: done by the completer's statement, on
        // the `progress` column, so a step costs no read.
        let progress = completer::Progress::of(&kind);
        let ev = NewEvent::new(kind, now())?;
        self.completer().append(lease.clone(), ev, progress).await
    }

    async fn append_many(
        &self,
        lease: &Lease,
        kinds: Vec<JobEventKind>,
    ) -> Result<Vec<std::sync::Arc<JobEvent>>, StoreError> {
        // Events that do not move the job's progress go in one write; one that does (a step's
        // start or end) goes in a write of its own, as `append` writes it.
        let mut written = Vec::with_capacity(kinds.len());
        let mut run = Vec::new();
        for kind in kinds {
            apply::appendable(&kind)?;
            let progress = completer::Progress::of(&kind);
            let ev = NewEvent::new(kind, now())?;
            if matches!(progress, completer::Progress::Unchanged) {
                run.push(ev);
            } else {
                self.append_run(lease, &mut run, &mut written).await?;
                let one = self.completer().append(lease.clone(), ev, progress).await?;
                written.push(std::sync::Arc::new(one));
            }
        }
        self.append_run(lease, &mut run, &mut written).await?;
        Ok(written)
    }

    async fn finish(&self, lease: &Lease, finish: Finish) -> Result<(Job, JobEvent), StoreError> {
        let ended = self
            .completer()
            .finish(lease.clone(), None, None, finish, now())
            .await?;
        Ok((ended.job, ended.event))
    }

    async fn finish_after(
        &self,
        lease: &Lease,
        last: JobEventKind,
        finish: Finish,
    ) -> Result<FinishedAfter, StoreError> {
        apply::appendable(&last)?;
        let at = now();
        let last = NewEvent::new(last, at)?;
        let ended = self
            .completer()
            .finish(lease.clone(), None, Some(Box::new(last)), finish, at)
            .await?;
        let last = ended
            .last
            .ok_or_else(|| StoreError::backend("postgres: the last event was not written"))?;
        Ok(FinishedAfter {
            last,
            ended: (ended.job, ended.event),
        })
    }

    async fn finish_after_step(
        &self,
        lease: &Lease,
        started: JobEventKind,
        finished: JobEventKind,
        finish: Finish,
        with_job: bool,
    ) -> Result<FinishedStep, StoreError> {
        apply::appendable(&started)?;
        apply::appendable(&finished)?;
        let at = now();
        let started = NewEvent::new(started, at)?;
        let finished = NewEvent::new(finished, at)?;
        let ended = self
            .completer()
            .finish(
                lease.clone(),
                Some(Box::new(started)),
                Some(Box::new(finished)),
                finish,
                at,
            )
            .await?;
        let missing = || StoreError::backend("postgres: the step's events were not written");
        let started = ended.first.ok_or_else(missing)?;
        let (between, finished) = ended.last.ok_or_else(missing)?;
        Ok(FinishedStep {
            started,
            finished,
            between: with_job.then_some(between),
            ended: (ended.job, ended.event),
        })
    }

    async fn request_cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(db)?;
        let mut job = self.locked_job(&mut tx, id).await?;
        match job.status {
            JobStatus::Queued | JobStatus::AwaitingApproval => {
                let kind = apply::cancel_queued(&mut job, reason, at)?;
                apply::progress(&mut job, &kind);
                let ev = NewEvent::new(kind, at)?;
                let seq = self.write_changed(&mut tx, &job, &ev).await?;
                tx.commit().await.map_err(db)?;
                self.announce(id, seq, &ev);
                Ok(CancelOutcome::Cancelled(job, ev.into_event(id, seq)))
            }
            JobStatus::Running => {
                job.cancel_requested = true;
                sqlx::query(
                    "UPDATE aiwg_jobs SET cancel_requested = TRUE, updated_at = now() \
                     WHERE id = $1",
                )
                .bind(id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                sqlx::query(
                    "SELECT pg_notify($1, json_build_object('i', $2::text, 'c', $3::uuid)::text)",
                )
                .bind(&self.channel)
                .bind(&self.instance)
                .bind(id.as_uuid())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(CancelOutcome::Requested(job))
            }
            _ => {
                tx.rollback().await.map_err(db)?;
                Ok(CancelOutcome::AlreadyFinished(job))
            }
        }
    }

    async fn decide_approval(
        &self,
        id: JobId,
        decision: ApprovalDecision,
    ) -> Result<ApprovalOutcome, StoreError> {
        let at = now();
        let mut tx = self.pool.begin().await.map_err(db)?;
        let mut job = self.locked_job(&mut tx, id).await?;
        let Some(kind) = apply::decide(&mut job, decision, at) else {
            // Rolled back now, not when the connection is next used: until then the row stays
            // locked, and claims (which skip locked rows) would not see the job.
            tx.rollback().await.map_err(db)?;
            return Ok(ApprovalOutcome::NotWaiting(job));
        };
        let ev = NewEvent::new(kind, at)?;
        let seq = self.write_changed(&mut tx, &job, &ev).await?;
        tx.commit().await.map_err(db)?;
        self.announce(id, seq, &ev);
        Ok(ApprovalOutcome::Decided(job, ev.into_event(id, seq)))
    }

    async fn expire_approvals(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        self.sweep(
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM aiwg_jobs j WHERE status = 'awaiting_approval' \
               AND approval_expires_at <= GREATEST($1::timestamptz, now()) \
             ORDER BY approval_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            now,
            |job, at| {
                Ok(apply::decide(
                    job,
                    ApprovalDecision::new(false, "aiwg", "timeout"),
                    at,
                ))
            },
        )
        .await
    }

    async fn events(&self, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError> {
        self.events_page(id, after, usize::MAX).await
    }

    async fn events_page(
        &self,
        id: JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind FROM aiwg_job_events WHERE job_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(id.as_uuid())
        .bind(to_i64(after))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        if rows.is_empty() && self.get(id).await?.is_none() {
            return Err(StoreError::NotFound(id));
        }
        rows.iter()
            .map(|r| {
                let Json(kind): Json<JobEventKind> = r.try_get("kind").map_err(db)?;
                Ok(JobEvent {
                    job_id: id,
                    seq: to_u64(r.try_get("seq").map_err(db)?),
                    at: r.try_get("at").map_err(db)?,
                    kind,
                })
            })
            .collect()
    }

    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        self.sweep(
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM aiwg_jobs j WHERE status = 'running' \
               AND lease_expires_at <= GREATEST($1::timestamptz, now()) \
             ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            now,
            |job, at| {
                let kind = apply::expire(job, at)?;
                apply::progress(job, &kind);
                Ok(Some(kind))
            },
        )
        .await
    }

    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE status = 'queued') AS queued, \
                    count(*) FILTER (WHERE status = 'running') AS running \
             FROM aiwg_jobs WHERE status IN ('queued', 'running')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let n = |c: &str| -> Result<usize, StoreError> {
            let v: i64 = row.try_get(c).map_err(db)?;
            Ok(usize::try_from(v).unwrap_or(0))
        };
        Ok(QueueCounts {
            queued: n("queued")?,
            running: n("running")?,
        })
    }
}
