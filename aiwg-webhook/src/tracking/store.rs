//! Where each job's tracking comment id is kept, so exactly one comment is made per job even
//! when its events are seen by several instances (the one that queued it, the ones that run
//! its attempts).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aiwg_core::JobId;
use async_trait::async_trait;

use crate::error::DeliveryStoreError;

/// What [`TrackingStore::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackClaim {
    /// Nobody has (or a stale claimant had) the job: create the comment, then
    /// [`set`](TrackingStore::set) its id.
    Mine,
    /// The comment exists.
    Existing(String),
    /// Another instance is creating it: ask again shortly.
    Pending,
}

/// Keeps each job's tracking comment id. [`MemoryTrackingStore`] for one instance;
/// `PgTrackingStore` (feature `postgres`) across instances.
#[async_trait]
pub trait TrackingStore: Send + Sync + 'static {
    /// Claims the creation of `job`'s comment for `owner`, taking over a claim older than
    /// `stale_after` that never got a comment id.
    async fn claim(
        &self,
        job: JobId,
        owner: &str,
        stale_after: Duration,
    ) -> Result<TrackClaim, DeliveryStoreError>;

    /// Records the comment made for `job`.
    async fn set(&self, job: JobId, comment_id: &str) -> Result<(), DeliveryStoreError>;

    /// Gives a claim up (the comment could not be made), so another attempt may claim it.
    async fn release(&self, job: JobId, owner: &str) -> Result<(), DeliveryStoreError>;
}

struct Entry {
    owner: String,
    claimed: Instant,
    comment: Option<String>,
}

/// A [`TrackingStore`] in memory (one instance). Holds at most 100 000 jobs, forgetting the
/// oldest claims first.
#[derive(Default)]
pub struct MemoryTrackingStore {
    jobs: Mutex<HashMap<JobId, Entry>>,
}

impl std::fmt::Debug for MemoryTrackingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTrackingStore")
            .finish_non_exhaustive()
    }
}

impl MemoryTrackingStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Entry>> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

const MEMORY_MAX: usize = 100_000;

#[async_trait]
impl TrackingStore for MemoryTrackingStore {
    async fn claim(
        &self,
        job: JobId,
        owner: &str,
        stale_after: Duration,
    ) -> Result<TrackClaim, DeliveryStoreError> {
        let mut jobs = self.lock();
        if jobs.len() >= MEMORY_MAX && !jobs.contains_key(&job) {
            // Job ids are time-ordered (UUIDv7): the smallest are the oldest.
            let mut ids: Vec<JobId> = jobs.keys().copied().collect();
            ids.sort_unstable();
            for id in ids.into_iter().take(MEMORY_MAX / 10) {
                jobs.remove(&id);
            }
        }
        match jobs.get_mut(&job) {
            Some(Entry {
                comment: Some(c), ..
            }) => Ok(TrackClaim::Existing(c.clone())),
            Some(e) if e.owner == owner || e.claimed.elapsed() >= stale_after => {
                e.owner = owner.to_owned();
                e.claimed = Instant::now();
                Ok(TrackClaim::Mine)
            }
            Some(_) => Ok(TrackClaim::Pending),
            None => {
                jobs.insert(
                    job,
                    Entry {
                        owner: owner.to_owned(),
                        claimed: Instant::now(),
                        comment: None,
                    },
                );
                Ok(TrackClaim::Mine)
            }
        }
    }

    async fn set(&self, job: JobId, comment_id: &str) -> Result<(), DeliveryStoreError> {
        if let Some(e) = self.lock().get_mut(&job) {
            e.comment = Some(comment_id.to_owned());
        }
        Ok(())
    }

    async fn release(&self, job: JobId, owner: &str) -> Result<(), DeliveryStoreError> {
        let mut jobs = self.lock();
        if jobs
            .get(&job)
            .is_some_and(|e| e.owner == owner && e.comment.is_none())
        {
            jobs.remove(&job);
        }
        Ok(())
    }
}

