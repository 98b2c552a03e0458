//! [`HookOutcome`]: what happened to a delivery, and [`HookReply`]: the outcome rendered once
//! into the platform's answer (an [`ApiResponse`] the routers write as is). Each platform's
//! [`Endpoint`](crate::platform) decides its shape; the forges share the one here.

use std::ops::Deref;

use aiwg_core::http::{ApiResponse, Problem};
use aiwg_core::JobId;
use http::StatusCode;
use serde_json::json;

use crate::authorize::IgnoreReason;
use crate::error::{ParseError, VerifyError};

/// `application/json`.
pub const JSON: &str = "application/json";
/// `application/problem+json` (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// What happened to a delivery, typed (for tests, logs and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookOutcome {
    /// A job was submitted (or, `replayed`, had been for this delivery id).
    Submitted {
        /// The job.
        job_id: JobId,
        /// The workflow asked for.
        workflow: String,
        /// Whether this is a redelivery that started nothing new.
        replayed: bool,
    },
    /// Understood, nothing to do.
    Ignored(IgnoreReason),
    /// `help`: the workflows `(name, description)` this platform may start.
    Help(Vec<(String, String)>),
    /// A connectivity check was answered.
    Pong,
    /// Slack `url_verification`: the challenge echoed.
    Challenge(String),
    /// The signature (or token) is missing, wrong or not configured: 401.
    Unauthorized(VerifyError),
    /// Verified but not understood: 400.
    BadRequest(ParseError),
    /// `/hooks/{name}` for a platform that does not exist or is not compiled in: 404.
    UnknownPlatform,
    /// The engine could not take the job now (queue full, shutting down, store failure): 503,
    /// with the problem the HTTP API gives for the same refusal.
    Unavailable(Problem),
    /// The same delivery is still being handled by another request: 409.
    DuplicateInProgress,
    /// The delivery store failed: 503. The cause is logged where it happened; its text never
    /// reaches the platform (or the person in a chat).
    StoreUnavailable,
    /// `@aiwg approve` / `@aiwg reject` from an allowed user decided a waiting job: 200.
    Decided {
        /// The job.
        job_id: JobId,
        /// Approved (it continues) or rejected (it ends `cancelled`).
        approved: bool,
    },
}

impl HookOutcome {
    /// The `reason` label of `aiwg_webhook_errors_total`, for outcomes that are errors.
    #[must_use]
    pub fn error_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized(e) => e.reason(),
            Self::BadRequest(_) => "bad_payload",
            Self::UnknownPlatform => "unknown_platform",
            Self::Unavailable(p) => p.slug(),
            Self::DuplicateInProgress => "duplicate_in_progress",
            Self::StoreUnavailable => "store_unavailable",
            Self::Ignored(r @ (IgnoreReason::Rejected(_) | IgnoreReason::InvalidCommand(_))) => {
                r.label()
            }
            _ => return None,
        })
    }
}

/// A delivery's answer: the [`ApiResponse`] to send (it derefs to it) and what happened.
#[derive(Debug)]
#[non_exhaustive]
pub struct HookReply {
    /// What happened, typed.
    pub outcome: HookOutcome,
    /// The answer, in the platform's shape.
    pub response: ApiResponse,
}

impl HookReply {
    /// The body as JSON (every body this crate produces is JSON).
    ///
    /// # Errors
    /// Never for answers built here.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(self.response.body_bytes().map_or(&[][..], |b| &b[..]))
    }

    /// A header of the answer, as text.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.response
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
    }
}

impl Deref for HookReply {
    type Target = ApiResponse;
    fn deref(&self) -> &ApiResponse {
        &self.response
    }
}

impl From<HookReply> for ApiResponse {
    fn from(reply: HookReply) -> Self {
        reply.response
    }
}

/// A JSON answer.
pub(crate) fn json(status: u16, body: &serde_json::Value) -> ApiResponse {
    ApiResponse::json(StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body)
}

