//! The schedule runner: one task per schedule of a workflow, submitting a job per tick.
//!
//! Exactly once across instances comes from the store, not from coordination between the
//! runners: every instance computes the same ticks and submits each under the same idempotency
//! key ([`Schedule::tick_key`]), so the first creates the job and the others find it. Ticks
//! are computed from the time the runner starts, so ticks missed while no instance ran are
//! never replayed; a runner that falls behind (a suspended process) skips to the next tick
//! after now.

use chrono::Utc;

use super::Engine;
use crate::job::{JobStatus, TriggerInfo};
use crate::request::JobRequest;
use crate::schedule::{Overlap, Schedule};
use crate::store::JobQuery;
use crate::workflow::WorkflowCatalog;

/// How late a tick may fire and still count (past that, it was missed and is skipped).
const LATE_TOLERANCE: chrono::Duration = chrono::Duration::seconds(5);

/// Every (workflow, schedule index) of the catalog.
pub(super) fn schedules(catalog: &WorkflowCatalog) -> Vec<(String, usize)> {
    catalog
        .iter()
        .flat_map(|wf| (0..wf.schedules.len()).map(|i| (wf.name.clone(), i)))
        .collect()
}

pub(super) async fn run(engine: Engine, workflow: String, index: usize) {
    let Some(schedule) = engine
        .inner
        .catalog
        .get(&workflow)
        .and_then(|wf| wf.schedules.get(index).cloned())
    else {
        return;
    };
    let stop = engine.inner.stop_claiming.clone();
    let mut after = Utc::now();
    loop {
        let Some(tick) = schedule.next_after(after) else {
            tracing::info!(
                workflow,
                schedule = index,
                "the schedule has no further tick"
            );
            return;
        };
        let wait = (tick - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        // The timer may wake a little early (clock adjustments): never before the tick.
        let now = Utc::now();
        if now < tick {
            after = tick - chrono::Duration::milliseconds(1);
            continue;
        }
        after = tick;
        if now - tick > LATE_TOLERANCE {
            tracing::warn!(workflow, schedule = index, %tick, "a tick was missed (the process was not running or was suspended); skipping it");
            after = now;
            continue;
        }
        fire(&engine, &workflow, index, &schedule, tick).await;
    }
}

async fn fire(
    engine: &Engine,
    workflow: &str,
    index: usize,
    schedule: &Schedule,
    tick: chrono::DateTime<Utc>,
) {
    let outcome = |o: &'static str| {
        metrics::counter!("aiwg_schedule_ticks_total", "workflow" => workflow.to_owned(), "outcome" => o)
            .increment(1);
    };
    if schedule.overlap == Overlap::Skip && still_running(engine, workflow, tick).await {
        tracing::info!(
            workflow,
            schedule = index,
            %tick,
            "an earlier scheduled job still runs; skipping this tick (overlap: skip)"
        );
        outcome("skipped");
        return;
    }
    let mut trigger = TriggerInfo::new("schedule");
    trigger.actor = Some(format!("schedule {}", index + 1));
    trigger
        .extra
        .insert("schedule".into(), schedule.cron.clone());
    trigger.extra.insert(
        "tick".into(),
        tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    let mut request = JobRequest::new(workflow)
        .trigger(trigger)
        .idempotency_key(Schedule::tick_key(workflow, index, tick));
    request.params.clone_from(&schedule.params);
    request.guidance.clone_from(&schedule.guidance);
    request.project.clone_from(&schedule.project);
    request.project_path.clone_from(&schedule.project_path);
    match engine.submission(request).await {
        Ok(s) if s.created => {
            tracing::info!(workflow, schedule = index, %tick, job = %s.job.id, "scheduled job started");
            outcome("started");
        }
        // Another instance sharing the store started this tick's job first.
        Ok(_) => outcome("elsewhere"),
        Err(e) => {
            tracing::warn!(workflow, schedule = index, %tick, error = %e, "a scheduled job could not be started");
            outcome("refused");
        }
    }
}

/// Whether a job an earlier tick of `workflow` started has not finished.
async fn still_running(engine: &Engine, workflow: &str, tick: chrono::DateTime<Utc>) -> bool {
    let this_tick = tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for status in [
        JobStatus::Running,
        JobStatus::Queued,
        JobStatus::AwaitingApproval,
    ] {
        let query = JobQuery::default()
            .status(status)
            .workflow(workflow)
            .limit(500);
        let Ok(page) = engine.inner.store.list(&query).await else {
            // Unknown: starting nothing is the safe side of `overlap: skip`.
            return true;
        };
        if page.jobs.iter().any(|j| {
            j.trigger.source == "schedule"
                && j.trigger.extra.get("tick").map(String::as_str) != Some(this_tick.as_str())
        }) {
            return true;
        }
    }
    false
}
