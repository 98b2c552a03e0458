//! Receivers that hold requests: timeouts, the per-subscription in-flight cap, shutdown
//! releasing an attempt in flight or what a claim on its way took, and workers sending while
//! their records are written.

#[path = "dispatch_support.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::dispatch::{
    Attempt, AttemptOutcome, ClaimedDelivery, CreateSubscription, Delivery, DeliveryClaimRequest,
    DeliveryId, DeliveryLease, DeliveryState, DispatchStore, DispatchStoreResult, Dispatcher,
    EndpointFailure, MemoryDispatchStore, NewDelivery, OutboundEvent, RequeueOutcome, RetryPolicy,
    Subscription, SubscriptionChange, SubscriptionId, CLAIMED_PER_WORKER,
};
use chrono::{DateTime, Utc};
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

/// An in-memory outbox whose attempts' records wait until the test opens a gate, and which
/// checks on every claim that the dispatcher never asks for more deliveries than it may hold.
struct GatedRecords {
    inner: MemoryDispatchStore,
    open: tokio::sync::watch::Receiver<bool>,
    /// Claimed and neither recorded nor released.
    held: AtomicUsize,
    /// The most the dispatcher may hold at once.
    most: usize,
    /// Claims that asked for more than the dispatcher may hold.
    overreach: std::sync::Mutex<Vec<String>>,
    /// Whether the next claim answers leases that end in a second (as if its deliveries had
    /// waited for a worker until their leases nearly ran out).
    short_leases: AtomicBool,
    /// Leases released.
    released: AtomicUsize,
    /// When set, a claim that took deliveries answers only once this says `true` (as a
    /// database's answer may come after the claimer was cancelled).
    claims_wait_for: std::sync::Mutex<Option<tokio::sync::watch::Receiver<bool>>>,
}

impl GatedRecords {
    fn new(open: tokio::sync::watch::Receiver<bool>, most: usize) -> Self {
        Self {
            inner: MemoryDispatchStore::new(),
            open,
            held: AtomicUsize::new(0),
            most,
            overreach: std::sync::Mutex::default(),
            short_leases: AtomicBool::new(false),
            released: AtomicUsize::new(0),
            claims_wait_for: std::sync::Mutex::default(),
        }
    }
}

