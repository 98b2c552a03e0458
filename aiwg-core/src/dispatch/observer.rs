//! The dispatcher as a [`JobObserver`]: job events become `job.*` deliveries. This is the one
//! place where the engine's events meet the dispatcher; the engine itself knows nothing of it.

use async_trait::async_trait;

use super::event::{event_type_for_status, OutboundEvent};
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
            let mut ev = OutboundEvent::for_job("job.step.completed", job, None);
            if let Some(data) = ev.data.as_object_mut() {
                data.insert("step".into(), serde_json::Value::String(step.clone()));
            }
            Some(ev)
        }
        _ => None,
    }
}

#[async_trait]
impl JobObserver for Dispatcher {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        let Some(out) = outbound_event(job, event) else {
            return;
        };
        let result = match self.publish(out.clone()).await {
            // Too large for the outbox (a huge summary or step output): delivered cut, with a
            // marker, never dropped silently.
            Err(DispatchError::PayloadTooLarge { limit, .. }) => {
                self.publish(out.truncated(limit)).await
            }
            other => other,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, job = %job.id, "could not queue outbound webhooks");
        }
    }
}
