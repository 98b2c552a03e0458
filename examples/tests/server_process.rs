//! The example server as a real process: a config in a temporary folder, a job triggered over
//! real HTTP and completed, a clean shutdown on SIGTERM, and a config error that names the key.

mod support;

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use support::{start, KEY};

fn config(dir: &std::path::Path) -> String {
    format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{}" }}
engine: {{ workers: 2, shutdown_grace: "200ms" }}
agents:
  sh: {{ kind: command }}
workflows:
  hello:
    steps:
      - {{ name: say, agent: sh, command: ["printf", "%s|%s", "{{{{guidance}}}}", "$SECRET_THAT_MUST_NOT_LEAK"] }}
  env:
    steps:
      - {{ name: env, agent: sh, command: ["env"] }}
  slow:
    steps:
      - {{ name: sleep, agent: sh, command: ["sleep", "300"] }}
"#,
        dir.display()
    )
}

#[tokio::test]
async fn the_axum_server_runs_a_job_and_stops_cleanly_on_sigterm() {
    runs_a_job_and_stops_cleanly_on_sigterm(env!("CARGO_BIN_EXE_server")).await;
}

#[tokio::test]
async fn the_actix_server_runs_a_job_and_stops_cleanly_on_sigterm() {
    runs_a_job_and_stops_cleanly_on_sigterm(env!("CARGO_BIN_EXE_actix_server")).await;
}

async fn runs_a_job_and_stops_cleanly_on_sigterm(bin: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(bin, &config(dir.path()), dir.path());
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(KEY)
        .json(&json!({"workflow": "hello", "guidance": "$(id) `whoami`", "async": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let doc: Value = res.json().await.unwrap();
    assert_eq!(doc["status"], "completed", "{doc}");
    assert_eq!(
        doc["result"]["summary"].as_str().unwrap().trim_end(),
        "$(id) `whoami`|$SECRET_THAT_MUST_NOT_LEAK",
        "arguments stay literal"
    );

    let env: Value = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(KEY)
        .json(&json!({"workflow": "env", "async": false}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let out = env["result"]["summary"].as_str().unwrap();
    assert!(
        !out.contains("hunter2"),
        "the server's environment leaked into the agent"
    );
    assert!(!out.contains(KEY), "the API key leaked into the agent");

    // A long job is running when SIGTERM arrives: it is cancelled after the grace period and
    // the process exits 0.
    let slow: Value = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(KEY)
        .json(&json!({"workflow": "slow"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = slow["job_id"].as_str().unwrap();
    let events = http
        .get(format!("{}/workflows/{id}/events", server.base))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let mut stream = events.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("event: step.started") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the slow job starts")
            .expect("stream open")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGTERM).unwrap();
    let mut stopped = false;
    while let Ok(line) = server.lines.recv_timeout(Duration::from_secs(30)) {
        if line.contains("aiwg: stopped") {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "the server announced its stop");
    // The open event stream ends with the job's terminal event: cancelled by the shutdown.
    let rest = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        seen
    })
    .await
    .expect("the stream ends");
    assert!(rest.contains("\"to\":\"cancelled\""), "{rest}");
    assert!(rest.contains("\"kind\":\"shutdown\""), "{rest}");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_config_error_names_the_key_and_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "engine: { workers: lots }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("engine.workers"), "{err}");
}

/// A parameter value that looks like an option never reaches the command: `git log -1
/// {{rev}}` with `rev = --output=<file>` is refused with 400 `invalid-params` naming `rev`, and
/// the file is not written; a value the parameter's pattern admits runs.
#[tokio::test]
async fn flag_like_parameter_values_are_refused_naming_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["commit", "-q", "--allow-empty", "-m", "first"]);
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{}" }}
agents:
  sh: {{ kind: command }}
workflows:
  log:
    parameters:
      - {{ name: rev, default: HEAD }}
      - {{ name: level, choices: [low, high], default: low }}
      - {{ name: path, pattern: "[a-z/]+", default: src }}
    steps:
      - {{ name: log, agent: sh, command: ["git", "log", "-1", "--format=%s", "{{{{rev}}}}"] }}
"#,
        dir.path().display()
    );
    let server = start(env!("CARGO_BIN_EXE_server"), &config, dir.path());
    let http = reqwest::Client::new();
    let target = dir.path().join("written-by-git");
    let trigger = |params: Value| {
        http.post(format!("{}/workflows/trigger", server.base))
            .bearer_auth(KEY)
            .json(&json!({"workflow": "log", "params": params, "async": false}))
            .send()
    };
    for (params, name, why) in [
        (
            json!({"rev": format!("--output={}", target.display())}),
            "rev",
            "starts with `-`",
        ),
        (json!({"level": "medium"}), "level", "one of: low, high"),
        (json!({"path": "../etc"}), "path", "pattern"),
        (json!({"rev": "x".repeat(2000)}), "rev", "limit is 1024"),
    ] {
        let res = trigger(params.clone()).await.unwrap();
        assert_eq!(res.status().as_u16(), 400, "{params}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(
            problem["type"], "urn:aiwg:problem:invalid-params",
            "{problem}"
        );
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("`{name}`")), "{detail}");
        assert!(detail.contains(why), "{detail}");
    }
    assert!(!target.exists(), "git wrote the file named by a parameter");
    let doc: Value = trigger(json!({"rev": "HEAD"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["status"], "completed", "{doc}");
    assert_eq!(doc["result"]["summary"].as_str().unwrap().trim(), "first");
}

/// An unknown key anywhere, including the sections other crates own, is refused naming it.
#[test]
fn unknown_config_keys_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, key) in [
        ("engine: { workerz: 2 }\n", "engine.workerz"),
        ("triggers: { github: { secrett: x } }\n", "triggers.github.secrett"),
        ("triggers: { gitlabb: {} }\n", "triggers.gitlabb"),
        (
            "workflows: { w: { steps: [{ name: s, command: [x] }], parameters: [{ name: p, patern: x }] } }\n",
            "workflows.w.parameters[0].patern",
        ),
    ] {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_server"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{key}`")), "{yaml}: {err}");
        assert!(err.contains("unknown key"), "{yaml}: {err}");
    }
}

