//! The JSON documents of the HTTP API (request and response bodies).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::audit::{AuditEntry, Decision};
use crate::engine::QueueStats;
use crate::executor::{BackendHealth, CircuitState};
use crate::job::{Approval, Job, JobError, JobResult, JobStatus, Progress, TriggerInfo};
use crate::workflow::{Parameter, Workflow};

/// Body of `POST /workflows/trigger`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerBody {
    /// The workflow to run.
    pub workflow: String,
    /// Project directory (absolute, or relative to the root).
    #[serde(default)]
    pub project_path: Option<String>,
    /// Project key resolved through the mapping rules.
    #[serde(default)]
    pub project: Option<String>,
    /// Free text for the agent.
    #[serde(default)]
    pub guidance: Option<String>,
    /// Parameter values (strings, numbers or booleans).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: Option<BTreeMap<String, serde_json::Value>>,
    /// `false` waits for the job to end and answers with its status document.
    #[serde(default, rename = "async")]
    pub is_async: Option<bool>,
    /// Overrides the workflow's priority (an integer; `5.0` counts as `5`, as in JSON Schema).
    #[serde(default, deserialize_with = "integral_i32")]
    pub priority: Option<i32>,
    /// Same key and body → the same job; same key, other body → 409.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// An optional `i32` that also accepts a JSON number with a zero fraction (`5.0`), since JSON
/// Schema (and so the OpenAPI document) counts it as an integer.
fn integral_i32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let value = match (n.as_i64(), n.as_f64()) {
        (Some(i), _) => i32::try_from(i).ok(),
        (None, Some(f))
            if f.fract() == 0.0 && f >= f64::from(i32::MIN) && f <= f64::from(i32::MAX) =>
        {
            Some(f as i32)
        }
        _ => None,
    };
    value
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("priority {n} is not a 32-bit integer")))
}

/// Answer of an accepted trigger (202).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TriggerAccepted {
    /// The job.
    pub job_id: String,
    /// Its status (`queued`, or later for a replayed idempotency key).
    pub status: JobStatus,
    /// Seconds jobs of this workflow took on average, when known.
    pub estimated_duration: Option<u64>,
    /// Where to poll.
    pub status_url: String,
    /// Where to stream events.
    pub events_url: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusDocument {
    /// The job's id.
    pub job_id: String,
    /// The workflow.
    pub workflow: String,
    /// Current status.
    pub status: JobStatus,
    /// The project directory.
    pub project_path: String,
    /// Parameters after defaults.
    pub params: BTreeMap<String, String>,
    /// The free text given to the agent, if any (so the job can be run again as it was).
    pub guidance: Option<String>,
    /// Priority.
    pub priority: i32,
    /// Current attempt (0 before the first run).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Created.
    #[serde(with = "crate::timestamp")]
    pub created_at: DateTime<Utc>,
    /// Last attempt started.
    #[serde(default, with = "crate::timestamp::option")]
    pub started_at: Option<DateTime<Utc>>,
    /// Reached a terminal status.
    #[serde(default, with = "crate::timestamp::option")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Step progress.
    pub progress: Progress,
    /// Result (on completion; partial on failure).
    // The job's own, shared: a status document does not copy every step's output.
    #[schema(value_type = Option<JobResult>)]
    pub result: Option<Arc<JobResult>>,
    /// Error (failed, cancelled, timed out).
    pub error: Option<JobError>,
    /// Failed with no attempts left.
    pub dead_letter: bool,
    /// What started it.
    pub trigger: TriggerInfo,
    /// What the job has cost so far, in US dollars (every step that reported a cost,
    /// including one stopped early).
    pub cost_usd: Option<f64>,
    /// The job's spending cap, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// While `awaiting_approval`: the step it waits for, until when, and who may decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<PendingApproval>,
    /// Every approval asked for and what became of it (who approved or rejected, how, when).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
}

