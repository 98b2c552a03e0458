//! Issue 17 in the engine: approval gates, budgets, partial work at limits, structured output
//! and schedules, with scripted executors and the memory store.

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::engine::EngineError;
use aiwg_core::schedule::Schedule;
use aiwg_core::store::JobQuery;
use aiwg_core::test_util::{step_names, ScriptedExecutor};
use aiwg_core::{
    AgentEvent, AgentLimit, AgentResult, Engine, EngineBuilder, ExecutorError, JobEventKind,
    JobRequest, JobStatus, ProjectPolicy, Step, Usage, Workflow,
};
use futures_util::StreamExt;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn builder(dir: &tempfile::TempDir) -> EngineBuilder {
    Engine::builder()
        .policy(ProjectPolicy::builder().root(dir.path()).build().unwrap())
        .poll_interval(Duration::from_millis(10))
}

/// Waits until the job has `status` (by its event stream, not by polling).
async fn wait_for(engine: &Engine, id: aiwg_core::JobId, status: JobStatus) -> aiwg_core::Job {
    let mut events = engine.subscribe(id, 0).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev.kind, JobEventKind::Status { to, .. } if to == status) {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("job did not reach {status}"));
    engine.get(id).await.unwrap()
}

fn gated() -> Workflow {
    Workflow::new("gated")
        .step(Step::prompt("plan", "agent", "plan"))
        .step(Step::prompt("apply", "agent", "apply {{steps.plan.output}}").requiring_approval())
}

/// A retry runs the steps before the gate again, so what the gated step would act on is new:
/// the approval of the first attempt does not let it through; the job waits for one again.
/// (An approval held for every later attempt, and a retry's unseen draft went through.)
#[tokio::test]
async fn a_retry_asks_for_the_approval_again() {
    let dir = tempfile::tempdir().unwrap();
    let draft = ScriptedExecutor::succeeding("draft");
    let apply = ScriptedExecutor::succeeding("applied").fail_times(1);
    let engine = builder(&dir)
        .executor("draft", Arc::new(draft.clone()))
        .executor("apply", Arc::new(apply.clone()))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .workflow(
            Workflow::new("gated-retry")
                .step(Step::prompt("plan", "draft", "plan"))
                .step(Step::prompt("apply", "apply", "apply").requiring_approval())
                .with_max_attempts(2),
        )
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("gated-retry")).await.unwrap();
    let mut events = engine.subscribe(job.id, 0).await.unwrap();
    let mut waits = 0;
    async fn waited(events: &mut (impl futures_util::Stream<Item = aiwg_core::JobEvent> + Unpin)) {
        tokio::time::timeout(WAIT, async {
            while let Some(ev) = events.next().await {
                if matches!(
                    ev.kind,
                    JobEventKind::Status {
                        to: JobStatus::AwaitingApproval,
                        ..
                    }
                ) {
                    return;
                }
            }
        })
        .await
        .expect("the job waits for an approval");
    }
    waited(&mut events).await;
    waits += 1;
    engine.approve(job.id, "alice", "api").await.unwrap();
    // `apply` fails once; the retry drafts again and waits again.
    waited(&mut events).await;
    waits += 1;
    let waiting = engine.get(job.id).await.unwrap();
    assert_eq!(waiting.attempt, 2);
    assert_eq!(waiting.approvals.len(), 2);
    assert_eq!(waiting.pending_approval().unwrap().attempt, 2);
    assert_eq!(draft.calls(), 2);
    assert_eq!(
        apply.calls(),
        1,
        "the retry's apply waited for its approval"
    );
    engine.approve(job.id, "bob", "api").await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(apply.calls(), 2);
    assert_eq!(waits, 2);
}

