//! Wiring to the engine and the HTTP API: [`Engine`] is a [`JobSubmitter`], and [`EngineHooks`]
//! serves `/hooks/{platform}` for `aiwg_core::http::Api` (and so for both routers).
//!
//! ```no_run
//! # async fn doc(engine: aiwg_core::Engine, triggers: aiwg_webhook::TriggersConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let hooks = aiwg_webhook::Hooks::builder(triggers).build()?;
//! let api = aiwg_core::http::Api::builder(engine.clone())
//!     .hooks(Arc::new(aiwg_webhook::EngineHooks::new(hooks, engine)))
//!     .build()?;
//! # let _ = api; Ok(()) }
//! ```

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use aiwg_core::http::{ApiResponse, HookHandler};
use aiwg_core::{Engine, JobId, JobRequest, SubmitError};

use crate::{Hooks, JobSubmitter, SubmitRejection};

#[async_trait]
impl JobSubmitter for Engine {
    async fn submit(&self, request: JobRequest) -> Result<JobId, SubmitRejection> {
        Engine::submit(self, request)
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
        self.catalog()
            .iter()
            .map(|w| (w.name.clone(), w.description.clone()))
            .collect()
    }
}

/// Serves `/hooks/{platform}`: [`Hooks`] submitting to an [`Engine`].
#[derive(Debug)]
pub struct EngineHooks {
    hooks: Hooks,
    engine: Engine,
}

impl EngineHooks {
    /// Platform hooks submitting to `engine`.
    #[must_use]
    pub fn new(hooks: Hooks, engine: Engine) -> Self {
        Self { hooks, engine }
    }
}

#[async_trait]
impl HookHandler for EngineHooks {
    async fn handle(&self, platform: &str, headers: &HeaderMap, body: Bytes) -> ApiResponse {
        let res = self
            .hooks
            .handle(platform, headers, &body, &self.engine)
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