/// The approval a job waits for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PendingApproval {
    /// The step that waits.
    pub step: String,
    /// When the job paused.
    #[serde(with = "crate::timestamp")]
    pub requested_at: DateTime<Utc>,
    /// When it ends `cancelled` (kind `approval_timeout`) unless decided before.
    #[serde(with = "crate::timestamp")]
    pub expires_at: DateTime<Utc>,
    /// Who may approve or reject, in words.
    pub who_may_approve: String,
    /// Where to approve (`POST`), relative to the API's root.
    pub approve_url: String,
    /// Where to reject (`POST`), relative to the API's root.
    pub reject_url: String,
}

/// Who may decide a job's approval, in words: an API key, and for a job a forge's comment
/// started, a user of that forge.
fn who_may_approve(job: &Job) -> &'static str {
    macro_rules! or_a_forge_user {
        ($forge:literal) => {
            concat!(
                "an API key with the `approve` (or `admin`) scope, or a ",
                $forge,
                " user the trigger policy admits, commenting `@<bot> approve` or `@<bot> reject` \
                 on the thread that started it"
            )
        };
    }
    match job.trigger.source.as_str() {
        "github" => or_a_forge_user!("github"),
        "gitlab" => or_a_forge_user!("gitlab"),
        "gitea" => or_a_forge_user!("gitea"),
        "bitbucket" => or_a_forge_user!("bitbucket"),
        _ => "an API key with the `approve` (or `admin`) scope",
    }
}

/// `workflows/{job_id}/approve` or `…/reject`, joined without `fmt` when written.
#[derive(Clone, Copy)]
struct JobUrl {
    id: crate::job::JobId,
    action: &'static str,
}

impl JobUrl {
    fn approve(id: crate::job::JobId) -> Self {
        Self {
            id,
            action: "/approve",
        }
    }

    fn reject(id: crate::job::JobId) -> Self {
        Self {
            id,
            action: "/reject",
        }
    }

    fn text(self) -> String {
        let mut id = uuid::Uuid::encode_buffer();
        let id = self.id.as_uuid().hyphenated().encode_lower(&mut id);
        ["workflows/", id, self.action].concat()
    }
}

impl Serialize for JobUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

/// A job as the API shows it, borrowed from the job: what the status, approval and list
/// answers write. Its JSON is [`StatusDocument`]'s, field for field and byte for byte (a test
/// holds the two together), without copying the job into owned strings first (issue 15: the
/// copies and their drops were a sixth of a page of jobs' time).
#[derive(Serialize)]
pub(crate) struct StatusView<'a> {
    job_id: crate::job::JobId,
    workflow: &'a str,
    status: JobStatus,
    project_path: &'a str,
    params: &'a BTreeMap<String, String>,
    guidance: Option<&'a str>,
    priority: i32,
    attempt: u32,
    max_attempts: u32,
    #[serde(with = "crate::timestamp")]
    created_at: DateTime<Utc>,
    #[serde(with = "crate::timestamp::option")]
    started_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::timestamp::option")]
    finished_at: Option<DateTime<Utc>>,
    progress: &'a Progress,
    result: Option<&'a JobResult>,
    error: Option<&'a JobError>,
    dead_letter: bool,
    trigger: &'a TriggerInfo,
    cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_budget_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<ApprovalView<'a>>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    approvals: &'a [Approval],
}

/// [`PendingApproval`], borrowed.
#[derive(Serialize)]
struct ApprovalView<'a> {
    step: &'a str,
    #[serde(with = "crate::timestamp")]
    requested_at: DateTime<Utc>,
    #[serde(with = "crate::timestamp")]
    expires_at: DateTime<Utc>,
    who_may_approve: &'static str,
    approve_url: JobUrl,
    reject_url: JobUrl,
}

