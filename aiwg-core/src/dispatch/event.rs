//! Outbound events: the names, the body, and how a job becomes one.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::job::{Job, JobStatus};

/// `job.queued`: a job was accepted (or went back to the queue for another attempt).
pub const JOB_QUEUED: &str = "job.queued";
/// `job.started`: a worker started running the job.
pub const JOB_STARTED: &str = "job.started";
/// `job.step.completed`: one step of the workflow finished.
pub const JOB_STEP_COMPLETED: &str = "job.step.completed";
/// `job.completed`: every step succeeded.
pub const JOB_COMPLETED: &str = "job.completed";
/// `job.failed`: the job failed for good.
pub const JOB_FAILED: &str = "job.failed";
/// `job.cancelled`: the job was cancelled.
pub const JOB_CANCELLED: &str = "job.cancelled";
/// `job.timed_out`: the job ran past its timeout.
pub const JOB_TIMED_OUT: &str = "job.timed_out";
/// `job.awaiting_approval`: the job paused before a step that needs an approval.
pub const JOB_AWAITING_APPROVAL: &str = "job.awaiting_approval";

/// Every event a subscription can name.
pub const EVENT_TYPES: [&str; 8] = [
    JOB_QUEUED,
    JOB_STARTED,
    JOB_AWAITING_APPROVAL,
    JOB_STEP_COMPLETED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_CANCELLED,
    JOB_TIMED_OUT,
];

/// The event announcing that a job reached `status`.
#[must_use]
pub fn event_type_for_status(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued => JOB_QUEUED,
        JobStatus::Running => JOB_STARTED,
        JobStatus::AwaitingApproval => JOB_AWAITING_APPROVAL,
        JobStatus::Completed => JOB_COMPLETED,
        JobStatus::Failed => JOB_FAILED,
        JobStatus::Cancelled => JOB_CANCELLED,
        JobStatus::TimedOut => JOB_TIMED_OUT,
    }
}

/// One event to publish to every matching subscription.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboundEvent {
    /// `job.completed`, … (one of [`EVENT_TYPES`]).
    pub event_type: String,
    /// When it happened.
    pub timestamp: DateTime<Utc>,
    /// The event's `data` object.
    pub data: Value,
}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    event: &'a str,
    timestamp: String,
    data: &'a Value,
}

impl OutboundEvent {
    /// The event cut to fit `limit` bytes of body: long texts in `data.result` and
    /// `data.error` are cut (each with a marker of what was left out), and as a last resort
    /// `result` is dropped; `data.truncated` is then `true`.
    #[must_use]
    pub fn truncated(mut self, limit: usize) -> Self {
        fn cut(v: &mut Value, max: usize) {
            match v {
                Value::String(s) if s.len() > max => {
                    let mut end = max;
                    while !s.is_char_boundary(end) {
                        end -= 1;
                    }
                    let left = s.len() - end;
                    s.truncate(end);
                    s.push_str(&format!("… [{left} more bytes cut]"));
                }
                Value::Array(a) => a.iter_mut().for_each(|v| cut(v, max)),
                Value::Object(o) => o.values_mut().for_each(|v| cut(v, max)),
                _ => {}
            }
        }
        if let Some(data) = self.data.as_object_mut() {
            data.insert("truncated".into(), Value::Bool(true));
        }
        for max in [16 * 1024, 2 * 1024, 256, 32] {
            if self.body().len() <= limit {
                return self;
            }
            if let Some(data) = self.data.as_object_mut() {
                for key in ["result", "error"] {
                    if let Some(v) = data.get_mut(key) {
                        cut(v, max);
                    }
                }
            }
        }
        if self.body().len() > limit {
            if let Some(data) = self.data.as_object_mut() {
                data.remove("result");
            }
        }
        self
    }

    /// An event of `event_type` now with `data`.
    #[must_use]
    pub fn new(event_type: impl Into<String>, data: Value) -> Self {
        Self {
            event_type: event_type.into(),
            timestamp: Utc::now(),
            data,
        }
    }

    /// The event about `job`: `data` holds `job_id`, `workflow`, `project`, `agent`, `status`,
    /// `exit_code` (the last step that reported one), `duration_ms` (from the start of the
    /// current attempt to its end, or to now while it runs), `trigger`, and `result` / `error`
    /// / `approval` (the open one, while it waits) when the job has them.
    #[must_use]
    pub fn for_job(event_type: impl Into<String>, job: &Job, agent: Option<&str>) -> Self {
        let now = Utc::now();
        let exit_code = job
            .result
            .as_ref()
            .and_then(|r| r.steps.iter().rev().find_map(|s| s.exit_code));
        let duration_ms = job.started_at.map(|start| {
            let end = job.finished_at.unwrap_or(now);
            u64::try_from((end - start).num_milliseconds()).unwrap_or(0)
        });
        let mut data = Map::new();
        data.insert("job_id".into(), json!(job.id.to_string()));
        data.insert("workflow".into(), json!(job.workflow));
        data.insert("project".into(), json!(job.project_path));
        data.insert("agent".into(), json!(agent));
        data.insert("status".into(), json!(job.status.as_str()));
        data.insert("exit_code".into(), json!(exit_code));
        data.insert("duration_ms".into(), json!(duration_ms));
        data.insert(
            "trigger".into(),
            serde_json::to_value(&job.trigger).unwrap_or(Value::Null),
        );
        if let Some(result) = &job.result {
            data.insert(
                "result".into(),
                serde_json::to_value(result).unwrap_or(Value::Null),
            );
        }
        if let Some(approval) = job.pending_approval() {
            data.insert(
                "approval".into(),
                serde_json::to_value(approval).unwrap_or(Value::Null),
            );
        }
        if let Some(error) = &job.error {
            data.insert(
                "error".into(),
                serde_json::to_value(error).unwrap_or(Value::Null),
            );
        }
        Self {
            event_type: event_type.into(),
            timestamp: now,
            data: Value::Object(data),
        }
    }