#[tokio::test]
async fn an_approved_job_continues_at_the_gated_step_in_the_same_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let exec = ScriptedExecutor::succeeding("out").cost(0.25, Usage::new(1, 1));
    let engine = builder(&dir)
        .executor("agent", Arc::new(exec.clone()))
        .workflow(gated())
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("gated")).await.unwrap();
    let waiting = wait_for(&engine, job.id, JobStatus::AwaitingApproval).await;
    assert_eq!(exec.calls(), 1, "only the step before the gate ran");
    assert_eq!(waiting.pending_approval().unwrap().step, "apply");
    assert_eq!(step_names(&waiting.progress.completed), ["plan"]);
    // No worker is held while it waits.
    assert_eq!(engine.queue_stats().await.unwrap().busy, 0);
    let approved = engine.approve(job.id, "alice", "api").await.unwrap();
    assert_eq!(approved.status, JobStatus::Queued);
    // Approving twice is refused with the current status.
    assert!(matches!(
        engine.approve(job.id, "alice", "api").await,
        Err(EngineError::NotAwaitingApproval { .. })
    ));
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(
        exec.calls(),
        2,
        "the step before the gate did not run again"
    );
    assert_eq!(done.attempt, 1);
    let result = done.result.unwrap();
    assert_eq!(
        result
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["plan", "apply"]
    );
    assert_eq!(result.cost_usd, Some(0.5), "both steps' cost is summed");
    // The second step saw the first one's output, kept across the pause.
    assert_eq!(exec.requests()[1].prompt, "apply out");
    let decision = done.approvals[0].decision.clone().unwrap();
    assert_eq!(
        (decision.by.as_str(), decision.via.as_str()),
        ("alice", "api")
    );
}

#[tokio::test]
async fn a_rejected_or_expired_approval_cancels_the_job_and_keeps_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let exec = ScriptedExecutor::succeeding("out");
    let engine = builder(&dir)
        .executor("agent", Arc::new(exec.clone()))
        .workflow(gated())
        .workflow(gated_with_timeout())
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("gated")).await.unwrap();
    wait_for(&engine, job.id, JobStatus::AwaitingApproval).await;
    let rejected = engine.reject(job.id, "bob", "github").await.unwrap();
    assert_eq!(rejected.status, JobStatus::Cancelled);
    assert_eq!(rejected.error.unwrap().kind, "rejected");
    assert_eq!(rejected.result.unwrap().steps.len(), 1);
    assert!(matches!(
        engine.approve(job.id, "bob", "api").await,
        Err(EngineError::NotAwaitingApproval {
            status: JobStatus::Cancelled,
            ..
        })
    ));

    let job = engine
        .submit(JobRequest::new("gated-briefly"))
        .await
        .unwrap();
    let expired = wait_for(&engine, job.id, JobStatus::Cancelled).await;
    assert_eq!(expired.error.unwrap().kind, "approval_timeout");
    assert!(expired
        .history
        .iter()
        .any(|h| h.status == JobStatus::AwaitingApproval));

    // Cancelling a waiting job ends it at once.
    let job = engine.submit(JobRequest::new("gated")).await.unwrap();
    wait_for(&engine, job.id, JobStatus::AwaitingApproval).await;
    assert_eq!(
        engine.cancel(job.id).await.unwrap().status,
        JobStatus::Cancelled
    );
    // A job that never paused cannot be approved; an unknown one is not found.
    assert!(matches!(
        engine.approve(aiwg_core::JobId::new(), "x", "api").await,
        Err(EngineError::NotFound(_))
    ));
}

/// An approval timeout meant as "never" (configuration accepts any number of seconds) pauses
/// the job like any other: the worker does not panic computing when the wait ends.
#[tokio::test]
async fn an_approval_timeout_past_the_calendar_waits_forever() {
    let dir = tempfile::tempdir().unwrap();
    let engine = builder(&dir)
        .executor("agent", Arc::new(ScriptedExecutor::succeeding("out")))
        .workflow(
            Workflow::new("gated-forever")
                .step(Step::prompt("apply", "agent", "apply").requiring_approval())
                .with_approval_timeout(Duration::from_secs(u64::MAX)),
        )
        .build()
        .unwrap();
    let job = engine
        .submit(JobRequest::new("gated-forever"))
        .await
        .unwrap();
    let waiting = wait_for(&engine, job.id, JobStatus::AwaitingApproval).await;
    assert_eq!(
        waiting.approvals.last().unwrap().expires_at,
        chrono::DateTime::<chrono::Utc>::MAX_UTC
    );
    let approved = engine.approve(job.id, "bob", "api").await.unwrap();
    assert_ne!(approved.status, JobStatus::AwaitingApproval);
    assert_eq!(
        engine.wait(job.id, WAIT).await.unwrap().status,
        JobStatus::Completed
    );
}

fn gated_with_timeout() -> Workflow {
    Workflow::new("gated-briefly")
        .step(Step::prompt("plan", "agent", "plan"))
        .step(Step::prompt("apply", "agent", "apply").requiring_approval())
        .with_approval_timeout(Duration::from_millis(50))
}

