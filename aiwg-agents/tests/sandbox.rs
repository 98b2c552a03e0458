//! `sandbox: bwrap` with real processes: a sandboxed command and the real Claude Code CLI
//! cannot see other processes or the server's environment, cannot write outside the project
//! (and their temporary home), and can write inside it. One binary: it sets a variable in this
//! process's environment, standing for the server's secrets.

mod common;

use std::path::Path;
use std::time::Duration;

use aiwg_agents::testing::{FakeAnthropic, Reply};
use aiwg_agents::{ClaudeCode, CommandExecutor, OpenCodeServer, ProcessOptions, Sandbox};
use aiwg_core::{AgentRequest, EventSink, Executor};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const SECRET: (&str, &str) = ("AIWG_SANDBOX_TEST_SECRET", "hunter2-sandbox-secret");
const LIMIT: Duration = Duration::from_secs(120);

/// A script that tries what an agent must not be able to do and reports each outcome.
fn probe(project: &Path, marker: &str) -> String {
    let outside_tmp = std::env::temp_dir().join(format!("aiwg-escape-{marker}"));
    let parent = project
        .parent()
        .unwrap()
        .join(format!("aiwg-escape-{marker}"));
    format!(
        r#"for f in /proc/[0-9]*; do echo "PROC $f $(tr '\0' ' ' < $f/cmdline 2>/dev/null)"; done
cat /proc/*/environ 2>/dev/null | tr '\0' '\n' | sed 's/^/ENV /'
echo x > {tmp} 2>/dev/null && echo "WROTE tmp" || echo "DENIED tmp"
echo x > {parent} 2>/dev/null && echo "WROTE parent" || echo "DENIED parent"
echo x > {project}/inside.txt && echo "WROTE project" || echo "DENIED project"
echo x > "$HOME/h.txt" && echo "WROTE home" || echo "DENIED home"
echo "HOME=$HOME"
"#,
        tmp = outside_tmp.display(),
        parent = parent.display(),
        project = project.display(),
    )
}

/// Checks the probe's report and the host's file system.
fn check(report: &str, project: &Path, marker: &str) {
    let me = std::env::current_exe().unwrap();
    let me = me.file_name().unwrap().to_string_lossy();
    let procs: Vec<&str> = report.lines().filter(|l| l.starts_with("PROC ")).collect();
    assert!(!procs.is_empty(), "{report}");
    for p in &procs {
        assert!(!p.contains(me.as_ref()), "the test process is visible: {p}");
    }
    // Our own pid would be visible without a PID namespace.
    let mine = format!("PROC /proc/{} ", std::process::id());
    assert!(!report.contains(&mine), "{report}");
    assert!(
        !report.contains(SECRET.1),
        "the server's environment leaked:\n{report}"
    );
    assert!(report.contains("DENIED tmp"), "{report}");
    assert!(report.contains("DENIED parent"), "{report}");
    assert!(report.contains("WROTE project"), "{report}");
    assert!(report.contains("WROTE home"), "{report}");
    assert!(!std::env::temp_dir()
        .join(format!("aiwg-escape-{marker}"))
        .exists());
    assert!(!project
        .parent()
        .unwrap()
        .join(format!("aiwg-escape-{marker}"))
        .exists());
    assert_eq!(
        std::fs::read_to_string(project.join("inside.txt")).unwrap(),
        "x\n"
    );
    // The temporary home is gone after the run.
    let home = report
        .lines()
        .find_map(|l| l.strip_prefix("HOME="))
        .expect("HOME reported");
    assert!(home.contains("aiwg-run-"), "{home}");
    assert!(!Path::new(home).exists(), "{home} was not removed");
}

#[tokio::test]
async fn a_sandboxed_command_sees_nothing_and_writes_only_the_project() {
    if !common::bwrap() {
        return;
    }
    std::env::set_var(SECRET.0, SECRET.1);
    let project = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().sandbox(Sandbox::Bwrap))
        .build()
        .unwrap();
    let marker = format!("cmd-{}", std::process::id());
    let req = AgentRequest::command(
        vec!["sh".into(), "-c".into(), probe(project.path(), &marker)],
        project.path(),
    );
    let res = exec
        .execute(req, EventSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    check(&res.output, project.path(), &marker);
}

#[tokio::test]
async fn hidden_paths_are_empty_in_the_sandbox() {
    if !common::bwrap() {
        return;
    }
    let server = tempfile::tempdir().unwrap();
    let config = server.path().join("aiwg.yaml");
    std::fs::write(&config, "api_key: sk-hidden-1").unwrap();
    let data = server.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("jobs.db"), "sk-hidden-2").unwrap();
    let project = tempfile::tempdir().unwrap();
    // Paths inside the project (bound into the sandbox writable) stay hidden too.
    let env_file = project.path().join(".env");
    std::fs::write(&env_file, "sk-hidden-3").unwrap();
    let keys = project.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("id"), "sk-hidden-4").unwrap();
    let exec = CommandExecutor::builder()
        .allow_failure(true)
        .process(
            ProcessOptions::new()
                .sandbox(Sandbox::Bwrap)
                .hide(&config)
                .hide(&data)
                .hide(&env_file)
                .hide(&keys),
        )
        .build()
        .unwrap();
    let script = format!(
        "cat {c}; ls -A {d}; cat {d}/jobs.db; cat {e}; ls -A {k}; cat {k}/id; echo done",
        c = config.display(),
        d = data.display(),
        e = env_file.display(),
        k = keys.display()
    );
    let res = exec
        .execute(
            AgentRequest::command(vec!["sh".into(), "-c".into(), script], project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(!res.output.contains("sk-hidden"), "{}", res.output);
    assert_eq!(res.output.trim(), "done");
    // Outside the sandbox nothing changed.
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "api_key: sk-hidden-1"
    );
    // `hide` without a sandbox is refused, naming the option.
    let err = CommandExecutor::builder()
        .process(ProcessOptions::new().hide(&config))
        .build()
        .unwrap_err();
    assert_eq!(err.key, "hide");
}

#[tokio::test]
async fn network_false_leaves_only_loopback() {
    if !common::bwrap() {
        return;
    }
    let project = tempfile::tempdir().unwrap();
    let run = |network: bool| {
        let exec = CommandExecutor::builder()
            .process(
                ProcessOptions::new()
                    .sandbox(Sandbox::Bwrap)
                    .network(network),
            )
            .build()
            .unwrap();
        let req = AgentRequest::command(vec!["cat".into(), "/proc/net/dev".into()], project.path());
        async move {
            exec.execute(req, EventSink::discard(), CancellationToken::new())
                .await
                .unwrap()
                .output
        }
    };
    let offline = run(false).await;
    let interfaces: Vec<&str> = offline
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(interfaces, ["lo"], "{offline}");
    let online = run(true).await;
    assert!(
        online.lines().skip(2).count() >= interfaces.len(),
        "{online}"
    );
}

#[tokio::test]
async fn sandboxed_claude_code_sees_nothing_and_writes_only_the_project() {
    if !common::bwrap() {
        return;
    }
    let Some(claude) = common::peer("AIWG_TEST_CLAUDE") else {
        return;
    };
    std::env::set_var(SECRET.0, SECRET.1);
    let project = tempfile::tempdir().unwrap();
    let marker = format!("claude-{}", std::process::id());
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "Bash",
            json!({"command": probe(project.path(), &marker), "description": "probe"}),
        ),
        Reply::text("probed"),
    ])
    .await
    .unwrap();
    // HOME comes from the sandbox (a fresh temporary directory); the rest points at the fake.
    let home = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> = fake
        .claude_env(home.path())
        .into_iter()
        .filter(|(k, _)| k != "HOME")
        .collect();
    let exec = ClaudeCode::builder()
        .binary(claude)
        .allowed_tools(["Bash"])
        .process(ProcessOptions::new().envs(env).sandbox(Sandbox::Bwrap))
        .build()
        .unwrap();
    let res = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("probe the sandbox", project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("claude finished in time")
    .unwrap();
    assert_eq!(res.output, "probed");
    // The tool's output went back to the model with the second turn.
    let turns = fake.turns();
    assert_eq!(turns.len(), 2);
    let report = tool_results(&turns[1].body);
    check(&report, project.path(), &marker);
}

/// The text of every `tool_result` in a Messages API request body.
fn tool_results(body: &serde_json::Value) -> String {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["type"] == "tool_result")
        .map(|c| match &c["content"] {
            serde_json::Value::String(s) => s.clone(),
            other => other
                .as_array()
                .map(|parts| {
                    parts
                        .iter()
                        .filter_map(|p| p["text"].as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .unwrap_or_default(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_sandboxed_opencode_server_sees_nothing_and_writes_only_the_project() {
    if !common::bwrap() {
        return;
    }
    let Some(bin) = common::peer("AIWG_TEST_OPENCODE") else {
        return;
    };
    std::env::set_var(SECRET.0, SECRET.1);
    let project = tempfile::tempdir().unwrap();
    let marker = format!("opencode-{}", std::process::id());
    let fake = FakeAnthropic::start([
        Reply::tool_use(
            "bash",
            json!({"command": probe(project.path(), &marker), "description": "probe"}),
        ),
        Reply::text("probed"),
    ])
    .await
    .unwrap();
    // opencode asks before a command touches paths outside the project: allow it here, the
    // sandbox is what says no.
    let mut oc_config = fake.opencode_config();
    oc_config["permission"] =
        json!({"bash": "allow", "external_directory": "allow", "edit": "allow"});
    std::fs::write(
        project.path().join("opencode.json"),
        serde_json::to_vec_pretty(&oc_config).unwrap(),
    )
    .unwrap();
    // HOME (and so every XDG directory) is the sandbox's temporary one.
    let server = OpenCodeServer::builder(project.path())
        .binary(bin)
        .startup_timeout(LIMIT)
        .process(
            ProcessOptions::new()
                .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
                .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
                .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
                .env("OPENCODE_DISABLE_SHARE", "1")
                .sandbox(Sandbox::Bwrap),
        )
        .start()
        .await
        .unwrap();
    let exec = server.client().build().unwrap();
    let res = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("probe the sandbox", project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        let reqs: Vec<String> = fake
            .requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {} scripted={} {}",
                    r.method,
                    r.path,
                    r.scripted,
                    tool_results(&r.body).chars().take(3000).collect::<String>()
                )
            })
            .collect();
        panic!("opencode did not finish in time; the model saw: {reqs:#?}")
    })
    .unwrap();
    assert_eq!(res.output, "probed");
    let turns = fake.turns();
    let report = tool_results(&turns.last().unwrap().body);
    let pid = server.pid().unwrap() as i32;
    server.shutdown().await;
    assert!(!aiwg_agents::process_alive(pid));
    // The home directory is removed with the server, so check it after the shutdown.
    check(&report, project.path(), &marker);
}
