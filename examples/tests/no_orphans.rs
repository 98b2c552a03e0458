//! No agent process outlives the server, even when the server is killed with `SIGKILL`: the
//! server runs one sandboxed and one unsandboxed job, each a long `sleep` with a marker
//! argument, and is killed while both run; every process of both jobs is gone soon after.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const KEY: &str = "orphan-test-key-0123456789";
const LIMIT: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(config: &str, dir: &std::path::Path) -> Server {
    let path = dir.join("aiwg.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .env("AIWG_API_KEY", KEY)
        .env("AIWG_PROJECT_ROOT", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Drained to the end: a server writing into a closed pipe dies (its println panics).
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let base = loop {
        let line = rx
            .recv_timeout(LIMIT)
            .expect("the server prints its address");
        if let Some(rest) = line.strip_prefix("aiwg listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    Server { child, base }
}

/// Live (non-zombie) processes whose command line contains `needle`.
/// Live processes whose command line contains `needle` (the wrappers, `setpriv` and `bwrap`,
/// included).
fn pids_with(needle: &str) -> Vec<i32> {
    pids_where(|cmd| cmd.contains(needle))
}

/// Live `sleep` processes whose command line contains `needle`: the agent itself, once its
/// sandbox is up. (Killing the server while `bwrap` is still setting the sandbox up would test
/// bubblewrap's own start-up: its inner process sets `--die-with-parent` only after it was
/// cloned, and misses a parent that died in between.)
fn sleeps_with(needle: &str) -> Vec<i32> {
    pids_where(|cmd| {
        let program = cmd.split(' ').next().unwrap_or_default();
        (program == "sleep" || program.ends_with("/sleep")) && cmd.contains(needle)
    })
}

fn pids_where(wanted: impl Fn(&str) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
            .unwrap_or(true);
        if wanted(&cmd) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// Triggers `workflow`: the job's id.
async fn trigger(http: &reqwest::Client, server: &Server, workflow: &str) -> String {
    let res: Value = http
        .post(format!("{}/workflows/trigger", server.base))
        .bearer_auth(KEY)
        .json(&json!({"workflow": workflow}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    res["job_id"].as_str().expect("a job id").to_owned()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(LIMIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

fn bwrap_installed() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bwrap").is_file()));
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("bwrap is not installed; run `bash scripts/install-peers.sh`");
        }
        eprintln!("skipping: bwrap is not installed (apt-get install bubblewrap)");
    }
    found
}

#[tokio::test]
async fn agents_die_with_the_server_on_sigkill() {
    if !bwrap_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Unique marker arguments: `sleep` accepts fractional seconds.
    let plain = format!("86400.{}1", std::process::id());
    let boxed = format!("86400.{}2", std::process::id());
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{root}" }}
engine: {{ workers: 4, per_project_concurrency: 2 }}
agents:
  plain: {{ kind: command }}
  boxed: {{ kind: command, sandbox: bwrap }}
workflows:
  sleep-plain:
    steps:
      - {{ name: sleep, agent: plain, command: ["sleep", "{plain}"] }}
  sleep-boxed:
    steps:
      - {{ name: sleep, agent: boxed, command: ["sleep", "{boxed}"] }}
"#,
        root = dir.path().display()
    );
    let mut server = start(&config, dir.path());
    let http = reqwest::Client::new();
    let mut jobs = Vec::new();
    for wf in ["sleep-plain", "sleep-boxed"] {
        jobs.push(trigger(&http, &server, wf).await);
    }
    // Both jobs are running…
    for id in &jobs {
        let url = format!("{}/workflows/{id}/status", server.base);
        tokio::time::timeout(LIMIT, async {
            loop {
                let doc: Value = http
                    .get(&url)
                    .bearer_auth(KEY)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if doc["status"] == "running" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the job runs");
    }
    // …and so are their sleeps.
    wait_until("the plain sleep", || !sleeps_with(&plain).is_empty()).await;
    wait_until("the sandboxed sleep", || !sleeps_with(&boxed).is_empty()).await;
    let before: Vec<i32> = pids_with(&plain)
        .into_iter()
        .chain(pids_with(&boxed))
        .collect();
    assert!(before.len() >= 2, "{before:?}");

    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGKILL).unwrap();
    let status = server.child.wait().unwrap();
    assert!(!status.success());

    // Bounded wait (not a threshold): the kernel kills them as soon as the server is gone.
    let gone = tokio::time::timeout(LIMIT, async {
        while !(pids_with(&plain).is_empty() && pids_with(&boxed).is_empty()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if gone.is_err() {
        let left: Vec<String> = pids_with(&plain)
            .into_iter()
            .chain(pids_with(&boxed))
            .map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                format!(
                    "{pid}: {} [{stat}]",
                    String::from_utf8_lossy(&cmd).replace('\0', " ")
                )
            })
            .collect();
        panic!("processes of the jobs outlived the server: {left:#?}");
    }
}

/// The agent's shell (`sh`, as its path was found, then `-c`), not `setpriv` before its exec.
fn is_shell(cmd: &str) -> bool {
    let program = cmd.split(' ').next().unwrap_or_default();
    (program == "sh" || program.ends_with("/sh")) && cmd.contains(" -c sleep ")
}

/// What an unsandboxed agent started in turn is not its server's child: `PDEATHSIG` does not
/// reach it, and after a `kill -9` of the server it lives on under init. The next server that
/// starts on the host stops it: its run mark names a server that is gone.
#[tokio::test]
async fn what_an_agent_left_behind_is_stopped_when_a_server_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let left = format!("86400.{}3", std::process::id());
    let config = format!(
        r#"
server: {{ bind: "127.0.0.1:0" }}
projects: {{ root: "{root}" }}
agents:
  plain: {{ kind: command }}
workflows:
  leave:
    steps:
      - {{ name: leave, agent: plain, command: ["sh", "-c", "sleep {left} & wait"] }}
"#,
        root = dir.path().display()
    );
    let mut server = start(&config, dir.path());
    trigger(&reqwest::Client::new(), &server, "leave").await;
    wait_until("the agent's own sleep", || !sleeps_with(&left).is_empty()).await;
    let shell = pids_where(|cmd| is_shell(cmd) && cmd.contains(&left));
    assert_eq!(shell.len(), 1, "{shell:?}");

    kill(Pid::from_raw(server.child.id() as i32), Signal::SIGKILL).unwrap();
    server.child.wait().unwrap();
    // The agent (the shell) dies with the server; the sleep it started does not.
    wait_until("the shell to die with the server", || {
        pids_where(|cmd| is_shell(cmd) && cmd.contains(&left)).is_empty()
    })
    .await;
    let orphans = sleeps_with(&left);
    assert_eq!(
        orphans.len(),
        1,
        "the sleep outlived its server: {orphans:?}"
    );

    // A server starts again on the host: the sleep is stopped.
    let again = start(&config, dir.path());
    let gone = tokio::time::timeout(LIMIT, async {
        while !sleeps_with(&left).is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(again);
    if gone.is_err() {
        for pid in sleeps_with(&left) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        panic!("the sleep a dead server's agent left behind survived the next server's start");
    }
}
