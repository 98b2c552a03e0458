//! How a job is kept in its row of `aiwg_jobs` (migration 0030): its *document*, what never
//! changes after the submit, in the `job` column, written once; its *state*, what does, in
//! columns of their own, written as one JSON object with the job's own field names
//! (`aiwg_job_columns`). A reader of `aiwg_jobs` reads the state's columns as they are
//! ([`job_columns`], [`State::read`]); the claim and outcome functions return it as one JSON
//! object (`aiwg_job_state(j)`), read by [`State`]'s `Deserialize`.
//!
//! Reading the columns as they are costs PostgreSQL half the time of building the object and
//! sending it as text (a page of 51 jobs: 0.35 ms against 0.67 ms), and costs the store no
//! parse of its timestamps (issue 15, session 50).
//!
//! The split is what keeps a claim and an outcome from moving, parsing and rewriting the
//! whole document (BENCHMARKS.md, session 36). [`job`] puts the two back together: every
//! field of [`Job`] is named there, so a field added to it fails to compile until it is given
//! to one of the two.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;

use crate::job::{
    Approval, Job, JobError, JobId, JobResult, JobStatus, Progress, ReplyCredentials, StatusChange,
    TriggerInfo,
};

/// The columns a reader selects for a job, from `aiwg_jobs` named `j`: the document and the
/// state's columns ([`State::read`] and [`job`] read them back).
macro_rules! job_columns {
    () => {
        "j.job, j.status, j.retry_at, j.cancel_requested, j.attempt, j.started_at, \
         j.finished_at, j.dead_letter, j.resume_after_approval, j.progress, j.history, \
         j.approvals, j.result, j.error"
    };
}
pub(super) use job_columns;

/// The state's columns, in the order `aiwg_job_columns` returns them: what a statement that
/// writes a state sets from it (`(state_columns!()) = (SELECT * FROM aiwg_job_columns(…))`).
macro_rules! state_columns {
    () => {
        "attempt, started_at, finished_at, dead_letter, resume_after_approval, progress, \
         history, approvals, result, error"
    };
}
pub(super) use state_columns;

/// What never changes after the submit: the `job` column. (The whole job serialised is
/// accepted too: the fields of the state are ignored.)
#[derive(Deserialize)]
pub(super) struct Document {
    id: JobId,
    workflow: Arc<str>,
    project_path: Arc<str>,
    params: Arc<BTreeMap<String, String>>,
    guidance: Option<String>,
    priority: i32,
    max_attempts: u32,
    #[serde(with = "crate::job::duration_ms")]
    timeout: Duration,
    #[serde(with = "crate::timestamp")]
    created_at: DateTime<Utc>,
    trigger: Arc<TriggerInfo>,
    idempotency_key: Option<String>,
    #[serde(default)]
    reply_credentials: ReplyCredentials,
    #[serde(default)]
    concurrency_group: Option<String>,
    #[serde(default)]
    max_budget_usd: Option<f64>,
}

/// What changes: the state columns, as `aiwg_job_state` reads them and `aiwg_job_columns`
/// writes them (`status`, `retry_at` and `cancel_requested` are written by each statement on
/// its own, and read here). Borrowed from a job to be written, owned when read.
#[derive(Serialize, Deserialize)]
pub(super) struct State<'a> {
    status: JobStatus,
    #[serde(default, with = "crate::timestamp::option")]
    retry_at: Option<DateTime<Utc>>,
    cancel_requested: bool,
    attempt: u32,
    #[serde(default, with = "crate::timestamp::option")]
    started_at: Option<DateTime<Utc>>,
    #[serde(default, with = "crate::timestamp::option")]
    finished_at: Option<DateTime<Utc>>,
    dead_letter: bool,
    resume_after_approval: bool,
    progress: Cow<'a, Progress>,
    history: Cow<'a, [StatusChange]>,
    approvals: Cow<'a, [Approval]>,
    result: Option<Cow<'a, JobResult>>,
    error: Option<Cow<'a, JobError>>,
}

impl<'a> State<'a> {
    /// The state of `job`, borrowed.
    pub(super) fn of(job: &'a Job) -> Self {
        Self {
            status: job.status,
            retry_at: job.retry_at,
            cancel_requested: job.cancel_requested,
            attempt: job.attempt,
            started_at: job.started_at,
            finished_at: job.finished_at,
            dead_letter: job.dead_letter,
            resume_after_approval: job.resume_after_approval,
            progress: Cow::Borrowed(&job.progress),
            history: Cow::Borrowed(&job.history),
            approvals: Cow::Borrowed(&job.approvals),
            result: job.result.as_deref().map(Cow::Borrowed),
            error: job.error.as_ref().map(Cow::Borrowed),
        }
    }
}

