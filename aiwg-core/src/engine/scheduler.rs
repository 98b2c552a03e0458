//! The schedule runner: one task per schedule of a workflow, submitting a job per tick.
//!
//! Exactly once across instances comes from the store, not from coordination between the
//! runners: every instance computes the same ticks and submits each under the same idempotency
//! key ([`Schedule::tick_key`]), so the first creates the job and the others find it. Ticks
//! are computed from the time the runner starts, so ticks of a time no instance ran are never
//! replayed. A runner waits for its next tick in naps of at most a minute, reading the wall
//! clock after each: a tick the wall clock passed while the runner waited for it fires, however
//! far the clock moved meanwhile (an NTP step, a suspended machine); when several ticks passed
//! in one nap, only the last of them fires.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::job::{JobStatus, TriggerInfo};
use crate::request::JobRequest;
use crate::schedule::{Overlap, Schedule};
use crate::store::JobQuery;
use crate::workflow::WorkflowCatalog;

/// The longest a runner sleeps without reading the wall clock again.
const NAP: Duration = Duration::from_secs(60);

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
        let Some(now) = reach(tick, Utc::now, &stop).await else {
            return;
        };
        let last = last_passed(&schedule, tick, now);
        if last != tick {
            tracing::warn!(workflow, schedule = index, %tick, fired = %last, "ticks passed while the clock jumped or the machine slept; only the last fires");
        }
        fire(&engine, &workflow, index, &schedule, last).await;
        after = last;
    }
}

/// Waits until the wall clock (`clock`) reaches `tick`, in naps of at most [`NAP`]: the time the
/// clock then reads, or `None` when `stop` fires first.
async fn reach(
    tick: DateTime<Utc>,
    clock: impl Fn() -> DateTime<Utc>,
    stop: &CancellationToken,
) -> Option<DateTime<Utc>> {
    loop {
        let now = clock();
        if now >= tick {
            return Some(now);
        }
        let nap = (tick - now).to_std().unwrap_or_default().min(NAP);
        tokio::select! {
            () = tokio::time::sleep(nap) => {}
            () = stop.cancelled() => return None,
        }
    }
}

/// The last tick from `tick` on that is not after `now` (at most 10 000 steps on).
fn last_passed(schedule: &Schedule, tick: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    let mut last = tick;
    for _ in 0..10_000 {
        match schedule.next_after(last) {
            Some(next) if next <= now => last = next,
            _ => break,
        }
    }
    last
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
        .idempotency_key(schedule.tick_key(workflow, tick));
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

/// Whether a job an earlier tick of `workflow` started has not finished. Every unfinished job
/// of the workflow is read, page by page: a first page alone missed a scheduled job behind 500
/// others (jobs the API started, say).
async fn still_running(engine: &Engine, workflow: &str, tick: chrono::DateTime<Utc>) -> bool {
    let this_tick = tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for status in JobStatus::ALL.into_iter().filter(|s| !s.is_terminal()) {
        let mut query = JobQuery::default()
            .status(status)
            .workflow(workflow)
            .limit(PAGE);
        loop {
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
            match page.next_cursor {
                Some(next) => query.cursor = Some(next),
                None => break,
            }
        }
    }
    false
}

/// Jobs read a page when looking for an unfinished scheduled one.
const PAGE: usize = 500;

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// A daily 03:00 tick, waited for from midnight; ten minutes in, the wall clock steps three
    /// hours and a minute forward (an NTP correction). The runner slept its whole wait in one
    /// go, woke at 06:01 by the wall clock and skipped 03:00 as missed; in naps it sees the
    /// clock pass the tick and fires it.
    #[tokio::test(start_paused = true)]
    async fn a_tick_the_clock_jumped_over_while_waiting_fires() {
        let midnight = Utc.with_ymd_and_hms(2026, 12, 7, 0, 0, 0).unwrap();
        let start = tokio::time::Instant::now();
        let clock = move || {
            let slept = start.elapsed();
            let jump = if slept >= Duration::from_secs(600) {
                chrono::Duration::minutes(181)
            } else {
                chrono::Duration::zero()
            };
            midnight + chrono::Duration::from_std(slept).unwrap() + jump
        };
        let daily = Schedule::new("0 3 * * *");
        let tick = daily.next_after(midnight).unwrap();
        assert_eq!(tick, Utc.with_ymd_and_hms(2026, 12, 7, 3, 0, 0).unwrap());
        let now = reach(tick, clock, &CancellationToken::new()).await.unwrap();
        assert!(now >= tick, "{now}");
        assert!(
            start.elapsed() <= Duration::from_secs(660),
            "woken within a nap of the jump, not at 03:00 by the monotonic clock: {:?}",
            start.elapsed()
        );
        assert_eq!(last_passed(&daily, tick, now), tick, "the 03:00 tick fires");
    }

    #[tokio::test(start_paused = true)]
    async fn of_several_ticks_passed_in_one_nap_only_the_last_fires_and_a_stop_ends_the_wait() {
        let t0 = Utc.with_ymd_and_hms(2026, 12, 7, 0, 0, 0).unwrap();
        let every_minute = Schedule::new("* * * * *");
        let tick = every_minute.next_after(t0).unwrap();
        let now = t0 + chrono::Duration::minutes(90) + chrono::Duration::seconds(30);
        assert_eq!(
            last_passed(&every_minute, tick, now),
            t0 + chrono::Duration::minutes(90)
        );
        let stop = CancellationToken::new();
        let waiting = tokio::spawn({
            let stop = stop.clone();
            async move { reach(tick, move || t0, &stop).await }
        });
        stop.cancel();
        assert_eq!(waiting.await.unwrap(), None);
    }

    /// An unfinished scheduled job behind more than a page of other jobs of its workflow (the
    /// API's, queued after it) still stops the next tick under `overlap: skip`. Only the first
    /// 500 of each status were read, and this one was missed.
    #[tokio::test]
    async fn a_scheduled_job_behind_a_page_of_others_still_counts_as_running() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder()
            .policy(
                crate::ProjectPolicy::builder()
                    .root(dir.path())
                    .build()
                    .unwrap(),
            )
            .workers(1)
            .executor(
                "hang",
                std::sync::Arc::new(crate::test_util::ScriptedExecutor::hanging()),
            )
            .workflow(crate::Workflow::new("busy").step(crate::Step::prompt("s", "hang", "x")))
            .build()
            .unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 12, 7, 3, 0, 0).unwrap();
        // One job holds the only worker; the scheduled one waits behind it, and 600 of the
        // API's after that.
        engine.submit(JobRequest::new("busy")).await.unwrap();
        let mut trigger = TriggerInfo::new("schedule");
        trigger.extra.insert(
            "tick".into(),
            t0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        engine
            .submit(JobRequest::new("busy").trigger(trigger))
            .await
            .unwrap();
        assert!(!still_running(&engine, "other", t0).await);
        for _ in 0..600 {
            engine.submit(JobRequest::new("busy")).await.unwrap();
        }
        let next = t0 + chrono::Duration::days(1);
        assert!(still_running(&engine, "busy", next).await);
        // The tick's own job does not stop it.
        assert!(!still_running(&engine, "busy", t0).await);
        engine.shutdown(Duration::ZERO).await;
    }
}
