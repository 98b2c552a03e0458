//! A quick command run, start to end, through `aiwg_agents::CommandExecutor` beside a bare
//! `tokio::process::Command` of the same program with the same piped output.
//!
//! Each run starts `true` (nothing to read, nothing left behind), so what is measured is what
//! the executor does around a process: its environment, its process-tree tracking (`/proc`),
//! the run's mark search when it ends, the output's line readers and its event sink. The
//! baseline spawns the same program with both outputs piped and waits for its exit and its
//! output (`Command::output`). Both sides run `AIWG_COMMAND_TASKS` (default 4) tasks at once,
//! `AIWG_COMMAND_RUNS` (default 400) runs per round, rounds alternated
//! (`AIWG_COMMAND_ROUNDS`, default 5).
//!
//! Prints `command runs/s` of each side per round and, last,
//! `ratio command_vs_bare_spawn <ours / bare>` (medians of the rounds). When bubblewrap is
//! installed, a third side runs the same through an executor with `sandbox: bwrap` (its own
//! PID, IPC and UTS namespaces, the system read-only, a temporary directory per run), and
//! `ratio command_bwrap_vs_bare_spawn` comes before the last line: what the sandbox costs a run.
//!
//! Run: `cargo bench -p aiwg-benches --bench command_run`.

use aiwg_benches::{env_usize, median};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use aiwg_agents::{CommandExecutor, ProcessOptions, Sandbox};
use aiwg_core::{AgentRequest, EventSink, Executor};
use tokio_util::sync::CancellationToken;

/// `runs` runs of `true` through the executor, `tasks` at a time: runs per second.
async fn ours(exec: &Arc<CommandExecutor>, dir: &Path, runs: usize, tasks: usize) -> f64 {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let exec = Arc::clone(exec);
        let dir = dir.to_path_buf();
        let mine = runs / tasks + usize::from(t < runs % tasks);
        set.spawn(async move {
            for _ in 0..mine {
                let req = AgentRequest::command(vec!["true".to_owned()], &dir);
                let res = exec
                    .execute(req, EventSink::discard(), CancellationToken::new())
                    .await
                    .expect("true runs");
                assert_eq!(res.exit_code, Some(0));
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task");
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

/// The same runs as bare `tokio::process::Command::output` calls.
async fn bare(dir: &Path, runs: usize, tasks: usize) -> f64 {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let dir = dir.to_path_buf();
        let mine = runs / tasks + usize::from(t < runs % tasks);
        set.spawn(async move {
            for _ in 0..mine {
                let out = tokio::process::Command::new("true")
                    .current_dir(&dir)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .expect("true runs");
                assert!(out.status.success());
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task");
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let runs = env_usize("AIWG_COMMAND_RUNS", 400).max(1);
    let tasks = env_usize("AIWG_COMMAND_TASKS", 4).max(1);
    let rounds = env_usize("AIWG_COMMAND_ROUNDS", 5).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let exec = Arc::new(CommandExecutor::builder().build().expect("executor"));
    let boxed = CommandExecutor::builder()
        .process(ProcessOptions::new().sandbox(Sandbox::Bwrap))
        .build()
        .map(Arc::new)
        .inspect_err(|e| eprintln!("no sandboxed side: {e}"))
        .ok();
    let (mut o, mut b, mut s) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        // Warm every side: the first spawns page in the programs and the runtime's blocking
        // threads.
        ours(&exec, dir.path(), tasks * 4, tasks).await;
        bare(dir.path(), tasks * 4, tasks).await;
        if let Some(boxed) = &boxed {
            ours(boxed, dir.path(), tasks * 4, tasks).await;
        }
        for round in 0..rounds {
            let (x, y) = if round % 2 == 0 {
                let x = ours(&exec, dir.path(), runs, tasks).await;
                (x, bare(dir.path(), runs, tasks).await)
            } else {
                let y = bare(dir.path(), runs, tasks).await;
                (ours(&exec, dir.path(), runs, tasks).await, y)
            };
            print!("round {round}: command runs/s ours {x:.0} bare {y:.0}");
            if let Some(boxed) = &boxed {
                let z = ours(boxed, dir.path(), runs, tasks).await;
                print!(" sandboxed {z:.0}");
                s.push(z);
            }
            println!();
            o.push(x);
            b.push(y);
        }
    });
    let (o, b) = (median(o), median(b));
    println!("command runs/s (median of {rounds} rounds of {runs}, {tasks} tasks): ours {o:.0} bare {b:.0}");
    if !s.is_empty() {
        let s = median(s);
        println!("sandboxed (bwrap) runs/s: {s:.0}");
        println!("ratio command_bwrap_vs_bare_spawn {:.3}", s / b);
    }
    println!("ratio command_vs_bare_spawn {:.3}", o / b);
}
