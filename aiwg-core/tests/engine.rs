//! The engine with scripted and mock executors.

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::engine::EngineError;
use aiwg_core::test_util::{step_names, MockExecutor, ScriptedExecutor};
use aiwg_core::{
    AgentEvent, AgentResult, Capabilities, Engine, EngineBuilder, Health, JobEventKind, JobRequest,
    JobStatus, Parameter, PolicyError, ProjectPolicy, Step, SubmitError, Usage, Workflow,
};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(20);

struct Env {
    _dir: tempfile::TempDir,
    policy: ProjectPolicy,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    for p in ["a", "b", "c"] {
        std::fs::create_dir(dir.path().join(p)).unwrap();
    }
    let policy = ProjectPolicy::builder().root(dir.path()).build().unwrap();
    Env { _dir: dir, policy }
}

fn builder(env: &Env) -> EngineBuilder {
    Engine::builder()
        .policy(env.policy.clone())
        .poll_interval(Duration::from_millis(10))
        .retry_backoff(Duration::from_millis(5), Duration::from_millis(20))
}

fn one_step(name: &str, agent: &str) -> Workflow {
    Workflow::new(name).step(Step::prompt("run", agent, "do {{guidance}}"))
}

/// A command step reaches its executor as an argument vector, each argument rendered on its
/// own (a parameter with a space stays one argument), with no prompt, its job's id and its
/// step's name, and the job's parameters.
#[tokio::test]
async fn a_command_step_reaches_its_executor_as_rendered_arguments() {
    let env = env();
    let exec = ScriptedExecutor::succeeding("logged");
    let engine = builder(&env)
        .executor("sh", Arc::new(exec.clone()))
        .workflow(
            Workflow::new("log")
                .param(Parameter::new("rev").required())
                .step(Step::command("show", "sh", ["git", "log", "-1", "{{rev}}"])),
        )
        .build()
        .unwrap();
    let job = engine
        .submit(
            JobRequest::new("log")
                .project_path("a")
                .param("rev", "main two"),
        )
        .await
        .unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    let reqs = exec.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(
        req.command.as_deref(),
        Some(&["git", "log", "-1", "main two"].map(String::from)[..])
    );
    assert_eq!(req.prompt, "");
    assert_eq!((req.job_id, req.step.as_str()), (job.id, "show"));
    assert_eq!(req.params.get("rev").map(String::as_str), Some("main two"));
}

