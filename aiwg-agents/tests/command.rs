//! The command executor against real programs (`sh`, `echo`, `printf`, `sleep`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aiwg_agents::{CommandExecutor, ProcessOptions, ResourceLimits};
use aiwg_core::{AgentEvent, AgentRequest, EventSink, Executor, ExecutorError, LogStream};
use tokio_util::sync::CancellationToken;

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<AgentEvent>) -> Vec<AgentEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn output_exit_code_and_streams() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder().build().unwrap();
    let (sink, mut rx) = EventSink::channel();
    let req = AgentRequest::command(
        argv(&["sh", "-c", "echo out1; echo err1 >&2; echo out2; pwd"]),
        dir.path(),
    );
    let res = exec
        .execute(req, sink, CancellationToken::new())
        .await
        .unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(res.output, format!("out1\nout2\n{}\n", cwd.display()));
    assert_eq!(res.exit_code, Some(0));
    let events = drain(&mut rx);
    assert!(events.contains(&AgentEvent::Log {
        stream: LogStream::Stderr,
        line: "err1".into()
    }));
    assert!(events.contains(&AgentEvent::Log {
        stream: LogStream::Stdout,
        line: "out2".into()
    }));
}

#[tokio::test]
async fn non_zero_exit_is_an_error_with_code_and_stderr_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = argv(&["sh", "-c", "echo broken >&2; exit 7"]);
    let exec = CommandExecutor::builder().build().unwrap();
    let err = exec
        .execute(
            AgentRequest::command(cmd.clone(), dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    match err {
        ExecutorError::Failed { message, exit_code } => {
            assert_eq!(exit_code, Some(7));
            assert!(message.contains("broken"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    let lenient = CommandExecutor::builder()
        .allow_failure(true)
        .build()
        .unwrap();
    let res = lenient
        .execute(
            AgentRequest::command(cmd, dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(res.exit_code, Some(7));
}

#[tokio::test]
async fn hostile_arguments_are_passed_literally() {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    std::fs::write(&canary, "still here").unwrap();
    let exec = CommandExecutor::builder().build().unwrap();
    let hostile = [
        "; rm -rf ~",
        "$(id)",
        "`id`",
        "&& rm canary",
        "| cat /etc/passwd",
        "--help",
        "a\nb",
    ];
    let mut cmd = argv(&["printf", "[%s]\\n"]);
    cmd.extend(hostile.iter().map(|s| (*s).to_owned()));
    let res = exec
        .execute(
            AgentRequest::command(cmd, dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let expected: String = hostile.iter().map(|h| format!("[{h}]\n")).collect();
    assert_eq!(res.output, expected);
    assert!(canary.exists());
}

#[tokio::test]
async fn template_arguments_come_from_params_one_element_each() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .template(["printf", "<%s>", "--name={{name}}", "{{ file }}"])
        .build()
        .unwrap();
    let mut params = BTreeMap::new();
    params.insert("name".to_owned(), "$(id)".to_owned());
    params.insert("file".to_owned(), "a b; rm -rf ~".to_owned());
    let mut req = AgentRequest::new("unused", dir.path()).with_params(params);
    req.command = None;
    let res = exec
        .execute(req, EventSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(res.output, "<--name=$(id)><a b; rm -rf ~>\n");

    let missing = AgentRequest::new("unused", dir.path());
    let err = exec
        .execute(missing, EventSink::discard(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("`name`"), "{err}");
}

/// A host running the executor's template itself (no engine in between): a parameter whose
/// value would start an argument with `-` refuses the run before anything starts, naming the
/// parameter and not its value; inside an argument such a value is fine, a parameter named with
/// `allow_option_param` may lead, and a NUL byte is refused anywhere.
#[tokio::test]
async fn template_values_may_not_become_options() {
    let dir = tempfile::tempdir().unwrap();
    let template = [
        "sh",
        "-c",
        "touch ran; printf '<%s>' \"$@\"",
        "sh",
        "--name={{name}}",
        "{{file}}",
    ];
    let run = |exec: CommandExecutor, name: &str, file: &str| {
        let mut params = BTreeMap::new();
        params.insert("name".to_owned(), name.to_owned());
        params.insert("file".to_owned(), file.to_owned());
        let mut req = AgentRequest::new("unused", dir.path()).with_params(params);
        req.command = None;
        async move {
            exec.execute(req, EventSink::discard(), CancellationToken::new())
                .await
        }
    };
    let exec = CommandExecutor::builder()
        .template(template)
        .build()
        .unwrap();
    let err = run(exec.clone(), "x", "--output=/etc/secret-value")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`file`") && text.contains("`-`"), "{text}");
    assert!(!text.contains("secret-value"), "{text}");
    assert!(!dir.path().join("ran").exists(), "the command ran");
    // The same request would be refused again: not worth a retry.
    assert!(
        matches!(
            &err,
            aiwg_core::ExecutorError::InvalidRequest(aiwg_core::RequestError::Param { name, .. })
                if name == "file"
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    let err = run(exec.clone(), "a\0b", "f").await.unwrap_err();
    assert!(
        err.to_string().contains("`name`") && err.to_string().contains("NUL"),
        "{err}"
    );
    assert!(!dir.path().join("ran").exists(), "the command ran");

    let res = run(exec, "-x", "file").await.unwrap();
    assert_eq!(res.output, "<--name=-x><file>\n");

    let lenient = CommandExecutor::builder()
        .template(template)
        .allow_option_param("file")
        .build()
        .unwrap();
    let res = run(lenient, "x", "--verbose").await.unwrap();
    assert_eq!(res.output, "<--name=x><--verbose>\n");
}

#[tokio::test]
async fn missing_program_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder().build().unwrap();
    let err = exec
        .execute(
            AgentRequest::command(argv(&["/nonexistent/aiwg-no-such-program"]), dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ExecutorError::Spawn(_)), "{err:?}");
}

async fn run_and_stop(
    exec: CommandExecutor,
    req: AgentRequest,
    marker: &str,
    cancel: CancellationToken,
    fire: bool,
) -> (Result<aiwg_core::AgentResult, ExecutorError>, Vec<i32>) {
    let dir = req.project_path.clone();
    let (stop_watch, watched) = common::watch_dir(dir.clone());
    let c = cancel.clone();
    let run = tokio::spawn(async move { exec.execute(req, EventSink::discard(), c).await });
    assert!(
        common::wait_for(Duration::from_secs(20), || common::pids_with_cmdline(
            marker
        )
        .len()
            >= 2)
        .await,
        "the command did not start its processes"
    );
    let mut pids = common::pids_with_cmdline(marker);
    if fire {
        cancel.cancel();
    }
    let res = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("execute returned")
        .unwrap();
    let _ = stop_watch.send(());
    pids.extend(watched.await.unwrap());
    (res, pids)
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().grace(Duration::from_secs(2)))
        .build()
        .unwrap();
    // A background child and a foreground child: both must be gone afterwards.
    let req = AgentRequest::command(
        argv(&["sh", "-c", "sleep 311 & sleep 311; echo never"]),
        dir.path(),
    );
    let (res, pids) = run_and_stop(exec, req, "sleep 311", CancellationToken::new(), true).await;
    assert_eq!(res.unwrap_err().kind(), "cancelled");
    assert!(pids.len() >= 3, "sh and two sleeps: {pids:?}");
    for pid in pids {
        assert!(
            !aiwg_agents::process_alive(pid),
            "pid {pid} survived the cancel"
        );
    }
    assert!(common::pids_with_cmdline("sleep 311").is_empty());
}

#[tokio::test]
async fn processes_in_their_own_group_are_found_and_killed_too() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().grace(Duration::from_secs(1)))
        .build()
        .unwrap();
    // `setsid` puts the inner sleep into a new session and group, as tools of agents do.
    let req = AgentRequest::command(
        argv(&["sh", "-c", "setsid sleep 312 & sleep 312"]),
        dir.path(),
    )
    .with_timeout(Duration::from_secs(600));
    let (res, pids) = run_and_stop(exec, req, "sleep 312", CancellationToken::new(), true).await;
    assert_eq!(res.unwrap_err().kind(), "cancelled");
    for pid in pids {
        assert!(!aiwg_agents::process_alive(pid), "pid {pid} survived");
    }
    assert!(common::pids_with_cmdline("sleep 312").is_empty());
}

#[tokio::test]
async fn request_timeout_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().grace(Duration::from_millis(500)))
        .build()
        .unwrap();
    let req = AgentRequest::command(argv(&["sh", "-c", "sleep 313 & sleep 313"]), dir.path())
        .with_timeout(Duration::from_secs(3));
    let (res, pids) = run_and_stop(exec, req, "sleep 313", CancellationToken::new(), false).await;
    assert_eq!(res.unwrap_err().kind(), "timed_out");
    for pid in pids {
        assert!(
            !aiwg_agents::process_alive(pid),
            "pid {pid} survived the timeout"
        );
    }
}

#[tokio::test]
async fn idle_watchdog_stops_a_silent_run_and_output_keeps_it_alive() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(
            ProcessOptions::new()
                .idle_timeout(Duration::from_secs(2))
                .grace(Duration::from_millis(500)),
        )
        .build()
        .unwrap();
    let req = AgentRequest::command(
        argv(&["sh", "-c", "echo hi; sleep 314 & sleep 314"]),
        dir.path(),
    );
    let (res, pids) = run_and_stop(
        exec.clone(),
        req,
        "sleep 314",
        CancellationToken::new(),
        false,
    )
    .await;
    assert_eq!(res.unwrap_err().kind(), "idle");
    for pid in pids {
        assert!(!aiwg_agents::process_alive(pid));
    }
    // Output more often than the idle limit: it completes although it runs longer than it.
    let chatty = AgentRequest::command(
        argv(&[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done",
        ]),
        dir.path(),
    );
    let res = exec
        .execute(chatty, EventSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(res.output, "1\n2\n3\n4\n5\n6\n");
}

#[tokio::test]
async fn leftover_background_processes_are_killed_after_a_normal_exit() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().grace(Duration::from_millis(500)))
        .build()
        .unwrap();
    // The shell exits at once, leaving a sleep that holds no pipe.
    let req = AgentRequest::command(
        argv(&[
            "sh",
            "-c",
            "sleep 315 >/dev/null 2>&1 </dev/null & echo started",
        ]),
        dir.path(),
    );
    let res = exec
        .execute(req, EventSink::discard(), CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(res.output, "started\n");
    assert!(common::pids_with_cmdline("sleep 315").is_empty());
    assert!(common::pids_in_dir(dir.path()).is_empty());
}

#[tokio::test]
async fn resource_limits_apply_to_the_child() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").is_err(),
            "prlimit (util-linux) is missing"
        );
        eprintln!("skipping: prlimit is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(
            ProcessOptions::new().limits(ResourceLimits::new().cpu_time(7).address_space(1 << 30)),
        )
        .build()
        .unwrap();
    let res = exec
        .execute(
            AgentRequest::command(argv(&["sh", "-c", "ulimit -t; ulimit -v"]), dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(res.output, format!("7\n{}\n", (1u64 << 30) / 1024));
}

#[tokio::test]
async fn non_utf8_and_unterminated_output_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder().build().unwrap();
    let res = exec
        .execute(
            AgentRequest::command(argv(&["printf", "ok\\n\\377\\nlast"]), dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(res.output, "ok\n\u{fffd}\nlast\n");
}

/// Durations meant as "forever" (configuration accepts any number of seconds) are deadlines at
/// the clock's end, not a panic: an idle timeout and a kill grace of `Duration::MAX` (each
/// added to `Instant::now()` panicked with "overflow when adding duration to instant").
#[tokio::test]
async fn durations_past_the_clocks_range_mean_forever() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(
            ProcessOptions::new()
                .idle_timeout(Duration::MAX)
                .grace(Duration::MAX),
        )
        .build()
        .unwrap();
    let (sink, _rx) = EventSink::channel();
    let res = exec
        .execute(
            AgentRequest::command(argv(&["echo", "hi"]), dir.path()),
            sink,
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(res.output, "hi\n");
    // Stopped: SIGTERM ends it long before the grace would.
    let (sink, mut rx) = EventSink::channel();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        let req = AgentRequest::command(
            argv(&["sh", "-c", "echo started; exec sleep 300"]),
            dir.path(),
        );
        async move { exec.execute(req, sink, cancel).await }
    });
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ev) = rx.recv().await {
            if matches!(&ev, AgentEvent::Log { line, .. } if line == "started") {
                return;
            }
        }
    })
    .await
    .expect("the command starts");
    cancel.cancel();
    let res = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the run stops")
        .unwrap();
    assert_eq!(res.unwrap_err().kind(), "cancelled");
}

/// A command that starts a detached process (new session, output closed) and exits at once,
/// long before a scan of its tree could see the child: the process is gone when the job ends.
#[tokio::test]
async fn a_detached_process_does_not_outlive_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let exec = CommandExecutor::builder()
        .process(ProcessOptions::new().grace(Duration::from_millis(500)))
        .build()
        .unwrap();
    let secs = 100_000 + std::process::id() % 100_000;
    let needle = format!("sleep {secs}");
    let script = format!("setsid {needle} </dev/null >/dev/null 2>&1 & echo started");
    let res = exec
        .execute(
            AgentRequest::command(argv(&["sh", "-c", &script]), dir.path()),
            EventSink::discard(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(res.output, "started\n");
    let left = common::pids_with_cmdline(&needle);
    for pid in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    assert!(left.is_empty(), "{needle} outlived its job: {left:?}");
}