#[cfg(feature = "postgres")]
pub use postgres::PgTrackingStore;

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::Duration;

    use aiwg_core::JobId;
    use async_trait::async_trait;
    use sqlx::migrate::Migrator;
    use sqlx::PgPool;

    use super::{TrackClaim, TrackingStore};
    use crate::error::DeliveryStoreError;

    static MIGRATOR: Migrator = Migrator {
        ignore_missing: true,
        ..sqlx::migrate!("migrations/tracking")
    };

    fn db(e: sqlx::Error) -> DeliveryStoreError {
        DeliveryStoreError::Unavailable(aiwg_core::BackendError::with_source(
            "postgres: tracking comments",
            e,
        ))
    }

    /// A [`TrackingStore`] in PostgreSQL (table `aiwg_tracking_comments`, migration
    /// `aiwg-webhook/migrations/tracking/`), shared by every instance.
    #[derive(Clone, Debug)]
    pub struct PgTrackingStore {
        pool: PgPool,
    }

    impl PgTrackingStore {
        /// The store over `pool` (runs no migrations: call [`migrate`](Self::migrate)).
        #[must_use]
        pub fn new(pool: PgPool) -> Self {
            Self { pool }
        }

        /// Runs the embedded migration (idempotent).
        ///
        /// # Errors
        /// [`DeliveryStoreError`] when it fails.
        pub async fn migrate(&self) -> Result<(), DeliveryStoreError> {
            MIGRATOR.run(&self.pool).await.map_err(|e| {
                DeliveryStoreError::Unavailable(aiwg_core::BackendError::with_source(
                    "postgres: tracking migration failed",
                    e,
                ))
            })
        }

        /// The embedded migrations, for hosts that run them with their own tooling.
        #[must_use]
        pub fn migrator() -> &'static Migrator {
            &MIGRATOR
        }

        /// Forgets the comments of jobs created before `before` (their jobs are gone too).
        ///
        /// # Errors
        /// [`DeliveryStoreError`] when the database fails.
        pub async fn purge(
            &self,
            before: chrono::DateTime<chrono::Utc>,
        ) -> Result<u64, DeliveryStoreError> {
            Ok(
                sqlx::query("DELETE FROM aiwg_tracking_comments WHERE updated_at < $1")
                    .bind(before)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?
                    .rows_affected(),
            )
        }
    }

    #[async_trait]
    impl TrackingStore for PgTrackingStore {
        async fn claim(
            &self,
            job: JobId,
            owner: &str,
            stale_after: Duration,
        ) -> Result<TrackClaim, DeliveryStoreError> {
            let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
            // Insert, or take over a stale claim that never got a comment; the row returned
            // says who holds it now.
            let row: (String, Option<String>) = sqlx::query_as(
                "INSERT INTO aiwg_tracking_comments (job_id, owner) VALUES ($1, $2) \
                 ON CONFLICT (job_id) DO UPDATE SET owner = EXCLUDED.owner, claimed_at = now(), \
                     updated_at = now() \
                 WHERE aiwg_tracking_comments.comment_id IS NULL \
                   AND (aiwg_tracking_comments.owner = EXCLUDED.owner \
                        OR aiwg_tracking_comments.claimed_at \
                           < now() - $3 * interval '1 millisecond') \
                 RETURNING owner, comment_id",
            )
            .bind(job.as_uuid())
            .bind(owner)
            .bind(stale_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .unwrap_or_default();
            if row.0 == owner && row.1.is_none() {
                return Ok(TrackClaim::Mine);
            }
            let current: Option<(Option<String>,)> =
                sqlx::query_as("SELECT comment_id FROM aiwg_tracking_comments WHERE job_id = $1")
                    .bind(job.as_uuid())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
            Ok(match current {
                Some((Some(c),)) => TrackClaim::Existing(c),
                _ => TrackClaim::Pending,
            })
        }

        async fn set(&self, job: JobId, comment_id: &str) -> Result<(), DeliveryStoreError> {
            sqlx::query(
                "UPDATE aiwg_tracking_comments SET comment_id = $2, updated_at = now() \
                 WHERE job_id = $1",
            )
            .bind(job.as_uuid())
            .bind(comment_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        }

        async fn release(&self, job: JobId, owner: &str) -> Result<(), DeliveryStoreError> {
            sqlx::query(
                "DELETE FROM aiwg_tracking_comments \
                 WHERE job_id = $1 AND owner = $2 AND comment_id IS NULL",
            )
            .bind(job.as_uuid())
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(db)?;
            Ok(())
        }
    }
}