#[test]
fn an_unknown_agent_key_names_it_and_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-agent.yaml");
    std::fs::write(
        &path,
        format!(
            "projects: {{ root: \"{}\" }}\nagents:\n  sbx: {{ kind: command, sandboxx: bwrap }}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agents.sbx.sandboxx"), "{err}");
    assert!(err.contains("unknown key"), "{err}");
}

/// The peak resident memory of a process, from `/proc/<pid>/status` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// `yes` for a few seconds: output beyond the job's budget is dropped where it is produced,
/// so the server's peak memory stays bounded and the status document small.
#[tokio::test]
async fn an_output_flood_keeps_the_server_small() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{}" }}
agents:
  sh: {{ kind: command }}
workflows:
  flood:
    timeout: 4s
    steps:
      - {{ name: yes, agent: sh, command: ["yes", "a line of output that repeats"] }}
"#,
        dir.path().display()
    );
    let server = start(env!("CARGO_BIN_EXE_server"), &config, dir.path());
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(KEY)
        .json(&json!({"workflow": "flood", "async": false}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let body = res.bytes().await.unwrap();
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["status"], "timed_out", "{doc}");
    assert!(
        body.len() < 2 * 1024 * 1024,
        "status document of {} bytes",
        body.len()
    );
    let id = doc["job_id"].as_str().unwrap();
    let events = http
        .get(format!("{}/workflows/{id}/events", server.base))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        events.matches("event: output_truncated").count(),
        1,
        "one output_truncated event"
    );
    let peak = peak_rss(server.child.id());
    assert!(
        peak < 300 * 1024 * 1024,
        "the server peaked at {} MiB",
        peak / 1024 / 1024
    );
    println!("flood: server peak {} MiB", peak / 1024 / 1024);
}
