//! [`HookResponse`]: what the router sends back, decided entirely here.

use aiwg_core::JobId;
use bytes::Bytes;
use serde_json::json;

use crate::authorize::IgnoreReason;
use crate::error::{ParseError, VerifyError};
use crate::event::Platform;
use crate::submit::SubmitRejection;

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
    /// The engine could not take the job now (queue full, …): 503.
    Unavailable(SubmitRejection),
    /// The same delivery is still being handled by another request: 409.
    DuplicateInProgress,
    /// The delivery store failed: 503. The cause is logged where it happened; its text never
    /// reaches the platform (or the person in a chat).
    StoreUnavailable,
}

impl HookOutcome {
    /// The `reason` label of `aiwg_webhook_errors_total`, for outcomes that are errors.
    #[must_use]
    pub fn error_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Unauthorized(e) => e.reason(),
            Self::BadRequest(_) => "bad_payload",
            Self::UnknownPlatform => "unknown_platform",
            Self::Unavailable(r) => r.reason(),
            Self::DuplicateInProgress => "duplicate_in_progress",
            Self::StoreUnavailable => "store_unavailable",
            Self::Ignored(r @ (IgnoreReason::Rejected(_) | IgnoreReason::InvalidCommand(_))) => {
                r.label()
            }
            _ => return None,
        })
    }
}

/// The answer to a delivery: status, content type, body and extra headers (`Retry-After`).
/// Routers copy these verbatim; [`into_http`](Self::into_http) does it for `http` 1.x.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct HookResponse {
    /// The HTTP status.
    pub status: u16,
    /// The `content-type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// Extra headers to send.
    pub headers: Vec<(&'static str, String)>,
    /// What happened, typed.
    pub outcome: HookOutcome,
}

impl HookResponse {
    /// The body as JSON (every body this crate produces is JSON).
    ///
    /// # Errors
    /// Never for responses built here.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// An `http::Response` with the status, content type, extra headers and body.
    #[must_use]
    pub fn into_http(self) -> http::Response<Bytes> {
        let mut builder = http::Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, self.content_type);
        for (name, value) in &self.headers {
            builder = builder.header(*name, value.as_str());
        }
        builder.body(self.body).unwrap_or_else(|_| {
            let mut r = http::Response::new(Bytes::new());
            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }

    pub(crate) fn render(platform: Option<Platform>, outcome: HookOutcome) -> Self {
        match platform {
            Some(Platform::Slack) => slack(outcome),
            Some(Platform::Discord) => discord(outcome),
            _ => forge(outcome),
        }
    }
}

fn respond(
    status: u16,
    content_type: &'static str,
    body: &serde_json::Value,
    outcome: HookOutcome,
) -> HookResponse {
    HookResponse {
        status,
        content_type,
        body: Bytes::from(body.to_string()),
        headers: Vec::new(),
        outcome,
    }
}

/// An RFC 9457 problem in the same shape as the rest of the API (`urn:aiwg:problem:<slug>`).
fn problem(status: u16, slug: &'static str, detail: String, outcome: HookOutcome) -> HookResponse {
    let code = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_REQUEST);
    let body = serde_json::to_value(aiwg_core::http::Problem::new(code, slug, detail))
        .unwrap_or_else(|_| json!({ "status": status }));
    let mut r = respond(status, PROBLEM_JSON, &body, outcome);
    if status == 503 {
        r.headers.push(("retry-after", "30".to_owned()));
    }
    r
}

/// Shared by every platform: the error answers.
fn errors(outcome: HookOutcome) -> Result<HookResponse, HookOutcome> {
    Ok(match &outcome {
        HookOutcome::Unauthorized(e) => {
            let d = e.to_string();
            problem(401, "invalid-signature", d, outcome)
        }
        HookOutcome::BadRequest(e) => {
            let d = e.to_string();
            problem(400, "invalid-payload", d, outcome)
        }
        HookOutcome::UnknownPlatform => problem(
            404,
            "unknown-platform",
            "no such platform hook".to_owned(),
            outcome,
        ),
        HookOutcome::StoreUnavailable => problem(
            503,
            "unavailable",
            "the delivery could not be recorded; try again later".to_owned(),
            outcome,
        ),
        _ => return Err(outcome),
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

fn forge(outcome: HookOutcome) -> HookResponse {
    let outcome = match errors(outcome) {
        Ok(r) => return r,
        Err(o) => o,
    };
    match &outcome {
        HookOutcome::Submitted { job_id, .. } => {
            let body = json!({ "job_id": job_id.to_string() });
            respond(202, JSON, &body, outcome)
        }
        HookOutcome::Ignored(reason) => {
            let body = json!({ "ignored": reason.to_string() });
            respond(200, JSON, &body, outcome)
        }
        HookOutcome::Help(list) => {
            let body = json!({ "ignored": "help", "workflows": workflows_json(list) });
            respond(200, JSON, &body, outcome)
        }
        HookOutcome::Pong => respond(200, JSON, &json!({ "pong": true }), outcome),
        HookOutcome::Challenge(c) => {
            let body = json!({ "challenge": c });
            respond(200, JSON, &body, outcome)
        }
        HookOutcome::Unavailable(r) => {
            let d = r.to_string();
            problem(503, "unavailable", d, outcome)
        }
        HookOutcome::DuplicateInProgress => problem(
            409,
            "duplicate-in-progress",
            "this delivery is already being handled".to_owned(),
            outcome,
        ),
        _ => problem(500, "internal", "unexpected outcome".to_owned(), outcome),
    }
}

fn slack_text(text: String, outcome: HookOutcome) -> HookResponse {
    let body = json!({ "response_type": "ephemeral", "text": text });
    respond(200, JSON, &body, outcome)
}

fn slack(outcome: HookOutcome) -> HookResponse {
    let outcome = match errors(outcome) {
        Ok(r) => return r,
        Err(o) => o,
    };
    match &outcome {
        HookOutcome::Challenge(c) => {
            let body = json!({ "challenge": c });
            respond(200, JSON, &body, outcome)
        }
        _ => {
            let text = chat_text(&outcome);
            slack_text(text, outcome)
        }
    }
}

fn discord(outcome: HookOutcome) -> HookResponse {
    let outcome = match errors(outcome) {
        Ok(r) => return r,
        Err(o) => o,
    };
    match &outcome {
        HookOutcome::Pong => respond(200, JSON, &json!({ "type": 1 }), outcome),
        HookOutcome::Submitted { .. } => respond(200, JSON, &json!({ "type": 5 }), outcome),
        _ => {
            // Type 4: a message shown only to the person who asked (flag 64: ephemeral).
            let text = chat_text(&outcome);
            let body = json!({ "type": 4, "data": { "content": text, "flags": 64 } });
            respond(200, JSON, &body, outcome)
        }
    }
}

fn chat_text(outcome: &HookOutcome) -> String {
    match outcome {
        HookOutcome::Submitted {
            job_id,
            workflow,
            replayed: _,
        } => {
            format!("Started `{workflow}`: job `{job_id}`.")
        }
        HookOutcome::Ignored(reason) => format!("Nothing started: {reason}."),
        HookOutcome::Help(list) => workflows_text(list),
        HookOutcome::Pong => "pong".to_owned(),
        HookOutcome::Unavailable(r) => format!("Busy, try again later: {r}."),
        HookOutcome::DuplicateInProgress => "This request is already being handled.".to_owned(),
        _ => "Something went wrong.".to_owned(),
    }
}
