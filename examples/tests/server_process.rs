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

    // A path outside the API is a 404 problem document, not an empty body.
    let res = http
        .get(format!("{}/no/such/path", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 404);
    assert_eq!(
        res.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["status"], 404);

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
            "auth: { jwt: { issuer: i, audience: a, jwks_uri: \"http://127.0.0.1:9/k\" } }\n",
            "auth.jwt.jwks_uri",
        ),
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

/// `server hash-key` reads the key from standard input (never argv) and prints the SHA-256
/// that `key_sha256` takes; `server gen-secret-key` prints a usable `AIWG_SECRET_KEY` entry.
#[test]
fn the_helper_commands_hash_a_key_and_make_a_secret_key() {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"a-key-of-twenty-chars\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        aiwg_core::http::ApiKey::hash_hex("a-key-of-twenty-chars")
    );
    // A hashed key from it is accepted where the plain one would be.
    let hashed = aiwg_core::http::ApiKey::sha256(
        "ops",
        String::from_utf8_lossy(&out.stdout).trim(),
        vec![aiwg_core::http::Scope::Admin],
    );
    assert!(hashed.is_ok());
    // Too short a key is refused.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"short\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["gen-secret-key", "prod1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let entry = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(entry.starts_with("prod1:"), "{entry}");
    let keyring = aiwg_core::secrets::SecretKeyring::parse(&entry).unwrap();
    assert_eq!(keyring.current_id(), "prod1");
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("gen-secret-key")
        .output()
        .unwrap();
    assert_ne!(
        String::from_utf8_lossy(&again.stdout).trim(),
        entry,
        "a fresh key each time"
    );
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A signed GitHub comment on pull request 7 of a real repository (a bare one over
/// `file://`, whose `refs/pull/7/head` differs from `main`): the job's step runs
/// `git rev-parse HEAD` in its workspace and sees the pull request's head; the worktree is
/// gone afterwards. A pull request the repository does not have fails the job with
/// `workspace_failed`.
#[tokio::test]
async fn a_pull_request_job_runs_in_a_worktree_at_its_head() {
    use hmac::{Hmac, Mac};

    let dir = tempfile::tempdir().unwrap();
    let origin = dir.path().join("origin.git");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(
        dir.path(),
        &["init", "--bare", "-q", origin.to_str().unwrap()],
    );
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("README"), "main\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "main"]);
    let main_sha = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["push", "-q", origin.to_str().unwrap(), "main"]);
    std::fs::write(work.join("README"), "the pull request\n").unwrap();
    git(&work, &["commit", "-q", "-am", "pr"]);
    let pr_sha = git(&work, &["rev-parse", "HEAD"]);
    git(
        &work,
        &[
            "push",
            "-q",
            origin.to_str().unwrap(),
            "HEAD:refs/pull/7/head",
        ],
    );
    assert_ne!(main_sha, pr_sha);

    let cache = dir.path().join("cache");
    let secret = "workspace-webhook-secret";
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{root}", mapping: [ {{ pattern: ".*", path: "." }} ],
            workspace: {{ kind: worktree, cache: "{cache}", protocols: [file], keep_failed_for: 0s }} }}
engine: {{ workers: 2, shutdown_grace: "200ms" }}
agents:
  sh: {{ kind: command }}
  boxed: {{ kind: command, sandbox: bwrap }}
workflows:
  head:
    steps:
      - {{ name: head, agent: sh, command: ["git", "rev-parse", "HEAD"] }}
      - {{ name: file, agent: sh, command: ["cat", "README"] }}
  commit:
    steps:
      - {{ name: commit, agent: boxed, command: ["sh", "-c", "echo agent > NEW && git add NEW && git commit -q -m agent && git rev-parse HEAD HEAD^"] }}
  here:
    workspace: none
    steps:
      - {{ name: pwd, agent: sh, command: ["pwd"] }}
triggers:
  github: {{ secret: "{secret}" }}
"#,
        root = dir.path().display(),
        cache = cache.display()
    );
    let server = start(env!("CARGO_BIN_EXE_server"), &config, dir.path());
    let http = reqwest::Client::new();
    let post = |pr: u64, comment_id: u64, workflow: &str| {
        let body = json!({
            "action": "created",
            "issue": { "number": pr, "pull_request": { "url": "https://api.github.com/repos/o/r/pulls/7" } },
            "comment": { "id": comment_id, "body": format!("@aiwg {workflow}"), "user": { "login": "bob", "type": "User" }, "author_association": "MEMBER" },
            "repository": { "full_name": "o/r", "clone_url": format!("file://{}", origin.display()), "default_branch": "main" },
            "sender": { "login": "bob", "type": "User" }
        })
        .to_string();
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        http.post(format!("{}/hooks/github", server.base))
            .header("x-github-event", "issue_comment")
            .header("x-github-delivery", format!("ws-{comment_id}"))
            .header("x-hub-signature-256", sig)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let wait = |id: String| {
        let http = http.clone();
        let base = server.base.clone();
        async move {
            let res = http
                .get(format!("{base}/workflows/{id}/events"))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap();
            let mut stream = res.bytes_stream();
            let read = async { while let Some(Ok(_)) = stream.next().await {} };
            tokio::time::timeout(Duration::from_secs(60), read)
                .await
                .expect("the job ends");
            let doc: Value = http
                .get(format!("{base}/workflows/{id}/status"))
                .bearer_auth(KEY)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            doc
        }
    };

    let res = post(7, 1, "head").await.unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = wait(id.clone()).await;
    assert_eq!(doc["status"], "completed", "{doc}");
    let steps = doc["result"]["steps"].as_array().unwrap();
    assert_eq!(steps[0]["output"].as_str().unwrap().trim(), pr_sha);
    assert_eq!(
        steps[1]["output"].as_str().unwrap().trim(),
        "the pull request"
    );
    let left: Vec<_> = std::fs::read_dir(cache.join("worktrees"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.iter().all(|name| !name.starts_with(&id)),
        "the worktree is removed: {left:?}"
    );
    // The project directory itself was never touched.
    assert!(!dir.path().join("README").exists());

    // A sandboxed agent commits in its checkout (a repository of its own, the mirror's objects
    // borrowed read-only); nothing it writes reaches the mirror.
    let res = post(7, 30, "commit").await.unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = wait(id).await;
    assert_eq!(doc["status"], "completed", "{doc}");
    let out = doc["result"]["steps"][0]["output"]
        .as_str()
        .unwrap()
        .to_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[1], pr_sha,
        "the commit's parent is the pull request's head"
    );
    for mirror in std::fs::read_dir(cache.join("mirrors")).unwrap().flatten() {
        let has = std::process::Command::new("git")
            .args([
                "-C",
                mirror.path().to_str().unwrap(),
                "cat-file",
                "-e",
                lines[0],
            ])
            .output()
            .unwrap();
        assert!(
            !has.status.success(),
            "the agent's commit is not in the mirror"
        );
    }

    let res = post(8, 2, "head").await.unwrap();
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = wait(id).await;
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["error"]["kind"], "workspace_failed", "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be fetched"),
        "{doc}"
    );

    // A workflow with `workspace: none` runs in the project directory.
    let res = post(7, 3, "here").await.unwrap();
    let id = res.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = wait(id).await;
    assert_eq!(doc["status"], "completed", "{doc}");
    let pwd = doc["result"]["summary"].as_str().unwrap().trim().to_owned();
    assert_eq!(
        std::path::Path::new(&pwd),
        dir.path().canonicalize().unwrap()
    );
}