impl<'a> StatusView<'a> {
    /// How `job` is shown.
    pub(crate) fn of(j: &'a Job) -> Self {
        Self {
            job_id: j.id,
            workflow: &j.workflow,
            status: j.status,
            project_path: &j.project_path,
            params: &j.params,
            guidance: j.guidance.as_deref(),
            priority: j.priority,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            created_at: j.created_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
            progress: &j.progress,
            result: j.result.as_deref(),
            error: j.error.as_ref(),
            dead_letter: j.dead_letter,
            trigger: &j.trigger,
            cost_usd: j.result.as_ref().and_then(|r| r.cost_usd),
            max_budget_usd: j.max_budget_usd,
            approval: j.pending_approval().map(|a| ApprovalView {
                step: &a.step,
                requested_at: a.requested_at,
                expires_at: a.expires_at,
                who_may_approve: who_may_approve(j),
                approve_url: JobUrl::approve(j.id),
                reject_url: JobUrl::reject(j.id),
            }),
            approvals: &j.approvals,
        }
    }
}

/// [`JobList`], borrowed from its jobs.
#[derive(Serialize)]
pub(crate) struct JobListView<'a> {
    /// Jobs, newest first.
    pub(crate) jobs: Vec<StatusView<'a>>,
    /// Pass as `cursor` for the next page.
    pub(crate) next_cursor: Option<crate::job::JobId>,
}

impl From<&Job> for StatusDocument {
    /// The job as the answers show it (`StatusView`), owned; its result shared with the job.
    fn from(j: &Job) -> Self {
        // A field the view writes and the document lacks fails the test that compares them.
        let v = StatusView::of(j);
        Self {
            job_id: v.job_id.to_string(),
            workflow: v.workflow.to_owned(),
            status: v.status,
            project_path: v.project_path.to_owned(),
            params: v.params.clone(),
            guidance: v.guidance.map(str::to_owned),
            priority: v.priority,
            attempt: v.attempt,
            max_attempts: v.max_attempts,
            created_at: v.created_at,
            started_at: v.started_at,
            finished_at: v.finished_at,
            progress: v.progress.clone(),
            result: j.result.clone(),
            error: v.error.cloned(),
            dead_letter: v.dead_letter,
            trigger: v.trigger.clone(),
            cost_usd: v.cost_usd,
            max_budget_usd: v.max_budget_usd,
            approval: v.approval.map(|a| PendingApproval {
                step: a.step.to_owned(),
                requested_at: a.requested_at,
                expires_at: a.expires_at,
                who_may_approve: a.who_may_approve.to_owned(),
                approve_url: a.approve_url.text(),
                reject_url: a.reject_url.text(),
            }),
            approvals: v.approvals.to_vec(),
        }
    }
}

/// Answer of a successful cancel.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CancelAnswer {
    /// The job.
    pub job_id: String,
    /// `cancelled`.
    pub status: JobStatus,
}

/// One workflow in `GET /workflows/available`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkflowInfo {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Parameters.
    pub parameters: Vec<Parameter>,
    /// Step names in order.
    pub steps: Vec<String>,
    /// The steps a job pauses before until someone approves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approval_steps: Vec<String>,
    /// The spending cap of one job, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Its schedules, each with its next run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleInfo>,
}

/// A workflow's schedule in `GET /workflows/available`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ScheduleInfo {
    /// The cron expression.
    pub cron: String,
    /// The time zone it is read in.
    pub timezone: String,
    /// `skip` or `allow`.
    pub overlap: String,
    /// The next tick, if there is one.
    #[serde(default, with = "crate::timestamp::option")]
    pub next_run: Option<DateTime<Utc>>,
}

impl From<&Workflow> for WorkflowInfo {
    fn from(w: &Workflow) -> Self {
        let now = Utc::now();
        Self {
            name: w.name.clone(),
            description: w.description.clone(),
            parameters: w.parameters.clone(),
            steps: w.step_names(),
            approval_steps: w
                .steps
                .iter()
                .filter(|s| s.approval == crate::workflow::ApprovalGate::Required)
                .map(|s| s.name.clone())
                .collect(),
            max_budget_usd: w.max_budget_usd,
            schedules: w
                .schedules
                .iter()
                .map(|s| ScheduleInfo {
                    cron: s.cron.clone(),
                    timezone: s.timezone.clone().unwrap_or_else(|| "UTC".to_owned()),
                    overlap: match s.overlap {
                        crate::schedule::Overlap::Allow => "allow",
                        _ => "skip",
                    }
                    .to_owned(),
                    next_run: s.next_after(now),
                })
                .collect(),
        }
    }
}

