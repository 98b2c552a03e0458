//! [`PgDeliveryStore`]: inbound de-duplication in PostgreSQL (feature `postgres`; migration
//! `aiwg-webhook/migrations/0003_inbound_dedup.sql`), so several server instances sharing a
//! database start one job per platform delivery between them. All times are the database's, so
//! instances with skewed clocks agree on leases and expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::{BackendError, JobId};
use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{Claim, DeliveryStore};
use crate::error::DeliveryStoreError;

/// Expired keys are purged once every this many claims (per store).
const PURGE_EVERY: u64 = 256;

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
#[derive(Clone)]
pub struct PgDeliveryStore {
    pool: PgPool,
    claims: Arc<AtomicU64>,
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
        }
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
        sqlx::query(
            "INSERT INTO aiwg_inbound_deliveries AS d (key, job_id, until) \
             VALUES ($1, $2, now() + $3 * interval '1 microsecond') \
             ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id, until = EXCLUDED.until",
        )
        .bind(key)
        .bind(job.as_uuid())
        .bind(micros(ttl))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
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
