//! The job model: identifiers, statuses and the one transition table, progress, results and
//! trigger metadata.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's identifier: a UUID v7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

crate::util::uuid_v7_id!(JobId);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Token usage as agents report it. Fields an agent does not report stay 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Prompt tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Completion tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Prompt tokens read from the cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
    /// Prompt tokens written to the cache.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
}

impl Usage {
    /// Usage with the given input and output token counts.
    #[must_use]
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            ..Self::default()
        }
    }

    /// Field-wise sum (saturating).
    #[must_use]
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, other: Usage) -> Usage {
        Usage {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cache_read_input_tokens: self
                .cache_read_input_tokens
                .saturating_add(other.cache_read_input_tokens),
            cache_creation_input_tokens: self
                .cache_creation_input_tokens
                .saturating_add(other.cache_creation_input_tokens),
        }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker (new, or back for another attempt).
    Queued,
    /// A worker holds its lease and runs its steps.
    Running,
    /// Paused before a step with `approval: required`: no worker holds it until someone
    /// approves (back to `queued`, resuming at that step) or rejects it (`cancelled`).
    AwaitingApproval,
    /// Every step succeeded.
    Completed,
    /// A step failed and no attempts are left (or the failure is not retryable).
    Failed,
    /// Cancelled by a caller or by shutdown.
    Cancelled,
    /// A step or the whole job ran past its timeout.
    TimedOut,
}

impl JobStatus {
    /// Every status, in life-cycle order.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::AwaitingApproval,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::TimedOut,
    ];

    /// The wire name (`queued`, `timed_out`, …).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::AwaitingApproval => "awaiting_approval",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::TimedOut => "timed_out",
        }
    }

    /// True for the statuses a job never leaves.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobStatus::Queued | JobStatus::Running | JobStatus::AwaitingApproval
        )
    }

    /// The transition table. This is the only place that decides which changes are legal:
    ///
    /// | from | to |
    /// |---|---|
    /// | `queued` | `running`, `cancelled`, `failed` (refused before it ran) |
    /// | `running` | `completed`, `failed`, `cancelled`, `timed_out`, `queued` (retry or lost lease), `awaiting_approval` (before a gated step) |
    /// | `awaiting_approval` | `queued` (approved), `cancelled` (rejected, timed out or cancelled) |
    /// | terminal | nothing |
    #[must_use]
    pub fn can_transition_to(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Queued, Running | Cancelled | Failed)
                | (
                    Running,
                    Completed | Failed | Cancelled | TimedOut | Queued | AwaitingApproval
                )
                | (AwaitingApproval, Queued | Cancelled)
        )
    }

    /// Checks a transition against [`can_transition_to`](Self::can_transition_to).
    pub fn check_transition(self, to: JobStatus) -> Result<(), IllegalTransition> {
        if self.can_transition_to(to) {
            Ok(())
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A status name that is not one of the seven.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status `{0}` (expected queued, running, awaiting_approval, completed, failed, cancelled or timed_out)")]
pub struct UnknownStatus(pub String);

/// A status change the transition table forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal job transition from {from} to {to}")]
pub struct IllegalTransition {
    /// The current status.
    pub from: JobStatus,
    /// The status asked for.
    pub to: JobStatus,
}

/// One entry of a job's status history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The new status.
    pub status: JobStatus,
    /// When it changed.
    #[serde(with = "crate::timestamp")]
    pub at: DateTime<Utc>,
    /// The attempt the change belongs to.
    pub attempt: u32,
    /// Why, when there is more to say than the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The workflow's steps split by where the job is.
// The names are shared (`Arc<str>`) with the workflow catalog's: a copy of a job (a claim's,
// an outcome's, a reader's) copies three short lists of pointers, not every step's name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// Steps that finished successfully in the current attempt.
    #[schema(value_type = Vec<String>)]
    #[serde(deserialize_with = "shared_names")]
    pub completed: Vec<Arc<str>>,
    /// The step running now (at most one).
    #[schema(value_type = Vec<String>)]
    #[serde(deserialize_with = "shared_names")]
    pub in_progress: Vec<Arc<str>>,
    /// Steps not started yet.
    #[schema(value_type = Vec<String>)]
    #[serde(deserialize_with = "shared_names")]
    pub pending: Vec<Arc<str>>,
}

/// A list of names read straight into `Arc<str>`s, one allocation each (a stored job's progress,
/// on every claim and read from PostgreSQL): serde's own `Arc<str>` reads each into a `String`
/// first and copies it.
fn shared_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Arc<str>>, D::Error> {
    use serde::de::{Error, SeqAccess, Visitor};

    struct Name(Arc<str>);
    struct NameVisitor;
    impl Visitor<'_> for NameVisitor {
        type Value = Name;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a step name")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Name, E> {
            Ok(Name(Arc::from(v)))
        }
    }
    impl<'de> Deserialize<'de> for Name {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(NameVisitor)
        }
    }
    struct Names;
    impl<'de> Visitor<'de> for Names {
        type Value = Vec<Arc<str>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of step names")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(Name(n)) = seq.next_element()? {
                out.push(n);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Names)
}

