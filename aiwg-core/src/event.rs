//! Job events: every change to a job, numbered per job, stored, and streamed live.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::executor::AgentEvent;
use crate::job::{JobError, JobId, JobStatus};

/// One change to a job. `seq` starts at 1 and grows by one per event of the same job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The job.
    pub job_id: JobId,
    /// Per-job sequence number (the SSE `id`).
    pub seq: u64,
    /// When it was recorded.
    #[serde(with = "crate::timestamp")]
    pub at: DateTime<Utc>,
    /// What happened.
    #[serde(flatten)]
    pub kind: JobEventKind,
}

impl JobEvent {
    /// True for the status change that ends the job.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        matches!(&self.kind, JobEventKind::Status { to, .. } if to.is_terminal())
    }
}

/// What a [`JobEvent`] records. Step and agent names are shared (`Arc<str>`) with the workflow
/// catalog and the executor registry: an event, and each copy of it, copies none.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum JobEventKind {
    /// The status changed.
    Status {
        /// The previous status (`None` for creation).
        from: Option<JobStatus>,
        /// The new status.
        to: JobStatus,
        /// The attempt.
        attempt: u32,
        /// Why, when there is more to say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The error, for failed, cancelled and timed-out changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
    /// A step began.
    StepStarted {
        /// The step.
        step: Arc<str>,
        /// The agent running it.
        agent: Arc<str>,
        /// The attempt.
        attempt: u32,
    },
    /// A step ended.
    StepFinished {
        /// The step.
        step: Arc<str>,
        /// Whether it succeeded.
        ok: bool,
        /// Wall time.
        duration_ms: u64,
        /// The step's error, if it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
    /// Something the agent did.
    Agent {
        /// The step.
        step: Arc<str>,
        /// The agent's event.
        event: AgentEvent,
    },
    /// The job's output budget (`engine.max_output_bytes`) was spent: further agent output of
    /// this job was dropped. Recorded once per attempt.
    OutputTruncated {
        /// The step that hit the limit.
        step: Arc<str>,
        /// The budget, in bytes.
        limit_bytes: u64,
    },
    /// A log line from the engine.
    Log {
        /// `info`, `warn` or `error`.
        level: String,
        /// The message.
        message: String,
    },
}

impl JobEventKind {
    /// Every [`name`](Self::name), in the order of the variants.
    pub const NAMES: &'static [&'static str] = &[
        "status",
        "step.started",
        "step.finished",
        "agent",
        "output_truncated",
        "log",
    ];

    /// The SSE `event:` name: `status`, `step.started`, `step.finished`, `agent`,
    /// `output_truncated`, `log`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            JobEventKind::Status { .. } => "status",
            JobEventKind::StepStarted { .. } => "step.started",
            JobEventKind::StepFinished { .. } => "step.finished",
            JobEventKind::Agent { .. } => "agent",
            JobEventKind::OutputTruncated { .. } => "output_truncated",
            JobEventKind::Log { .. } => "log",
        }
    }

    /// A status change without reason or error.
    #[must_use]
    pub fn status(from: Option<JobStatus>, to: JobStatus, attempt: u32) -> Self {
        JobEventKind::Status {
            from,
            to,
            attempt,
            reason: None,
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_json_is_flat_with_a_kind() {
        let ev = JobEvent {
            job_id: JobId::new(),
            seq: 3,
            at: Utc::now(),
            kind: JobEventKind::status(Some(JobStatus::Running), JobStatus::Completed, 1),
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["kind"], "status");
        assert_eq!(v["to"], "completed");
        assert_eq!(v["seq"], 3);
        assert!(ev.is_terminal());
        let back: JobEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, ev);
    }
}
