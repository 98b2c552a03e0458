//! [`JobSubmitter`]: where accepted triggers go. `aiwg-core`'s engine implements it; tests use
//! `MockJobSubmitter` (feature `test-util`).

use aiwg_core::{JobId, JobRequest};
use async_trait::async_trait;
use thiserror::Error;

/// Why the engine refused a request. Each variant carries a message for the person who asked
/// (it is shown to them on the platform), so it must not contain secrets.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SubmitRejection {
    /// No workflow of that name.
    #[error("unknown workflow: {0}")]
    UnknownWorkflow(String),
    /// Unknown, missing or invalid parameters.
    #[error("invalid parameters: {0}")]
    BadParams(String),
    /// The project could not be resolved or is outside the allowed roots.
    #[error("project refused: {0}")]
    ProjectRefused(String),
    /// The queue is full: try again later.
    #[error("queue full: {0}")]
    QueueFull(String),
    /// Anything else (store unavailable, …).
    #[error("could not start the job: {0}")]
    Other(String),
}

impl SubmitRejection {
    /// Whether asking again later may succeed (queue full, store down): such outcomes are not
    /// remembered by the de-duplication, so a redelivery tries again.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::QueueFull(_) | Self::Other(_))
    }

    /// A short, stable label for metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownWorkflow(_) => "unknown_workflow",
            Self::BadParams(_) => "bad_params",
            Self::ProjectRefused(_) => "project_refused",
            Self::QueueFull(_) => "queue_full",
            Self::Other(_) => "submit_failed",
        }
    }
}

/// Starts jobs. Implemented by `aiwg_core::Engine`; mocked in tests.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait JobSubmitter: Send + Sync {
    /// Validates and queues `request`, returning the new job's id.
    async fn submit(&self, request: JobRequest) -> Result<JobId, SubmitRejection>;

    /// The workflows that can be started, as `(name, description)`, for `help`.
    fn workflows(&self) -> Vec<(String, String)>;
}