/// `GET /workflows/available`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkflowList {
    /// Every workflow, by name.
    pub workflows: Vec<WorkflowInfo>,
}

/// `GET /jobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// Jobs, newest first.
    pub jobs: Vec<StatusDocument>,
    /// Pass as `cursor` for the next page.
    pub next_cursor: Option<String>,
}

/// One entry of `GET /audit`: a trigger attempt and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntryDoc {
    /// The entry's id (larger is newer).
    pub id: i64,
    /// When it was decided.
    #[serde(with = "crate::timestamp")]
    pub at: DateTime<Utc>,
    /// `api`, or the platform (`github`, `gitlab`, `slack`, …).
    pub source: String,
    /// The API key's name, for `api`.
    pub key_name: Option<String>,
    /// Who asked.
    pub actor: Option<String>,
    /// The platform's delivery id, or the API's idempotency key.
    pub delivery_id: Option<String>,
    /// The repository, when there is one.
    pub repo: Option<String>,
    /// The workflow asked for.
    pub workflow: Option<String>,
    /// `accepted`, `duplicate`, `refused`, `approved` or `rejected`.
    pub decision: Decision,
    /// Why (refusals and duplicates).
    pub reason: Option<String>,
    /// The job created or answered.
    pub job_id: Option<String>,
}

impl From<&AuditEntry> for AuditEntryDoc {
    fn from(e: &AuditEntry) -> Self {
        Self {
            id: e.id,
            at: e.at,
            source: e.source.clone(),
            key_name: e.key_name.clone(),
            actor: e.actor.clone(),
            delivery_id: e.delivery_id.clone(),
            repo: e.repo.clone(),
            workflow: e.workflow.clone(),
            decision: e.decision,
            reason: e.reason.clone(),
            job_id: e.job_id.map(|j| j.to_string()),
        }
    }
}

/// `GET /audit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Entries, newest first.
    pub entries: Vec<AuditEntryDoc>,
    /// Pass as `cursor` for the next (older) page.
    pub next_cursor: Option<String>,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthAnswer {
    /// `ok`.
    pub status: String,
}

/// One agent in `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentStatus {
    /// Registered name.
    pub name: String,
    /// Backend kind.
    pub kind: String,
    /// Health check result.
    pub healthy: bool,
    /// Circuit breaker state, for pools.
    pub circuit: Option<CircuitState>,
    /// Detail from the health check.
    pub detail: Option<String>,
    /// Pool members.
    pub backends: Vec<BackendHealth>,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerStatus {
    /// aiwg version.
    pub version: String,
    /// Seconds since the engine started.
    pub uptime_secs: u64,
    /// Queue figures.
    pub queue: QueueStats,
    /// Agents.
    pub agents: Vec<AgentStatus>,
    /// Outbound deliveries not yet settled.
    pub pending_deliveries: u64,
}