/// An RFC 9457 problem in the same shape as the rest of the API (`urn:aiwg:problem:<slug>`).
fn problem(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> ApiResponse {
    let p = Problem::new(status, slug, detail);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        p.retry_after(30).into_response()
    } else {
        p.into_response()
    }
}

/// The error answers every platform shares (401, 400, 404, 503 for the delivery store), or
/// `None` for outcomes a platform answers in its own shape.
pub(crate) fn errors(outcome: &HookOutcome) -> Option<ApiResponse> {
    Some(match outcome {
        HookOutcome::Unauthorized(e) => {
            problem(StatusCode::UNAUTHORIZED, "invalid-signature", e.to_string())
        }
        HookOutcome::BadRequest(e) => {
            problem(StatusCode::BAD_REQUEST, "invalid-payload", e.to_string())
        }
        HookOutcome::UnknownPlatform => problem(
            StatusCode::NOT_FOUND,
            "unknown-platform",
            "no such platform hook",
        ),
        HookOutcome::StoreUnavailable => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the delivery could not be recorded; try again later",
        ),
        _ => return None,
    })
}

fn workflows_json(list: &[(String, String)]) -> serde_json::Value {
    list.iter()
        .map(|(n, d)| json!({ "name": n, "description": d }))
        .collect()
}

fn workflows_text(list: &[(String, String)]) -> String {
    if list.is_empty() {
        return "No workflows are available.".to_owned();
    }
    let mut s = "Available workflows:".to_owned();
    for (n, d) in list {
        s.push_str(&format!("\n• `{n}`"));
        if !d.is_empty() {
            s.push_str(&format!(": {d}"));
        }
    }
    s
}

/// The forges' answers (GitHub, GitLab, Gitea, Bitbucket, generic): 202 `{"job_id"}`, 200
/// `{"ignored": "<reason>"}`, 200 `{"pong": true}`, or a problem.
pub(crate) fn forge(outcome: &HookOutcome) -> ApiResponse {
    if let Some(r) = errors(outcome) {
        return r;
    }
    match outcome {
        HookOutcome::Submitted { job_id, .. } => {
            json(202, &json!({ "job_id": job_id.to_string() }))
        }
        HookOutcome::Ignored(reason) => json(200, &json!({ "ignored": reason.to_string() })),
        HookOutcome::Help(list) => json(
            200,
            &json!({ "ignored": "help", "workflows": workflows_json(list) }),
        ),
        HookOutcome::Pong => json(200, &json!({ "pong": true })),
        HookOutcome::Decided { job_id, approved } => json(
            200,
            &json!({
                "job_id": job_id.to_string(),
                "decision": if *approved { "approved" } else { "rejected" },
            }),
        ),
        HookOutcome::Challenge(c) => json(200, &json!({ "challenge": c })),
        HookOutcome::Unavailable(p) => p.clone().retry_after(30).into_response(),
        HookOutcome::DuplicateInProgress => problem(
            StatusCode::CONFLICT,
            "duplicate-in-progress",
            "this delivery is already being handled",
        ),
        // Every other outcome is answered by `errors` above.
        _ => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected outcome",
        ),
    }
}

/// The text of a chat answer (Slack, Discord) for the person who asked.
pub(crate) fn chat_text(outcome: &HookOutcome) -> String {
    match outcome {
        HookOutcome::Submitted {
            job_id, workflow, ..
        } => format!("Started `{workflow}`: job `{job_id}`."),
        HookOutcome::Ignored(reason) => format!("Nothing started: {reason}."),
        HookOutcome::Help(list) => workflows_text(list),
        HookOutcome::Pong => "pong".to_owned(),
        HookOutcome::Decided { job_id, approved } => format!(
            "Job `{job_id}` {}.",
            if *approved { "approved" } else { "rejected" }
        ),
        HookOutcome::Unavailable(p) => format!("Busy, try again later: {}.", p.detail()),
        HookOutcome::DuplicateInProgress => "This request is already being handled.".to_owned(),
        _ => "Something went wrong.".to_owned(),
    }
}