impl Progress {
    /// Everything pending.
    ///
    /// ```
    /// let p = aiwg_core::Progress::pending(["draft", "review"]);
    /// assert_eq!(p.pending.len(), 2);
    /// assert_eq!(&*p.pending[0], "draft");
    /// ```
    #[must_use]
    pub fn pending<S: Into<Arc<str>>>(steps: impl IntoIterator<Item = S>) -> Self {
        Self {
            completed: Vec::new(),
            in_progress: Vec::new(),
            pending: steps.into_iter().map(Into::into).collect(),
        }
    }

    /// Moves `step` from pending to in progress (the name itself moves: no copy is made when
    /// it was pending).
    pub fn start(&mut self, step: &str) {
        let name = take(&mut self.pending, step);
        let again = take(&mut self.in_progress, step);
        let name = name.or(again).unwrap_or_else(|| Arc::from(step));
        push_into(&mut self.in_progress, &mut self.pending, name);
    }

    /// Moves `step` from in progress to completed (the name moves, as in [`start`](Self::start)).
    pub fn finish(&mut self, step: &str) {
        let name = take(&mut self.in_progress, step);
        let pending = take(&mut self.pending, step);
        if !self.completed.iter().any(|s| &**s == step) {
            let name = name.or(pending).unwrap_or_else(|| Arc::from(step));
            push_into(&mut self.completed, &mut self.in_progress, name);
        }
    }
}

/// Pushes `name` onto `to`. When `to` has never held anything and `from`, the list the name
/// just left, is empty now, `to` takes `from`'s memory instead of allocating its own: a job's
/// last step moves its name from pending to in progress to completed in one allocation, the
/// one its pending list was made with.
fn push_into(to: &mut Vec<Arc<str>>, from: &mut Vec<Arc<str>>, name: Arc<str>) {
    if to.capacity() == 0 && from.is_empty() {
        std::mem::swap(to, from);
    }
    to.push(name);
}

/// Removes every `step` from `names`, keeping their order, and hands back the first removed.
fn take(names: &mut Vec<Arc<str>>, step: &str) -> Option<Arc<str>> {
    let first = names.iter().position(|s| &**s == step)?;
    let name = names.remove(first);
    names.retain(|s| &**s != step);
    Some(name)
}

/// What started a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TriggerInfo {
    /// `api`, `github`, `gitlab`, `slack`, `discord`, `gitea`, `bitbucket`, `generic`.
    pub source: String,
    /// Who asked (login, user name or API key name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The platform's delivery id, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    /// Repository full name (`org/repo`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Pull or merge request number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr: Option<u64>,
    /// Issue number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue: Option<u64>,
    /// Anything else the trigger wants to keep and show (`head_sha`, `comment_id`, …). Never
    /// a capability: those go to [`Job::reply_credentials`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

/// What lets its holder act as the bot on a platform (a Slack `response_url`, a Discord
/// interaction token, a forge token): kept with the job, privately, for the job's own replies.
///
/// The store persists them with the job (a reply may be sent by another instance), but they
/// are never part of a status document, a job list, an SSE event, an outbound webhook payload,
/// a log line or an error: nothing renders a job's capabilities, and their `Debug` shows only
/// their names.
///
/// ```
/// use aiwg_core::ReplyCredentials;
/// let mut caps = ReplyCredentials::default();
/// caps.insert("slack_response_url", "https://hooks.slack.com/commands/T/1/secret");
/// assert_eq!(caps.get("slack_response_url"), Some("https://hooks.slack.com/commands/T/1/secret"));
/// assert!(!format!("{caps:?}").contains("secret"));
/// ```
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReplyCredentials(BTreeMap<String, String>);

