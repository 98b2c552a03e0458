//! Bytes of memory per queued job with 100 000 jobs queued (in-memory store), measured as the
//! growth of the process's resident set, beside the same number of bare `JobRequest`s held in a
//! `Vec` as the baseline.
//!
//! `cargo bench -p aiwg-benches --bench engine_memory`; the last line is
//! `ratio memory_per_queued_job <bare request bytes / engine bytes>` (the goal of issue 15,
//! at most 1 KiB per queued job, is a ratio of about 0.4).

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobRequest, Step, Workflow};

const JOBS: usize = 100_000;

/// Resident set size in bytes, from /proc/self/statm.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn request(i: usize) -> JobRequest {
    JobRequest::new("hold").guidance(format!("job {i}"))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let before = rss();
        let baseline: Vec<JobRequest> = (0..JOBS).map(request).collect();
        let baseline_bytes = rss().saturating_sub(before);
        drop(baseline);

        // One worker that hangs on its first job: everything else stays queued.
        let engine = Engine::builder()
            .executor("hang", Arc::new(ScriptedExecutor::hanging()))
            .workflow(Workflow::new("hold").step(Step::prompt("wait", "hang", "{{guidance}}")))
            .workers(1)
            .queue_capacity(JOBS + 1)
            .build()
            .expect("engine");
        let before = rss();
        for i in 0..JOBS {
            engine.submit(request(i)).await.expect("submit");
        }
        let queued = engine.queue_stats().await.expect("stats").queued;
        let engine_bytes = rss().saturating_sub(before);
        println!("queued jobs:                 {queued}");
        println!("engine bytes per queued job: {}", engine_bytes / JOBS);
        println!("baseline bytes per request:  {}", baseline_bytes / JOBS);
        println!(
            "engine / bare request: {:.2}",
            engine_bytes as f64 / baseline_bytes.max(1) as f64
        );
        // Higher is better: the bare request's bytes over the engine's.
        println!(
            "ratio memory_per_queued_job {:.3}",
            baseline_bytes as f64 / engine_bytes.max(1) as f64
        );
        engine.shutdown(Duration::ZERO).await;
    });
}
