//! [`PgDeliveryStore`]: inbound de-duplication in PostgreSQL (feature `postgres`; migration
//! `aiwg-webhook/migrations/0003_inbound_dedup.sql`), so several server instances sharing a
//! database start one job per platform delivery between them. All times are the database's, so
//! instances with skewed clocks agree on leases and expiry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use aiwg_core::coalesce::{answer_each, Coalescer, Flush, KeptConnection};
use aiwg_core::{BackendError, JobId};
use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{Claim, DeliveryStore};
use crate::error::DeliveryStoreError;

/// Expired keys are purged once every this many claims (per store).
const PURGE_EVERY: u64 = 256;

/// Claims (and completions) written together at most.
const MAX_BATCH: usize = 256;

/// The de-duplication table's migrations (versions unique across aiwg, so they compose with
/// aiwg-core's jobs and outbox migrations on one database and one pool).
static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!()
};

fn db(e: sqlx::Error) -> DeliveryStoreError {
    DeliveryStoreError::Unavailable(BackendError::with_source("postgres", e))
}

/// Microseconds of `d`, saturating.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A [`DeliveryStore`] in the `aiwg_inbound_deliveries` table, shared by every instance that
/// connects to the same database and schema. Claims are one `INSERT … ON CONFLICT`, so of
/// several instances receiving the same delivery exactly one starts its job.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool, engine: aiwg_core::Engine) -> Result<(), Box<dyn std::error::Error>> {
/// let dedup = aiwg_webhook::PgDeliveryStore::new(pool);
/// dedup.migrate().await?;
/// let hooks = aiwg_webhook::Hooks::builder(Default::default(), engine)
///     .delivery_store(std::sync::Arc::new(dedup))
///     .build()?;
/// # let _ = hooks; Ok(()) }
/// ```
///
/// Claims that arrive together (and the completions that follow them) go out together, one
/// statement and one commit for many: every signed delivery costs a claim and a completion,
/// and written one by one they queued for the disk (see [`aiwg_core::coalesce`]).
#[derive(Clone)]
pub struct PgDeliveryStore {
    pool: PgPool,
    claims: Arc<AtomicU64>,
    /// Started on first use (a coalescer runs a task on the caller's runtime).
    batches: Arc<OnceLock<Batches>>,
}

struct Batches {
    claims: Coalescer<Claims>,
    completions: Coalescer<Completions>,
}

/// Claims of keys, in one `INSERT … ON CONFLICT`.
struct Claims {
    /// The connection batches are written on while claims keep coming.
    kept: KeptConnection,
}

/// A claim to make: the key and its lease in microseconds.
type ClaimItem = (String, i64);

impl Flush for Claims {
    type Item = ClaimItem;
    /// `None`: the key's row changed hands while the statement ran (released, expired, or
    /// claimed by a statement that committed meanwhile): claim it again on its own.
    type Answer = Result<Option<Claim>, DeliveryStoreError>;

    async fn flush(&self, items: Vec<ClaimItem>) -> Vec<Self::Answer> {
        let claimed = self
            .kept
            .run(db, async |conn| claim_together(conn, &items).await);
        answer_each(items.len(), claimed.await)
    }

    fn idle(&self) {
        self.kept.release();
    }
}