#[async_trait::async_trait]
impl DispatchStore for GatedRecords {
    async fn insert_subscription(&self, sub: &Subscription) -> DispatchStoreResult<()> {
        self.inner.insert_subscription(sub).await
    }
    async fn subscription(&self, id: SubscriptionId) -> DispatchStoreResult<Option<Subscription>> {
        self.inner.subscription(id).await
    }
    async fn subscriptions(&self) -> DispatchStoreResult<Vec<Subscription>> {
        self.inner.subscriptions().await
    }
    async fn update_subscription(
        &self,
        id: SubscriptionId,
        change: &SubscriptionChange,
    ) -> DispatchStoreResult<Option<Subscription>> {
        self.inner.update_subscription(id, change).await
    }
    async fn delete_subscription(&self, id: SubscriptionId) -> DispatchStoreResult<bool> {
        self.inner.delete_subscription(id).await
    }
    async fn endpoint_failed(
        &self,
        id: SubscriptionId,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<Option<EndpointFailure>> {
        self.inner.endpoint_failed(id, at).await
    }
    async fn endpoint_succeeded(&self, id: SubscriptionId) -> DispatchStoreResult<()> {
        self.inner.endpoint_succeeded(id).await
    }
    async fn disable_subscription(
        &self,
        id: SubscriptionId,
        reason: &str,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<bool> {
        self.inner.disable_subscription(id, reason, at).await
    }
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> DispatchStoreResult<()> {
        self.inner.enqueue(deliveries).await
    }
    async fn claim_due(
        &self,
        req: &DeliveryClaimRequest,
    ) -> DispatchStoreResult<Vec<ClaimedDelivery>> {
        let held = self.held.load(Ordering::SeqCst);
        if held + req.limit > self.most {
            self.overreach.lock().unwrap().push(format!(
                "asked for {} while holding {held} (at most {})",
                req.limit, self.most
            ));
        }
        let mut claimed = self.inner.claim_due(req).await?;
        self.held.fetch_add(claimed.len(), Ordering::SeqCst);
        if !claimed.is_empty() && self.short_leases.swap(false, Ordering::SeqCst) {
            for c in &mut claimed {
                c.lease.expires_at = Utc::now() + chrono::Duration::seconds(1);
            }
        }
        let gate = self.claims_wait_for.lock().unwrap().clone();
        if let (Some(mut gate), false) = (gate, claimed.is_empty()) {
            gate.wait_for(|open| *open).await.unwrap();
        }
        Ok(claimed)
    }
    async fn finish_attempt(
        &self,
        lease: &DeliveryLease,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> DispatchStoreResult<()> {
        let mut open = self.open.clone();
        open.wait_for(|o| *o).await.unwrap();
        self.inner.finish_attempt(lease, attempt, outcome).await?;
        self.held.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    async fn release(&self, lease: &DeliveryLease) -> DispatchStoreResult<()> {
        self.inner.release(lease).await?;
        self.held.fetch_sub(1, Ordering::SeqCst);
        self.released.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn delivery(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
    ) -> DispatchStoreResult<Option<Delivery>> {
        self.inner.delivery(subscription, id).await
    }
    async fn deliveries(
        &self,
        subscription: SubscriptionId,
        limit: usize,
        before: Option<DeliveryId>,
    ) -> DispatchStoreResult<Vec<Delivery>> {
        self.inner.deliveries(subscription, limit, before).await
    }
    async fn requeue(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
        now: DateTime<Utc>,
    ) -> DispatchStoreResult<RequeueOutcome> {
        self.inner.requeue(subscription, id, now).await
    }
    async fn pending_count(&self) -> DispatchStoreResult<usize> {
        self.inner.pending_count().await
    }
    async fn next_due_at(&self) -> DispatchStoreResult<Option<DateTime<Utc>>> {
        self.inner.next_due_at().await
    }
}

/// A worker is free again once its request is answered: the attempt's record (a database
/// round trip on PostgreSQL) is written behind it. The dispatcher claims ahead of its workers,
/// but holds at most `CLAIMED_PER_WORKER` deliveries per worker (claimed, being sent, or
/// waiting for their record), and the workers still bound the requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_send_while_records_are_written_and_claims_stay_bounded() {
    const WORKERS: usize = 2;
    let most = WORKERS * CLAIMED_PER_WORKER;
    let (gate, open) = tokio::sync::watch::channel(false);
    let store = Arc::new(GatedRecords::new(open, most));
    let h = hold().await;
    h.release.add_permits(1_000);
    let d = Dispatcher::builder()
        .store(store.clone())
        .allow_private_targets(true)
        .workers(WORKERS)
        .max_in_flight_per_subscription(1_000)
        .build()
        .unwrap();
    d.start().unwrap();
    subscribe(&d, &h.url).await;
    for _ in 0..20 {
        d.publish(OutboundEvent::new("job.queued", json!({})))
            .await
            .unwrap();
    }
    // No record is written yet, and the workers went on sending: as many requests answered
    // as the dispatcher may hold, not one per worker.
    wait_until("the dispatcher to hold all it may", || async {
        (h.done.load(Ordering::SeqCst) == most).then_some(())
    })
    .await;
    assert_eq!(store.held.load(Ordering::SeqCst), most);
    gate.send(true).unwrap();
    wait_until("all delivered", || async {
        (d.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    assert_eq!(h.done.load(Ordering::SeqCst), 20, "each delivery sent once");
    assert!(
        h.max_seen.load(Ordering::SeqCst) <= WORKERS,
        "{} requests in flight for {WORKERS} workers",
        h.max_seen.load(Ordering::SeqCst)
    );
    assert_eq!(*store.overreach.lock().unwrap(), Vec::<String>::new());
    d.shutdown().await;
}

/// A delivery whose lease would run out during its request (it waited that long for a worker)
/// is released, not sent: another instance may claim it once the lease ends, and the two must
/// not both send it. The next claim takes it again under a fresh lease, and it is sent once.
/// A shutdown while a claim is on its way (a database round trip) waits for the claim's answer
/// and releases what it took: dropping the claim would leave the deliveries the database
/// already leased to their leases (45 s by default), late for every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_claim_releases_what_the_claim_took() {
    let (_records, open) = tokio::sync::watch::channel(true);
    let store = Arc::new(GatedRecords::new(open, usize::MAX));
    let (answer, claims_wait_for) = tokio::sync::watch::channel(false);
    *store.claims_wait_for.lock().unwrap() = Some(claims_wait_for);
    let h = hold().await;
    h.release.add_permits(1_000);
    let d = Dispatcher::builder()
        .store(store.clone())
        .allow_private_targets(true)
        .build()
        .unwrap();
    d.start().unwrap();
    let sub = subscribe(&d, &h.url).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    wait_until("the claim to have taken the delivery", || async {
        (store.held.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The shutdown's first poll cancels the dispatcher's tasks; the claim answers after that.
    let shutdown = d.shutdown();
    tokio::pin!(shutdown);
    tokio::select! {
        biased;
        () = &mut shutdown => panic!("the shutdown ended while a claim was on its way"),
        () = std::future::ready(()) => {}
    }
    answer.send(true).unwrap();
    shutdown.await;
    assert_eq!(
        store.released.load(Ordering::SeqCst),
        1,
        "what the claim took was released"
    );
    assert_eq!(store.held.load(Ordering::SeqCst), 0);
    let due = store.next_due_at().await.unwrap().unwrap();
    assert!(due <= Utc::now(), "due again at once, not leased");
    assert_eq!(h.done.load(Ordering::SeqCst), 0, "nothing was sent");
    // Started again, the dispatcher sends it.
    *store.claims_wait_for.lock().unwrap() = None;
    d.start().unwrap();
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_lease_is_nearly_over_is_released_not_sent() {
    let (_gate, open) = tokio::sync::watch::channel(true);
    let store = Arc::new(GatedRecords::new(open, usize::MAX));
    store.short_leases.store(true, Ordering::SeqCst);
    let h = hold().await;
    h.release.add_permits(1_000);
    let d = Dispatcher::builder()
        .store(store.clone())
        .allow_private_targets(true)
        .workers(1)
        .build()
        .unwrap();
    d.start().unwrap();
    subscribe(&d, &h.url).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    wait_until("the delivery sent", || async {
        (d.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    assert_eq!(
        store.released.load(Ordering::SeqCst),
        1,
        "the delivery claimed with a lease nearly over was released"
    );
    assert_eq!(
        h.done.load(Ordering::SeqCst),
        1,
        "sent once, under the fresh lease"
    );
    d.shutdown().await;
}
