//! The audit trail: every trigger attempt, accepted or refused, from every source, and every
//! decision on a job waiting for approval.
//!
//! Whoever decides whether a trigger starts a job records the decision once, through the
//! engine's [`AuditLog`] ([`Engine::audit`](crate::Engine::audit)): the HTTP API for
//! `POST /workflows/trigger` (the API key's name, the idempotency key as delivery id), the
//! platform hooks of `aiwg-webhook` for comments, rules and chat commands (platform, actor,
//! delivery id, repository). Each record is
//!
//! - emitted as a structured `tracing` event with target `aiwg::audit` (so a log pipeline can
//!   route it on its own), and
//! - kept in an [`AuditStore`]: [`MemoryAuditStore`] (bounded by an [`AuditRetention`]) or, with
//!   the `postgres` feature, [`PgAuditStore`], shared by every instance.
//!
//! `GET /audit` (admin scope) reads it back newest first with [`AuditQuery`] filters.
//!
//! What counts as an attempt: a request to the trigger endpoint (also one with a wrong key or
//! a missing scope), and a platform delivery that failed verification or addressed us (a
//! command, a matching rule). An approval or a rejection of a waiting job is recorded as
//! [`Decision::Approved`] or [`Decision::Rejected`] (who, and the job), whether it came through
//! `POST /workflows/{job_id}/approve` and `/reject` or a platform's comment; an attempt to
//! decide that was refused (a wrong key, a missing scope, a job not waiting, a commenter not
//! allowed) as [`Decision::Refused`] with the reason. A comment that does not mention us, a ping and a Slack URL check
//! are not attempts. Rate-limited requests are not recorded either: the limiter exists so that
//! a flood costs us nothing, the audit store included.
//!
//! Nothing secret is recorded: no key, no signature, no reply URL, only names and reasons.
//!
//! ```
//! # async fn run() -> Result<(), aiwg_core::store::StoreError> {
//! use std::sync::Arc;
//! use aiwg_core::audit::{AuditLog, AuditQuery, AuditRecord, Decision, MemoryAuditStore};
//!
//! let log = AuditLog::new(Arc::new(MemoryAuditStore::new()));
//! log.record(
//!     AuditRecord::new("github", Decision::Refused)
//!         .actor("mallory")
//!         .workflow("review")
//!         .reason("sender `mallory` is not allowed to trigger workflows"),
//! )
//! .await;
//! let page = log.store().list(&AuditQuery::default()).await?;
//! assert_eq!(page.entries[0].actor.as_deref(), Some("mallory"));
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::job::JobId;
use crate::store::StoreError;

mod memory;
#[cfg(feature = "postgres")]
mod postgres;

pub use memory::{AuditRetention, MemoryAuditStore};
#[cfg(feature = "postgres")]
pub use postgres::PgAuditStore;

/// The longest text kept in one field of a record (longer values are cut at a character
/// boundary): user-controlled text (a workflow name from a comment, an actor) cannot make a
/// record large.
pub const MAX_FIELD_BYTES: usize = 256;
/// The longest reason kept.
pub const MAX_REASON_BYTES: usize = 1024;

/// What became of a trigger attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Decision {
    /// A new job was created.
    Accepted,
    /// The same trigger again (a redelivery, a replayed body, an idempotency key): the existing
    /// job was answered and nothing new started.
    Duplicate,
    /// Refused: authentication, authorization, validation, or the engine could not take it.
    Refused,
    /// A job waiting at an approval gate was approved (through the API or a platform's
    /// comment): `job_id` names it, `actor` (and `key_name`) who.
    Approved,
    /// A job waiting at an approval gate was rejected.
    Rejected,
}

impl Decision {
    /// The wire name (`accepted`, `duplicate`, `refused`, `approved`, `rejected`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::Refused => "refused",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a [`Decision`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a decision (accepted, duplicate, refused, approved, rejected)")]
pub struct UnknownDecision(pub String);

impl FromStr for Decision {
    type Err = UnknownDecision;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "accepted" => Ok(Self::Accepted),
            "duplicate" => Ok(Self::Duplicate),
            "refused" => Ok(Self::Refused),
            "approved" => Ok(Self::Approved),
            "rejected" => Ok(Self::Rejected),
            other => Err(UnknownDecision(other.to_owned())),
        }
    }
}

