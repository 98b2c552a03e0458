//! Where each job's tracking comment id is kept, so exactly one comment is made per job even
//! when its events are seen by several instances (the one that queued it, the ones that run
//! its attempts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiwg_core::JobId;
use async_trait::async_trait;

use crate::error::DeliveryStoreError;

/// What [`TrackingStore::claim`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrackClaim {
    /// Nobody had the job: create the comment, then [`set`](TrackingStore::set) its id.
    Mine,
    /// A claim without a comment id (stale, another instance's, or this owner's own from an
    /// earlier try) was taken over: the comment may have been made without its id being
    /// recorded, so look for it on the forge before creating one, then
    /// [`set`](TrackingStore::set) its id.
    TakenOver,
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

    /// Records `text`, the comment as job event `seq` left the job, unless a later event's
    /// text is recorded already, and returns the latest recorded `(seq, text)`: what the
    /// comment should show. Writers on every instance ask before and after each edit, so an
    /// edit of an older state that lands late is followed by the newest text.
    ///
    /// The default records nothing and returns what it was given: edits from several
    /// instances are then not ordered.
    async fn latest(
        &self,
        job: JobId,
        seq: u64,
        text: &str,
    ) -> Result<(u64, String), DeliveryStoreError> {
        let _ = job;
        Ok((seq, text.to_owned()))
    }
}

struct Entry {
    owner: String,
    claimed: Instant,
    comment: Option<String>,
    /// The newest text recorded, and the event it shows.
    latest: Option<(u64, Arc<str>)>,
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
                Ok(TrackClaim::TakenOver)
            }
            Some(_) => Ok(TrackClaim::Pending),
            None => {
                jobs.insert(
                    job,
                    Entry {
                        owner: owner.to_owned(),
                        claimed: Instant::now(),
                        comment: None,
                        latest: None,
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

    async fn latest(
        &self,
        job: JobId,
        seq: u64,
        text: &str,
    ) -> Result<(u64, String), DeliveryStoreError> {
        let mut jobs = self.lock();
        let Some(e) = jobs.get_mut(&job) else {
            return Ok((seq, text.to_owned()));
        };
        match &e.latest {
            Some((newer, t)) if *newer >= seq => Ok((*newer, t.to_string())),
            _ => {
                e.latest = Some((seq, Arc::from(text)));
                Ok((seq, text.to_owned()))
            }
        }
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
            // `xmax` is not zero on a row the statement updated rather than inserted: a
            // claim taken over.
            let row: (String, Option<String>, bool) = sqlx::query_as(
                "INSERT INTO aiwg_tracking_comments (job_id, owner) VALUES ($1, $2) \
                 ON CONFLICT (job_id) DO UPDATE SET owner = EXCLUDED.owner, claimed_at = now(), \
                     updated_at = now() \
                 WHERE aiwg_tracking_comments.comment_id IS NULL \
                   AND (aiwg_tracking_comments.owner = EXCLUDED.owner \
                        OR aiwg_tracking_comments.claimed_at \
                           < now() - $3 * interval '1 millisecond') \
                 RETURNING owner, comment_id, xmax <> 0",
            )
            .bind(job.as_uuid())
            .bind(owner)
            .bind(stale_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?
            .unwrap_or_default();
            if row.0 == owner && row.1.is_none() {
                return Ok(if row.2 {
                    TrackClaim::TakenOver
                } else {
                    TrackClaim::Mine
                });
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

        async fn latest(
            &self,
            job: JobId,
            seq: u64,
            text: &str,
        ) -> Result<(u64, String), DeliveryStoreError> {
            let seq_db = i64::try_from(seq).unwrap_or(i64::MAX);
            // Kept when newer; either way the row's newest is returned (the outer SELECT
            // reads the row as it was before the UPDATE, which is what stays when it changes
            // nothing).
            let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
                "WITH kept AS ( \
                     UPDATE aiwg_tracking_comments SET latest_seq = $2, latest_text = $3, \
                         updated_at = now() \
                     WHERE job_id = $1 AND (latest_seq IS NULL OR latest_seq < $2) \
                     RETURNING latest_seq, latest_text) \
                 SELECT latest_seq, latest_text FROM kept \
                 UNION ALL \
                 SELECT latest_seq, latest_text FROM aiwg_tracking_comments \
                 WHERE job_id = $1 AND NOT EXISTS (SELECT 1 FROM kept)",
            )
            .bind(job.as_uuid())
            .bind(seq_db)
            .bind(text)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            Ok(match row {
                Some((Some(s), Some(t))) => (u64::try_from(s).unwrap_or(0), t),
                _ => (seq, text.to_owned()),
            })
        }
    }
}

/// Checks a [`TrackingStore`] (feature `test-util`): the first claimant creates, the others
/// wait then find the comment, a stale claim is taken over, a released claim is free again.
/// `make` must give an empty store each call.
///
/// # Panics
/// On the first check that fails.
#[cfg(feature = "test-util")]
pub async fn tracking_store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::sync::Arc<dyn TrackingStore>>,
{
    let long = Duration::from_secs(3600);
    let s = make().await;
    let job = JobId::new();
    assert_eq!(s.claim(job, "a", long).await.unwrap(), TrackClaim::Mine);
    assert_eq!(s.claim(job, "b", long).await.unwrap(), TrackClaim::Pending);
    // The claimant asking again (a retry) still holds it, and is told its earlier try may
    // have made the comment.
    assert_eq!(
        s.claim(job, "a", long).await.unwrap(),
        TrackClaim::TakenOver
    );
    s.set(job, "c-1").await.unwrap();
    for owner in ["a", "b"] {
        assert_eq!(
            s.claim(job, owner, long).await.unwrap(),
            TrackClaim::Existing("c-1".into())
        );
    }
    // A claim that never got its comment is taken over once stale.
    let stale = JobId::new();
    assert_eq!(s.claim(stale, "a", long).await.unwrap(), TrackClaim::Mine);
    assert_eq!(
        s.claim(stale, "b", long).await.unwrap(),
        TrackClaim::Pending
    );
    assert_eq!(
        s.claim(stale, "b", Duration::ZERO).await.unwrap(),
        TrackClaim::TakenOver
    );
    // A released claim is free; only its holder releases it.
    let released = JobId::new();
    assert_eq!(
        s.claim(released, "a", long).await.unwrap(),
        TrackClaim::Mine
    );
    s.release(released, "b").await.unwrap();
    assert_eq!(
        s.claim(released, "b", long).await.unwrap(),
        TrackClaim::Pending
    );
    s.release(released, "a").await.unwrap();
    assert_eq!(
        s.claim(released, "b", long).await.unwrap(),
        TrackClaim::Mine
    );
    // The newest text recorded wins, whichever instance recorded it and in whatever order.
    let edited = JobId::new();
    assert_eq!(s.claim(edited, "a", long).await.unwrap(), TrackClaim::Mine);
    s.set(edited, "c-2").await.unwrap();
    assert_eq!(
        s.latest(edited, 5, "five").await.unwrap(),
        (5, "five".into())
    );
    assert_eq!(
        s.latest(edited, 9, "nine").await.unwrap(),
        (9, "nine".into())
    );
    assert_eq!(
        s.latest(edited, 7, "seven, late").await.unwrap(),
        (9, "nine".into()),
        "an older state is not recorded over a newer one"
    );
    assert_eq!(
        s.latest(edited, 9, "nine").await.unwrap(),
        (9, "nine".into())
    );
    assert_eq!(
        s.latest(edited, 12, "end").await.unwrap(),
        (12, "end".into())
    );
}