    /// The JSON body sent to subscribers: `{"type", "event", "timestamp", "data"}`.
    #[must_use]
    pub fn body(&self) -> String {
        serde_json::to_string(&Body {
            kind: &self.event_type,
            event: &self.event_type,
            timestamp: self
                .timestamp
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data: &self.data,
        })
        .unwrap_or_else(|_| unreachable!("a JSON value always serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobError, JobId, JobResult, StepResult};
    use std::sync::Arc;

    fn job() -> Job {
        let mut job: Job = serde_json::from_value(json!({
            "id": JobId::new(), "workflow": "review", "project_path": "/srv/p", "params": {},
            "guidance": null, "priority": 0, "status": "failed", "attempt": 1, "max_attempts": 1,
            "timeout": 1000, "created_at": "2026-01-01T00:00:00Z",
            "started_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:00:03.5Z",
            "retry_at": null, "progress": {"completed": [], "in_progress": [], "pending": []},
            "result": null, "error": null, "dead_letter": true,
            "trigger": {"source": "github", "repo": "o/r", "pr": 7}, "history": [],
            "cancel_requested": false, "idempotency_key": null
        }))
        .unwrap();
        Arc::make_mut(&mut job.trigger).actor = Some("octocat".into());
        job.result = Some(Arc::new(JobResult {
            summary: "x".into(),
            steps: vec![StepResult {
                name: "s".into(),
                agent: "sh".into(),
                exit_code: Some(3),
                ..StepResult::default()
            }],
            ..JobResult::default()
        }));
        job.error = Some(JobError::new("agent_failed", "exit 3"));
        job
    }

    #[test]
    fn job_event_data_has_the_design_fields() {
        let job = job();
        let ev = OutboundEvent::for_job(JOB_FAILED, &job, Some("sh"));
        let d = &ev.data;
        assert_eq!(d["job_id"], job.id.to_string());
        assert_eq!(d["workflow"], "review");
        assert_eq!(d["project"], "/srv/p");
        assert_eq!(d["agent"], "sh");
        assert_eq!(d["status"], "failed");
        assert_eq!(d["exit_code"], 3);
        assert_eq!(d["duration_ms"], 2500);
        assert_eq!(d["trigger"]["repo"], "o/r");
        assert_eq!(d["trigger"]["actor"], "octocat");
        assert_eq!(d["result"]["summary"], "x");
        assert_eq!(d["error"]["kind"], "agent_failed");
        let body: Value = serde_json::from_str(&ev.body()).unwrap();
        assert_eq!(body["type"], "job.failed");
        assert_eq!(body["event"], "job.failed");
        assert!(DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());
        assert_eq!(body["data"], ev.data);
    }

    #[test]
    fn a_too_large_event_is_cut_with_a_marker() {
        let mut job = job();
        if let Some(r) = job.result.as_mut() {
            Arc::make_mut(r).summary = "é".repeat(300_000);
        }
        let ev = OutboundEvent::for_job(JOB_FAILED, &job, Some("sh"));
        assert!(ev.body().len() > 256 * 1024);
        let cut = ev.truncated(64 * 1024);
        assert!(cut.body().len() <= 64 * 1024, "{}", cut.body().len());
        let d = &cut.data;
        assert_eq!(d["truncated"], true);
        assert_eq!(d["job_id"], job.id.to_string());
        assert_eq!(d["status"], "failed");
        let summary = d["result"]["summary"].as_str().unwrap();
        assert!(
            summary.ends_with("more bytes cut]"),
            "{}",
            &summary[summary.len() - 40..]
        );
        // Already small enough: only the marker changes.
        let small = OutboundEvent::for_job(JOB_FAILED, &self::job(), Some("sh"));
        assert_eq!(
            small.clone().truncated(64 * 1024).data["result"],
            small.data["result"]
        );
    }

    #[test]
    fn statuses_map_to_events() {
        for st in JobStatus::ALL {
            assert!(EVENT_TYPES.contains(&event_type_for_status(st)));
        }
        assert_eq!(event_type_for_status(JobStatus::TimedOut), "job.timed_out");
    }
}