/// Claims `items` in one statement. Of a key asked for twice in the batch, the first is
/// answered as a lone claim would be and the second as a claim arriving just after it.
async fn claim_together(
    conn: &mut PgConnection,
    items: &[ClaimItem],
) -> Result<Vec<Option<Claim>>, DeliveryStoreError> {
    // The batch's distinct keys in key order (of a key asked for twice, the first lease), and
    // for each item the position of its key among them. Every batch writes its rows in key
    // order: two statements that write the same keys (another instance's batch, or this
    // one's completions) then wait for each other in one order, never each for the other (in
    // arrival order, two instances' batches of claims deadlocked).
    let mut keys: Vec<(&str, i64)> = items.iter().map(|(k, l)| (k.as_str(), *l)).collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    keys.dedup_by(|later, first| later.0 == first.0);
    let slots: Vec<usize> = items
        .iter()
        .map(|(key, _)| {
            keys.binary_search_by(|(k, _)| (*k).cmp(key.as_str()))
                .unwrap_or_default()
        })
        .collect();
    let (keys, leases): (Vec<&str>, Vec<i64>) = keys.into_iter().unzip();
    // `d` is read in the statement's snapshot, without the rows `ins` wrote: it answers the
    // keys that were not taken (known, done or pending). A key taken by a transaction that
    // committed after the snapshot is neither: it is answered `None`. One row per key, in
    // the order of `keys`.
    let rows = sqlx::query(
        "WITH t AS (SELECT * FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY \
             AS t(key, lease, ord)), \
         ins AS (INSERT INTO aiwg_inbound_deliveries AS d (key, job_id, until) \
             SELECT key, NULL, now() + lease * interval '1 microsecond' FROM t \
             ON CONFLICT (key) DO UPDATE SET job_id = NULL, until = EXCLUDED.until \
             WHERE d.until <= now() \
             RETURNING d.key) \
         SELECT ins.key IS NOT NULL AS fresh, d.key IS NOT NULL AS known, d.job_id \
         FROM t LEFT JOIN ins ON ins.key = t.key \
         LEFT JOIN aiwg_inbound_deliveries d ON d.key = t.key AND d.until > now() \
         ORDER BY t.ord",
    )
    .bind(&keys)
    .bind(&leases)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let answers = rows
        .iter()
        .map(|row| {
            Ok(if row.try_get::<bool, _>("fresh").map_err(db)? {
                Some(Claim::Fresh)
            } else if row.try_get::<bool, _>("known").map_err(db)? {
                let job: Option<Uuid> = row.try_get("job_id").map_err(db)?;
                Some(job.map_or(Claim::Pending, |j| Claim::Done(JobId::from(j))))
            } else {
                None
            })
        })
        .collect::<Result<Vec<_>, DeliveryStoreError>>()?;
    let mut answered = vec![false; keys.len()];
    Ok(slots
        .into_iter()
        .map(|slot| {
            let answer = answers.get(slot).copied().flatten();
            if std::mem::replace(&mut answered[slot], true) {
                // The same key again: the first one's claim is now the key's state.
                answer.map(|a| match a {
                    Claim::Fresh => Claim::Pending,
                    other => other,
                })
            } else {
                answer
            }
        })
        .collect())
}

/// Completions of claimed keys, in one `INSERT … ON CONFLICT`.
struct Completions {
    /// The connection batches are written on while completions keep coming.
    kept: KeptConnection,
}

/// A completion: the key, its job, and how long it is remembered in microseconds.
type CompletionItem = (String, Uuid, i64);

impl Flush for Completions {
    type Item = CompletionItem;
    type Answer = Result<(), DeliveryStoreError>;

    async fn flush(&self, items: Vec<CompletionItem>) -> Vec<Self::Answer> {
        let n = items.len();
        // A key completed twice in one batch: the later completion wins, as it would one by
        // one (one statement may not write a row twice). In key order, as the claims (see
        // `claim_together`).
        let mut last: BTreeMap<&str, &CompletionItem> = BTreeMap::new();
        for item in &items {
            last.insert(item.0.as_str(), item);
        }
        let (mut keys, mut jobs, mut ttls) = (Vec::new(), Vec::new(), Vec::new());
        for (key, job, ttl) in last.into_values() {
            keys.push(key.as_str());
            jobs.push(*job);
            ttls.push(*ttl);
        }
        let done = self.kept.run(db, async |conn| {
            sqlx::query(
                "INSERT INTO aiwg_inbound_deliveries AS d (key, job_id, until) \
                 SELECT key, job, now() + ttl * interval '1 microsecond' \
                 FROM unnest($1::text[], $2::uuid[], $3::int8[]) AS t(key, job, ttl) \
                 ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id, until = EXCLUDED.until",
            )
            .bind(&keys)
            .bind(&jobs)
            .bind(&ttls)
            .execute(conn)
            .await
            .map_err(db)
        });
        answer_each(n, done.await.map(|_| vec![(); n]))
    }

    fn idle(&self) {
        self.kept.release();
    }
}

impl std::fmt::Debug for PgDeliveryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDeliveryStore")
            .field("pool_size", &self.pool.size())
            .finish_non_exhaustive()
    }
}

