//! Jobs per second from submit to terminal state with a no-op executor, at 1, 4 and 64 workers,
//! beside a baseline of the same number of bare `tokio::spawn` + channel round trips.
//!
//! `cargo bench -p aiwg-benches --bench engine` — criterion reports both as elements/s; the
//! ratio is engine throughput / baseline throughput for the same batch.

// `criterion_group!` generates an undocumented public function.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    let mut ids = Vec::with_capacity(BATCH);
    for _ in 0..BATCH {
        ids.push(
            engine
                .submit(JobRequest::new("noop"))
                .await
                .expect("submit")
                .id,
        );
    }
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
    let mut rxs = Vec::with_capacity(BATCH);
    for i in 0..BATCH {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(i);
        });
        rxs.push(rx);
    }
    for rx in rxs {
        rx.await.expect("round trip");
    }
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
