//! A million quick jobs through the engine on the in-memory store (default retention: a day,
//! at most 10 000 finished jobs): the resident set after the first 100 000 jobs beside the
//! resident set at the end. Flat memory is a ratio near 1.0; a store that kept every finished
//! job would end several hundred MiB higher.
//!
//! `cargo bench -p aiwg-benches --bench memory_soak` (`AIWG_SOAK_JOBS` changes the count)

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::{
    AgentRequest, AgentResult, Capabilities, Engine, EventSink, Executor, ExecutorError, Health,
    JobRequest, JobStatus, Step, Workflow,
};
use tokio_util::sync::CancellationToken;

/// An agent that does nothing and remembers nothing (the scripted executor of the test
/// utilities records every request, which would be the only thing growing here).
struct Noop;

#[async_trait::async_trait]
impl Executor for Noop {
    async fn execute(
        &self,
        _request: AgentRequest,
        _events: EventSink,
        _cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        Ok(AgentResult::text("ok"))
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn kind(&self) -> &'static str {
        "noop"
    }
    async fn health(&self) -> Health {
        Health::healthy()
    }
}

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

fn main() {
    let jobs: usize = std::env::var("AIWG_SOAK_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let warm = jobs / 10;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let engine = Engine::builder()
            .executor("noop", Arc::new(Noop))
            .workflow(Workflow::new("w").step(Step::prompt("s", "noop", "{{guidance}}")))
            .workers(4)
            .queue_capacity(10_000)
            .build()
            .expect("engine");
        let start = std::time::Instant::now();
        let mut at_warm = 0;
        let mut peak = 0;
        let batch = 1_000;
        let mut done = 0;
        while done < jobs {
            let mut ids = Vec::with_capacity(batch);
            for i in 0..batch {
                let job = engine
                    .submit(JobRequest::new("w").guidance(format!("job {}", done + i)))
                    .await
                    .expect("submit");
                ids.push(job.id);
            }
            // The last job of the batch ending means the batch is through (FIFO, one priority).
            for id in ids.iter().rev().take(1) {
                let job = engine
                    .wait(*id, Duration::from_secs(60))
                    .await
                    .expect("wait");
                assert_eq!(job.status, JobStatus::Completed);
            }
            done += batch;
            peak = peak.max(rss());
            if done == warm {
                at_warm = rss();
            }
        }
        let end = rss();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "jobs:                      {done} in {secs:.1} s ({:.0} jobs/s)",
            done as f64 / secs
        );
        println!("rss after {warm} jobs: {} MiB", at_warm / 1024 / 1024);
        println!(
            "rss at the end:            {} MiB (peak {} MiB)",
            end / 1024 / 1024,
            peak / 1024 / 1024
        );
        println!(
            "ratio memory_soak_flat {:.2}",
            at_warm as f64 / end.max(1) as f64
        );
        engine.shutdown(Duration::from_secs(5)).await;
    });
}