/// The budget caps the whole job: a retry is offered what the earlier attempts left, and the
/// job's cost is every attempt's. (Each attempt started from nothing: with `max_attempts: 2`
/// a job could spend twice its cap, and its cost showed the last attempt's only.)
#[tokio::test]
async fn a_retry_spends_what_the_earlier_attempts_left_of_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let paid = ScriptedExecutor::succeeding("draft").cost(0.6, Usage::new(1, 1));
    let flaky = ScriptedExecutor::succeeding("applied").fail_times(1);
    let engine = builder(&dir)
        .executor("paid", Arc::new(paid.clone()))
        .executor("flaky", Arc::new(flaky.clone()))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
        .workflow(
            Workflow::new("capped")
                .step(Step::prompt("draft", "paid", "1"))
                .step(Step::prompt("apply", "flaky", "2"))
                .with_max_attempts(3)
                .with_max_budget_usd(1.0),
        )
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("capped")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    // Attempt 1: the draft ($0.60), then `apply` fails. Attempt 2: the draft again, offered
    // $0.40, spends $0.60 more; $1.20 is past the cap before `apply`.
    let offered: Vec<_> = paid.requests().iter().map(|r| r.max_budget_usd).collect();
    assert_eq!(offered.len(), 2, "{offered:?}");
    assert_eq!(offered[0], Some(1.0));
    assert!((offered[1].unwrap() - 0.4).abs() < 1e-9, "{offered:?}");
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.error.unwrap().kind, "budget_exceeded");
    assert_eq!(done.attempt, 2);
    assert!((done.result.unwrap().cost_usd.unwrap() - 1.2).abs() < 1e-9);
    assert_eq!(flaky.calls(), 1, "the second `apply` was never run");
}

#[tokio::test]
async fn a_budget_stops_the_job_before_the_next_step_and_keeps_the_results() {
    let dir = tempfile::tempdir().unwrap();
    let exec = ScriptedExecutor::succeeding("out").cost(0.6, Usage::new(1, 1));
    let engine = builder(&dir)
        .executor("agent", Arc::new(exec.clone()))
        .workflow(
            Workflow::new("capped")
                .step(Step::prompt("one", "agent", "1"))
                .step(Step::prompt("two", "agent", "2"))
                .step(Step::prompt("three", "agent", "3"))
                .with_max_budget_usd(1.0),
        )
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("capped")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Failed);
    let error = done.error.unwrap();
    assert_eq!(error.kind, "budget_exceeded");
    assert!(error.message.contains("three"), "{}", error.message);
    assert!(!done.dead_letter || done.attempt == done.max_attempts);
    assert_eq!(exec.calls(), 2);
    // Each step was offered what was left of the cap.
    let offered: Vec<_> = exec.requests().iter().map(|r| r.max_budget_usd).collect();
    assert_eq!(offered[0], Some(1.0));
    assert!((offered[1].unwrap() - 0.4).abs() < 1e-9);
    let result = done.result.unwrap();
    assert_eq!(result.steps.len(), 2);
    assert_eq!(result.cost_usd, Some(1.2));
}

#[tokio::test]
async fn a_step_stopped_at_a_limit_or_timeout_keeps_its_partial_output_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut partial = AgentResult::text("half done");
    partial.session_id = Some("ses-limit".into());
    partial.cost_usd = Some(0.3);
    let limited = ScriptedExecutor::succeeding("never")
        .fail_times(1)
        .fail_with(ExecutorError::Limit {
            limit: AgentLimit::Turns,
            partial: Box::new(partial),
        });
    let slow = ScriptedExecutor::hanging()
        .emit(AgentEvent::Init {
            session_id: Some("ses-slow".into()),
            model: None,
            tools: Vec::new(),
        })
        .emit(AgentEvent::Text {
            text: "started the work".into(),
        });
    let engine = builder(&dir)
        .executor("limited", Arc::new(limited))
        .executor("slow", Arc::new(slow))
        .workflow(Workflow::new("turns").step(Step::prompt("go", "limited", "go")))
        .workflow(
            Workflow::new("slow")
                .step(Step::prompt("go", "slow", "go"))
                .with_timeout(Duration::from_millis(300)),
        )
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("turns")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.error.as_ref().unwrap().kind, "max_turns");
    let result = done.result.unwrap();
    assert_eq!(result.session_id.as_deref(), Some("ses-limit"));
    assert_eq!(result.cost_usd, Some(0.3));
    let step = &result.steps[0];
    assert!(step.partial);
    assert_eq!(step.output, "half done");

    let job = engine.submit(JobRequest::new("slow")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::TimedOut);
    let result = done.result.unwrap();
    let step = &result.steps[0];
    assert!(step.partial);
    assert_eq!(step.output, "started the work");
    assert_eq!(step.session_id.as_deref(), Some("ses-slow"));
}

