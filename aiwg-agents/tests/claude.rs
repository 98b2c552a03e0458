//! The real Claude Code CLI (`AIWG_TEST_CLAUDE`) against the scripted fake Anthropic server.

mod common;

use std::path::Path;
use std::time::Duration;

use aiwg_agents::testing::{FakeAnthropic, Reply};
use aiwg_agents::{ClaudeCode, ClaudeCodeBuilder, ProcessOptions};
use aiwg_core::{AgentEvent, AgentRequest, AgentResult, EventSink, Executor, ExecutorError};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

struct Setup {
    fake: FakeAnthropic,
    home: tempfile::TempDir,
    project: tempfile::TempDir,
    claude: std::path::PathBuf,
}

async fn setup(script: Vec<Reply>) -> Option<Setup> {
    let claude = common::peer("AIWG_TEST_CLAUDE")?;
    Some(Setup {
        fake: FakeAnthropic::start(script).await.unwrap(),
        home: tempfile::tempdir().unwrap(),
        project: tempfile::tempdir().unwrap(),
        claude,
    })
}

impl Setup {
    fn process(&self) -> ProcessOptions {
        ProcessOptions::new().envs(self.fake.claude_env(self.home.path()))
    }

    fn builder(&self) -> ClaudeCodeBuilder {
        ClaudeCode::builder()
            .binary(&self.claude)
            .process(self.process())
    }

    fn dir(&self) -> &Path {
        self.project.path()
    }
}

async fn run(
    exec: &ClaudeCode,
    req: AgentRequest,
) -> (Result<AgentResult, ExecutorError>, Vec<AgentEvent>) {
    let (sink, mut rx) = EventSink::channel();
    let res = tokio::time::timeout(LIMIT, exec.execute(req, sink, CancellationToken::new()))
        .await
        .expect("claude finished in time");
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (res, events)
}

#[tokio::test]
async fn completes_a_job_with_result_session_cost_and_usage() {
    let Some(s) = setup(vec![Reply::text("Hello from the fake model")]).await else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (res, events) = run(&exec, AgentRequest::new("say hello; $(id) --help", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output, "Hello from the fake model");
    let session = res.session_id.clone().expect("a session id");
    assert!(res.cost_usd.is_some_and(|c| c > 0.0), "{res:?}");
    let usage = res.usage.expect("usage");
    assert_eq!((usage.input_tokens, usage.output_tokens), (10, 5));
    assert_eq!(res.num_turns, Some(1));
    assert_eq!(res.exit_code, Some(0));
    // Events: init with the same session and the tools, the text, the final usage.
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::Init { session_id: Some(id), tools, .. } if *id == session && tools.iter().any(|t| t == "Bash"))));
    assert!(events.contains(&AgentEvent::Text {
        text: "Hello from the fake model".into()
    }));
    assert!(events.iter().any(|e| matches!(e, AgentEvent::Usage { .. })));
    // The prompt reached the model literally.
    let turn = &s.fake.turns()[0];
    assert!(turn.body.to_string().contains("say hello; $(id) --help"));
}