/// User text never becomes an option of a command: a guidance starting with `-` is refused
/// at submit when a command step starts an argument with it, and a value put into an argument
/// at run time (here an earlier step's output) that makes it start with `-` fails the job
/// before the program runs. Flags the workflow's author wrote, and parameters whose pattern
/// admits a leading `-`, go through.
#[tokio::test]
async fn user_text_never_becomes_an_option_of_a_command() {
    let env = env();
    let exec = ScriptedExecutor::succeeding("--output=/tmp/x");
    let engine = builder(&env)
        .executor("sh", Arc::new(exec.clone()))
        .workflow(Workflow::new("log").step(Step::command(
            "show",
            "sh",
            ["git", "log", "--grep={{guidance}}", "{{ guidance }}"],
        )))
        .workflow(
            Workflow::new("chain")
                .step(Step::command("first", "sh", ["true"]))
                .step(Step::command(
                    "second",
                    "sh",
                    ["echo", "{{steps.first.output}}"],
                )),
        )
        .workflow(
            Workflow::new("signed")
                .param(Parameter::new("n").with_pattern("-?[0-9]+"))
                .step(Step::command("add", "sh", ["expr", "{{n}}", "+", "1"])),
        )
        .build()
        .unwrap();
    let refused = engine
        .submit(JobRequest::new("log").guidance("--output=/tmp/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SubmitError::Invalid(why) if why.contains("may not look like an option")),
        "{refused:?}"
    );
    let job = engine
        .submit(JobRequest::new("log").guidance("fix it"))
        .await
        .unwrap();
    assert_eq!(
        engine.wait(job.id, WAIT).await.unwrap().status,
        JobStatus::Completed
    );
    assert_eq!(
        exec.requests()[0].command.as_deref(),
        Some(&["git", "log", "--grep=fix it", "fix it"].map(String::from)[..])
    );

    let job = engine.submit(JobRequest::new("chain")).await.unwrap();
    let failed = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    let error = failed.error.unwrap();
    assert_eq!(error.kind, "invalid_request");
    assert!(
        error.message.contains("step `second`")
            && error.message.contains("may not look like an option"),
        "{}",
        error.message
    );
    assert_eq!(
        exec.requests().len(),
        2,
        "the second step's program never ran"
    );

    let job = engine
        .submit(JobRequest::new("signed").param("n", "-3"))
        .await
        .unwrap();
    assert_eq!(
        engine.wait(job.id, WAIT).await.unwrap().status,
        JobStatus::Completed
    );
    assert_eq!(
        exec.requests()[2].command.as_deref(),
        Some(&["expr", "-3", "+", "1"].map(String::from)[..])
    );
}

#[tokio::test]
async fn a_two_step_job_completes_with_rendered_prompts_events_and_result() {
    let env = env();
    let exec = ScriptedExecutor::succeeding("step output")
        .session("ses-1")
        .cost(0.5, Usage::new(10, 20))
        .emit(AgentEvent::Text {
            text: "thinking".into(),
        });
    let engine = builder(&env)
        .executor("agent", Arc::new(exec.clone()))
        .workflow(
            Workflow::new("review")
                .param(Parameter::new("target").required())
                .param(Parameter::new("depth").with_default("2"))
                .step(Step::prompt("draft", "agent", "Review {{target}} at {{depth}}: {{guidance}} in {{project_path}} for {{trigger.source}}"))
                .step(Step::prompt("check", "agent", "Check: {{steps.draft.output}}").resuming()),
        )
        .build()
        .unwrap();
    let job = engine
        .submit(
            JobRequest::new("review")
                .project_path("a")
                .param("target", "api")
                .guidance("be strict $(rm -rf /)"),
        )
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.params["depth"], "2");
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    assert_eq!(done.attempt, 1);
    let result = done.result.clone().unwrap();
    assert_eq!(result.summary, "step output");
    assert_eq!(result.steps.len(), 2);
    assert_eq!(result.cost_usd, Some(1.0));
    assert_eq!(result.usage.unwrap().output_tokens, 40);
    assert_eq!(result.session_id.as_deref(), Some("ses-1"));
    assert_eq!(step_names(&done.progress.completed), ["draft", "check"]);
    assert!(done.started_at.is_some() && done.finished_at.is_some());

    let reqs = exec.requests();
    let project = std::fs::canonicalize(env.policy.roots()[0].join("a")).unwrap();
    assert_eq!(
        reqs[0].prompt,
        format!(
            "Review api at 2: be strict $(rm -rf /) in {} for api",
            project.display()
        )
    );
    assert_eq!(reqs[0].resume_session, None);
    assert_eq!(reqs[1].prompt, "Check: step output");
    assert_eq!(reqs[1].resume_session.as_deref(), Some("ses-1"));
    assert_eq!(reqs[0].project_path, project);
    // Each run names its job and step (the executor's logs and sessions key on them).
    assert_eq!((reqs[0].job_id, reqs[0].step.as_str()), (job.id, "draft"));
    assert_eq!((reqs[1].job_id, reqs[1].step.as_str()), (job.id, "check"));
    assert_eq!(reqs[0].command, None);

    let events: Vec<_> = engine.subscribe(job.id, 0).await.unwrap().collect().await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let names: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    assert_eq!(
        names,
        [
            "status",
            "status",
            "step.started",
            "agent",
            "step.finished",
            "step.started",
            "agent",
            "step.finished",
            "status"
        ]
    );
    assert!(events.last().unwrap().is_terminal());
    // Replay from a sequence number skips what the client has.
    let tail: Vec<_> = engine.subscribe(job.id, 7).await.unwrap().collect().await;
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 9]);
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_live_subscriber_sees_history_then_live_events_and_the_end() {
    let env = env();
    let exec = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .executor("h", Arc::new(exec.clone()))
        .workflow(one_step("w", "h"))
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(exec.wait_started(1, WAIT).await);
    let mut stream = engine.subscribe(job.id, 0).await.unwrap();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(
            tokio::time::timeout(WAIT, stream.next())
                .await
                .unwrap()
                .unwrap()
                .kind
                .name(),
        );
    }
    assert_eq!(kinds, ["status", "status", "step.started"]);
    let canceller = engine.clone();
    tokio::spawn(async move { canceller.cancel(job.id).await });
    let rest: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .unwrap();
    let last = rest.last().unwrap();
    assert!(matches!(
        last.kind,
        JobEventKind::Status {
            to: JobStatus::Cancelled,
            ..
        }
    ));
    engine.shutdown(Duration::from_secs(1)).await;
}

