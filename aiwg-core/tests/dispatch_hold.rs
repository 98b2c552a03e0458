//! Receivers that hold requests: timeouts, the per-subscription in-flight cap, and shutdown
//! releasing an attempt in flight.

#[path = "dispatch_support.rs"]
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::dispatch::{
    CreateSubscription, DeliveryState, Dispatcher, OutboundEvent, RetryPolicy, SubscriptionId,
};
use serde_json::json;
use support::{wait_delivery, wait_until};
use tokio::sync::Semaphore;

/// A receiver that holds every request until the test adds a permit.
#[derive(Clone)]
struct Hold {
    url: String,
    in_flight: Arc<AtomicUsize>,
    max_seen: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
}

async fn hold() -> Hold {
    let h = Hold {
        url: String::new(),
        in_flight: Arc::default(),
        max_seen: Arc::default(),
        done: Arc::default(),
        release: Arc::new(Semaphore::new(0)),
    };
    let s = h.clone();
    let app = axum::Router::new().fallback(move || {
        let s = s.clone();
        async move {
            let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            s.max_seen.fetch_max(now, Ordering::SeqCst);
            s.release.acquire().await.unwrap().forget();
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            s.done.fetch_add(1, Ordering::SeqCst);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Hold { url, ..h }
}

async fn subscribe(d: &Dispatcher, url: &str) -> SubscriptionId {
    d.create(CreateSubscription {
        url: url.into(),
        events: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .subscription
    .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_subscription_cap_bounds_concurrency() {
    let h = hold().await;
    let d = Dispatcher::builder()
        .allow_private_targets(true)
        .workers(10)
        .max_in_flight_per_subscription(2)
        .build()
        .unwrap();
    d.start().unwrap();
    let sub = subscribe(&d, &h.url).await;
    for _ in 0..10 {
        d.publish(OutboundEvent::new("job.queued", json!({})))
            .await
            .unwrap();
    }
    for i in 0..10 {
        let expected = 2.min(10 - i);
        wait_until("the cap to fill", || async {
            (h.in_flight.load(Ordering::SeqCst) == expected).then_some(())
        })
        .await;
        assert!(h.max_seen.load(Ordering::SeqCst) <= 2, "cap exceeded");
        h.release.add_permits(1);
        wait_until("one to finish", || async {
            (h.done.load(Ordering::SeqCst) > i).then_some(())
        })
        .await;
    }
    wait_until("all delivered", || async {
        (d.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    assert_eq!(h.max_seen.load(Ordering::SeqCst), 2);
    let page = d.deliveries(sub, 100, None).await.unwrap();
    assert!(page
        .deliveries
        .iter()
        .all(|x| x.state == DeliveryState::Succeeded));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_times_out_as_a_network_error() {
    let h = hold().await;
    let d = Dispatcher::builder()
        .allow_private_targets(true)
        .timeout(Duration::from_millis(200))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    d.start().unwrap();
    let sub = subscribe(&d, &h.url).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    let a = &failed.attempts[0];
    assert_eq!(a.status_code, 0);
    assert!(
        a.error.as_deref().unwrap().contains("timed out"),
        "{:?}",
        a.error
    );
    h.release.add_permits(100);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_attempt_in_flight() {
    let h = hold().await;
    let d = Dispatcher::builder()
        .allow_private_targets(true)
        .build()
        .unwrap();
    d.start().unwrap();
    let sub = subscribe(&d, &h.url).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    wait_until("the attempt to be in flight", || async {
        (h.in_flight.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    d.shutdown().await;
    let page = d.deliveries(sub, 10, None).await.unwrap();
    let x = &page.deliveries[0];
    assert_eq!(x.state, DeliveryState::Pending);
    assert!(
        x.attempts.is_empty(),
        "an abandoned attempt is not recorded"
    );
    // Released, not left to its lease: due again at once.
    let due = d.store().next_due_at().await.unwrap().unwrap();
    assert!(due <= chrono::Utc::now());
    h.release.add_permits(100);
    d.start().unwrap();
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    d.shutdown().await;
}
