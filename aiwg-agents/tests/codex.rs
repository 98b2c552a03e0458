//! The real Codex CLI (`AIWG_TEST_CODEX`) against the scripted fake Responses-API server.
//!
//! Codex never reaches the internet here: its model provider is the fake on loopback (from a
//! `config.toml` in a `CODEX_HOME` of the test's own, or from aiwg's `base_url`), and the child
//! gets the scrubbed environment of `ProcessOptions` (no API key of the real environment).
//! `CODEX_HOME` lives under the target directory, not `/tmp`: codex refuses to set up the helper
//! of its own command sandbox under a temporary folder.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use aiwg_agents::testing::{FakeResponses, ResponsesReply};
use aiwg_agents::{Codex, CodexBuilder, ProcessOptions};
use aiwg_core::{AgentEvent, AgentRequest, AgentResult, EventSink, Executor, ExecutorError};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

struct Setup {
    fake: FakeResponses,
    home: tempfile::TempDir,
    codex_home: tempfile::TempDir,
    project: tempfile::TempDir,
    codex: PathBuf,
}

async fn setup(script: Vec<ResponsesReply>) -> Option<Setup> {
    let codex = common::peer("AIWG_TEST_CODEX")?;
    let fake = FakeResponses::start(script).await.unwrap();
    let codex_home = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(
        codex_home.path().join("config.toml"),
        fake.codex_config_toml(),
    )
    .unwrap();
    Some(Setup {
        fake,
        home: tempfile::tempdir().unwrap(),
        codex_home,
        project: tempfile::tempdir().unwrap(),
        codex,
    })
}

impl Setup {
    fn process(&self) -> ProcessOptions {
        ProcessOptions::new().env("HOME", self.home.path().to_string_lossy())
    }

    fn builder(&self) -> CodexBuilder {
        Codex::builder()
            .binary(&self.codex)
            .codex_home(self.codex_home.path())
            .approval_policy("never")
            // Codex's own `workspace-write` sandbox refuses to start its helper when the
            // checkout lives under /tmp (a clean clone often does); aiwg's process supervision
            // is what these tests check.
            .sandbox_mode("danger-full-access")
            .process(self.process())
    }

    fn dir(&self) -> &Path {
        self.project.path()
    }
}

async fn run(
    exec: &Codex,
    req: AgentRequest,
) -> (Result<AgentResult, ExecutorError>, Vec<AgentEvent>) {
    let (sink, mut rx) = EventSink::channel();
    let res = tokio::time::timeout(LIMIT, exec.execute(req, sink, CancellationToken::new()))
        .await
        .expect("codex finished in time");
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    (res, events)
}

/// The text of the user messages the model received in request `i`.
fn user_text(s: &Setup, i: usize) -> String {
    s.fake.requests()[i].body["input"].to_string()
}

