//! Jobs per second from submit to terminal state with a no-op executor, at 1, 4 and 64 workers,
//! beside a baseline of the same number of bare `tokio::spawn` + channel round trips.
//!
//! `cargo bench -p aiwg-benches --bench engine` — criterion reports both as elements/s; the
//! ratio is engine throughput / baseline throughput for the same batch. The last lines are
//! `ratio <name> <value>` (median of a few more timed batches of each, run side by side).

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_benches::engine::{spawn_round_trips, submit_then_wait};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobRequest, Step, Workflow};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BATCH: usize = 1_000;

fn engine(workers: usize) -> Engine {
    Engine::builder()
        .executor("noop", Arc::new(ScriptedExecutor::succeeding("")))
        .workflow(Workflow::new("noop").step(Step::prompt("run", "noop", "x")))
        .workers(workers)
        .queue_capacity(BATCH * 4)
        .build()
        .expect("engine")
}

async fn run_batch(engine: &Engine) -> Duration {
    let start = Instant::now();
    submit_then_wait(engine, BATCH).await;
    start.elapsed()
}

/// The same batch through [`Engine::submit_many`].
async fn run_batch_many(engine: &Engine) -> Duration {
    let start = Instant::now();
    let ids: Vec<_> = engine
        .submit_many((0..BATCH).map(|_| JobRequest::new("noop")))
        .await
        .into_iter()
        .map(|r| r.expect("submit").id)
        .collect();
    for id in ids {
        engine
            .wait(id, Duration::from_secs(60))
            .await
            .expect("terminal");
    }
    start.elapsed()
}

async fn baseline_batch() -> Duration {
    let start = Instant::now();
    spawn_round_trips(BATCH).await;
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("submit_to_terminal");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("baseline_spawn_channel", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += baseline_batch().await;
            }
            total
        });
    });
    for workers in [1usize, 4, 64] {
        let engine = rt.block_on(async { engine(workers) });
        group.bench_with_input(
            BenchmarkId::new("engine_workers", workers),
            &workers,
            |b, _| {
                b.to_async(&rt).iter_custom(|iters| {
                    let engine = engine.clone();
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            total += run_batch(&engine).await;
                        }
                        total
                    }
                });
            },
        );
        rt.block_on(engine.shutdown(Duration::from_secs(5)));
    }
    group.finish();

    // The summary: median of side-by-side rounds, 4 workers (the default).
    let engine4 = rt.block_on(async { engine(4) });
    let (mut base, mut ours, mut many) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        base.push(rt.block_on(baseline_batch()));
        ours.push(rt.block_on(run_batch(&engine4)));
        many.push(rt.block_on(run_batch_many(&engine4)));
    }
    rt.block_on(engine4.shutdown(Duration::from_secs(5)));
    let rate = |d: Duration| BATCH as f64 / d.as_secs_f64();
    let (b, o, m) = (rate(median(base)), rate(median(ours)), rate(median(many)));
    println!(
        "submit -> terminal, {BATCH} jobs, 4 workers: engine {o:.0} jobs/s \
         (submit_many {m:.0}), bare spawn + oneshot {b:.0}/s"
    );
    println!("ratio engine_vs_spawn {:.3}", o / b);
    println!("ratio engine_submit_many_vs_spawn {:.3}", m / b);
}

/// Side-by-side rounds of the summary.
const ROUNDS: usize = 7;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

criterion_group!(benches, bench);
criterion_main!(benches);