/// An answer longer than a pipe read (here 100 000 characters) arrives whole: Claude Code
/// writes it on one `result` line, which the reader used to cut at 64 KiB, failing the run
/// "without a result line".
#[tokio::test]
async fn a_long_answer_arrives_whole() {
    let answer = "All good. ".repeat(10_000);
    let Some(s) = setup(vec![Reply::text(answer.clone())]).await else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (res, _) = run(&exec, AgentRequest::new("write a long answer", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output.len(), answer.len());
    assert_eq!(res.output, answer);
}

#[tokio::test]
async fn a_tool_use_makes_claude_write_a_file_in_the_project() {
    let Some(s) = setup(vec![]).await else {
        return;
    };
    let target = s.dir().join("hello.txt");
    s.fake.push([
        Reply::tool_use(
            "Write",
            json!({"file_path": target.to_string_lossy(), "content": "written by the real claude\n"}),
        ),
        Reply::text("I wrote hello.txt"),
    ]);
    let exec = s.builder().permission_mode("acceptEdits").build().unwrap();
    let (res, events) = run(&exec, AgentRequest::new("write hello.txt", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output, "I wrote hello.txt");
    assert_eq!(res.num_turns, Some(2));
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "written by the real claude\n"
    );
    assert!(events
        .iter()
        .any(|e| matches!(e, AgentEvent::ToolUse { name, .. } if name == "Write")));
    assert!(events.iter().any(|e| matches!(
        e,
        AgentEvent::ToolResult {
            is_error: false,
            ..
        }
    )));
    // The second turn carried the tool result back to the model.
    let turns = s.fake.turns();
    assert_eq!(turns.len(), 2);
    assert!(turns[1].body.to_string().contains("tool_result"));
}

#[tokio::test]
async fn a_resumed_step_continues_the_session() {
    let Some(s) = setup(vec![
        Reply::text("first answer: the plan is X"),
        Reply::text("second answer"),
    ])
    .await
    else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (first, _) = run(&exec, AgentRequest::new("draft the plan", s.dir())).await;
    let first = first.unwrap();
    let session = first.session_id.expect("session");
    let (second, _) = run(
        &exec,
        AgentRequest::new("review the plan", s.dir()).with_resume(session.clone()),
    )
    .await;
    let second = second.unwrap();
    assert_eq!(second.output, "second answer");
    assert!(second.session_id.is_some());
    // The model saw the first step's conversation in the second step's request.
    let turns = s.fake.turns();
    assert_eq!(turns.len(), 2);
    let body = turns[1].body["messages"].to_string();
    assert!(body.contains("draft the plan"), "{body}");
    assert!(body.contains("first answer: the plan is X"), "{body}");
    assert!(body.contains("review the plan"), "{body}");
    assert!(!turns[0].body["messages"]
        .to_string()
        .contains("review the plan"));
}

#[tokio::test]
async fn an_api_error_is_a_failure_not_a_hang() {
    let Some(s) = setup(vec![Reply::error(
        400,
        "invalid_request_error",
        "the fake refuses this request",
    )])
    .await
    else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (res, _) = run(&exec, AgentRequest::new("fail please", s.dir())).await;
    match res.unwrap_err() {
        ExecutorError::Failed { message, .. } => {
            assert!(
                message.contains("fake refuses") || message.contains("400"),
                "{message}"
            );
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Starts a run whose model asks for `sleep <marker>` through the Bash tool, waits until the
/// sleep runs, applies `stop`, and checks that every process of the run is gone afterwards.
async fn stop_mid_run(
    marker: &str,
    timeout: Duration,
    idle: Option<Duration>,
    reply: Option<Reply>,
    fire_cancel: bool,
    grace: Duration,
) -> Option<ExecutorError> {
    let s = setup(vec![reply.unwrap_or_else(|| {
        Reply::tool_use(
            "Bash",
            json!({"command": format!("sleep {marker}"), "description": "wait"}),
        )
    })])
    .await?;
    let mut opts = s.process().grace(grace);
    if let Some(i) = idle {
        opts = opts.idle_timeout(i);
    }
    let exec = s
        .builder()
        .allowed_tools(["Bash"])
        .process(opts)
        .build()
        .unwrap();
    let cancel = CancellationToken::new();
    let (stop_watch, watched) = common::watch_dir(s.dir().to_path_buf());
    let req = AgentRequest::new("wait a while", s.dir()).with_timeout(timeout);
    let c = cancel.clone();
    let run = tokio::spawn(async move { exec.execute(req, EventSink::discard(), c).await });
    let needle = format!("sleep {marker}");
    if fire_cancel {
        assert!(
            common::wait_for(LIMIT, || !common::pids_with_cmdline(&needle).is_empty()).await,
            "the Bash tool never ran"
        );
        cancel.cancel();
    }
    let res = tokio::time::timeout(LIMIT, run)
        .await
        .expect("returned")
        .unwrap();
    let _ = stop_watch.send(());
    let pids = watched.await.unwrap();
    assert!(!pids.is_empty(), "no process of the run was seen");
    for pid in &pids {
        assert!(
            !aiwg_agents::process_alive(*pid),
            "pid {pid} outlived the run"
        );
    }
    assert!(common::pids_with_cmdline(&needle).is_empty());
    assert!(common::pids_in_dir(s.dir()).is_empty());
    drop(s);
    Some(res.unwrap_err())
}

#[tokio::test]
async fn cancel_mid_run_leaves_no_process() {
    if let Some(err) = stop_mid_run("321", LIMIT, None, None, true, Duration::from_secs(2)).await {
        assert_eq!(err.kind(), "cancelled");
    }
}

#[tokio::test]
async fn without_a_grace_period_the_tool_process_groups_are_still_killed() {
    // SIGKILL follows SIGTERM at once, so claude cannot clean up its Bash tool's process group
    // (a group of its own): the executor has to find and kill it.
    if let Some(err) = stop_mid_run("323", LIMIT, None, None, true, Duration::ZERO).await {
        assert_eq!(err.kind(), "cancelled");
    }
}

#[tokio::test]
async fn request_timeout_leaves_no_process() {
    // The sleep lasts far longer than the timeout, so only the timeout can end the run.
    if let Some(err) = stop_mid_run(
        "322",
        Duration::from_secs(8),
        None,
        None,
        false,
        Duration::from_secs(2),
    )
    .await
    {
        assert_eq!(err.kind(), "timed_out");
    }
}

#[tokio::test]
async fn idle_watchdog_stops_a_model_that_streams_forever() {
    if let Some(err) = stop_mid_run(
        "unused",
        LIMIT,
        Some(Duration::from_secs(4)),
        Some(Reply::Hang),
        false,
        Duration::from_secs(2),
    )
    .await
    {
        assert_eq!(err.kind(), "idle");
    }
}

#[tokio::test]
async fn an_exit_without_a_result_carries_stderr() {
    // Not the real claude: `sh` rejects claude's options, prints why and exits.
    let dir = tempfile::tempdir().unwrap();
    let exec = ClaudeCode::builder().binary("sh").build().unwrap();
    let err = exec
        .execute(
            AgentRequest::new("hi", dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    match err {
        ExecutorError::Failed { message, exit_code } => {
            assert!(message.contains("without a result line"), "{message}");
            assert!(message.contains("stderr:"), "{message}");
            assert_ne!(exit_code, Some(0));
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[tokio::test]
async fn health_reports_a_missing_binary() {
    let missing = ClaudeCode::builder()
        .binary("/nonexistent/claude")
        .build()
        .unwrap();
    assert!(!missing.health().await.healthy);
    if let Some(claude) = common::peer("AIWG_TEST_CLAUDE") {
        let ok = ClaudeCode::builder().binary(claude).build().unwrap();
        assert!(ok.health().await.healthy);
    }
}

#[tokio::test]
async fn a_prompt_larger_than_argv_allows_reaches_the_model_through_stdin() {
    let Some(s) = setup(vec![Reply::text("read it all")]).await else {
        return;
    };
    // 300 KiB, more than Linux accepts as one argument (128 KiB); starts with a dash and ends
    // with a marker so that the model's copy can be checked whole.
    let mut prompt = String::from("--not-an-option ");
    while prompt.len() < 300 * 1024 {
        prompt.push_str("all work and no play makes jack a dull boy. ");
    }
    prompt.push_str("END-OF-THE-LONG-PROMPT");
    assert!(prompt.len() > aiwg_agents::MAX_ARGV_PROMPT);
    let exec = s.builder().build().unwrap();
    let (res, _) = run(&exec, AgentRequest::new(prompt.clone(), s.dir())).await;
    assert_eq!(res.unwrap().output, "read it all");
    let turns = s.fake.turns();
    assert_eq!(turns.len(), 1);
    let body = turns[0].body["messages"].to_string();
    assert!(
        body.contains("END-OF-THE-LONG-PROMPT"),
        "the end of the prompt is missing"
    );
    assert!(body.contains("--not-an-option all work"));
    let expected = serde_json::to_string(&prompt).unwrap();
    assert!(
        body.contains(expected.trim_matches('"')),
        "the prompt did not arrive whole"
    );
}

#[tokio::test]
async fn an_output_schema_makes_claude_return_its_structured_answer() {
    let Some(s) = setup(vec![]).await else {
        return;
    };
    s.fake.push([
        Reply::tool_use(
            "StructuredOutput",
            json!({"verdict": "approve", "issues": 0}),
        ),
        Reply::text("Done."),
    ]);
    let exec = s.builder().build().unwrap();
    let schema = json!({
        "type": "object",
        "properties": {"verdict": {"type": "string"}, "issues": {"type": "integer"}},
        "required": ["verdict", "issues"]
    });
    let mut req = AgentRequest::new("review", s.dir());
    req.output_schema = Some(schema.clone());
    let (res, _) = run(&exec, req).await;
    let res = res.unwrap();
    assert_eq!(
        res.structured,
        Some(json!({"verdict": "approve", "issues": 0})),
        "{res:?}"
    );
    // The schema reached the model as the structured-output tool's input schema.
    let first = s.fake.turns()[0].body.to_string();
    assert!(first.contains("StructuredOutput"), "{first}");
    assert!(first.contains("\"verdict\""), "{first}");
}

#[tokio::test]
async fn a_budget_stops_claude_and_keeps_its_partial_work() {
    let Some(s) = setup(vec![]).await else {
        return;
    };
    let target = s.dir().join("a.txt");
    s.fake.push([
        Reply::tool_use(
            "Write",
            json!({"file_path": target.to_string_lossy(), "content": "first\n"}),
        ),
        Reply::text("never reached"),
    ]);
    let exec = s.builder().permission_mode("acceptEdits").build().unwrap();
    let mut req = AgentRequest::new("write a.txt then continue", s.dir());
    // One turn of the fake model costs more than this.
    req.max_budget_usd = Some(0.000_01);
    let (res, events) = run(&exec, req).await;
    let Err(ExecutorError::Limit { limit, partial }) = res else {
        panic!("expected a budget limit, got {res:?}; events {events:?}");
    };
    assert_eq!(limit, aiwg_core::AgentLimit::Budget);
    assert!(partial.session_id.is_some(), "{partial:?}");
    assert!(
        partial.cost_usd.is_some_and(|c| c > 0.000_01),
        "{partial:?}"
    );
    // The CLI stops as soon as the cap is passed: after the first turn, before running the
    // tool that turn asked for.
    assert_eq!(s.fake.turns().len(), 1);
    assert!(!target.exists());
}