impl ReplyCredentials {
    /// Keeps `value` under `name`.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// The capability called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Their names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Whether these are sealed (see [`sealed`](Self::sealed)).
    #[must_use]
    pub fn is_sealed(&self) -> bool {
        self.0.len() == 1 && self.0.contains_key(SEALED_CREDENTIALS)
    }

    /// These credentials sealed with `keyring` for the record `context` (a store does this
    /// before writing them; see [`crate::secrets`]): one entry holding the sealed JSON of all.
    /// Empty and already sealed credentials are returned as they are.
    #[must_use]
    pub fn sealed(&self, keyring: &crate::secrets::SecretKeyring, context: &[u8]) -> Self {
        if self.is_empty() || self.is_sealed() {
            return self.clone();
        }
        let json = serde_json::to_vec(&self.0).unwrap_or_default();
        let mut out = BTreeMap::new();
        out.insert(SEALED_CREDENTIALS.to_owned(), keyring.seal(&json, context));
        Self(out)
    }

    /// Sealed credentials opened with `keyring` (credentials that are not sealed are returned
    /// as they are).
    ///
    /// # Errors
    /// [`SecretError::NoKey`](crate::secrets::SecretError::NoKey) for sealed credentials
    /// without a keyring, or why they do not open.
    pub fn opened(
        &self,
        keyring: Option<&crate::secrets::SecretKeyring>,
        context: &[u8],
    ) -> Result<Self, crate::secrets::SecretError> {
        let Some(sealed) = self.0.get(SEALED_CREDENTIALS).filter(|_| self.0.len() == 1) else {
            return Ok(self.clone());
        };
        let keyring = keyring.ok_or(crate::secrets::SecretError::NoKey)?;
        let json = keyring.open(sealed, context)?;
        serde_json::from_slice(&json)
            .map(Self)
            .map_err(|_| crate::secrets::SecretError::Corrupt)
    }
}

/// The one entry of sealed [`ReplyCredentials`].
const SEALED_CREDENTIALS: &str = "$sealed";

impl fmt::Debug for ReplyCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ReplyCredentials")
            .field(&self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TriggerInfo {
    /// A trigger from `source` (e.g. `"api"`).
    #[must_use]
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            ..Self::default()
        }
    }

    /// The value of `{{trigger.<field>}}` in templates.
    #[must_use]
    pub fn field(&self, name: &str) -> Option<String> {
        match name {
            "source" => Some(self.source.clone()),
            "actor" => self.actor.clone(),
            "delivery_id" => self.delivery_id.clone(),
            "repo" => self.repo.clone(),
            "pr" => self.pr.map(|n| n.to_string()),
            "issue" => self.issue.map(|n| n.to_string()),
            // The pull request's head commit and branch, and its base branch.
            "sha" => self.extra.get("head_sha").cloned(),
            "branch" => self.extra.get("head_ref").cloned(),
            "base" => self.extra.get("base_ref").cloned(),
            other => self.extra.get(other).cloned(),
        }
    }
}

/// The outcome of one step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// The agent that ran it.
    pub agent: String,
    /// The agent's final text (or the command's output).
    pub output: String,
    /// The agent session, when the agent has sessions.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Cost reported by the agent.
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// Exit code for process-based agents.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Wall time of the step.
    pub duration_ms: u64,
    /// The step's answer parsed as JSON and valid against its `output_schema`, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub structured: Option<serde_json::Value>,
    /// True when the step did not finish (a timeout, a turn or budget limit, a cancel, an
    /// invalid answer): `output` and `session_id` are what it had produced so far, and a
    /// later job can resume that session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// A pause before a step with `approval: required`, and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct Approval {
    /// The step that waits for it.
    pub step: String,
    /// When the job paused.
    #[serde(with = "crate::timestamp")]
    pub requested_at: DateTime<Utc>,
    /// When it ends `cancelled` (reason `approval_timeout`) unless decided before.
    #[serde(with = "crate::timestamp")]
    pub expires_at: DateTime<Utc>,
    /// The decision, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<ApprovalDecision>,
    /// The attempt it was asked in: it holds for that attempt only (0: not known, an
    /// approval stored before attempts were recorded, which holds for none).
    #[serde(default)]
    pub attempt: u32,
}

