//! [`PgAuditStore`]: the audit trail in PostgreSQL (feature `postgres`; migration
//! `migrations/audit/0004_audit.sql`), shared by every instance.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{AuditEntry, AuditPage, AuditQuery, AuditRecord, AuditStore, Decision};
use crate::job::JobId;
use crate::store::StoreError;

/// The audit trail's migrations (versions unique across aiwg, so they compose with the jobs',
/// the outbox's and the de-duplication's on one database).
static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("migrations/audit")
};

/// An [`AuditStore`] in PostgreSQL. Nothing is forgotten until [`purge`](AuditStore::purge)
/// (the example server purges every `storage.retention.purge_every`, keeping
/// `storage.retention.audit_for`).
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), aiwg_core::store::StoreError> {
/// use std::sync::Arc;
/// use aiwg_core::audit::{AuditLog, PgAuditStore};
///
/// let store = PgAuditStore::new(pool);
/// store.migrate().await?;
/// let engine = aiwg_core::Engine::builder()
///     .audit(AuditLog::new(Arc::new(store)))
///     .build();
/// # let _ = engine; Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgAuditStore {
    pool: PgPool,
}

impl PgAuditStore {
    /// The trail in `pool`'s current schema. Runs no migrations: call
    /// [`migrate`](Self::migrate) or run [`migrator`](Self::migrator) yourself.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs the trail's embedded migrations (idempotent; safe when several instances start at
    /// once).
    ///
    /// # Errors
    /// [`StoreError::Backend`] when a migration fails.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::backend_from("postgres: audit migration failed", e))
    }

    /// The embedded migrations (from `aiwg-core/migrations/audit`).
    #[must_use]
    pub fn migrator() -> &'static Migrator {
        &MIGRATOR
    }
}

fn db(e: sqlx::Error) -> StoreError {
    StoreError::backend_from("postgres: audit", e)
}

fn entry(row: &PgRow) -> Result<AuditEntry, StoreError> {
    let decision: String = row.try_get("decision").map_err(db)?;
    let decision = decision
        .parse::<Decision>()
        .map_err(|e| StoreError::backend_from("postgres: audit decision", e))?;
    let job: Option<Uuid> = row.try_get("job_id").map_err(db)?;
    Ok(AuditEntry {
        id: row.try_get("id").map_err(db)?,
        at: row.try_get("at").map_err(db)?,
        source: row.try_get("source").map_err(db)?,
        key_name: row.try_get("key_name").map_err(db)?,
        actor: row.try_get("actor").map_err(db)?,
        delivery_id: row.try_get("delivery_id").map_err(db)?,
        repo: row.try_get("repo").map_err(db)?,
        workflow: row.try_get("workflow").map_err(db)?,
        decision,
        reason: row.try_get("reason").map_err(db)?,
        job_id: job.map(JobId::from),
    })
}

#[async_trait]
impl AuditStore for PgAuditStore {
    async fn record(&self, r: AuditRecord) -> Result<i64, StoreError> {
        let r = r.bounded();
        sqlx::query_scalar(
            "INSERT INTO aiwg_audit \
             (at, source, key_name, actor, delivery_id, repo, workflow, decision, reason, job_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(r.at)
        .bind(&r.source)
        .bind(&r.key_name)
        .bind(&r.actor)
        .bind(&r.delivery_id)
        .bind(&r.repo)
        .bind(&r.workflow)
        .bind(r.decision.as_str())
        .bind(&r.reason)
        .bind(r.job_id.map(|j| *j.as_uuid()))
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    async fn list(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let size = q.page_size();
        let rows = sqlx::query(
            "SELECT id, at, source, key_name, actor, delivery_id, repo, workflow, decision, \
             reason, job_id FROM aiwg_audit \
             WHERE ($1::timestamptz IS NULL OR at >= $1) \
               AND ($2::text IS NULL OR source = $2) \
               AND ($3::text IS NULL OR decision = $3) \
               AND ($4::bigint IS NULL OR id < $4) \
             ORDER BY id DESC LIMIT $5",
        )
        .bind(q.since)
        .bind(&q.source)
        .bind(q.decision.map(Decision::as_str))
        .bind(q.cursor)
        .bind(i64::try_from(size + 1).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let entries = rows.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
        Ok(AuditPage::from_overfetch(entries, size))
    }

    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM aiwg_audit WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db)?
            .rows_affected())
    }
}