#[tokio::test]
async fn structured_output_is_validated_and_reaches_later_templates() {
    let dir = tempfile::tempdir().unwrap();
    let schema = json!({
        "type": "object",
        "properties": {"verdict": {"enum": ["approve", "reject"]}, "files": {"type": "array"}},
        "required": ["verdict"]
    });
    let good = ScriptedExecutor::succeeding(r#"{"verdict": "approve", "files": ["a.rs"]}"#);
    let bad = ScriptedExecutor::succeeding(r#"{"verdict": "maybe"}"#);
    let prose = ScriptedExecutor::succeeding("I think it is fine");
    let next = ScriptedExecutor::succeeding("ok");
    let wf = |name: &str, agent: &str| {
        Workflow::new(name)
            .step(Step::prompt("review", agent, "review").with_output_schema(schema.clone()))
            .step(Step::prompt(
                "report",
                "next",
                "verdict {{steps.review.structured.verdict}} on {{steps.review.structured.files.0}}",
            ))
    };
    let engine = builder(&dir)
        .executor("good", Arc::new(good))
        .executor("bad", Arc::new(bad))
        .executor("prose", Arc::new(prose))
        .executor("next", Arc::new(next.clone()))
        .workflow(wf("good", "good"))
        .workflow(wf("bad", "bad"))
        .workflow(wf("prose", "prose"))
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("good")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    let steps = &done.result.as_ref().unwrap().steps;
    assert_eq!(
        steps[0].structured,
        Some(json!({"verdict": "approve", "files": ["a.rs"]}))
    );
    assert_eq!(next.requests()[0].prompt, "verdict approve on a.rs");

    for (name, why) in [("bad", "does not match"), ("prose", "not JSON")] {
        let job = engine.submit(JobRequest::new(name)).await.unwrap();
        let done = engine.wait(job.id, WAIT).await.unwrap();
        assert_eq!(done.status, JobStatus::Failed, "{name}");
        let error = done.error.unwrap();
        assert_eq!(error.kind, "invalid_output");
        assert!(error.message.contains(why), "{}", error.message);
        let step = &done.result.unwrap().steps[0];
        assert!(step.partial);
        assert!(!step.output.is_empty(), "the raw answer is kept");
    }
    // A schema that is not a schema is refused when the workflow is built.
    let e = Engine::builder()
        .executor("good", Arc::new(ScriptedExecutor::succeeding("x")))
        .workflow(Workflow::new("w").step(
            Step::prompt("s", "good", "x").with_output_schema(json!({"type": "no-such-type"})),
        ))
        .build()
        .unwrap_err();
    assert!(e.to_string().contains("output_schema"), "{e}");
}

#[tokio::test]
async fn a_six_field_schedule_starts_one_job_per_tick_and_skips_while_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let quick = ScriptedExecutor::succeeding("tick");
    let slow = ScriptedExecutor::hanging();
    let engine = builder(&dir)
        .executor("quick", Arc::new(quick.clone()))
        .executor("slow", Arc::new(slow.clone()))
        .workflow(
            Workflow::new("every-second")
                .step(Step::prompt("s", "quick", "{{guidance}}"))
                .with_schedule(Schedule::new("* * * * * *").guidance("from the schedule")),
        )
        .workflow(
            Workflow::new("overlapping")
                .step(Step::prompt("s", "slow", "x"))
                .with_schedule(Schedule::new("* * * * * *")),
        )
        .build()
        .unwrap();
    let mut feed = engine.feed(None);
    // Wait for three completed scheduled jobs.
    let mut completed = 0;
    tokio::time::timeout(WAIT, async {
        while let Some(aiwg_core::engine::FeedItem::Event { event, .. }) = feed.next().await {
            if matches!(
                event.kind,
                JobEventKind::Status {
                    to: JobStatus::Completed,
                    ..
                }
            ) {
                completed += 1;
                if completed == 3 {
                    break;
                }
            }
        }
    })
    .await
    .expect("three ticks");
    let page = engine
        .list(&JobQuery::default().workflow("every-second").limit(100))
        .await
        .unwrap();
    let mut ticks: Vec<_> = page
        .jobs
        .iter()
        .map(|j| {
            assert_eq!(j.trigger.source, "schedule");
            assert_eq!(j.guidance.as_deref(), Some("from the schedule"));
            j.trigger.extra["tick"].clone()
        })
        .collect();
    let n = ticks.len();
    ticks.sort();
    ticks.dedup();
    assert_eq!(ticks.len(), n, "one job per tick");
    // The overlapping workflow's first job never ends, so later ticks started nothing.
    let overlapping = engine
        .list(&JobQuery::default().workflow("overlapping").limit(100))
        .await
        .unwrap();
    assert_eq!(overlapping.jobs.len(), 1, "overlap: skip");
    assert_eq!(slow.calls(), 1);
}

/// Two instances on one store during a rolling deploy that adds a schedule before an existing
/// one: each tick still starts each schedule's job once. Keyed by the schedule's place in its
/// list, the old instance's first schedule and the new instance's first (another one) shared a
/// key, so the new schedule's tick started nothing and the old one's started twice (once under
/// each of its places).
#[tokio::test]
async fn instances_listing_schedules_in_another_order_start_each_tick_once() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn aiwg_core::store::JobStore> = Arc::new(aiwg_core::store::MemoryStore::new());
    let a = Schedule::new("* * * * * *")
        .guidance("a")
        .overlap(aiwg_core::schedule::Overlap::Allow);
    let added = Schedule::new("* * * * * *")
        .guidance("added")
        .overlap(aiwg_core::schedule::Overlap::Allow);
    let instance = |schedules: &[&Schedule]| {
        let mut wf = Workflow::new("twice").step(Step::prompt("s", "quick", "{{guidance}}"));
        for s in schedules {
            wf = wf.with_schedule((*s).clone());
        }
        builder(&dir)
            .store(store.clone())
            .executor("quick", Arc::new(ScriptedExecutor::succeeding("tick")))
            .workflow(wf)
            .build()
            .unwrap()
    };
    // The old instance's runners start first, so at each tick its job is submitted first.
    let one = instance(&[&a]);
    let two = instance(&[&added, &a]);
    // Wait for eight jobs to complete, on either instance.
    let mut feeds = futures_util::stream::select(one.feed(None), two.feed(None));
    let mut completed = 0;
    tokio::time::timeout(WAIT, async {
        while let Some(aiwg_core::engine::FeedItem::Event { event, .. }) = feeds.next().await {
            if matches!(
                event.kind,
                JobEventKind::Status {
                    to: JobStatus::Completed,
                    ..
                }
            ) {
                completed += 1;
                if completed == 8 {
                    break;
                }
            }
        }
    })
    .await
    .expect("eight scheduled jobs");
    let page = one
        .list(&JobQuery::default().workflow("twice").limit(100))
        .await
        .unwrap();
    let mut by_tick: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for j in &page.jobs {
        by_tick
            .entry(j.trigger.extra["tick"].clone())
            .or_default()
            .push(j.guidance.clone().unwrap());
    }
    // The last tick may still be being submitted; every earlier one is whole.
    by_tick.pop_last();
    assert!(by_tick.len() >= 2, "{by_tick:?}");
    for (tick, mut guidance) in by_tick {
        guidance.sort();
        assert_eq!(guidance, ["a", "added"], "tick {tick}");
    }
}