/// One decision to record; the store gives it an id and it becomes an [`AuditEntry`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditRecord {
    /// When it was decided.
    pub at: DateTime<Utc>,
    /// `api`, or the platform (`github`, `gitlab`, `slack`, …).
    pub source: String,
    /// The API key's name, for `api`.
    pub key_name: Option<String>,
    /// Who asked (the platform's user; for `api`, the key's name).
    pub actor: Option<String>,
    /// The platform's delivery id, or the API's idempotency key.
    pub delivery_id: Option<String>,
    /// The repository (`owner/name`), when there is one.
    pub repo: Option<String>,
    /// The workflow asked for, when known.
    pub workflow: Option<String>,
    /// The decision.
    pub decision: Decision,
    /// Why (for refusals and duplicates).
    pub reason: Option<String>,
    /// The job created or answered.
    pub job_id: Option<JobId>,
}

impl AuditRecord {
    /// A record of `decision` for `source`, now.
    #[must_use]
    pub fn new(source: impl Into<String>, decision: Decision) -> Self {
        Self {
            at: Utc::now(),
            source: source.into(),
            key_name: None,
            actor: None,
            delivery_id: None,
            repo: None,
            workflow: None,
            decision,
            reason: None,
            job_id: None,
        }
    }

    /// Sets the API key's name.
    #[must_use]
    pub fn key_name(mut self, name: impl Into<String>) -> Self {
        self.key_name = Some(name.into());
        self
    }

    /// Sets the actor.
    #[must_use]
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the delivery id.
    #[must_use]
    pub fn delivery_id(mut self, id: impl Into<String>) -> Self {
        self.delivery_id = Some(id.into());
        self
    }

    /// Sets the repository.
    #[must_use]
    pub fn repo(mut self, repo: impl Into<String>) -> Self {
        self.repo = Some(repo.into());
        self
    }

    /// Sets the workflow.
    #[must_use]
    pub fn workflow(mut self, workflow: impl Into<String>) -> Self {
        self.workflow = Some(workflow.into());
        self
    }

    /// Sets the reason.
    #[must_use]
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets the job.
    #[must_use]
    pub fn job(mut self, id: JobId) -> Self {
        self.job_id = Some(id);
        self
    }

    /// The record with every text cut to [`MAX_FIELD_BYTES`] ([`MAX_REASON_BYTES`] for the
    /// reason) at a character boundary. [`AuditLog::record`] and the stores apply it, so
    /// user-controlled text (a workflow name from a comment, an actor) cannot make an entry
    /// large.
    #[must_use]
    pub fn bounded(mut self) -> Self {
        let field = |v: Option<String>| v.map(|v| cut(v, MAX_FIELD_BYTES));
        self.source = cut(self.source, MAX_FIELD_BYTES);
        self.key_name = field(self.key_name);
        self.actor = field(self.actor);
        self.delivery_id = field(self.delivery_id);
        self.repo = field(self.repo);
        self.workflow = field(self.workflow);
        self.reason = self.reason.map(|v| cut(v, MAX_REASON_BYTES));
        self
    }

