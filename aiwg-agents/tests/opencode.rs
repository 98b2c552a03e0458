//! The real `opencode serve` (`AIWG_TEST_OPENCODE`) against the scripted fake Anthropic server.

mod common;

use std::time::Duration;

use aiwg_agents::testing::{FakeAnthropic, Reply};
use aiwg_agents::{OpenCode, OpenCodeServer, ProcessOptions};
use aiwg_core::{AgentEvent, AgentRequest, EventSink, Executor, ExecutorError};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

struct Setup {
    fake: FakeAnthropic,
    server: OpenCodeServer,
    project: tempfile::TempDir,
    _home: tempfile::TempDir,
}

async fn setup(script: Vec<Reply>, password: Option<&str>) -> Option<Setup> {
    let bin = common::peer("AIWG_TEST_OPENCODE")?;
    let fake = FakeAnthropic::start(script).await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("opencode.json"),
        serde_json::to_vec_pretty(&fake.opencode_config()).unwrap(),
    )
    .unwrap();
    let mut b = OpenCodeServer::builder(project.path())
        .binary(bin)
        .startup_timeout(LIMIT);
    let opts = ProcessOptions::new()
        .env("HOME", home.path().to_string_lossy())
        .env(
            "XDG_CONFIG_HOME",
            home.path().join(".config").to_string_lossy(),
        )
        .env("XDG_DATA_HOME", home.path().join(".data").to_string_lossy())
        .env(
            "XDG_CACHE_HOME",
            home.path().join(".cache").to_string_lossy(),
        )
        .env(
            "XDG_STATE_HOME",
            home.path().join(".state").to_string_lossy(),
        )
        .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
        .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
        .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
        .env("OPENCODE_DISABLE_SHARE", "1");
    b = b.process(opts);
    if let Some(p) = password {
        b = b.password(p);
    }
    let server = b.start().await.unwrap();
    Some(Setup {
        fake,
        server,
        project,
        _home: home,
    })
}

#[tokio::test]
async fn completes_a_job_and_the_server_goes_away_on_shutdown() {
    let Some(s) = setup(
        vec![Reply::text("Hello from the fake model")],
        Some("pw-123"),
    )
    .await
    else {
        return;
    };
    let exec = s.server.client().build().unwrap();
    assert!(exec.health().await.healthy);
    // Without the password the server refuses, and the error carries the status.
    let anon = OpenCode::builder(s.server.url()).build().unwrap();
    let err = anon
        .execute(
            AgentRequest::new("hi", s.project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExecutorError::Http { status: 401, .. }),
        "{err:?}"
    );

    let (sink, mut rx) = EventSink::channel();
    let res = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("say hello", s.project.path()),
            sink,
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.output, "Hello from the fake model");
    assert!(res
        .session_id
        .as_deref()
        .is_some_and(|id| id.starts_with("ses")));
    assert!(res.cost_usd.is_some());
    assert_eq!(
        res.usage.map(|u| (u.input_tokens, u.output_tokens)),
        Some((10, 5))
    );
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    assert!(events.contains(&AgentEvent::Text {
        text: "Hello from the fake model".into()
    }));
    assert!(events.iter().any(|e| matches!(e, AgentEvent::Usage { .. })));
    // The prompt went to the model.
    assert!(s
        .fake
        .turns()
        .iter()
        .any(|t| t.body.to_string().contains("say hello")));

    let pid = s.server.pid().unwrap() as i32;
    s.server.shutdown().await;
    assert!(!aiwg_agents::process_alive(pid));
}

