//! The admitter: new jobs go into the queue in one statement each batch, and submits that
//! arrive together share one.
//!
//! A bounded queue holds because every insert into it takes the queue's advisory lock, counts
//! the queued jobs after the lock is held, and keeps the lock until it commits (migrations
//! 0007 and 0011). One submit at a time, that is one commit, and one wait for the disk, after
//! another, however many arrive at once. So [`JobStore::create`](crate::store::JobStore::create)
//! goes out at once, from its caller, only while nothing else is on its way; the creates that
//! arrive meanwhile wait in the admitter's task and go out together as soon as it has been
//! answered ([`crate::coalesce`]): one lock, one count, one statement and one commit for all
//! of them. [`JobStore::create_many`](crate::store::JobStore::create_many)
//! sends its batch as one such statement directly.
//!
//! A bounded batch without idempotency keys that finds the lock held by another does not wait
//! for it: it is written first, then counted under the lock, and the jobs that the count
//! leaves no room for are deleted again (migration 0029, [`ADMIT`]). The
//! batches of several instances are written at the same time instead of one after another
//! (the submit burst of `pg_queue`, two stores: about 30 % more submits a second;
//! BENCHMARKS.md, session 27). A lone submit still takes the lock first: it is quicker so.
//! So does a batch with an idempotency key: an insert may wait for another transaction's
//! insert of the same key, and one that inserted keys before the lock could wait for the lock
//! held by a transaction waiting for its key (a deadlock).
//!
//! Each job still gets its own answer: the jobs of a batch are admitted in order while the
//! queue has room, and the rest are refused with [`StoreError::QueueFull`], as one submit
//! after another would have been. A job whose idempotency key is taken (by a job inserted
//! before, or earlier in the same batch) is not inserted; its caller is told so and looks the
//! key's job up.

use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use sqlx::Row;

use super::{db, json_err, listen::Notifier, micros, row::state_columns, seal_job, NewEvent};
use crate::coalesce::{answer_each, Coalescer, Flush, KeptConnection};
use crate::job::{IllegalTransition, JobStatus};
use crate::secrets::SecretKeyring;
use crate::store::{apply, Created, NewJob, StoreError};

/// What a submit's statement answered for one job: `None` when its idempotency key was taken
/// meanwhile (the caller finds the key's job), otherwise the job created or why not.
pub(super) type Answer = Option<Result<Created, StoreError>>;

/// The most jobs in one statement of the admitter.
const MAX_BATCH: usize = 512;

/// What the admitter needs of its store.
pub(super) struct Ctx {
    /// The connection the admitter's batches are written on while submits keep coming.
    pub(super) kept: KeptConnection,
    pub(super) keyring: Option<SecretKeyring>,
    pub(super) notifier: Notifier,
    /// The queue's advisory lock.
    pub(super) lock_key: i64,
}

impl Flush for Ctx {
    type Item = NewJob;
    type Answer = Result<Answer, StoreError>;

    async fn flush(&self, news: Vec<NewJob>) -> Vec<Result<Answer, StoreError>> {
        let n = news.len();
        let written = self.kept.run(db, async |conn| {
            if let [new] = news.as_slice() {
                insert_one(self, conn, new).await.map(|a| vec![a])
            } else {
                insert(self, conn, news).await
            }
        });
        answer_each(n, written.await)
    }

    fn idle(&self) {
        self.kept.release();
    }
}

/// The handle of a store's admitter (see the module docs).
pub(super) struct Admitter(Coalescer<Ctx>);

impl Admitter {
    /// Starts the task (on the current Tokio runtime).
    pub(super) fn start(ctx: Ctx) -> Self {
        Self(Coalescer::start(ctx, MAX_BATCH))
    }

    /// What the admitter writes with (for [`insert`] of a whole batch).
    pub(super) fn ctx(&self) -> &Ctx {
        self.0.flusher()
    }

    /// Queues `new`: at once, from the caller, when nothing is on its way; otherwise with the
    /// next batch.
    pub(super) async fn create(&self, new: NewJob) -> Result<Answer, StoreError> {
        self.0.call(new).await.unwrap_or_else(|| {
            Err(StoreError::backend(
                "postgres: the store's admitter stopped",
            ))
        })
    }
}

