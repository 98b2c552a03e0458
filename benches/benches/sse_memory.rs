//! Memory per subscriber of one running job, counted by the allocator (not the resident set,
//! which does not move for a few hundred kilobytes the allocator already holds).
//!
//! 1 000 tasks each follow one running job through [`Engine::subscribe_shared`] (what the SSE
//! and WebSocket endpoints hold per client, without the socket), and have each received one
//! event; the heap bytes still allocated, divided by the number of subscribers, are compared
//! with the same number of tasks each holding a bare `tokio::sync::broadcast` receiver of one
//! channel. Counted with `dhat`'s allocator, in a binary of its own so that no other bench runs
//! under it.
//!
//! `cargo bench -p aiwg-benches --bench sse_memory`; `AIWG_FANOUT_SUBSCRIBERS` (default 1000)
//! changes the count. The last line is `ratio sse_memory_per_subscriber <baseline / ours>`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobRequest, Step, Workflow};
use futures_util::StreamExt;
use tokio::sync::{broadcast, Notify};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Bytes allocated now.
fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

/// Counts tasks that got their first event, and wakes the bench when all have.
struct Arrivals {
    n: AtomicUsize,
    all: Notify,
    target: usize,
}

impl Arrivals {
    fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            n: AtomicUsize::new(0),
            all: Notify::new(),
            target,
        })
    }

    fn arrived(&self) {
        if self.n.fetch_add(1, Ordering::SeqCst) + 1 == self.target {
            self.all.notify_one();
        }
    }

    async fn wait(&self) {
        tokio::time::timeout(Duration::from_secs(60), self.all.notified())
            .await
            .expect("every subscriber got its first event");
    }
}

async fn ours(subscribers: usize) -> usize {
    let exec = ScriptedExecutor::hanging();
    let engine = Engine::builder()
        .executor("hang", Arc::new(exec.clone()))
        .workflow(Workflow::new("w").step(Step::prompt("s", "hang", "x")))
        .build()
        .expect("engine");
    let job = engine.submit(JobRequest::new("w")).await.expect("submit");
    assert!(exec.wait_started(1, Duration::from_secs(10)).await);
    // One subscriber first, so the job's channel exists before the count starts.
    let first = engine.subscribe_shared(job.id, 0).await.expect("subscribe");
    let arrivals = Arrivals::new(subscribers);
    let before = heap();
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut events = engine.subscribe_shared(job.id, 0).await.expect("subscribe");
        let arrivals = Arc::clone(&arrivals);
        tasks.push(tokio::spawn(async move {
            let _ = events.next().await;
            arrivals.arrived();
            // Held open, waiting for the next event, as a connected client is.
            while events.next().await.is_some() {}
        }));
    }
    arrivals.wait().await;
    let bytes = heap().saturating_sub(before);
    engine.cancel(job.id).await.expect("cancel");
    for t in tasks {
        let _ = t.await;
    }
    drop(first);
    engine.shutdown(Duration::from_secs(5)).await;
    bytes / subscribers
}

async fn baseline(subscribers: usize) -> usize {
    let (tx, _rx) = broadcast::channel::<Arc<String>>(256);
    let arrivals = Arrivals::new(subscribers);
    let before = heap();
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut rx = tx.subscribe();
        let arrivals = Arc::clone(&arrivals);
        tasks.push(tokio::spawn(async move {
            let _ = rx.recv().await;
            arrivals.arrived();
            while rx.recv().await.is_ok() {}
        }));
    }
    let _ = tx.send(Arc::new("the first event".to_owned()));
    arrivals.wait().await;
    let bytes = heap().saturating_sub(before);
    drop(tx);
    for t in tasks {
        let _ = t.await;
    }
    bytes / subscribers
}

fn main() {
    let subscribers: usize = std::env::var("AIWG_FANOUT_SUBSCRIBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let _profiler = dhat::Profiler::builder().testing().build();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (ours, bare) =
        rt.block_on(async { (ours(subscribers).await, baseline(subscribers).await) });
    println!("subscribers of one running job:      {subscribers}");
    println!("heap bytes per subscriber (engine):  {ours}");
    println!("heap bytes per subscriber (bare):    {bare}");
    println!(
        "ratio sse_memory_per_subscriber {:.3}",
        bare as f64 / ours.max(1) as f64
    );
}
