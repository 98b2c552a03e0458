//! RFC 9457 problem documents.

use http::{HeaderValue, StatusCode};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::ApiResponse;
use crate::engine::SubmitError;
use crate::policy::PolicyError;

/// An `application/problem+json` error: `type` (`urn:aiwg:problem:<slug>`), `title`, `status`,
/// `detail`, and for answers about a job its `job_id` and `job_status`.
#[derive(Debug, Clone, PartialEq, Eq, utoipa::ToSchema)]
#[schema(example = json!({"type": "urn:aiwg:problem:unknown-workflow", "title": "Not Found", "status": 404, "detail": "unknown workflow `x`"}))]
pub struct Problem {
    #[schema(value_type = String, rename = "type")]
    slug: &'static str,
    #[schema(value_type = String)]
    title: &'static str,
    status: u16,
    detail: String,
    #[schema(value_type = Option<Object>)]
    job: Option<Box<(String, String)>>,
    #[schema(ignore)]
    retry_after: Option<u64>,
    #[schema(ignore)]
    www_authenticate: Option<Box<str>>,
}

impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("type", &format!("urn:aiwg:problem:{}", self.slug))?;
        m.serialize_entry("title", self.title)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("detail", &self.detail)?;
        if let Some(job) = &self.job {
            m.serialize_entry("job_id", &job.0)?;
            m.serialize_entry("job_status", &job.1)?;
        }
        m.end()
    }
}

impl Problem {
    /// A problem with status, slug and detail.
    #[must_use]
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            slug,
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail: detail.into(),
            job: None,
            retry_after: None,
            www_authenticate: None,
        }
    }

    /// The status code.
    #[must_use]
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The slug of its `type` (`urn:aiwg:problem:<slug>`), e.g. `queue-full`.
    #[must_use]
    pub fn slug(&self) -> &'static str {
        self.slug
    }

    /// The detail text.
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// Adds a `Retry-After` header (seconds, at least 1).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// Adds `WWW-Authenticate: Bearer realm="aiwg"` (no credentials were presented).
    #[must_use]
    pub fn bearer_challenge(mut self) -> Self {
        self.www_authenticate = Some("Bearer realm=\"aiwg\"".into());
        self
    }

    /// Adds `WWW-Authenticate: Bearer realm="aiwg", error="invalid_token",
    /// error_description="<description>"` (RFC 6750 §3.1): the credentials presented were
    /// refused, and why. Characters RFC 6750 does not allow in the description (quotes,
    /// backslashes, anything outside printable ASCII) become `'` or `?`.
    #[must_use]
    pub fn invalid_token(mut self, description: &str) -> Self {
        let clean: String = description
            .chars()
            .map(|c| match c {
                '"' | '\\' => '\'',
                ' '..='~' => c,
                _ => '?',
            })
            .collect();
        self.www_authenticate = Some(
            format!(
                "Bearer realm=\"aiwg\", error=\"invalid_token\", error_description=\"{clean}\""
            )
            .into(),
        );
        self
    }

    /// The `WWW-Authenticate` value this problem carries, if any.
    #[must_use]
    pub fn challenge(&self) -> Option<&str> {
        self.www_authenticate.as_deref()
    }

    /// Names the job and its status.
    #[must_use]
    pub fn job(mut self, id: impl Into<String>, status: impl Into<String>) -> Self {
        self.job = Some(Box::new((id.into(), status.into())));
        self
    }

    /// The HTTP answer.
    #[must_use]
    pub fn into_response(self) -> ApiResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = ApiResponse::bytes(status, "application/problem+json", body);
        if let Some(secs) = self.retry_after {
            res.headers
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self
            .www_authenticate
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            res.headers
                .insert(http::header::WWW_AUTHENTICATE, challenge);
        }
        res
    }
}

impl From<&SubmitError> for Problem {
    /// The one mapping of a refused submission to HTTP, for the API and the platform hooks
    /// alike: refusals of the request itself are 4xx; a full queue, a shutdown or a store
    /// failure ([`SubmitError::is_transient`]) 503 with `Retry-After`, a store failure's text
    /// only in the log.
    fn from(e: &SubmitError) -> Self {
        match e {
            SubmitError::UnknownWorkflow(w) => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-workflow",
                format!("unknown workflow `{w}`"),
            ),
            SubmitError::Params(p) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid-params", p.to_string())
            }
            SubmitError::Project(
                p @ (PolicyError::NotFound(_)
                | PolicyError::NotADirectory(_)
                | PolicyError::Malformed),
            ) => Problem::new(StatusCode::BAD_REQUEST, "invalid-project", p.to_string()),
            SubmitError::Project(p @ PolicyError::NoMapping(_)) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid-project", p.to_string())
            }
            SubmitError::Project(p) => {
                Problem::new(StatusCode::FORBIDDEN, "project-forbidden", p.to_string())
            }
            SubmitError::Invalid(m) => {
                Problem::new(StatusCode::BAD_REQUEST, "invalid-request", m.clone())
            }
            SubmitError::IdempotencyConflict { existing } => Problem::new(
                StatusCode::CONFLICT,
                "idempotency-conflict",
                "this idempotency key was used with a different request",
            )
            .job(existing.to_string(), "exists"),
            SubmitError::QueueFull { capacity } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue-full",
                format!("the queue is full ({capacity} jobs); try again later"),
            )
            .retry_after(5),
            SubmitError::ShuttingDown => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting-down",
                "the server is shutting down",
            )
            .retry_after(5),
            SubmitError::Store(e) => {
                tracing::error!(error = %e, "job store failed");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the job could not be stored; try again later",
                )
                .retry_after(5)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_serialise_as_rfc_9457() {
        let p = Problem::new(StatusCode::CONFLICT, "job-finished", "done").job("j1", "completed");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "urn:aiwg:problem:job-finished", "title": "Conflict", "status": 409,
                "detail": "done", "job_id": "j1", "job_status": "completed"})
        );
        let res = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "slow")
            .retry_after(0)
            .into_response();
        assert_eq!(res.headers[http::header::RETRY_AFTER], "1");
        assert!(std::mem::size_of::<Problem>() <= 128);
        let res = Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "x")
            .invalid_token("bad \"quote\" \\ é")
            .into_response();
        assert_eq!(
            res.headers[http::header::WWW_AUTHENTICATE],
            "Bearer realm=\"aiwg\", error=\"invalid_token\", error_description=\"bad 'quote' ' ?\""
        );
    }
}