/// A request that says nothing of its trigger is the API's, and such jobs share one trigger, as
/// the jobs of one API key do; the same workflow's jobs share its name, and one project's jobs
/// its path.
#[tokio::test]
async fn jobs_share_what_they_have_in_common_and_keep_what_they_do_not() {
    let env = env();
    let engine = builder(&env)
        .workers(1)
        .executor("hang", Arc::new(ScriptedExecutor::hanging()))
        .workflow(one_step("w", "hang"))
        .build()
        .unwrap();
    let a = engine.submit(JobRequest::new("w")).await.unwrap();
    let b = engine.submit(JobRequest::new("w")).await.unwrap();
    let forge = aiwg_core::TriggerInfo::new("github");
    let c = engine
        .submit(
            JobRequest::new("w")
                .trigger(forge.clone())
                .project_path("b"),
        )
        .await
        .unwrap();
    assert_eq!(a.trigger.source, "api");
    assert!(Arc::ptr_eq(&a.trigger, &b.trigger));
    assert_eq!(*c.trigger, forge);
    assert!(Arc::ptr_eq(&a.workflow, &c.workflow));
    assert!(Arc::ptr_eq(&a.project_path, &b.project_path));
    assert!(c.project_path.ends_with("/b"));
    // The HTTP API's triggers name the key: one trigger per key.
    let keyed = |actor: &str| {
        let mut t = aiwg_core::TriggerInfo::new("api");
        t.actor = Some(actor.to_owned());
        JobRequest::new("w").trigger(t)
    };
    let ci = engine.submit(keyed("ci")).await.unwrap();
    let ci_again = engine.submit(keyed("ci")).await.unwrap();
    let bot = engine.submit(keyed("bot")).await.unwrap();
    assert!(Arc::ptr_eq(&ci.trigger, &ci_again.trigger));
    assert!(!Arc::ptr_eq(&ci.trigger, &bot.trigger));
    assert!(!Arc::ptr_eq(&ci.trigger, &a.trigger));
    assert_eq!(
        (ci.trigger.actor.as_deref(), bot.trigger.actor.as_deref()),
        (Some("ci"), Some("bot"))
    );
    // What the store answers later is the same.
    let read = engine.get(a.id).await.unwrap();
    assert_eq!(read.trigger.source, "api");
    assert_eq!(&*read.workflow, "w");
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn higher_priority_runs_first_and_fifo_within_a_priority() {
    let env = env();
    let blocker = ScriptedExecutor::hanging();
    let worker = ScriptedExecutor::succeeding("ok");
    let engine = builder(&env)
        .workers(1)
        .executor("block", Arc::new(blocker.clone()))
        .executor("work", Arc::new(worker.clone()))
        .workflow(one_step("block", "block"))
        .workflow(one_step("work", "work"))
        .build()
        .unwrap();
    let b = engine.submit(JobRequest::new("block")).await.unwrap();
    assert!(blocker.wait_started(1, WAIT).await);
    let mut ids = Vec::new();
    for (g, p) in [("low", 0), ("high-1", 10), ("mid", 5), ("high-2", 10)] {
        ids.push((
            g,
            engine
                .submit(JobRequest::new("work").guidance(g).priority(p))
                .await
                .unwrap()
                .id,
        ));
    }
    engine.cancel(b.id).await.unwrap();
    for (_, id) in &ids {
        assert_eq!(
            engine.wait(*id, WAIT).await.unwrap().status,
            JobStatus::Completed
        );
    }
    let order: Vec<String> = worker.requests().iter().map(|r| r.prompt.clone()).collect();
    assert_eq!(order, ["do high-1", "do high-2", "do mid", "do low"]);
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn per_project_concurrency_is_enforced_while_other_projects_run() {
    let env = env();
    let exec = ScriptedExecutor::succeeding("ok").delay(Duration::from_millis(30));
    let other = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .workers(4)
        .per_project_concurrency(1)
        .executor("x", Arc::new(exec.clone()))
        .executor("h", Arc::new(other.clone()))
        .workflow(one_step("w", "x"))
        .workflow(one_step("hang", "h"))
        .build()
        .unwrap();
    // A job that hangs in project b does not block project a.
    let hang = engine
        .submit(JobRequest::new("hang").project_path("b"))
        .await
        .unwrap();
    assert!(other.wait_started(1, WAIT).await);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            engine
                .submit(JobRequest::new("w").project_path("a"))
                .await
                .unwrap()
                .id,
        );
    }
    for id in ids {
        assert_eq!(
            engine.wait(id, WAIT).await.unwrap().status,
            JobStatus::Completed
        );
    }
    assert_eq!(
        exec.max_running(),
        1,
        "project a ran more than one job at once"
    );
    assert_eq!(exec.calls(), 4);
    engine.cancel(hang.id).await.unwrap();
    engine.shutdown(Duration::from_secs(1)).await;
}

/// A workflow's timeout past what an agent's request may last (30 days) is refused when the
/// engine is built, with the reason; a step's timeout meant as "never" (configuration accepts
/// any number of seconds) is bounded by the job's, and the job runs.
#[tokio::test]
async fn timeouts_past_the_clocks_range_are_refused_or_bounded() {
    let env = env();
    let forever = Duration::from_secs(u64::MAX);
    let refused = builder(&env)
        .executor("a", Arc::new(ScriptedExecutor::succeeding("out")))
        .workflow(
            Workflow::new("patient")
                .with_timeout(forever)
                .step(Step::prompt("s", "a", "x")),
        )
        .build()
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("patient") && refused.contains("timeout must be between 1 ms and 30 days"),
        "{refused}"
    );
    let engine = builder(&env)
        .executor("a", Arc::new(ScriptedExecutor::succeeding("out")))
        .workflow(
            Workflow::new("patient")
                .with_timeout(aiwg_core::executor::MAX_TIMEOUT)
                .step(Step::prompt("s", "a", "x").with_timeout(forever)),
        )
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("patient")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
}