#[tokio::test]
async fn tool_calls_and_resume_work() {
    let Some(s) = setup(vec![], None).await else {
        return;
    };
    let target = s.project.path().join("made-by-opencode.txt");
    s.fake.push([
        Reply::tool_use(
            "write",
            json!({"filePath": target.to_string_lossy(), "content": "hello\n"}),
        ),
        Reply::text("file written"),
        Reply::text("second step"),
    ]);
    let exec = s.server.client().build().unwrap();
    let (sink, mut rx) = EventSink::channel();
    let first = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("write the file", s.project.path()),
            sink,
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.output, "file written");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "hello\n");
    let mut saw_use = false;
    let mut saw_result = false;
    while let Ok(e) = rx.try_recv() {
        match e {
            AgentEvent::ToolUse { name, .. } if name == "write" => saw_use = true,
            AgentEvent::ToolResult {
                is_error: false, ..
            } => saw_result = true,
            _ => {}
        }
    }
    assert!(saw_use && saw_result);

    let session = first.session_id.unwrap();
    let second = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("and now review", s.project.path()).with_resume(session.clone()),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(second.output, "second step");
    assert_eq!(second.session_id.as_deref(), Some(session.as_str()));
    let last = s.fake.turns().last().unwrap().body["messages"].to_string();
    assert!(last.contains("write the file") && last.contains("and now review"));
    s.server.shutdown().await;
}