impl State<'static> {
    /// The state of a row read with [`job_columns`], from its columns.
    pub(super) fn read(row: &PgRow) -> Result<Self, sqlx::Error> {
        let decode =
            |column: &str, e: Box<dyn std::error::Error + Send + Sync>| sqlx::Error::ColumnDecode {
                index: column.to_owned(),
                source: e,
            };
        let status: &str = row.try_get("status")?;
        let attempt: i64 = row.try_get("attempt")?;
        let Json(progress): Json<Progress> = row.try_get("progress")?;
        let Json(history): Json<Vec<StatusChange>> = row.try_get("history")?;
        let Json(approvals): Json<Vec<Approval>> = row.try_get("approvals")?;
        let result: Option<Json<Option<JobResult>>> = row.try_get("result")?;
        let error: Option<Json<Option<JobError>>> = row.try_get("error")?;
        Ok(Self {
            status: status.parse().map_err(|e| decode("status", Box::new(e)))?,
            retry_at: row.try_get("retry_at")?,
            cancel_requested: row.try_get("cancel_requested")?,
            attempt: u32::try_from(attempt).map_err(|e| decode("attempt", Box::new(e)))?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            dead_letter: row.try_get("dead_letter")?,
            resume_after_approval: row.try_get("resume_after_approval")?,
            progress: Cow::Owned(progress),
            history: Cow::Owned(history),
            approvals: Cow::Owned(approvals),
            result: result.and_then(|Json(r)| r).map(Cow::Owned),
            error: error.and_then(|Json(e)| e).map(Cow::Owned),
        })
    }
}

/// The state of `job` as the JSON text `aiwg_job_columns` reads.
pub(super) fn state_json(job: &Job) -> Result<String, serde_json::Error> {
    serde_json::to_string(&State::of(job))
}

/// The job of a row: its document and its state put back together.
pub(super) fn job(doc: Document, state: State<'_>) -> Job {
    let Document {
        id,
        workflow,
        project_path,
        params,
        guidance,
        priority,
        max_attempts,
        timeout,
        created_at,
        trigger,
        idempotency_key,
        reply_credentials,
        concurrency_group,
        max_budget_usd,
    } = doc;
    let State {
        status,
        retry_at,
        cancel_requested,
        attempt,
        started_at,
        finished_at,
        dead_letter,
        resume_after_approval,
        progress,
        history,
        approvals,
        result,
        error,
    } = state;
    Job {
        id,
        workflow,
        project_path,
        params: crate::job::shared_params(Arc::unwrap_or_clone(params)),
        guidance,
        priority,
        status,
        attempt,
        max_attempts,
        timeout,
        created_at,
        started_at,
        finished_at,
        retry_at,
        progress: progress.into_owned(),
        result: result.map(|r| Arc::new(r.into_owned())),
        error: error.map(Cow::into_owned),
        dead_letter,
        trigger,
        history: history.into_owned(),
        cancel_requested,
        idempotency_key,
        reply_credentials,
        concurrency_group,
        max_budget_usd,
        approvals: approvals.into_owned(),
        resume_after_approval,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ApprovalDecision;

    /// A job with every field set away from its default.
    fn full() -> Job {
        let at = DateTime::parse_from_rfc3339("2026-12-06T14:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": JobId::new(), "workflow": "review", "project_path": "/srv/p",
            "params": {"pr": "7"}, "guidance": "be brief", "priority": 3,
            "status": "awaiting_approval", "attempt": 2, "max_attempts": 4,
            "timeout": 60000, "created_at": at, "started_at": at, "finished_at": at,
            "retry_at": at, "progress": {"completed": ["a"], "in_progress": ["b"],
            "pending": ["c"]}, "result": {"summary": "s", "session_id": null,
            "cost_usd": 0.5, "usage": null, "steps": []},
            "error": {"kind": "agent_failed", "message": "m"}, "dead_letter": true,
            "trigger": {"source": "api", "actor": "k"},
            "history": [{"status": "queued", "at": at, "attempt": 0, "reason": "r"}],
            "cancel_requested": true, "idempotency_key": "key",
            "reply_credentials": {"slack_response_url": "https://example.invalid/x"},
            "concurrency_group": "g", "max_budget_usd": 2.5,
            "approvals": [], "resume_after_approval": true,
        }))
        .unwrap();
        let mut approval = Approval::new("b", at, at);
        approval.decision = Some(ApprovalDecision::new(true, "octo", "github"));
        job.approvals.push(approval);
        job
    }

    #[test]
    fn a_job_split_into_document_and_state_comes_back_whole() {
        let job = full();
        let whole = serde_json::to_string(&job).unwrap();
        let doc: Document = serde_json::from_str(&whole).unwrap();
        let state: State<'_> = serde_json::from_str(&state_json(&job).unwrap()).unwrap();
        assert_eq!(super::job(doc, state), job);
    }

    #[test]
    fn the_state_read_back_from_the_database_form_is_the_same() {
        // `aiwg_job_state` writes times with an offset, not `Z`, and JSON nulls for empty
        // columns.
        let job = full();
        let mut state = serde_json::to_value(State::of(&job)).unwrap();
        state["started_at"] = "2026-12-06T15:00:00.123456+01:00".into();
        let read: State<'_> = serde_json::from_value(state).unwrap();
        assert_eq!(read.started_at, job.started_at);
    }
}
