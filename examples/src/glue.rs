//! Wiring `aiwg-webhook` to the engine and to the HTTP API.

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use aiwg_core::http::{ApiResponse, HookHandler};
use aiwg_core::{Engine, JobId, JobRequest, SubmitError};
use aiwg_webhook::{Hooks, JobSubmitter, SubmitRejection};

/// Submits platform triggers to an [`Engine`].
#[derive(Clone, Debug)]
pub struct EngineSubmitter(pub Engine);

#[async_trait]
impl JobSubmitter for EngineSubmitter {
    async fn submit(&self, request: JobRequest) -> Result<JobId, SubmitRejection> {
        self.0
            .submit(request)
            .await
            .map(|job| job.id)
            .map_err(|e| match e {
                SubmitError::UnknownWorkflow(w) => SubmitRejection::UnknownWorkflow(w),
                SubmitError::Params(p) => SubmitRejection::BadParams(p.to_string()),
                SubmitError::Project(p) => SubmitRejection::ProjectRefused(p.to_string()),
                SubmitError::QueueFull { .. } | SubmitError::ShuttingDown => {
                    SubmitRejection::QueueFull(e.to_string())
                }
                other => SubmitRejection::Other(other.to_string()),
            })
    }

    fn workflows(&self) -> Vec<(String, String)> {
        self.0
            .catalog()
            .iter()
            .map(|w| (w.name.clone(), w.description.clone()))
            .collect()
    }
}

/// Serves `/hooks/{platform}` with [`Hooks`] over an engine.
#[derive(Debug)]
pub struct EngineHooks {
    hooks: Hooks,
    submitter: EngineSubmitter,
}

impl EngineHooks {
    /// Platform hooks submitting to `engine`.
    #[must_use]
    pub fn new(hooks: Hooks, engine: Engine) -> Self {
        Self {
            hooks,
            submitter: EngineSubmitter(engine),
        }
    }
}

#[async_trait]
impl HookHandler for EngineHooks {
    async fn handle(&self, platform: &str, headers: &HeaderMap, body: Bytes) -> ApiResponse {
        let res = self
            .hooks
            .handle(platform, headers, &body, &self.submitter)
            .await;
        let status = StatusCode::from_u16(res.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut out = ApiResponse::bytes(status, res.content_type, res.body);
        for (name, value) in res.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                out.headers.insert(n, v);
            }
        }
        out
    }
}
