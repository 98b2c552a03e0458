//! Secrets in the server's environment never reach a child. One test per binary: it sets
//! variables in this process before anything is spawned.

mod common;

use std::time::Duration;

use aiwg_agents::testing::{FakeAnthropic, Reply};
use aiwg_agents::{ClaudeCode, CommandExecutor, ProcessOptions};
use aiwg_core::{AgentEvent, AgentRequest, EventSink, Executor};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SECRETS: [(&str, &str); 3] = [
    ("AIWG_API_KEY", "sk-aiwg-secret-1"),
    ("GITHUB_WEBHOOK_SECRET", "gh-secret-2"),
    ("SLACK_SIGNING_SECRET", "slack-secret-3"),
];

#[tokio::test]
async fn secrets_do_not_reach_children_but_named_variables_do() {
    for (k, v) in SECRETS {
        std::env::set_var(k, v);
    }
    std::env::set_var("AIWG_TEST_PASSED_ON", "passed-on-4");
    let dir = tempfile::tempdir().unwrap();

    // The command executor: only the allow-list, what it names, and what it sets.
    let exec = CommandExecutor::builder()
        .process(
            ProcessOptions::new()
                .pass_env("AIWG_TEST_PASSED_ON")
                .env("EXTRA", "extra-5"),
        )
        .build()
        .unwrap();
    let res = exec
        .execute(
            AgentRequest::command(vec!["env".into()], dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    for (k, v) in SECRETS {
        assert!(
            !res.output.contains(k) && !res.output.contains(v),
            "{k} leaked:\n{}",
            res.output
        );
    }
    assert!(res.output.contains("AIWG_TEST_PASSED_ON=passed-on-4"));
    assert!(res.output.contains("EXTRA=extra-5"));
    assert!(res.output.lines().any(|l| l.starts_with("PATH=")));

    // The real claude: its Bash tool prints the environment it got.
    let Some(claude) = common::peer("AIWG_TEST_CLAUDE") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": "env", "description": "print env"}),
        ),
        Reply::text("printed"),
    ])
    .await
    .unwrap();
    let exec = ClaudeCode::builder()
        .binary(claude)
        .allowed_tools(["Bash"])
        .process(ProcessOptions::new().envs(fake.claude_env(home.path())))
        .build()
        .unwrap();
    let (sink, mut rx) = EventSink::channel();
    let res = tokio::time::timeout(
        Duration::from_secs(120),
        exec.execute(
            AgentRequest::new("print your environment", dir.path()),
            sink,
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.output, "printed");
    let mut tool_output = String::new();
    while let Ok(ev) = rx.try_recv() {
        if let AgentEvent::ToolResult { content, .. } = ev {
            tool_output.push_str(&content.to_string());
        }
    }
    assert!(
        tool_output.contains("ANTHROPIC_BASE_URL"),
        "no env output: {tool_output}"
    );
    for (k, v) in SECRETS {
        assert!(
            !tool_output.contains(k) && !tool_output.contains(v),
            "{k} leaked to claude"
        );
    }
}