/// Inserts one job in one statement: the room in a bounded queue is checked under the queue's
/// lock (`aiwg_queue_has_room`, migration 0007), held until the insert commits.
///
/// A submit that finds nothing on its way goes out with this statement, the one every submit
/// used before batches: it takes one value per parameter where the batch's takes arrays.
/// (Enqueue → start in `pg_queue`, twelve runs alternating the two: within each other's
/// noise, 2.2-2.6 ms p50 either way.)
pub(super) async fn insert_one(
    ctx: &Ctx,
    conn: &mut PgConnection,
    new: &NewJob,
) -> Result<Answer, StoreError> {
    let job = &new.job;
    if job.status != JobStatus::Queued {
        return Ok(Some(Err(StoreError::IllegalTransition(
            IllegalTransition {
                from: job.status,
                to: JobStatus::Queued,
            },
        ))));
    }
    let ev = NewEvent::new(apply::created(job), micros(job.created_at))?;
    let sql = concat!(
        "WITH room AS (SELECT CASE WHEN $11::bigint IS NULL THEN true \
             ELSE aiwg_queue_has_room($12, $11) END AS ok), \
         u AS (INSERT INTO aiwg_jobs (id, status, priority, project_path, workflow, \
             queue_seq, retry_at, created_at, idempotency_key, fingerprint, last_seq, job, ",
        state_columns!(),
        ") SELECT $1, 'queued', $2, $3, $4, nextval('aiwg_queue_seq'), $5, $6, $7, $8, 1, \
             aiwg_job_document($9), s.* \
         FROM room CROSS JOIN LATERAL aiwg_job_columns($9) s WHERE room.ok \
         ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
         RETURNING id, last_seq), \
         e AS (INSERT INTO aiwg_job_events (job_id, seq, at, kind) \
             SELECT id, last_seq, $10, $13::jsonb FROM u) \
         SELECT room.ok, u.last_seq FROM room LEFT JOIN u ON true"
    );
    let capacity = new
        .queue_capacity
        .map(|c| i64::try_from(c).unwrap_or(i64::MAX));
    let row = sqlx::query(sql)
        .bind(job.id.as_uuid())
        .bind(job.priority)
        .bind(&*job.project_path)
        .bind(&*job.workflow)
        .bind(job.retry_at)
        .bind(job.created_at)
        .bind(job.idempotency_key.as_deref())
        .bind(
            job.idempotency_key
                .as_ref()
                .map(|_| new.fingerprint.clone().unwrap_or_default()),
        )
        .bind(Json(seal_job(ctx.keyring.as_ref(), job)?))
        .bind(ev.at)
        .bind(capacity)
        .bind(ctx.lock_key)
        .bind(&ev.text)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if !row.try_get::<bool, _>("ok").map_err(db)? {
        return Ok(Some(Err(StoreError::QueueFull {
            capacity: new.queue_capacity.unwrap_or_default(),
        })));
    }
    let Some(seq) = row.try_get::<Option<i64>, _>("last_seq").map_err(db)? else {
        // The idempotency key was taken meanwhile.
        return Ok(None);
    };
    ctx.notifier.announce_queued(job, seq, &ev);
    Ok(Some(Ok(Created::New(
        job.clone(),
        ev.into_event(job.id, seq),
    ))))
}