    /// Sets the time (tests and imports; [`new`](Self::new) takes the current time).
    #[must_use]
    pub fn at(mut self, at: DateTime<Utc>) -> Self {
        self.at = at;
        self
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A stored [`AuditRecord`] with its id (ids grow with time; the cursor of `GET /audit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// The entry's id: larger is newer.
    pub id: i64,
    /// When it was decided.
    #[serde(with = "crate::timestamp")]
    pub at: DateTime<Utc>,
    /// `api` or the platform.
    pub source: String,
    /// The API key's name.
    pub key_name: Option<String>,
    /// Who asked.
    pub actor: Option<String>,
    /// The delivery id or idempotency key.
    pub delivery_id: Option<String>,
    /// The repository.
    pub repo: Option<String>,
    /// The workflow asked for.
    pub workflow: Option<String>,
    /// The decision.
    pub decision: Decision,
    /// Why.
    pub reason: Option<String>,
    /// The job.
    pub job_id: Option<JobId>,
}

impl AuditEntry {
    /// The entry for `record` stored under `id`.
    #[must_use]
    pub fn from_record(id: i64, record: AuditRecord) -> Self {
        Self {
            id,
            at: record.at,
            source: record.source,
            key_name: record.key_name,
            actor: record.actor,
            delivery_id: record.delivery_id,
            repo: record.repo,
            workflow: record.workflow,
            decision: record.decision,
            reason: record.reason,
            job_id: record.job_id,
        }
    }
}

/// Filters and page of `GET /audit`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditQuery {
    /// Only entries at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only entries of this source.
    pub source: Option<String>,
    /// Only entries with this decision.
    pub decision: Option<Decision>,
    /// Page size (clamped to 1..=500, default 50).
    pub limit: Option<usize>,
    /// Continue with entries older than this id (the previous page's `next_cursor`).
    pub cursor: Option<i64>,
}

impl AuditQuery {
    /// The effective page size.
    #[must_use]
    pub fn page_size(&self) -> usize {
        self.limit.unwrap_or(50).clamp(1, 500)
    }

    /// Whether `entry` passes the filters (not the cursor).
    #[must_use]
    pub fn matches(&self, entry: &AuditEntry) -> bool {
        self.since.is_none_or(|s| entry.at >= s)
            && self.source.as_ref().is_none_or(|s| *s == entry.source)
            && self.decision.is_none_or(|d| d == entry.decision)
            && self.cursor.is_none_or(|c| entry.id < c)
    }
}

/// One page of entries, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// The cursor of the next (older) page, if there is one.
    pub next_cursor: Option<i64>,
}

impl AuditPage {
    /// A page from up to `page_size + 1` entries read newest first: the extra one, when
    /// present, only says that there is a next page.
    #[must_use]
    pub fn from_overfetch(mut entries: Vec<AuditEntry>, page_size: usize) -> Self {
        let more = entries.len() > page_size;
        entries.truncate(page_size);
        let next_cursor = if more {
            entries.last().map(|e| e.id)
        } else {
            None
        };
        Self {
            entries,
            next_cursor,
        }
    }
}

/// Where audit entries are kept. Implement it to keep them elsewhere; the suite
/// `aiwg_core::test_util::audit_store_suite` (feature `test-util`) checks an implementation.
#[async_trait]
pub trait AuditStore: Send + Sync + 'static {
    /// Stores `record`; returns its id.
    async fn record(&self, record: AuditRecord) -> Result<i64, StoreError>;

    /// Entries matching `query`, newest first.
    async fn list(&self, query: &AuditQuery) -> Result<AuditPage, StoreError>;

    /// Forgets entries older than `before`; returns how many.
    async fn purge(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}

/// Records trigger decisions: a `tracing` event with target `aiwg::audit`, then the store.
/// Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    store: Arc<dyn AuditStore>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl Default for AuditLog {
    fn default() -> Self {
        Self::new(Arc::new(MemoryAuditStore::new()))
    }
}

impl AuditLog {
    /// A log over `store`.
    #[must_use]
    pub fn new(store: Arc<dyn AuditStore>) -> Self {
        Self { store }
    }

    /// The store, to read entries back.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// Records `record`. A store failure is logged, never returned: the decision it describes
    /// has been taken already, and the `aiwg::audit` event carries it in any case.
    pub async fn record(&self, record: AuditRecord) {
        let record = record.bounded();
        tracing::info!(
            target: "aiwg::audit",
            source = %record.source,
            key_name = record.key_name.as_deref(),
            actor = record.actor.as_deref(),
            delivery_id = record.delivery_id.as_deref(),
            repo = record.repo.as_deref(),
            workflow = record.workflow.as_deref(),
            decision = record.decision.as_str(),
            reason = record.reason.as_deref(),
            job_id = record.job_id.map(|j| j.to_string()),
            "trigger {}",
            record.decision
        );
        metrics::counter!(
            "aiwg_trigger_decisions_total",
            "source" => record.source.clone(),
            "decision" => record.decision.as_str()
        )
        .increment(1);
        if let Err(e) = self.store.record(record).await {
            tracing::error!(error = %e, "could not store an audit entry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_cut_at_a_char_boundary() {
        let long = "é".repeat(MAX_FIELD_BYTES);
        let r = AuditRecord::new("api", Decision::Refused)
            .actor(long)
            .bounded();
        let actor = r.actor.unwrap();
        assert!(actor.len() <= MAX_FIELD_BYTES);
        assert!(actor.chars().all(|c| c == 'é'));
        let r = AuditRecord::new("api", Decision::Refused)
            .reason("x".repeat(5000))
            .bounded();
        assert_eq!(r.reason.unwrap().len(), MAX_REASON_BYTES);
    }

    #[test]
    fn decisions_round_trip() {
        for d in [
            Decision::Accepted,
            Decision::Duplicate,
            Decision::Refused,
            Decision::Approved,
            Decision::Rejected,
        ] {
            assert_eq!(d.as_str().parse::<Decision>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{}\"", d.as_str()));
        }
        assert_eq!(
            "maybe".parse::<Decision>().unwrap_err().to_string(),
            "`maybe` is not a decision (accepted, duplicate, refused, approved, rejected)"
        );
    }
}