#[tokio::test]
async fn a_schedule_whose_project_no_submit_would_admit_is_refused_when_the_engine_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let with = |schedule: Schedule| {
        builder(&dir)
            .executor("quick", Arc::new(ScriptedExecutor::succeeding("x")))
            .workflow(
                Workflow::new("nightly")
                    .step(Step::prompt("s", "quick", "x"))
                    .with_schedule(Schedule::new("0 3 * * *"))
                    .with_schedule(schedule),
            )
    };
    let outside = tempfile::tempdir().unwrap();
    for (schedule, why) in [
        (
            Schedule::new("0 3 * * *").project_path(outside.path().display().to_string()),
            "outside the project root",
        ),
        (
            Schedule::new("0 3 * * *").project_path("no-such-dir"),
            "does not exist",
        ),
        (
            Schedule::new("0 3 * * *").project("unmapped"),
            "no project mapping matches",
        ),
    ] {
        let e = with(schedule.clone()).build().unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("workflow `nightly`")
                && text.contains("schedule 2:")
                && text.contains(why),
            "{text}"
        );
        // An instance that does not run schedules does not need their projects.
        with(schedule).run_schedules(false).build().unwrap();
    }
    std::fs::create_dir(dir.path().join("repo")).unwrap();
    with(Schedule::new("0 3 * * *").project_path("repo"))
        .build()
        .unwrap();
}