/// Inserts jobs in one statement: the room in a bounded queue counted under the queue's lock,
/// the jobs that fit (in order) and whose idempotency key is free, their `queued` events.
/// Answers per job, in order; `Err` when the statement failed (nothing of it was written).
///
/// A job is admitted when the jobs queued before the statement, plus the bounded jobs of the
/// batch up to and including it, are within its capacity. When every job of the batch has the
/// same capacity (one engine's submits do), that is exactly one submit after another; with
/// different capacities it may refuse a job one at a time would have admitted, never the
/// reverse. A job whose key a job already has, or an earlier job of the batch, takes no place
/// and is not admitted to a bounded queue (answered [`StoreError::QueueFull`]; its caller then
/// finds the key's job); one whose key is taken by a submit that commits meanwhile counts as
/// admitted (it takes room it does not use): never more than the capacity.
pub(super) async fn insert(
    ctx: &Ctx,
    conn: &mut PgConnection,
    news: Vec<NewJob>,
) -> Result<Vec<Answer>, StoreError> {
    let n = news.len();
    let mut answers: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
    // The jobs that go to the database, with their slot in `answers` and their event.
    let mut sent = Vec::with_capacity(n);
    for (slot, new) in news.into_iter().enumerate() {
        if new.job.status != JobStatus::Queued {
            answers[slot] = Some(Some(Err(StoreError::IllegalTransition(
                IllegalTransition {
                    from: new.job.status,
                    to: JobStatus::Queued,
                },
            ))));
            continue;
        }
        let ev = NewEvent::new(apply::created(&new.job), micros(new.job.created_at))?;
        sent.push((slot, new, ev));
    }
    if !sent.is_empty() {
        write(ctx, conn, sent, &mut answers).await?;
    }
    Ok(answers
        .into_iter()
        .map(|a| {
            a.unwrap_or_else(|| {
                Some(Err(StoreError::backend(
                    "postgres: a job of the batch was not answered",
                )))
            })
        })
        .collect())
}

/// The statement of [`insert`], for the jobs it sends (each with its slot in `answers` and its
/// `queued` event); fills their answers.
async fn write(
    ctx: &Ctx,
    conn: &mut PgConnection,
    sent: Vec<(usize, NewJob, NewEvent)>,
    answers: &mut [Option<Answer>],
) -> Result<(), StoreError> {
    let m = sent.len();
    let (mut ids, mut priorities, mut projects, mut workflows) = (
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
    );
    let (mut keys, mut fingerprints) = (Vec::with_capacity(m), Vec::with_capacity(m));
    let (mut retry_ats, mut created_ats, mut jobs, mut kinds, mut ats, mut capacities) = (
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
        Vec::with_capacity(m),
    );
    for (_, new, ev) in &sent {
        let job = &new.job;
        ids.push(*job.id.as_uuid());
        priorities.push(job.priority);
        projects.push(&*job.project_path);
        workflows.push(&*job.workflow);
        keys.push(job.idempotency_key.as_deref());
        fingerprints.push(
            job.idempotency_key
                .as_ref()
                .map(|_| new.fingerprint.as_deref().unwrap_or_default()),
        );
        retry_ats.push(job.retry_at);
        created_ats.push(job.created_at);
        jobs.push(serde_json::to_string(&*seal_job(ctx.keyring.as_ref(), job)?).map_err(json_err)?);
        kinds.push(ev.text.as_str());
        ats.push(ev.at);
        capacities.push(
            new.queue_capacity
                .map(|c| i64::try_from(c).unwrap_or(i64::MAX)),
        );
    }
    let bounded = capacities.iter().any(Option::is_some);
    let rows = sqlx::query(ADMIT)
        .bind(ctx.lock_key)
        .bind(bounded)
        .bind(&ids)
        .bind(&priorities)
        .bind(&projects)
        .bind(&workflows)
        .bind(&retry_ats)
        .bind(&created_ats)
        .bind(&jobs)
        .bind(&kinds)
        .bind(&ats)
        .bind(&capacities)
        .bind(&keys)
        .bind(&fingerprints)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
    // Admitted jobs: whether each was inserted (its key was free).
    let mut admitted = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        admitted.insert(
            row.try_get::<uuid::Uuid, _>("id").map_err(db)?,
            row.try_get::<bool, _>("inserted").map_err(db)?,
        );
    }
    for (slot, new, ev) in sent {
        let id = new.job.id;
        answers[slot] = Some(match admitted.get(id.as_uuid()) {
            Some(true) => {
                ctx.notifier.announce_queued(&new.job, 1, &ev);
                Some(Ok(Created::New(new.job, ev.into_event(id, 1))))
            }
            Some(false) => None,
            None => Some(Err(StoreError::QueueFull {
                capacity: new.queue_capacity.unwrap_or_default(),
            })),
        });
    }
    Ok(())
}

/// The statement of [`insert`]: `aiwg_admit` (migration 0029; the module docs say how it
/// admits a batch), its parameters in the function's order. It answers the admitted jobs, each
/// with whether it was inserted (its key was free).
const ADMIT: &str =
    "SELECT id, inserted FROM aiwg_admit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";
