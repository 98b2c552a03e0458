//! The dispatcher as a [`JobObserver`]: job events become `job.*` deliveries. This is the one
//! place where the engine's events meet the dispatcher; the engine itself knows nothing of it.

use async_trait::async_trait;

use super::event::{event_type_for_status, OutboundEvent, JOB_STEP_COMPLETED};
use super::{DispatchError, Dispatcher};
use crate::engine::JobObserver;
use crate::event::{JobEvent, JobEventKind};
use crate::job::Job;

/// The outbound event a job event announces, if any: status changes become `job.queued`,
/// `job.started`, `job.completed`, `job.failed`, `job.cancelled`, `job.timed_out`; a step that
/// finished successfully becomes `job.step.completed`.
#[must_use]
pub fn outbound_event(job: &Job, event: &JobEvent) -> Option<OutboundEvent> {
    match &event.kind {
        JobEventKind::Status { to, .. } => {
            let agent = job
                .result
                .as_ref()
                .and_then(|r| r.steps.last())
                .map(|s| s.agent.as_str());
            Some(OutboundEvent::for_job(
                event_type_for_status(*to),
                job,
                agent,
            ))
        }
        JobEventKind::StepFinished { step, ok: true, .. } => {
            let mut ev = OutboundEvent::for_job(JOB_STEP_COMPLETED, job, None);
            if let Some(data) = ev.data.as_object_mut() {
                data.insert("step".into(), serde_json::Value::String(step.to_string()));
            }
            Some(ev)
        }
        _ => None,
    }
}

/// The type of the outbound event [`outbound_event`] makes of `event`, without making it.
fn outbound_type(event: &JobEvent) -> Option<&'static str> {
    match &event.kind {
        JobEventKind::Status { to, .. } => Some(event_type_for_status(*to)),
        JobEventKind::StepFinished { ok: true, .. } => Some(JOB_STEP_COMPLETED),
        _ => None,
    }
}

#[async_trait]
impl JobObserver for Dispatcher {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        let Some(event_type) = outbound_type(event) else {
            return;
        };
        // Who wants it first: with no subscriber the event is never built (serialising the
        // job for every event was most of a no-op job's cost).
        let subscribers = match self.subscribers(event_type).await {
            Ok(s) if s.is_empty() => return,
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, job = %job.id, "could not queue outbound webhooks");
                return;
            }
        };
        let Some(out) = outbound_event(job, event) else {
            return;
        };
        let result = match self.publish_to(&subscribers, &out).await {
            // Too large for the outbox (a huge summary or step output): delivered cut, with a
            // marker, never dropped silently.
            Err(DispatchError::PayloadTooLarge { limit, .. }) => {
                self.publish_to(&subscribers, &out.truncated(limit)).await
            }
            other => other,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, job = %job.id, "could not queue outbound webhooks");
        }
    }
}