impl Approval {
    /// A request for `step`, open until `expires_at`.
    #[must_use]
    pub fn new(
        step: impl Into<String>,
        requested_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Self {
        Self {
            step: step.into(),
            requested_at,
            expires_at,
            decision: None,
            attempt: 0,
        }
    }

    /// Asked in `attempt` of the job.
    #[must_use]
    pub fn in_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Whether it was granted.
    #[must_use]
    pub fn is_approved(&self) -> bool {
        self.decision.as_ref().is_some_and(|d| d.approved)
    }
}

/// Who decided an [`Approval`], how and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct ApprovalDecision {
    /// `true` to continue, `false` to stop the job.
    pub approved: bool,
    /// Who decided: an API key's name, a token's `jwt:<sub>`, a forge login, or `aiwg` for a
    /// timeout.
    pub by: String,
    /// Through what: `api`, a platform name (`github`, …) or `timeout`.
    pub via: String,
    /// When.
    #[serde(with = "crate::timestamp")]
    pub at: DateTime<Utc>,
}

impl ApprovalDecision {
    /// A decision by `by` through `via`, now.
    #[must_use]
    pub fn new(approved: bool, by: impl Into<String>, via: impl Into<String>) -> Self {
        Self {
            approved,
            by: by.into(),
            via: via.into(),
            at: Utc::now(),
        }
    }
}

/// The result of a finished job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    /// The last step's output.
    pub summary: String,
    /// The last session id reported.
    pub session_id: Option<String>,
    /// Total cost over all steps that reported one, in every attempt of the job (what
    /// `max_budget_usd` caps).
    pub cost_usd: Option<f64>,
    /// Token usage summed over the steps.
    #[schema(value_type = Object)]
    pub usage: Option<Usage>,
    /// Each step's outcome, in order.
    pub steps: Vec<StepResult>,
}

/// Why a job did not complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// A stable machine-readable kind: `agent_failed`, `timed_out`, `cancelled`, `unknown_agent`,
    /// `lease_lost`, `shutdown`, `invalid_request`, `panic`, `budget_exceeded`, `invalid_output`,
    /// `approval_timeout`, `rejected`, `workspace_failed`, `project_rejected`.
    pub kind: String,
    /// Human-readable detail (never a secret).
    pub message: String,
}

impl JobError {
    /// An error of `kind` with `message`.
    #[must_use]
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Job {
    /// The id.
    pub id: JobId,
    /// The workflow's name. Shared: the jobs of a workflow hold one copy of it.
    pub workflow: Arc<str>,
    /// The resolved, canonical project directory. Shared, as the workflow's name is: the jobs
    /// of a project submitted together hold one copy of it.
    pub project_path: Arc<str>,
    /// Parameters after defaults were applied. Shared, as the trigger is: they never change
    /// after the submit.
    pub params: Arc<BTreeMap<String, String>>,
    /// Free text for the agent.
    pub guidance: Option<String>,
    /// Higher runs first.
    pub priority: i32,
    /// Current status.
    pub status: JobStatus,
    /// The attempt number (0 before the first run, 1 during the first).
    pub attempt: u32,
    /// How many attempts the job may have.
    pub max_attempts: u32,
    /// Whole-job timeout.
    #[serde(with = "duration_ms")]
    pub timeout: Duration,
    /// Creation time.
    #[serde(with = "crate::timestamp")]
    pub created_at: DateTime<Utc>,
    /// When the current (or last) attempt started.
    #[serde(default, with = "crate::timestamp::option")]
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached a terminal status.
    #[serde(default, with = "crate::timestamp::option")]
    pub finished_at: Option<DateTime<Utc>>,
    /// When a queued retry becomes eligible.
    #[serde(default, with = "crate::timestamp::option")]
    pub retry_at: Option<DateTime<Utc>>,
    /// Step progress.
    pub progress: Progress,
    /// The result, once completed (partial results are kept on failure). Shared: a result (every
    /// step's output) is set whole and never changed in place, so copies of a job (a claim's,
    /// an outcome's, a reader's) share it instead of copying every output; and a queued job,
    /// which has none, stays small.
    pub result: Option<Arc<JobResult>>,
    /// The error, once failed, cancelled or timed out.
    pub error: Option<JobError>,
    /// True when the job failed with no attempts left.
    pub dead_letter: bool,
    /// What started it. Shared: it never changes after the submit, and a forge's trigger
    /// (its `extra` map) made most of the cost of every copy of the job the store hands out
    /// (about four a job in the memory store). Jobs whose trigger names only the same source
    /// and actor share one (every request of one API key).
    pub trigger: Arc<TriggerInfo>,
    /// Every status it had, in order.
    pub history: Vec<StatusChange>,
    /// Set when a cancel was asked for while it was running.
    pub cancel_requested: bool,
    /// The idempotency key it was created with.
    pub idempotency_key: Option<String>,
    /// What lets the job reply as the bot (never shown; see [`ReplyCredentials`]).
    #[serde(default, skip_serializing_if = "ReplyCredentials::is_empty")]
    pub reply_credentials: ReplyCredentials,
    /// Its workflow's concurrency group, rendered when it was submitted: at most one job of a
    /// group runs at a time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_group: Option<String>,
    /// The spending cap of the whole job in US dollars (the workflow's `max_budget_usd`, or
    /// its trigger source's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Every approval it asked for, in order; the last one is open while the job is
    /// `awaiting_approval`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// Set when an approval sent the job back to `queued`: its next run continues at the
    /// approved step with the results of the steps before it, in the same attempt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_after_approval: bool,
}

/// `params` shared: an empty map is one allocation for every job that has none (most), not
/// one each (a queued job is kept small: BENCHMARKS.md, Memory).
pub(crate) fn shared_params(params: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
    static EMPTY: std::sync::LazyLock<Arc<BTreeMap<String, String>>> =
        std::sync::LazyLock::new(Arc::default);
    if params.is_empty() {
        Arc::clone(&EMPTY)
    } else {
        Arc::new(params)
    }
}

impl Job {
    /// True once the job reached a status it never leaves.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The approval the job waits for, while it is `awaiting_approval`.
    #[must_use]
    pub fn pending_approval(&self) -> Option<&Approval> {
        self.approvals
            .last()
            .filter(|a| a.decision.is_none() && self.status == JobStatus::AwaitingApproval)
    }

