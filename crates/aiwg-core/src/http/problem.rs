//! RFC 9457 problem documents.

use http::{HeaderValue, StatusCode};
use serde::Serialize;

use super::ApiResponse;

/// An `application/problem+json` error: `type`, `title`, `status`, `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`urn:aiwg:problem:<slug>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// The status code's reason phrase.
    pub title: String,
    /// The status code.
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// Set on 409 answers about a job: its current status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_status: Option<String>,
    /// Set when the problem concerns an existing job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    #[serde(skip)]
    retry_after: Option<u64>,
    #[serde(skip)]
    www_authenticate: bool,
}

impl Problem {
    /// A problem with status, slug and detail.
    #[must_use]
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("urn:aiwg:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            job_status: None,
            job_id: None,
            retry_after: None,
            www_authenticate: false,
        }
    }

    /// Adds a `Retry-After` header (seconds, at least 1).
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// Adds `WWW-Authenticate: Bearer`.
    #[must_use]
    pub fn bearer_challenge(mut self) -> Self {
        self.www_authenticate = true;
        self
    }

    /// Names the job and its status.
    #[must_use]
    pub fn job(mut self, id: impl Into<String>, status: impl Into<String>) -> Self {
        self.job_id = Some(id.into());
        self.job_status = Some(status.into());
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
        if self.www_authenticate {
            res.headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"aiwg\""),
            );
        }
        res
    }
}
