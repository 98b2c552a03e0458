//! The example server as a real process: a config in a temporary folder, a job triggered over
//! real HTTP and completed, a clean shutdown on SIGTERM, and a config error that names the key.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const KEY: &str = "process-test-key-0123456789";

struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str, config: &str, dir: &std::path::Path) -> Server {
    let path = dir.join("aiwg.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .env("AIWG_API_KEY", KEY)
        .env("AIWG_PROJECT_ROOT", dir)
        .env("AIWG_API_PORT", "0")
        .env("SECRET_THAT_MUST_NOT_LEAK", "hunter2-hunter2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let base = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its address");
        if let Some(rest) = line.strip_prefix("aiwg listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    Server { child, lines, base }
}

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