    /// Whether `step` was approved in the current attempt. A retry runs the steps before the
    /// gate again, and what the gated step acts on is then new: it is asked for again (an
    /// approval that held for every later attempt let a retry's unseen draft through).
    #[must_use]
    pub fn step_approved(&self, step: &str) -> bool {
        self.approvals
            .iter()
            .any(|a| a.step == step && a.attempt == self.attempt && a.is_approved())
    }
}

/// Serialises a [`Duration`] as whole milliseconds.
pub(crate) mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::step_names;

    /// Ids sort as their UUIDs do (byte by byte), whichever bytes differ, high bits included;
    /// equal ids hash alike. (`Ord` and `Hash` read the UUID as one integer, `util::uuid_v7_id`.)
    #[test]
    fn ids_sort_as_their_uuids_and_hash_by_their_value() {
        use std::hash::BuildHasher;
        let mut uuids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
        // Arbitrary bytes too (a xorshift), so every byte's high bit varies.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        uuids.extend((0..200).map(|_| {
            let mut next = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            Uuid::from_u64_pair(next(), next())
        }));
        for i in 0..16 {
            for byte in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = [0x55; 16];
                b[i] = byte;
                uuids.push(Uuid::from_bytes(b));
            }
        }
        for a in &uuids {
            for b in uuids.iter().step_by(7) {
                assert_eq!(
                    JobId::from(*a).cmp(&JobId::from(*b)),
                    a.cmp(b),
                    "{a} against {b}"
                );
                assert_eq!(
                    JobId::from(*a).partial_cmp(&JobId::from(*b)),
                    Some(a.cmp(b))
                );
            }
        }
        let mut ids: Vec<JobId> = uuids.iter().map(|u| JobId::from(*u)).collect();
        ids.sort();
        uuids.sort();
        assert!(ids.iter().zip(&uuids).all(|(id, u)| id.as_uuid() == u));
        let state = std::hash::RandomState::new();
        let a = JobId::from(uuids[3]);
        assert_eq!(state.hash_one(a), state.hash_one(JobId::from(uuids[3])));
        assert_ne!(state.hash_one(a), state.hash_one(JobId::from(uuids[4])));
    }

    #[test]
    fn transition_table_is_exactly_the_documented_one() {
        use JobStatus::*;
        let allowed = [
            (Queued, Running),
            (Queued, Cancelled),
            (Queued, Failed),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
            (Running, TimedOut),
            (Running, Queued),
            (Running, AwaitingApproval),
            (AwaitingApproval, Queued),
            (AwaitingApproval, Cancelled),
        ];
        for from in JobStatus::ALL {
            for to in JobStatus::ALL {
                let expected = allowed.contains(&(from, to));
                assert_eq!(from.can_transition_to(to), expected, "{from} -> {to}");
                assert_eq!(
                    from.check_transition(to).is_ok(),
                    expected,
                    "{from} -> {to}"
                );
            }
        }
        for st in JobStatus::ALL {
            assert_eq!(
                st.is_terminal(),
                !matches!(st, Queued | Running | AwaitingApproval)
            );
            if st.is_terminal() {
                assert!(JobStatus::ALL.iter().all(|to| !st.can_transition_to(*to)));
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for st in JobStatus::ALL {
            assert_eq!(st.as_str().parse::<JobStatus>().unwrap(), st);
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert!("done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn job_ids_are_v7_and_time_ordered() {
        let a = JobId::new();
        let b = JobId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
    }

    #[test]
    fn progress_moves_steps() {
        let mut p = Progress::pending(["a", "b"]);
        p.start("a");
        assert_eq!(step_names(&p.in_progress), ["a"]);
        p.finish("a");
        p.start("b");
        assert_eq!(step_names(&p.completed), ["a"]);
        assert!(p.pending.is_empty());
        assert_eq!(step_names(&p.in_progress), ["b"]);
    }

    #[test]
    fn a_last_step_moves_its_name_in_the_memory_its_pending_list_was_made_with() {
        let mut p = Progress::pending(["only"]);
        let memory = p.pending.as_ptr();
        p.start("only");
        assert_eq!(step_names(&p.in_progress), ["only"]);
        assert!(p.pending.is_empty());
        assert_eq!(
            p.in_progress.as_ptr(),
            memory,
            "in progress allocated its own list"
        );
        p.finish("only");
        assert_eq!(step_names(&p.completed), ["only"]);
        assert!(p.in_progress.is_empty() && p.pending.is_empty());
        assert_eq!(
            p.completed.as_ptr(),
            memory,
            "completed allocated its own list"
        );
        // A list that already holds a name keeps it and its memory.
        let mut p = Progress::pending(["a", "b"]);
        p.start("a");
        p.finish("a");
        let completed = p.completed.as_ptr();
        p.start("b");
        p.finish("b");
        assert_eq!(step_names(&p.completed), ["a", "b"]);
        assert_eq!(p.completed.as_ptr(), completed);
        assert!(p.in_progress.is_empty() && p.pending.is_empty());
    }

    #[test]
    fn progress_reads_its_names_from_json_borrowed_escaped_or_owned() {
        let text = r#"{"completed":["a\"b","\u00e9t\u00e9"],"in_progress":[],"pending":["c"]}"#;
        let p: Progress = serde_json::from_str(text).unwrap();
        assert_eq!(step_names(&p.completed), ["a\"b", "été"]);
        assert!(p.in_progress.is_empty());
        assert_eq!(step_names(&p.pending), ["c"]);
        // From a `Value` every string comes owned (`visit_string`).
        let owned: Progress = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(owned, p);
        let err =
            serde_json::from_str::<Progress>(r#"{"completed":[1],"in_progress":[],"pending":[]}"#)
                .unwrap_err();
        assert!(err.to_string().contains("a step name"), "{err}");
        assert!(serde_json::from_str::<Progress>(r#"{"completed":[],"pending":[]}"#).is_err());
    }

    #[test]
    fn progress_keeps_each_step_once_whatever_order_it_is_told() {
        // Started twice, finished twice, finished without a start, started when unknown, and
        // a name listed twice: each ends up in one list, once, the others' order kept.
        let mut p = Progress::pending(["a", "b", "c", "b"].map(str::to_owned));
        p.start("b");
        p.start("b");
        assert_eq!(
            (step_names(&p.pending), step_names(&p.in_progress)),
            (vec!["a", "c"], vec!["b"])
        );
        p.finish("b");
        p.finish("b");
        p.finish("c");
        p.start("z");
        assert_eq!(step_names(&p.completed), ["b", "c"]);
        assert_eq!(step_names(&p.pending), ["a"]);
        assert_eq!(step_names(&p.in_progress), ["z"]);
    }
}