#[tokio::test]
async fn completes_a_job_with_text_thread_and_usage() {
    let Some(s) = setup(vec![ResponsesReply::text("Hello from the fake model")]).await else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (res, events) = run(&exec, AgentRequest::new("say hello; $(id) --help", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output, "Hello from the fake model");
    let thread = res.session_id.clone().expect("a thread id");
    let usage = res.usage.expect("usage");
    assert_eq!(
        (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_input_tokens
        ),
        (10, 5, 2)
    );
    assert_eq!(res.exit_code, Some(0));
    assert_eq!(res.num_turns, Some(1));
    assert!(events
        .iter()
        .any(|e| matches!(e, AgentEvent::Init { session_id: Some(id), .. } if *id == thread)));
    assert!(events.contains(&AgentEvent::Text {
        text: "Hello from the fake model".into()
    }));
    assert!(events.iter().any(|e| matches!(e, AgentEvent::Usage { .. })));
    // The prompt reached the model literally, and codex kept its session in our CODEX_HOME.
    assert!(user_text(&s, 0).contains("say hello; $(id) --help"));
    assert!(s.codex_home.path().join("sessions").is_dir());
}

#[tokio::test]
async fn a_tool_call_makes_codex_run_a_command_in_the_project() {
    let Some(s) = setup(vec![
        ResponsesReply::command("printf 'written by the real codex' > hello.txt && echo wrote-it"),
        ResponsesReply::text("I wrote hello.txt"),
    ])
    .await
    else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (res, events) = run(&exec, AgentRequest::new("write hello.txt", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output, "I wrote hello.txt");
    assert_eq!(
        std::fs::read_to_string(s.dir().join("hello.txt")).unwrap(),
        "written by the real codex"
    );
    let use_id = events.iter().find_map(|e| match e {
        AgentEvent::ToolUse { id, name, input } if name == "command" => {
            assert!(input["command"].as_str().unwrap().contains("hello.txt"));
            Some(id.clone())
        }
        _ => None,
    });
    let use_id = use_id.expect("a command tool use");
    assert!(events.iter().any(|e| matches!(e,
        AgentEvent::ToolResult { tool_use_id, content, is_error: false }
            if *tool_use_id == use_id && content["output"].as_str().unwrap_or_default().contains("wrote-it")
                && content["exit_code"] == 0)));
    // The second request carried the command's output back to the model.
    let reqs = s.fake.requests();
    assert_eq!(reqs.len(), 2);
    let input = reqs[1].body["input"].to_string();
    assert!(input.contains("function_call_output"), "{input}");
    assert!(input.contains("wrote-it"), "{input}");
}

#[tokio::test]
async fn a_resumed_step_continues_the_thread() {
    let Some(s) = setup(vec![
        ResponsesReply::text("first answer: the plan is X"),
        ResponsesReply::text("second answer"),
    ])
    .await
    else {
        return;
    };
    let exec = s.builder().build().unwrap();
    let (first, _) = run(&exec, AgentRequest::new("draft the plan", s.dir())).await;
    let thread = first.unwrap().session_id.expect("thread");
    let (second, _) = run(
        &exec,
        AgentRequest::new("review the plan", s.dir()).with_resume(thread.clone()),
    )
    .await;
    let second = second.unwrap();
    assert_eq!(second.output, "second answer");
    assert_eq!(second.session_id.as_deref(), Some(thread.as_str()));
    // The model saw the first step's conversation in the second step's request.
    let body = user_text(&s, 1);
    assert!(body.contains("draft the plan"), "{body}");
    assert!(body.contains("first answer: the plan is X"), "{body}");
    assert!(body.contains("review the plan"), "{body}");
    assert!(!user_text(&s, 0).contains("review the plan"));
}

#[tokio::test]
async fn the_provider_can_come_from_aiwgs_base_url() {
    let Some(s) = setup(vec![ResponsesReply::text("via base_url")]).await else {
        return;
    };
    // An empty CODEX_HOME: no config.toml, the provider is aiwg's.
    let bare_home = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exec = s
        .builder()
        .codex_home(bare_home.path())
        .model("gpt-5")
        .base_url(s.fake.base_url())
        .api_key("key-from-aiwg-config")
        .config("model_providers.aiwg.request_max_retries", 0)
        .build()
        .unwrap();
    let (res, _) = run(&exec, AgentRequest::new("hello", s.dir())).await;
    assert_eq!(res.unwrap().output, "via base_url");
    let req = &s.fake.requests()[0];
    assert_eq!(req.body["model"], "gpt-5");
    // The key from aiwg's config, through the child's environment only.
    assert_eq!(
        req.authorization.as_deref(),
        Some("Bearer key-from-aiwg-config")
    );
}

#[tokio::test]
async fn an_api_error_is_a_failure_not_a_hang() {
    let Some(s) = setup(vec![ResponsesReply::error(
        400,
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

/// Starts a run whose model asks for `sleep <marker>`, waits until the sleep runs (unless
/// `fire_cancel` is false), stops it, and checks that every process of the run is gone.
async fn stop_mid_run(
    marker: &str,
    timeout: Duration,
    idle: Option<Duration>,
    reply: Option<ResponsesReply>,
    fire_cancel: bool,
) -> Option<ExecutorError> {
    let s = setup(vec![reply.unwrap_or_else(|| {
        ResponsesReply::command(format!("sleep {marker}"))
    })])
    .await?;
    let mut opts = s.process().grace(Duration::from_secs(2));
    if let Some(i) = idle {
        opts = opts.idle_timeout(i);
    }
    let exec = s.builder().process(opts).build().unwrap();
    let cancel = CancellationToken::new();
    let (stop_watch, watched) = common::watch_dir(s.dir().to_path_buf());
    let req = AgentRequest::new("wait a while", s.dir()).with_timeout(timeout);
    let c = cancel.clone();
    let run = tokio::spawn(async move { exec.execute(req, EventSink::discard(), c).await });
    let needle = format!("sleep {marker}");
    if fire_cancel {
        assert!(
            common::wait_for(LIMIT, || !common::pids_with_cmdline(&needle).is_empty()).await,
            "the command never ran"
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
async fn cancel_mid_command_leaves_no_process() {
    if let Some(err) = stop_mid_run("431", LIMIT, None, None, true).await {
        assert_eq!(err.kind(), "cancelled");
    }
}

#[tokio::test]
async fn request_timeout_leaves_no_process() {
    // The command sleeps far longer than the timeout, so only the timeout can end the run.
    if let Some(err) = stop_mid_run("432", Duration::from_secs(8), None, None, false).await {
        assert_eq!(err.kind(), "timed_out");
    }
}

#[tokio::test]
async fn idle_watchdog_stops_a_model_that_streams_forever() {
    if let Some(err) = stop_mid_run(
        "unused",
        LIMIT,
        Some(Duration::from_secs(4)),
        Some(ResponsesReply::Hang),
        false,
    )
    .await
    {
        assert_eq!(err.kind(), "idle");
    }
}

#[tokio::test]
async fn sandboxed_by_bubblewrap_it_still_runs_a_command_and_resumes() {
    if !common::bwrap() {
        return;
    }
    let Some(s) = setup(vec![
        ResponsesReply::command("echo boxed > boxed.txt && cat /proc/1/cmdline | tr '\\0' ' '"),
        ResponsesReply::text("boxed run"),
        ResponsesReply::text("resumed in the box"),
    ])
    .await
    else {
        return;
    };
    // Inside aiwg's sandbox codex cannot start its own: the outer one is the boundary.
    let exec = s
        .builder()
        .sandbox_mode("danger-full-access")
        .process(s.process().sandbox(aiwg_agents::Sandbox::Bwrap))
        .build()
        .unwrap();
    let (res, events) = run(&exec, AgentRequest::new("write boxed.txt", s.dir())).await;
    let res = res.unwrap();
    assert_eq!(res.output, "boxed run");
    assert_eq!(
        std::fs::read_to_string(s.dir().join("boxed.txt")).unwrap(),
        "boxed\n"
    );
    // PID 1 of the command's namespace is bwrap's, not the machine's init.
    let output = events
        .iter()
        .find_map(|e| match e {
            AgentEvent::ToolResult { content, .. } => content["output"].as_str().map(str::to_owned),
            _ => None,
        })
        .expect("the command's output");
    assert!(output.contains("bwrap"), "{output}");
    // The thread lives in CODEX_HOME, writable in the sandbox, so a later step resumes it.
    let thread = res.session_id.expect("thread");
    let (again, _) = run(
        &exec,
        AgentRequest::new("and again", s.dir()).with_resume(thread),
    )
    .await;
    assert_eq!(again.unwrap().output, "resumed in the box");
    assert!(user_text(&s, 2).contains("write boxed.txt"));
}

#[tokio::test]
async fn health_reports_a_missing_binary() {
    let missing = Codex::builder()
        .binary("/nonexistent/codex")
        .build()
        .unwrap();
    assert!(!missing.health().await.healthy);
    if let Some(codex) = common::peer("AIWG_TEST_CODEX") {
        let ok = Codex::builder().binary(codex).build().unwrap();
        assert!(ok.health().await.healthy);
    }
}