/// `GET /whoami`: the presented key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    /// The key's name (the actor of the jobs it triggers).
    pub name: String,
    /// Its scopes as configured (`admin` implies every other).
    #[schema(value_type = Vec<String>)]
    pub scopes: Vec<crate::http::Scope>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{ApprovalDecision, JobId};

    /// A job with every field the status document shows set, started by `source`, waiting
    /// for `approval` of its second step (or its approvals all decided).
    fn job(source: &str, waiting: bool) -> Job {
        let at = DateTime::parse_from_rfc3339("2026-12-06T14:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": JobId::new(), "workflow": "review", "project_path": "/srv/p\"q",
            "params": {"pr": "7", "focus": "tests\n"}, "guidance": "be \\ brief", "priority": -3,
            "status": if waiting { "awaiting_approval" } else { "failed" },
            "attempt": 2, "max_attempts": 4,
            "timeout": 60000, "created_at": at, "started_at": at, "finished_at": at,
            "retry_at": at, "progress": {"completed": ["a"], "in_progress": ["b"],
            "pending": ["c", "d"]}, "result": {"summary": "s\u{1}", "session_id": "x",
            "cost_usd": 0.5, "usage": null, "steps": []},
            "error": {"kind": "agent_failed", "message": "m"}, "dead_letter": true,
            "trigger": {"source": source, "actor": "octo"},
            "history": [{"status": "queued", "at": at, "attempt": 0, "reason": "r"}],
            "cancel_requested": false, "idempotency_key": "key",
            "max_budget_usd": 2.5, "approvals": [], "resume_after_approval": false,
        }))
        .unwrap();
        let mut first = Approval::new("a", at, at + chrono::Duration::hours(1));
        first.decision = Some(ApprovalDecision::new(true, "octo", source));
        job.approvals.push(first);
        let mut second = Approval::new("b", at, at + chrono::Duration::nanoseconds(1_500));
        if !waiting {
            second.decision = Some(ApprovalDecision::new(false, "cat", "api"));
        }
        job.approvals.push(second);
        job
    }

    /// The borrowed view the answers write is the status document, byte for byte, for jobs
    /// with every field set and with the optional ones left out, whatever started them.
    #[test]
    fn a_status_view_writes_the_status_document() {
        let mut jobs = Vec::new();
        for source in [
            "github",
            "gitlab",
            "gitea",
            "bitbucket",
            "api",
            "slack",
            "schedule",
        ] {
            jobs.push(job(source, true));
            jobs.push(job(source, false));
        }
        let mut bare = job("api", false);
        bare.params = Arc::default();
        bare.guidance = None;
        bare.started_at = None;
        bare.finished_at = None;
        bare.result = None;
        bare.error = None;
        bare.max_budget_usd = None;
        bare.approvals.clear();
        bare.status = JobStatus::Queued;
        jobs.push(bare);
        let mut waiting = 0;
        for job in &jobs {
            let view = serde_json::to_string(&StatusView::of(job)).unwrap();
            let document = serde_json::to_string(&StatusDocument::from(job)).unwrap();
            assert_eq!(view, document);
            if let Some(approval) = &StatusDocument::from(job).approval {
                waiting += 1;
                assert_eq!(
                    approval.approve_url,
                    format!("workflows/{}/approve", job.id)
                );
                assert_eq!(approval.reject_url, format!("workflows/{}/reject", job.id));
                assert_eq!(
                    approval.who_may_approve.contains(&*job.trigger.source),
                    job.trigger.source != "api"
                        && job.trigger.source != "slack"
                        && job.trigger.source != "schedule",
                    "{}",
                    approval.who_may_approve
                );
            }
        }
        assert_eq!(waiting, 7);
        let github = StatusDocument::from(&job("github", true)).approval.unwrap();
        assert_eq!(
            github.who_may_approve,
            "an API key with the `approve` (or `admin`) scope, or a github user the trigger \
             policy admits, commenting `@<bot> approve` or `@<bot> reject` on the thread that \
             started it"
        );
        let api = StatusDocument::from(&job("api", true)).approval.unwrap();
        assert_eq!(
            api.who_may_approve,
            "an API key with the `approve` (or `admin`) scope"
        );
        let next = JobId::new();
        for next_cursor in [None, Some(next)] {
            let view = serde_json::to_string(&JobListView {
                jobs: jobs.iter().map(StatusView::of).collect(),
                next_cursor,
            })
            .unwrap();
            let list = serde_json::to_string(&JobList {
                jobs: jobs.iter().map(StatusDocument::from).collect(),
                next_cursor: next_cursor.map(|c| c.to_string()),
            })
            .unwrap();
            assert_eq!(view, list);
        }
    }
}
