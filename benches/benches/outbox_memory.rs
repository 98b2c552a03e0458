//! Memory per finished delivery kept in the in-memory outbox (its delivery log), counted by the
//! allocator.
//!
//! One subscription gets 10 000 deliveries of a 300-byte event; each is claimed and finished by
//! one successful attempt (status 200, body `ok`), as the dispatcher records them, and kept
//! (the default retention is 10 000 a subscription). The heap bytes the outbox holds then,
//! divided by the deliveries, are compared with the same deliveries as the log shows them
//! (`Delivery` values with their one attempt, the body shared as the outbox shares it) in a
//! `Vec`: what the log itself is. Counted with `dhat`'s allocator, in a binary of its own.
//!
//! `cargo bench -p aiwg-benches --bench outbox_memory`; `AIWG_OUTBOX_DELIVERIES` (default
//! 10 000) changes the count. The last line is `ratio outbox_memory_per_delivery <baseline /
//! ours>`.

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::dispatch::{
    Attempt, AttemptOutcome, AttemptTrigger, DeliveryClaimRequest, DispatchStore, FinishedAttempt,
    MemoryDispatchStore, NewDelivery, SigningSecret, Subscription,
};
use chrono::Utc;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Bytes allocated now.
fn heap() -> usize {
    dhat::HeapStats::get().curr_bytes
}

const BODY: &str = r#"{"type": "job.completed", "timestamp": "2026-12-07T10:00:00Z", "data": {"job_id": "0192d0c1-a8a0-7c43-b1c2-d3e4f5a6b7c8", "workflow": "review", "project": "/srv/p", "agent": "claude", "status": "completed", "exit_code": 0, "duration_ms": 1234, "trigger": {"source": "github", "repo": "o/r", "pr": 7}}}"#;

fn attempt() -> Attempt {
    Attempt {
        status_code: 200,
        duration_ms: 3,
        response_body: "ok".into(),
        error: None,
        at: Utc::now(),
        trigger: AttemptTrigger::Scheduled,
    }
}

/// A memory outbox with one subscription.
async fn outbox() -> (MemoryDispatchStore, Subscription) {
    let store = MemoryDispatchStore::new();
    let sub = Subscription::new(
        "http://127.0.0.1:9/hook",
        vec!["job.*".into()],
        None,
        SigningSecret::generate(),
        Utc::now(),
    );
    store.insert_subscription(&sub).await.unwrap();
    (store, sub)
}

/// Heap bytes the outbox holds for `n` finished deliveries of one subscription.
async fn ours(n: usize) -> usize {
    let (store, sub) = outbox().await;
    let body: Arc<str> = BODY.into();
    let before = heap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let now = Utc::now();
        let batch: Vec<_> = chunk
            .iter()
            .map(|_| NewDelivery::new(sub.id, "job.completed", body.clone(), now))
            .collect();
        store.enqueue(&batch).await.unwrap();
        drop(batch);
        let req = DeliveryClaimRequest::new(
            Utc::now(),
            chunk.len(),
            "bench",
            Duration::from_secs(60),
            1_000,
        );
        let claimed = store.claim_due(&req).await.unwrap();
        assert_eq!(claimed.len(), chunk.len());
        let finished: Vec<_> = claimed
            .into_iter()
            .map(|c| FinishedAttempt::new(c.lease, attempt(), AttemptOutcome::Succeeded))
            .collect();
        let recorded = store.finish_attempts(&finished).await.unwrap();
        assert!(recorded.iter().all(|ok| *ok));
    }
    let held = heap() - before;
    assert_eq!(
        store.deliveries(sub.id, n + 1, None).await.unwrap().len(),
        n,
        "every delivery kept"
    );
    held
}

/// Heap bytes of the same deliveries as the log shows them, in a `Vec`.
async fn bare(n: usize) -> usize {
    let (store, sub) = outbox().await;
    store
        .enqueue(&[NewDelivery::new(sub.id, "job.completed", BODY, Utc::now())])
        .await
        .unwrap();
    let one = store.deliveries(sub.id, 1, None).await.unwrap().remove(0);
    let before = heap();
    let mut log = Vec::with_capacity(n);
    for _ in 0..n {
        let mut d = one.clone();
        // The body is shared in the outbox: count it once, not per delivery.
        d.payload = String::new();
        d.attempts = vec![attempt()];
        log.push(d);
    }
    let held = heap() - before;
    drop(log);
    held
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let n: usize = std::env::var("AIWG_OUTBOX_DELIVERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ours = rt.block_on(ours(n)) as f64 / n as f64;
    let bare = rt.block_on(bare(n)) as f64 / n as f64;
    println!("memory per finished delivery kept, {n} deliveries: outbox {ours:.0} B, the log's values in a Vec {bare:.0} B");
    println!("ratio outbox_memory_per_delivery {:.3}", bare / ours);
}