#[tokio::test]
async fn cancel_aborts_the_session_and_waits_until_it_is_idle() {
    let Some(s) = setup(vec![Reply::Hang], None).await else {
        return;
    };
    let exec = s.server.client().build().unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let dir = s.project.path().to_path_buf();
    let e2 = exec.clone();
    let run = tokio::spawn(async move {
        e2.execute(
            AgentRequest::new("never ends", dir),
            EventSink::discard(),
            c,
        )
        .await
    });
    assert!(
        s.fake.wait_for_turns(1, LIMIT).await,
        "the model was never called"
    );
    cancel.cancel();
    let err = tokio::time::timeout(LIMIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), "cancelled");
    // The server reports no busy session any more.
    let status: serde_json::Value = reqwest::get(format!(
        "{}/session/status?directory={}",
        s.server.url(),
        s.project.path().display()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert!(
        status
            .as_object()
            .is_none_or(|m| m.values().all(|v| v["type"] == "idle")),
        "{status}"
    );

    // The request's timeout and the idle watchdog stop a hung session the same way.
    s.fake.push([Reply::Hang, Reply::Hang]);
    let err = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("hang until the timeout", s.project.path())
                .with_timeout(Duration::from_secs(5)),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.kind(), "timed_out");
    let watched = s
        .server
        .client()
        .idle_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let err = tokio::time::timeout(
        LIMIT,
        watched.execute(
            AgentRequest::new("hang until idle", s.project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.kind(), "idle");
    s.server.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_spawn_error_and_unhealthy() {
    // A port nothing listens on: bind one, then drop it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exec = OpenCode::builder(format!("http://127.0.0.1:{port}"))
        .build()
        .unwrap();
    assert!(!exec.health().await.healthy);
    let err = exec
        .execute(
            AgentRequest::new("hi", "/tmp"),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExecutorError::Spawn(_)), "{err:?}");
}

/// A server that accepts connections and never answers does not hold a job: the run ends at
/// its timeout, or at once when it is cancelled.
#[tokio::test]
async fn a_server_that_never_answers_ends_at_the_timeout_or_the_cancel() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts every connection and keeps it open, silent.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let exec = OpenCode::builder(format!("http://127.0.0.1:{port}"))
        .abort_wait(std::time::Duration::from_millis(200))
        .build()
        .unwrap();
    let bound = std::time::Duration::from_secs(60);
    let req = AgentRequest::new("hi", "/tmp").with_timeout(std::time::Duration::from_millis(300));
    let err = tokio::time::timeout(
        bound,
        exec.execute(req, EventSink::discard(), CancellationToken::new()),
    )
    .await
    .expect("the run ended at its timeout")
    .unwrap_err();
    assert!(matches!(err, ExecutorError::TimedOut(_)), "{err:?}");
    let cancel = CancellationToken::new();
    let run = exec.execute(
        AgentRequest::new("hi", "/tmp"),
        EventSink::discard(),
        cancel.clone(),
    );
    cancel.cancel();
    let err = tokio::time::timeout(bound, run)
        .await
        .expect("the run ended at its cancel")
        .unwrap_err();
    assert!(matches!(err, ExecutorError::Cancelled), "{err:?}");
    silent.abort();
}

/// The server's output is read past bytes that are not UTF-8 and in bounded pieces: a `lines()`
/// reader stopped at the first invalid byte, so a server that printed one before its address
/// was never found listening (and could block on a full pipe later).
#[tokio::test]
async fn a_server_printing_bytes_that_are_not_utf8_still_starts() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: python3 is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("opencode");
    std::fs::write(
        &fake,
        r#"#!/usr/bin/env python3
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("content-type", "application/json"); self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
sys.stdout.buffer.write(b"\xff\xfe not utf-8 " + b"x" * 200000 + b"\n")
sys.stdout.buffer.write(("opencode server listening on http://127.0.0.1:%d\n" % s.server_port).encode())
sys.stdout.flush()
s.serve_forever()
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let server = tokio::time::timeout(
        LIMIT,
        OpenCodeServer::builder(dir.path())
            .binary(&fake)
            .startup_timeout(std::time::Duration::from_secs(30))
            .start(),
    )
    .await
    .expect("started in time")
    .expect("the server was found listening");
    assert!(
        server.url().starts_with("http://127.0.0.1:"),
        "{}",
        server.url()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_serve_section_in_the_config_starts_a_supervised_server_that_dies_with_the_agent() {
    let Some(bin) = common::peer("AIWG_TEST_OPENCODE") else {
        return;
    };
    let fake = FakeAnthropic::start([Reply::text("served")]).await.unwrap();
    let project = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        project.path().join("opencode.json"),
        serde_json::to_vec_pretty(&fake.opencode_config()).unwrap(),
    )
    .unwrap();
    let h = |sub: &str| home.path().join(sub).to_string_lossy().into_owned();
    let agents = aiwg_agents::config::AgentsConfig::from_value(&json!({
        "oc": {
            "kind": "opencode",
            "password": "pw-serve",
            "idle_timeout": "2m",
            "serve": {
                "binary": bin,
                "dir": project.path(),
                "startup_timeout": "2m",
                "grace": "1s",
                "env": {
                    "HOME": h(""), "XDG_CONFIG_HOME": h(".config"), "XDG_DATA_HOME": h(".data"),
                    "XDG_CACHE_HOME": h(".cache"), "XDG_STATE_HOME": h(".state"),
                    "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
                    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1",
                },
            },
        },
    }))
    .unwrap();
    let built = agents.start().await.unwrap();
    let (name, exec) = &built.executors[0];
    assert_eq!(name, "oc");
    let res = tokio::time::timeout(
        LIMIT,
        exec.execute(
            AgentRequest::new("hello", project.path()),
            EventSink::discard(),
            CancellationToken::new(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(res.output, "served");
    assert!(!common::pids_in_dir(project.path()).is_empty());
    drop(built);
    assert!(
        common::wait_for(LIMIT, || common::pids_in_dir(project.path()).is_empty()).await,
        "the server outlived its agent"
    );
}

/// A server dropped while a tool runs (OpenCode runs its tools in process groups of their own)
/// takes the tool with it: the tree is read while the server is alive, before its own kill
/// leaves the tool to init.
#[tokio::test]
async fn a_dropped_server_takes_its_running_tools_with_it() {
    let Some(s) = setup(vec![], None).await else {
        return;
    };
    let marker = format!("aiwg-tool-{}", std::process::id());
    s.fake.push([
        Reply::tool_use(
            "bash",
            json!({"command": format!("exec -a {marker} sleep 1000"), "description": "wait", "timeout": 600_000}),
        ),
        Reply::text("never"),
    ]);
    let exec = s.server.client().build().unwrap();
    let project = s.project.path().to_owned();
    let run = tokio::spawn(async move {
        exec.execute(
            AgentRequest::new("run the tool", &project),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
    });
    let tool_running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).starts_with(&marker))
        })
    };
    assert!(
        common::wait_for(LIMIT, tool_running).await,
        "the tool started"
    );
    run.abort();
    drop(s);
    assert!(
        common::wait_for(LIMIT, || !tool_running()).await,
        "the tool outlived the server"
    );
}

/// A supervised server (owned by its client) killed between two jobs is replaced: the second
/// job runs on a new server process at a new port, and whatever binds the dead server's port
/// gets nothing (above all, not the password). A health check brings a dead server back too.
#[tokio::test]
async fn a_dead_supervised_server_is_replaced_before_the_next_job() {
    let Some(s) = setup(
        vec![Reply::text("first"), Reply::text("second")],
        Some("pw-replaced"),
    )
    .await
    else {
        return;
    };
    let Setup {
        fake,
        server,
        project,
        _home,
    } = s;
    let old_url = server.url().to_owned();
    let exec = server.into_client().build().unwrap();
    let run = |prompt: &'static str| {
        let exec = exec.clone();
        let dir = project.path().to_owned();
        async move {
            tokio::time::timeout(
                LIMIT,
                exec.execute(
                    AgentRequest::new(prompt, dir),
                    EventSink::discard(),
                    CancellationToken::new(),
                ),
            )
            .await
            .expect("the run ended in time")
        }
    };
    assert_eq!(run("one").await.unwrap().output, "first");
    let first_pid = exec.server_pid().expect("a supervised server");
    let kill = |pid: u32| {
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {pid}");
    };
    kill(first_pid);
    assert!(
        common::wait_for(LIMIT, || !aiwg_agents::process_alive(first_pid as i32)).await,
        "the server did not die"
    );

    // Another local process takes the dead server's port.
    let port = old_url.rsplit(':').next().unwrap().trim_end_matches('/');
    // (The kernel may take a moment to release the dead server's listening socket.)
    let mut impostor = None;
    for _ in 0..200 {
        match tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await {
            Ok(l) => {
                impostor = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let impostor = impostor.unwrap_or_else(|| {
        let ss = std::process::Command::new("ss")
            .arg("-ltnp")
            .output()
            .unwrap();
        panic!(
            "{old_url} {first_pid} {}",
            String::from_utf8_lossy(&ss.stdout)
        )
    });
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let spy = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut conn, _)) = impostor.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let _ = seen_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });

    let second = run("two").await;
    spy.abort();
    let mut seen = Vec::new();
    while let Ok(r) = seen_rx.try_recv() {
        seen.push(r);
    }
    assert!(
        seen.is_empty(),
        "the dead server's port got requests: {seen:?}"
    );
    assert_eq!(second.unwrap().output, "second");
    let second_pid = exec.server_pid().expect("a supervised server");
    assert_ne!(second_pid, first_pid);
    assert!(aiwg_agents::process_alive(second_pid as i32));
    assert!(fake
        .turns()
        .iter()
        .any(|t| t.body.to_string().contains("two")));

    // A health check finds the server dead and starts another one.
    kill(second_pid);
    assert!(
        common::wait_for(LIMIT, || !aiwg_agents::process_alive(second_pid as i32)).await,
        "the server did not die"
    );
    let health = tokio::time::timeout(LIMIT, exec.health()).await.unwrap();
    assert!(health.healthy, "{health:?}");
    let third_pid = exec.server_pid().unwrap();
    assert!(third_pid != second_pid && aiwg_agents::process_alive(third_pid as i32));

    drop(exec);
    assert!(
        common::wait_for(LIMIT, || !aiwg_agents::process_alive(third_pid as i32)).await,
        "the server outlived its client"
    );
}