impl PgDeliveryStore {
    /// De-duplication in `pool`'s current schema. Runs no migrations: call
    /// [`migrate`](Self::migrate) or run [`migrator`](Self::migrator) yourself. Share the pool
    /// with aiwg-core's `PgStore` to keep one set of connections.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            claims: Arc::new(AtomicU64::new(0)),
            batches: Arc::new(OnceLock::new()),
        }
    }

    fn batches(&self) -> &Batches {
        self.batches.get_or_init(|| Batches {
            claims: Coalescer::start(
                Claims {
                    kept: KeptConnection::new(self.pool.clone()),
                },
                MAX_BATCH,
            ),
            completions: Coalescer::start(
                Completions {
                    kept: KeptConnection::new(self.pool.clone()),
                },
                MAX_BATCH,
            ),
        })
    }

    /// Runs the embedded migration (idempotent; safe when several instances start at once).
    pub async fn migrate(&self) -> Result<(), DeliveryStoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| {
            DeliveryStoreError::Unavailable(BackendError::with_source(
                "postgres: migration failed",
                e,
            ))
        })
    }

    /// The embedded migrations (from `aiwg-webhook/migrations`), for hosts that run them with
    /// their own tooling.
    #[must_use]
    pub fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    /// Deletes expired keys (also done every 256 claims); returns how many.
    pub async fn purge(&self) -> Result<u64, DeliveryStoreError> {
        Ok(sqlx::query(
            "DELETE FROM aiwg_inbound_deliveries WHERE key IN \
             (SELECT key FROM aiwg_inbound_deliveries WHERE until <= now() LIMIT 10000 \
              FOR UPDATE SKIP LOCKED) AND until <= now()",
        )
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected())
    }
}

#[async_trait]
impl DeliveryStore for PgDeliveryStore {
    /// One `INSERT … ON CONFLICT`: a key that is absent, or whose row's `until` passed (a lapsed
    /// claim or a forgotten key), is taken for `lease`; otherwise the row says done or pending.
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Claim, DeliveryStoreError> {
        let _ = ttl;
        if self.claims.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            self.purge().await?;
        }
        // With the claims that arrive meanwhile; alone when its key changed hands meanwhile.
        match self
            .batches()
            .claims
            .call((key.to_owned(), micros(lease)))
            .await
        {
            Some(Ok(Some(claim))) => return Ok(claim),
            Some(Err(e)) => return Err(e),
            Some(Ok(None)) | None => {}
        }
        for _ in 0..3 {
            let took = sqlx::query(
                "INSERT INTO aiwg_inbound_deliveries AS d (key, job_id, until) \
                 VALUES ($1, NULL, now() + $2 * interval '1 microsecond') \
                 ON CONFLICT (key) DO UPDATE SET job_id = NULL, until = EXCLUDED.until \
                 WHERE d.until <= now() \
                 RETURNING 1",
            )
            .bind(key)
            .bind(micros(lease))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            if took.is_some() {
                return Ok(Claim::Fresh);
            }
            let row = sqlx::query(
                "SELECT job_id FROM aiwg_inbound_deliveries WHERE key = $1 AND until > now()",
            )
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            if let Some(row) = row {
                let job: Option<Uuid> = row.try_get("job_id").map_err(db)?;
                return Ok(job.map_or(Claim::Pending, |j| Claim::Done(JobId::from(j))));
            }
            // Released or expired in between: try again.
        }
        Ok(Claim::Pending)
    }

    /// Records the job created for a claimed key and remembers it for `ttl`.
    async fn complete(
        &self,
        key: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<(), DeliveryStoreError> {
        // With the completions that arrive meanwhile.
        self.batches()
            .completions
            .call((key.to_owned(), *job.as_uuid(), micros(ttl)))
            .await
            .unwrap_or_else(|| {
                Err(DeliveryStoreError::Unavailable(BackendError::new(
                    "postgres: the de-duplication writer stopped (its runtime shut down)",
                )))
            })
    }

    /// Forgets a pending claim (its submission failed), so a redelivery may try again. A done
    /// key is kept.
    async fn release(&self, key: &str) -> Result<(), DeliveryStoreError> {
        sqlx::query("DELETE FROM aiwg_inbound_deliveries WHERE key = $1 AND job_id IS NULL")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The job recorded for `key`, while it is remembered.
    async fn get(&self, key: &str) -> Result<Option<JobId>, DeliveryStoreError> {
        let job: Option<Option<Uuid>> = sqlx::query_scalar(
            "SELECT job_id FROM aiwg_inbound_deliveries \
             WHERE key = $1 AND until > now() AND job_id IS NOT NULL",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(job.flatten().map(JobId::from))
    }
}