#[tokio::test]
async fn step_timeout_and_job_timeout_end_timed_out_with_the_executor_cancelled() {
    let env = env();
    let exec = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .executor("h", Arc::new(exec.clone()))
        .workflow(
            Workflow::new("step")
                .step(Step::prompt("s", "h", "x").with_timeout(Duration::from_millis(50))),
        )
        .workflow(
            Workflow::new("job")
                .with_timeout(Duration::from_millis(60))
                .step(Step::prompt("s", "h", "x")),
        )
        .build()
        .unwrap();
    let a = engine.submit(JobRequest::new("step")).await.unwrap();
    let a = engine.wait(a.id, WAIT).await.unwrap();
    assert_eq!(a.status, JobStatus::TimedOut);
    assert!(
        a.error.as_ref().unwrap().message.contains("step `s`"),
        "{:?}",
        a.error
    );
    let b = engine.submit(JobRequest::new("job")).await.unwrap();
    let b = engine.wait(b.id, WAIT).await.unwrap();
    assert_eq!(b.status, JobStatus::TimedOut);
    assert!(
        b.error.as_ref().unwrap().message.contains("job ran past"),
        "{:?}",
        b.error
    );
    assert!(!b.dead_letter);
    assert_eq!(
        exec.cancelled(),
        2,
        "the executor must see the cancellation"
    );
    assert_eq!(exec.running(), 0);
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_dead_letter() {
    let env = env();
    let flaky = ScriptedExecutor::succeeding("ok").fail_times(2);
    let broken = ScriptedExecutor::succeeding("never").fail_times(usize::MAX);
    let engine = builder(&env)
        .executor("flaky", Arc::new(flaky.clone()))
        .executor("broken", Arc::new(broken.clone()))
        .workflow(one_step("flaky", "flaky").with_max_attempts(3))
        .workflow(one_step("broken", "broken").with_max_attempts(3))
        .build()
        .unwrap();
    let f = engine.submit(JobRequest::new("flaky")).await.unwrap();
    let f = engine.wait(f.id, WAIT).await.unwrap();
    assert_eq!(f.status, JobStatus::Completed);
    assert_eq!(f.attempt, 3);
    assert!(!f.dead_letter);
    assert_eq!(flaky.calls(), 3);

    let b = engine.submit(JobRequest::new("broken")).await.unwrap();
    let b = engine.wait(b.id, WAIT).await.unwrap();
    assert_eq!(b.status, JobStatus::Failed);
    assert!(b.dead_letter);
    assert_eq!(b.attempt, 3);
    assert_eq!(broken.calls(), 3);
    assert_eq!(b.error.as_ref().unwrap().kind, "agent_failed");
    let statuses: Vec<_> = b.history.iter().map(|h| h.status).collect();
    use JobStatus::*;
    assert_eq!(
        statuses,
        [Queued, Running, Queued, Running, Queued, Running, Failed]
    );
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn cancel_of_queued_running_finished_and_unknown_jobs() {
    let env = env();
    let exec = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .workers(1)
        .executor("h", Arc::new(exec.clone()))
        .workflow(one_step("w", "h"))
        .build()
        .unwrap();
    let running = engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(exec.wait_started(1, WAIT).await);
    let queued = engine.submit(JobRequest::new("w")).await.unwrap();

    let q = engine.cancel(queued.id).await.unwrap();
    assert_eq!(q.status, JobStatus::Cancelled);

    let r = engine.cancel(running.id).await.unwrap();
    assert_eq!(r.status, JobStatus::Cancelled);
    assert_eq!(
        exec.cancelled(),
        1,
        "the running executor saw the cancellation"
    );
    assert_eq!(
        exec.running(),
        0,
        "cancel returned only after the executor returned"
    );
    assert_eq!(exec.calls(), 1, "the cancelled queued job never ran");

    assert!(matches!(
        engine.cancel(running.id).await,
        Err(EngineError::AlreadyFinished {
            status: JobStatus::Cancelled,
            ..
        })
    ));
    assert!(matches!(
        engine.cancel(aiwg_core::JobId::new()).await,
        Err(EngineError::NotFound(_))
    ));
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idempotency_keys_return_the_same_job_or_conflict() {
    let env = env();
    let engine = builder(&env)
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(one_step("w", "x"))
        .build()
        .unwrap();
    let req = JobRequest::new("w").guidance("g").idempotency_key("abc");
    let a = engine.submit(req.clone()).await.unwrap();
    let b = engine.submit(req.clone()).await.unwrap();
    assert_eq!(a.id, b.id);
    assert!(matches!(
        engine.submit(req.guidance("other")).await,
        Err(SubmitError::IdempotencyConflict { existing }) if existing == a.id
    ));
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_full_queue_is_a_distinct_error() {
    let env = env();
    let exec = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .workers(1)
        .queue_capacity(2)
        .executor("h", Arc::new(exec.clone()))
        .workflow(one_step("w", "h"))
        .build()
        .unwrap();
    engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(exec.wait_started(1, WAIT).await);
    engine.submit(JobRequest::new("w")).await.unwrap();
    engine.submit(JobRequest::new("w")).await.unwrap();
    assert!(matches!(
        engine.submit(JobRequest::new("w")).await,
        Err(SubmitError::QueueFull { capacity: 2 })
    ));
    let stats = engine.queue_stats().await.unwrap();
    assert_eq!(
        (stats.queued, stats.running, stats.workers, stats.busy),
        (2, 1, 1, 1)
    );
    engine.shutdown(Duration::ZERO).await;
}

#[tokio::test]
async fn submit_rejects_bad_requests_with_distinct_errors() {
    let env = env();
    let engine = builder(&env)
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(
            Workflow::new("w")
                .param(Parameter::new("need").required())
                .step(Step::prompt("s", "x", "{{need}}")),
        )
        .build()
        .unwrap();
    assert!(matches!(
        engine.submit(JobRequest::new("nope")).await,
        Err(SubmitError::UnknownWorkflow(w)) if w == "nope"
    ));
    assert!(matches!(
        engine.submit(JobRequest::new("w")).await,
        Err(SubmitError::Params(aiwg_core::ParamError::Missing { .. }))
    ));
    assert!(matches!(
        engine
            .submit(JobRequest::new("w").param("need", "1").param("extra", "2"))
            .await,
        Err(SubmitError::Params(aiwg_core::ParamError::Unknown { .. }))
    ));
    assert!(matches!(
        engine
            .submit(
                JobRequest::new("w")
                    .param("need", "1")
                    .project_path("../..")
            )
            .await,
        Err(SubmitError::Project(PolicyError::DotDotEscape(_)))
    ));
    assert!(matches!(
        engine
            .submit(JobRequest::new("w").param("need", "1").project_path("/etc"))
            .await,
        Err(SubmitError::Project(PolicyError::OutsideRoot(_)))
    ));
    assert!(matches!(
        engine
            .submit(
                JobRequest::new("w")
                    .param("need", "1")
                    .guidance("x".repeat(70_000))
            )
            .await,
        Err(SubmitError::Invalid(_))
    ));
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn build_refuses_unknown_agents_and_bad_settings() {
    let env = env();
    let err = builder(&env)
        .executor("x", Arc::new(ScriptedExecutor::succeeding("")))
        .workflow(one_step("w", "ghost"))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("ghost"), "{err}");
    let err = builder(&env).workers(0).build().unwrap_err();
    assert!(err.to_string().contains("workers"), "{err}");
}

#[tokio::test]
async fn graceful_shutdown_lets_short_jobs_finish_and_cancels_the_rest() {
    let env = env();
    let short = ScriptedExecutor::succeeding("ok").delay(Duration::from_millis(50));
    let hang = ScriptedExecutor::hanging();
    let engine = builder(&env)
        .workers(2)
        .executor("short", Arc::new(short.clone()))
        .executor("hang", Arc::new(hang.clone()))
        .workflow(one_step("short", "short"))
        .workflow(one_step("hang", "hang"))
        .build()
        .unwrap();
    let s = engine.submit(JobRequest::new("short")).await.unwrap();
    let h = engine.submit(JobRequest::new("hang")).await.unwrap();
    assert!(short.wait_started(1, WAIT).await && hang.wait_started(1, WAIT).await);
    engine.shutdown(Duration::from_millis(300)).await;
    assert_eq!(engine.get(s.id).await.unwrap().status, JobStatus::Completed);
    let h = engine.get(h.id).await.unwrap();
    assert_eq!(h.status, JobStatus::Cancelled);
    assert_eq!(h.error.unwrap().kind, "shutdown");
    assert_eq!(hang.running(), 0);
    assert!(matches!(
        engine.submit(JobRequest::new("short")).await,
        Err(SubmitError::ShuttingDown)
    ));
}

#[tokio::test]
async fn a_mock_executor_sees_the_rendered_request() {
    let env = env();
    let mut mock = MockExecutor::new();
    mock.expect_execute()
        .withf(|req, _, _| req.prompt == "do the thing" && req.step == "run")
        .times(1)
        .returning(|_, events, _| {
            events.emit(AgentEvent::Text {
                text: "hello".into(),
            });
            Ok(AgentResult::text("mocked").with_exit_code(0))
        });
    mock.expect_capabilities().returning(Capabilities::default);
    mock.expect_kind().return_const("mock");
    mock.expect_health().returning(Health::healthy);
    let engine = builder(&env)
        .executor("m", Arc::new(mock))
        .workflow(one_step("w", "m"))
        .build()
        .unwrap();
    let job = engine
        .submit(JobRequest::new("w").guidance("the thing"))
        .await
        .unwrap();
    let job = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.result.unwrap().steps[0].exit_code, Some(0));
    let events = engine.store().events(job.id, 0).await.unwrap();
    assert!(events.iter().any(|e| matches!(&e.kind, JobEventKind::Agent { event: AgentEvent::Text { text }, .. } if text == "hello")));
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_noop_jobs_each_finish_exactly_once() {
    let env = env();
    let exec = ScriptedExecutor::succeeding("");
    let engine = builder(&env)
        .workers(16)
        .queue_capacity(20_000)
        .executor("noop", Arc::new(exec.clone()))
        .workflow(one_step("noop", "noop"))
        .build()
        .unwrap();
    let mut all = engine.subscribe_all();
    let counter = tokio::spawn(async move {
        let mut terminal = std::collections::HashMap::<aiwg_core::JobId, u32>::new();
        let mut total = 0;
        while total < 10_000 {
            match all.recv().await {
                Ok(ev) if ev.is_terminal() => {
                    *terminal.entry(ev.job_id).or_default() += 1;
                    total += 1;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        terminal
    });
    let mut handles = Vec::new();
    for _ in 0..10_000 {
        let e = engine.clone();
        handles.push(tokio::spawn(async move {
            e.submit(JobRequest::new("noop").guidance("x"))
                .await
                .unwrap()
                .id
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    for id in &ids {
        let job = engine.wait(*id, Duration::from_secs(120)).await.unwrap();
        assert_eq!(job.status, JobStatus::Completed);
        assert_eq!(job.attempt, 1);
        let terminal = engine
            .store()
            .events(*id, 0)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.is_terminal())
            .count();
        assert_eq!(terminal, 1);
    }
    assert_eq!(exec.calls(), 10_000, "every job ran exactly once");
    // The live bus may drop events under lag, but never duplicates a terminal one.
    if let Ok(Ok(seen)) = tokio::time::timeout(Duration::from_secs(5), counter).await {
        assert!(seen.values().all(|n| *n == 1));
    }
    engine.shutdown(Duration::from_secs(1)).await;
}

/// An agent that floods its sink: the job's output is cut at `max_output_bytes`, long lines
/// are cut at `max_line_bytes`, and one `output_truncated` event says so.
#[tokio::test]
async fn a_flooding_agent_is_cut_at_the_output_budget() {
    let env = env();
    let mut mock = MockExecutor::new();
    mock.expect_execute().times(1).returning(|_, events, _| {
        events.emit(AgentEvent::Log {
            stream: aiwg_core::LogStream::Stdout,
            line: "z".repeat(10_000),
        });
        for i in 0..200_000 {
            events.emit(AgentEvent::Log {
                stream: aiwg_core::LogStream::Stdout,
                line: format!("y {i}"),
            });
        }
        Ok(AgentResult::text("flooded").with_exit_code(0))
    });
    mock.expect_capabilities().returning(Capabilities::default);
    mock.expect_kind().return_const("mock");
    mock.expect_health().returning(Health::healthy);
    let budget = 256 * 1024;
    let engine = builder(&env)
        .executor("m", Arc::new(mock))
        .workflow(one_step("w", "m"))
        .max_output_bytes(budget)
        .max_line_bytes(1024)
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    let job = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    let events = engine.store().events(job.id, 0).await.unwrap();
    let logs: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            JobEventKind::Agent {
                event: AgentEvent::Log { line, .. },
                ..
            } => Some(line.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        logs[0].len() < 1100 && logs[0].ends_with("[8976 more bytes cut]"),
        "{}",
        logs[0].len()
    );
    assert!(
        logs.len() < 3_000,
        "{} output events kept of 200 001",
        logs.len()
    );
    let kept: usize = logs.iter().map(|l| l.len()).sum();
    assert!(kept <= budget, "{kept} bytes kept");
    let truncated: Vec<_> = events
        .iter()
        .filter(|e| matches!(e.kind, JobEventKind::OutputTruncated { .. }))
        .collect();
    assert_eq!(truncated.len(), 1);
    assert_eq!(truncated[0].kind.name(), "output_truncated");
    engine.shutdown(Duration::from_secs(1)).await;
}

/// Waits until `id` has the status `want` (following its events), or panics after `WAIT`.
async fn reaches(engine: &Engine, id: aiwg_core::JobId, want: JobStatus) {
    let mut events = engine.subscribe(id, 0).await.unwrap();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev.kind, JobEventKind::Status { to, .. } if to == want) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(found, "job {id} never reached {want}");
}

fn on_pr(workflow: &str, pr: u64) -> JobRequest {
    let mut t = aiwg_core::TriggerInfo::new("github");
    t.repo = Some("octo/app".into());
    t.pr = Some(pr);
    JobRequest::new(workflow).trigger(t)
}

/// `concurrency: { group: "{{trigger.repo}}#{{trigger.pr}}" }` with each `on_conflict`.
#[tokio::test]
async fn concurrency_groups_queue_cancel_running_or_replace_queued() {
    use aiwg_core::OnConflict;

    let env = env();
    let agent = ScriptedExecutor::hanging();
    let group = "{{trigger.repo}}#{{trigger.pr}}";
    let engine = builder(&env)
        .workers(4)
        .executor("a", Arc::new(agent.clone()))
        .workflow(one_step("queue", "a").with_concurrency(group, OnConflict::Queue))
        .workflow(one_step("cancel", "a").with_concurrency(group, OnConflict::CancelRunning))
        .workflow(one_step("replace", "a").with_concurrency(group, OnConflict::ReplaceQueued))
        .build()
        .unwrap();

    // queue: the second job of PR 1 waits while the first runs; PR 2 is another group.
    let q1 = engine.submit(on_pr("queue", 1)).await.unwrap();
    assert_eq!(q1.concurrency_group.as_deref(), Some("octo/app#1"));
    reaches(&engine, q1.id, JobStatus::Running).await;
    let q2 = engine.submit(on_pr("queue", 1)).await.unwrap();
    let other = engine.submit(on_pr("queue", 2)).await.unwrap();
    reaches(&engine, other.id, JobStatus::Running).await;
    assert_eq!(engine.get(q2.id).await.unwrap().status, JobStatus::Queued);
    engine.cancel(q1.id).await.unwrap();
    reaches(&engine, q2.id, JobStatus::Running).await;
    engine.cancel(q2.id).await.unwrap();
    engine.cancel(other.id).await.unwrap();

    // cancel_running: a new job of PR 3 cancels the running one and runs.
    let c1 = engine.submit(on_pr("cancel", 3)).await.unwrap();
    reaches(&engine, c1.id, JobStatus::Running).await;
    let c2 = engine.submit(on_pr("cancel", 3)).await.unwrap();
    reaches(&engine, c1.id, JobStatus::Cancelled).await;
    let c1_done = engine.get(c1.id).await.unwrap();
    assert!(
        c1_done
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("concurrency group"),
        "{:?}",
        c1_done.error
    );
    reaches(&engine, c2.id, JobStatus::Running).await;
    engine.cancel(c2.id).await.unwrap();

    // replace_queued: the running job of PR 4 goes on; the queued one is replaced.
    let r1 = engine.submit(on_pr("replace", 4)).await.unwrap();
    reaches(&engine, r1.id, JobStatus::Running).await;
    let r2 = engine.submit(on_pr("replace", 4)).await.unwrap();
    let r3 = engine.submit(on_pr("replace", 4)).await.unwrap();
    reaches(&engine, r2.id, JobStatus::Cancelled).await;
    assert!(engine
        .get(r2.id)
        .await
        .unwrap()
        .error
        .unwrap()
        .message
        .contains("replaced"));
    assert_eq!(engine.get(r1.id).await.unwrap().status, JobStatus::Running);
    assert_eq!(engine.get(r3.id).await.unwrap().status, JobStatus::Queued);
    engine.cancel(r1.id).await.unwrap();
    reaches(&engine, r3.id, JobStatus::Running).await;
    engine.cancel(r3.id).await.unwrap();
    engine.shutdown(Duration::from_secs(1)).await;
}

/// The feed (`GET /events`): every job's events in one order; a subscriber that reads too
/// slowly holds nothing but its cursor and gets a reset instead of growing memory; a cursor
/// resumes exactly; the feed ends at shutdown.
#[tokio::test]
async fn the_feed_resumes_resets_a_slow_reader_and_ends_at_shutdown() {
    use aiwg_core::engine::{FeedItem, ResetReason};
    let env = env();
    let engine = builder(&env)
        .executor("e", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(one_step("w", "e"))
        .feed_capacity(8, 1024 * 1024)
        .build()
        .unwrap();
    let start = engine.feed_cursor();
    let mut slow = engine.feed(None);
    let mut ids = Vec::new();
    for _ in 0..4 {
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        engine.wait(job.id, WAIT).await.unwrap();
        ids.push(job.id);
    }
    // Four jobs of five events each: twenty events, of which the feed keeps the last eight.
    let now = engine.feed_cursor();
    assert_eq!(now.seq, start.seq + 20);
    let first = tokio::time::timeout(WAIT, slow.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        FeedItem::Reset {
            cursor: now,
            reason: ResetReason::Expired
        },
        "the slow reader is told to reload"
    );
    // From the reset's cursor on, nothing is missed or repeated.
    let job = engine.submit(JobRequest::new("w")).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        match tokio::time::timeout(WAIT, slow.next())
            .await
            .unwrap()
            .unwrap()
        {
            FeedItem::Event { cursor, event } => {
                assert_eq!(event.job_id, job.id);
                assert_eq!(cursor.seq, now.seq + seqs.len() as u64 + 1);
                seqs.push(event.seq);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    // A cursor still in the ring resumes after it.
    let kept = aiwg_core::engine::FeedCursor {
        seq: now.seq - 3,
        ..now
    };
    let mut resumed = engine.feed(Some(kept));
    let Some(FeedItem::Event { cursor, event }) = resumed.next().await else {
        panic!("an event")
    };
    assert_eq!(cursor.seq, now.seq - 2);
    assert_eq!(event.job_id, ids[3]);
    // Shutdown ends every feed once it is read.
    engine.shutdown(Duration::from_secs(1)).await;
    let rest: Vec<_> = tokio::time::timeout(WAIT, resumed.collect::<Vec<_>>())
        .await
        .expect("the feed ends at shutdown");
    assert_eq!(
        rest.len(),
        7,
        "the two other events of job 4 and the five of job 5"
    );
}

/// Records what observers are shown: each event's name with the job's status and completed
/// steps at that moment.
#[derive(Default)]
struct Seen(std::sync::Mutex<Vec<(&'static str, JobStatus, Vec<String>)>>);

#[async_trait::async_trait]
impl aiwg_core::JobObserver for Seen {
    async fn on_event(&self, job: &aiwg_core::Job, event: &aiwg_core::JobEvent) {
        self.0.lock().unwrap().push((
            event.kind.name(),
            job.status,
            step_names(&job.progress.completed)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        ));
    }
}

/// The last step's `step_finished` is written with the outcome, but observers still see it
/// first, with the job as the step left it (`running`, the step completed), then the end.
#[tokio::test]
async fn observers_see_the_last_step_finish_before_the_end_with_the_job_still_running() {
    let env = env();
    let seen = Arc::new(Seen::default());
    let engine = builder(&env)
        .executor("agent", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(
            Workflow::new("two")
                .step(Step::prompt("first", "agent", "one"))
                .step(Step::prompt("second", "agent", "two")),
        )
        .observer(seen.clone())
        .build()
        .unwrap();
    let job = engine.submit(JobRequest::new("two")).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Completed);
    let seen = seen.0.lock().unwrap().clone();
    let after_start: Vec<_> = seen
        .iter()
        .skip_while(|(_, status, _)| *status != JobStatus::Running)
        .skip(1)
        .cloned()
        .collect();
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        after_start,
        [
            ("step.finished", JobStatus::Running, s(&["first"])),
            ("step.finished", JobStatus::Running, s(&["first", "second"])),
            ("status", JobStatus::Completed, s(&["first", "second"])),
        ],
        "everything observers saw: {seen:?}"
    );
    let kinds: Vec<_> = engine
        .store()
        .events(job.id, 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.kind.name())
        .collect();
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "step.started",
            "step.finished",
            "step.started",
            "step.finished",
            "status"
        ]
    );
}

/// The project policy is checked again when a job starts, before its agent gets the
/// directory: one admitted at submit and swapped since for a symlink (out of the root, or to
/// another project inside it) fails the job with `project_rejected`, and no agent runs. The
/// jobs wait for an approval before their only step, while their projects are swapped.
#[tokio::test]
async fn a_project_swapped_for_a_symlink_after_the_submit_fails_its_job_before_any_agent_runs() {
    let env = env();
    let root = env.policy.roots()[0].clone();
    let outside = tempfile::tempdir().unwrap();
    let exec = ScriptedExecutor::succeeding("ran");
    let engine = builder(&env)
        .executor("x", Arc::new(exec.clone()))
        .workflow(Workflow::new("gated").step(Step::prompt("run", "x", "go").requiring_approval()))
        .build()
        .unwrap();
    let mut jobs = Vec::new();
    for project in ["a", "b"] {
        let job = engine
            .submit(JobRequest::new("gated").project_path(project))
            .await
            .unwrap();
        reaches(&engine, job.id, JobStatus::AwaitingApproval).await;
        jobs.push(job);
    }
    std::fs::rename(root.join("a"), root.join("a-was")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("a")).unwrap();
    std::fs::rename(root.join("b"), root.join("b-was")).unwrap();
    std::os::unix::fs::symlink(root.join("c"), root.join("b")).unwrap();
    for job in &jobs {
        engine.approve(job.id, "alice", "api").await.unwrap();
        let done = engine.wait(job.id, WAIT).await.unwrap();
        assert_eq!(done.status, JobStatus::Failed, "{}", done.project_path);
        let error = done.error.unwrap();
        assert_eq!(error.kind, "project_rejected", "{}", error.message);
        assert_eq!(done.attempt, 1, "not retried");
    }
    // A new submit for the swapped project is refused at once, or (answered from the last
    // second's admissions) fails the same way when it starts.
    match engine
        .submit(JobRequest::new("gated").project_path("a"))
        .await
    {
        Err(SubmitError::Project(e)) => {
            assert!(matches!(e, PolicyError::SymlinkEscape(_)), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(job) => {
            reaches(&engine, job.id, JobStatus::AwaitingApproval).await;
            engine.approve(job.id, "alice", "api").await.unwrap();
            let done = engine.wait(job.id, WAIT).await.unwrap();
            assert_eq!(done.error.unwrap().kind, "project_rejected");
        }
    }
    assert_eq!(exec.calls(), 0, "no agent got a swapped project");
    engine.shutdown(Duration::from_secs(1)).await;
}

/// A copy of a job shares its result and its step names instead of copying them, and its
/// events' step and agent names are the workflow catalog's and the executor registry's: two
/// jobs of one workflow, each read twice, hold the same allocations (what keeps a job's copies
/// cheap, `engine_allocs` in BENCHMARKS.md).
#[tokio::test]
async fn copies_of_jobs_share_their_result_and_names() {
    let env = env();
    let engine = builder(&env)
        .executor(
            "agent",
            Arc::new(ScriptedExecutor::succeeding("a long output")),
        )
        .workflow(one_step("w", "agent"))
        .build()
        .unwrap();
    let run = async || {
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        engine.wait(job.id, WAIT).await.unwrap()
    };
    let (first, second) = (run().await, run().await);
    assert_eq!(first.status, JobStatus::Completed, "{:?}", first.error);
    assert_eq!(second.status, JobStatus::Completed, "{:?}", second.error);

    let again = engine.get(first.id).await.unwrap();
    assert!(
        Arc::ptr_eq(
            first.result.as_ref().unwrap(),
            again.result.as_ref().unwrap()
        ),
        "two reads of a job share its result"
    );
    assert_eq!(step_names(&first.progress.completed), ["run"]);
    assert!(
        Arc::ptr_eq(&first.progress.completed[0], &second.progress.completed[0]),
        "the jobs of a workflow share its step names"
    );

    let names = |events: Vec<aiwg_core::JobEvent>| {
        events
            .into_iter()
            .find_map(|e| match e.kind {
                JobEventKind::StepStarted { step, agent, .. } => Some((step, agent)),
                _ => None,
            })
            .expect("a step_started event")
    };
    let (step_a, agent_a) = names(engine.subscribe(first.id, 0).await.unwrap().collect().await);
    let (step_b, agent_b) = names(
        engine
            .subscribe(second.id, 0)
            .await
            .unwrap()
            .collect()
            .await,
    );
    assert_eq!((&*step_a, &*agent_a), ("run", "agent"));
    assert!(Arc::ptr_eq(&step_a, &step_b) && Arc::ptr_eq(&step_a, &first.progress.completed[0]));
    assert!(Arc::ptr_eq(&agent_a, &agent_b), "the registry's agent name");
}
