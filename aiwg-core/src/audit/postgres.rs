//! [`PgAuditStore`]: the audit trail in PostgreSQL (feature `postgres`; migration
//! `migrations/audit/0004_audit.sql`, and `0033_audit_approvals.sql` for the decisions on
//! waiting jobs), shared by every instance.
//!
//! Every trigger attempt records one entry before it is answered. The records that arrive
//! while one is on its way are written together, in one statement and one commit
//! ([`coalesce`](crate::coalesce)): under a burst of triggers each entry
//! waited for a commit, and the disk, of its own (with 32 connections at once, the example
//! server's requests spent most of their time in the audit's inserts, waiting on the WAL).

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use super::{AuditEntry, AuditPage, AuditQuery, AuditRecord, AuditStore, Decision};
use crate::coalesce::{answer_each, Coalescer, Flush, KeptConnection};
use crate::job::JobId;
use crate::store::StoreError;

/// The most entries in one statement.
const MAX_BATCH: usize = 512;

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
#[derive(Clone)]
pub struct PgAuditStore {
    pool: PgPool,
    /// Started at the first record (it needs a runtime), shared by the clones.
    writer: Arc<OnceLock<Coalescer<Writer>>>,
}

impl std::fmt::Debug for PgAuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAuditStore")
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

/// Writes batches of entries.
struct Writer {
    /// The connection batches are written on while entries keep coming.
    kept: KeptConnection,
}

impl Flush for Writer {
    type Item = AuditRecord;
    type Answer = Result<i64, StoreError>;

    async fn flush(&self, records: Vec<AuditRecord>) -> Vec<Result<i64, StoreError>> {
        let n = records.len();
        let written = self.kept.run(db, async |conn| insert(conn, records).await);
        answer_each(n, written.await)
    }

    fn idle(&self) {
        self.kept.release();
    }
}

/// Inserts `records` in one statement; answers their ids, in order. Each row's id is drawn in
/// the statement's first step, with the row, so the answer does not depend on the order the
/// rows are inserted in.
async fn insert(
    conn: &mut sqlx::PgConnection,
    records: Vec<AuditRecord>,
) -> Result<Vec<i64>, StoreError> {
    let records: Vec<AuditRecord> = records.into_iter().map(AuditRecord::bounded).collect();
    let text = |f: fn(&AuditRecord) -> Option<&str>| -> Vec<Option<&str>> {
        records.iter().map(f).collect()
    };
    let ats: Vec<DateTime<Utc>> = records.iter().map(|r| r.at).collect();
    let sources: Vec<&str> = records.iter().map(|r| r.source.as_str()).collect();
    let decisions: Vec<&str> = records.iter().map(|r| r.decision.as_str()).collect();
    let jobs: Vec<Option<Uuid>> = records
        .iter()
        .map(|r| r.job_id.map(|j| *j.as_uuid()))
        .collect();
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH t AS (SELECT t.*, nextval('aiwg_audit_id_seq') AS id \
             FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::uuid[]) WITH ORDINALITY \
             AS t(at, source, key_name, actor, delivery_id, repo, workflow, decision, reason, \
                 job_id, ord)), \
         i AS (INSERT INTO aiwg_audit (id, at, source, key_name, actor, delivery_id, repo, \
             workflow, decision, reason, job_id) \
             SELECT id, at, source, key_name, actor, delivery_id, repo, workflow, decision, \
                 reason, job_id FROM t) \
         SELECT ord, id FROM t ORDER BY ord",
    )
    .bind(&ats)
    .bind(&sources)
    .bind(text(|r| r.key_name.as_deref()))
    .bind(text(|r| r.actor.as_deref()))
    .bind(text(|r| r.delivery_id.as_deref()))
    .bind(text(|r| r.repo.as_deref()))
    .bind(text(|r| r.workflow.as_deref()))
    .bind(&decisions)
    .bind(text(|r| r.reason.as_deref()))
    .bind(&jobs)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    Ok(rows.into_iter().map(|(_, id)| id).collect())
}

impl PgAuditStore {
    /// The trail in `pool`'s current schema. Runs no migrations: call
    /// [`migrate`](Self::migrate) or run [`migrator`](Self::migrator) yourself.
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            writer: Arc::default(),
        }
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
        let writer = self.writer.get_or_init(|| {
            Coalescer::start(
                Writer {
                    kept: KeptConnection::new(self.pool.clone()),
                },
                MAX_BATCH,
            )
        });
        writer
            .call(r)
            .await
            .unwrap_or_else(|| Err(StoreError::backend("postgres: the audit's writer stopped")))
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
