//! Heap allocations per job from submit to terminal state with a no-op executor (in-memory
//! store, 4 workers), beside the allocations of the engine bench's baseline (a bare
//! `tokio::spawn` + oneshot round trip per item). Counted with `dhat`'s allocator, in a binary of
//! its own; unlike a rate, the count does not depend on what else the machine is doing, so it
//! shows what a change to the hot path saves even on a busy machine.
//!
//! `cargo bench -p aiwg-benches --bench engine_allocs`; `AIWG_ALLOC_JOBS` (default 10 000)
//! changes the count; `AIWG_ALLOC_PROFILE=1` also writes `dhat-heap.json` (every allocation
//! site; build with `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only` to see inlined frames). The
//! last line is `ratio engine_allocations_per_job <baseline / ours>`.

use std::sync::Arc;
use std::time::Duration;

use aiwg_benches::engine::{spawn_round_trips, submit_then_wait};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, Step, Workflow};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Blocks allocated so far.
fn blocks() -> u64 {
    dhat::HeapStats::get().total_blocks
}

fn main() {
    let jobs: usize = std::env::var("AIWG_ALLOC_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // `AIWG_ALLOC_PROFILE=1` writes `dhat-heap.json` (every allocation site, for dhat's viewer)
    // instead of counting quietly.
    let _profiler = if std::env::var_os("AIWG_ALLOC_PROFILE").is_some() {
        dhat::Profiler::new_heap()
    } else {
        dhat::Profiler::builder().testing().build()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let engine = rt.block_on(async {
        Engine::builder()
            .executor("noop", Arc::new(ScriptedExecutor::succeeding("")))
            .workflow(Workflow::new("noop").step(Step::prompt("run", "noop", "x")))
            .workers(4)
            .queue_capacity(jobs * 2)
            .build()
            .expect("engine")
    });
    let (ours, bare) = rt.block_on(async {
        // A warm-up batch: the first jobs grow maps and rings that later ones reuse.
        submit_then_wait(&engine, jobs).await;
        let before = blocks();
        submit_then_wait(&engine, jobs).await;
        let engine_blocks = blocks() - before;
        let before = blocks();
        spawn_round_trips(jobs).await;
        (engine_blocks, blocks() - before)
    });
    rt.block_on(engine.shutdown(Duration::from_secs(5)));
    let per = |b: u64| b as f64 / jobs as f64;
    println!("jobs:                          {jobs}");
    println!("allocations per job (engine):  {:.1}", per(ours));
    println!("allocations per item (bare):   {:.1}", per(bare));
    println!(
        "ratio engine_allocations_per_job {:.3}",
        per(bare) / per(ours).max(f64::MIN_POSITIVE)
    );
}
