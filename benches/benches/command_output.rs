//! An agent's output, line by line, from its pipe to where the server keeps it: a `command` step
//! printing `AIWG_OUTPUT_LINES` (default 50 000) lines of 80 bytes (`cat` of a file), beside a
//! bare reader of the same program's output.
//!
//! Each side runs `AIWG_OUTPUT_RUNS` (default 4) runs back to back a round, its rate the lines
//! of all of them over their time; the rounds (`AIWG_OUTPUT_ROUNDS`, default 5) alternate the
//! sides' order. The sides:
//! - **bare**: `tokio::process::Command` of `cat <file>` with its output piped, read line by
//!   line into `String`s (`AsyncBufReadExt::lines`), counted, then its exit awaited;
//! - **executor**: the same run through `aiwg_agents::CommandExecutor` with a bounded sink
//!   (the engine's default budget and line cap), its events counted by a task;
//! - **engine**: a job of one `command` step through an `Engine` on the memory store (keeping
//!   the last two finished jobs), from submit to its terminal state (every line an event of
//!   the job's history);
//! - **postgres**: the same on a `PgStore` (`AIWG_TEST_DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/test`, in a schema of its own dropped at the end),
//!   when PostgreSQL answers; otherwise the bench says why and leaves the side out.
//!
//! Prints lines/s of each side per round and, last, `ratio command_output_executor_vs_bare`
//! and `ratio command_output_engine_vs_bare` (medians of the rounds), with
//! `ratio command_output_postgres_vs_bare` before them when PostgreSQL ran.
//!
//! Run: `cargo bench -p aiwg-benches --bench command_output`.

use aiwg_benches::{env_usize, median};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_agents::CommandExecutor;
use aiwg_core::{
    AgentEvent, AgentRequest, Engine, EventSink, Executor, JobRequest, JobStatus, Step, Workflow,
};
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

async fn bare(file: &Path, lines: usize) -> f64 {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("cat")
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cat starts");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut n = 0usize;
    while let Some(l) = out.next_line().await.expect("read") {
        std::hint::black_box(l);
        n += 1;
    }
    assert!(child.wait().await.expect("wait").success());
    assert_eq!(n, lines);
    lines as f64 / started.elapsed().as_secs_f64()
}

async fn executor(exec: &CommandExecutor, file: &Path, dir: &Path, lines: usize) -> f64 {
    let started = Instant::now();
    let (sink, mut rx) = EventSink::bounded(16 << 20, 64 << 10);
    let counter = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(e) = rx.recv().await {
            if matches!(e, AgentEvent::Log { .. }) {
                n += 1;
            }
        }
        n
    });
    let req = AgentRequest::command(vec!["cat".to_owned(), file.display().to_string()], dir);
    let res = exec
        .execute(req, sink, CancellationToken::new())
        .await
        .expect("cat runs");
    assert_eq!(res.exit_code, Some(0));
    assert_eq!(counter.await.expect("counter"), lines);
    lines as f64 / started.elapsed().as_secs_f64()
}

async fn engine(engine: &Engine, lines: usize) -> f64 {
    let started = Instant::now();
    let job = engine
        .submit(JobRequest::new("flood"))
        .await
        .expect("submit");
    let done = engine
        .wait(job.id, Duration::from_secs(120))
        .await
        .expect("terminal");
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    lines as f64 / started.elapsed().as_secs_f64()
}

/// `runs` runs of `side` back to back: lines per second over all of them.
async fn repeated<F: std::future::Future<Output = f64>>(runs: usize, side: impl Fn() -> F) -> f64 {
    let mut seconds = 0.0;
    for _ in 0..runs {
        seconds += 1.0 / side().await;
    }
    runs as f64 / seconds
}

fn command_engine(exec: &Arc<CommandExecutor>, file: &Path) -> aiwg_core::EngineBuilder {
    Engine::builder()
        .executor("sh", exec.clone())
        .workflow(Workflow::new("flood").step(Step::command(
            "cat",
            "sh",
            ["cat".to_owned(), file.display().to_string()],
        )))
}

fn main() {
    let lines = env_usize("AIWG_OUTPUT_LINES", 50_000).max(1);
    let rounds = env_usize("AIWG_OUTPUT_ROUNDS", 5).max(1);
    let runs = env_usize("AIWG_OUTPUT_RUNS", 4).max(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("output.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).expect("file"));
        for i in 0..lines {
            // 80 bytes a line with its newline.
            writeln!(f, "{i:>10} {}", "x".repeat(68)).expect("write");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let exec = Arc::new(CommandExecutor::builder().build().expect("executor"));
    let eng = rt.block_on(async {
        let keep_two = aiwg_core::store::Retention {
            max_finished: 2,
            ..aiwg_core::store::Retention::default()
        };
        command_engine(&exec, &file)
            .store(Arc::new(aiwg_core::MemoryStore::with_retention(keep_two)))
            .build()
            .expect("engine")
    });
    let pg = rt.block_on(async {
        let db = match aiwg_benches::pg::BenchSchema::create("command_output").await {
            Ok(db) => db,
            Err(why) => {
                println!("no postgres side: {why}");
                return None;
            }
        };
        let store = aiwg_core::store::PgStore::from_pool(db.pool(8).await)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let engine = command_engine(&exec, &file)
            .store(Arc::new(store))
            .build()
            .expect("engine");
        Some((db, engine))
    });
    let (mut b, mut x, mut e, mut p) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        bare(&file, lines).await;
        executor(&exec, &file, dir.path(), lines).await;
        engine(&eng, lines).await;
        if let Some((_, pg)) = &pg {
            engine(pg, lines).await;
        }
        for round in 0..rounds {
            let b_side = || repeated(runs, || bare(&file, lines));
            let x_side = || repeated(runs, || executor(&exec, &file, dir.path(), lines));
            let e_side = || repeated(runs, || engine(&eng, lines));
            let (bb, xx, ee) = if round % 2 == 0 {
                let bb = b_side().await;
                let xx = x_side().await;
                (bb, xx, e_side().await)
            } else {
                let ee = e_side().await;
                let xx = x_side().await;
                (b_side().await, xx, ee)
            };
            print!("round {round}: lines/s bare {bb:.0} executor {xx:.0} engine {ee:.0}");
            if let Some((_, pg)) = &pg {
                let pp = repeated(runs, || engine(pg, lines)).await;
                print!(" postgres {pp:.0}");
                p.push(pp);
            }
            println!();
            b.push(bb);
            x.push(xx);
            e.push(ee);
        }
        eng.shutdown(Duration::from_secs(5)).await;
        if let Some((db, pg)) = pg {
            pg.shutdown(Duration::from_secs(5)).await;
            db.drop_schema().await;
        }
    });
    let (b, x, e) = (median(b), median(x), median(e));
    println!(
        "lines/s (median of {rounds} rounds of {runs} runs of {lines} lines): bare {b:.0} executor {x:.0} engine {e:.0}"
    );
    if !p.is_empty() {
        let p = median(p);
        println!("postgres lines/s: {p:.0}");
        println!("ratio command_output_postgres_vs_bare {:.3}", p / b);
    }
    println!("ratio command_output_executor_vs_bare {:.3}", x / b);
    println!("ratio command_output_engine_vs_bare {:.3}", e / b);
}
