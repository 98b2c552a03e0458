//! Inbound webhook de-duplication on PostgreSQL (migration `0003_inbound_dedup.sql`): the
//! queries behind `aiwg-webhook`'s `DeliveryStore`, shared by every instance. All times are the
//! database's, so instances with skewed clocks agree on leases and expiry.

use std::ops::ControlFlow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::Row;
use uuid::Uuid;

use super::{db, ttl_micros, PgStore};
use crate::job::JobId;
use crate::store::StoreError;

/// Expired keys are purged once every this many claims (per store).
const PURGE_EVERY: u64 = 256;

impl PgStore {
    /// Claims the inbound delivery `key` atomically (`INSERT … ON CONFLICT`):
    ///
    /// - `Continue(())`: first time seen (or the previous claim's `lease` lapsed, or the key
    ///   was forgotten): the caller owns the claim and must call
    ///   [`inbound_complete`](Self::inbound_complete) or
    ///   [`inbound_release`](Self::inbound_release);
    /// - `Break(Some(job))`: already handled, it created `job`;
    /// - `Break(None)`: another request with that key is being handled right now.
    ///
    /// `ttl` is how long a done key is remembered (set by `inbound_complete`); a pending claim
    /// lives for `lease`.
    pub async fn inbound_claim(
        &self,
        key: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<ControlFlow<Option<JobId>>, StoreError> {
        let _ = ttl;
        if self.inbound_claims.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1 {
            self.inbound_purge().await?;
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
            .bind(ttl_micros(lease))
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            if took.is_some() {
                return Ok(ControlFlow::Continue(()));
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
                return Ok(ControlFlow::Break(job.map(JobId::from)));
            }
            // Released or expired in between: try again.
        }
        Ok(ControlFlow::Break(None))
    }

    /// Records the job created for a claimed key and remembers it for `ttl`.
    pub async fn inbound_complete(
        &self,
        key: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO aiwg_inbound_deliveries AS d (key, job_id, until) \
             VALUES ($1, $2, now() + $3 * interval '1 microsecond') \
             ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id, until = EXCLUDED.until",
        )
        .bind(key)
        .bind(job.as_uuid())
        .bind(ttl_micros(ttl))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Forgets a pending claim (its submission failed), so a redelivery may try again. A done
    /// key is kept.
    pub async fn inbound_release(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM aiwg_inbound_deliveries WHERE key = $1 AND job_id IS NULL")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The job recorded for `key`, while it is remembered.
    pub async fn inbound_get(&self, key: &str) -> Result<Option<JobId>, StoreError> {
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

    /// Deletes expired keys (also done every 256 claims); returns how many.
    pub async fn inbound_purge(&self) -> Result<u64, StoreError> {
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
