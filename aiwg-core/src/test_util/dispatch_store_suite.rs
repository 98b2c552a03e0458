//! The conformance suite of the outbound webhook outbox: every
//! [`DispatchStore`](crate::dispatch::DispatchStore) implementation runs it.

use crate::dispatch::*;

/// The conformance suite: every [`DispatchStore`] must pass it. `make` returns a fresh, empty
/// store each time it is called.
///
/// ```
/// use std::sync::Arc;
/// use aiwg_core::dispatch::{DispatchStore, MemoryDispatchStore};
/// use aiwg_core::test_util::dispatch_store_suite;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// dispatch_store_suite(|| async { Arc::new(MemoryDispatchStore::new()) as Arc<dyn DispatchStore> }).await;
/// # }
/// ```
pub async fn dispatch_store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::sync::Arc<dyn DispatchStore>>,
{
    suite::subscriptions_round_trip(make().await).await;
    suite::health_and_disable(make().await).await;
    suite::enqueue_claim_finish(make().await).await;
    suite::claims_are_exclusive_and_fenced(make().await).await;
    suite::expired_leases_are_reclaimed(make().await).await;
    suite::per_subscription_cap(make().await).await;
    suite::claims_take_the_earliest_due_past_full_subscriptions(make().await).await;
    suite::disabled_subscriptions_are_skipped(make().await).await;
    suite::retry_and_fail_states(make().await).await;
    suite::batched_finish_is_fenced_per_attempt(make().await).await;
    suite::requeue_is_manual_and_keeps_the_id(make().await).await;
    suite::listing_newest_first_with_cursor(make().await).await;
    suite::delete_removes_deliveries(make().await).await;
}

mod suite {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::dispatch::SigningSecret;

    fn sub(now: DateTime<Utc>) -> Subscription {
        Subscription::new(
            "https://example.com/hook",
            vec!["*".into()],
            Some("suite".into()),
            SigningSecret::generate(),
            now,
        )
    }

    fn req(now: DateTime<Utc>, limit: usize, owner: &str) -> DeliveryClaimRequest {
        DeliveryClaimRequest::new(now, limit, owner, Duration::from_secs(30), usize::MAX)
    }

    fn attempt(at: DateTime<Utc>, code: u16, trigger: AttemptTrigger) -> Attempt {
        Attempt {
            status_code: code,
            duration_ms: 1,
            response_body: "ok".into(),
            error: None,
            at,
            trigger,
        }
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    pub(super) async fn subscriptions_round_trip(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now + secs(1));
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        assert!(matches!(
            store.insert_subscription(&a).await,
            Err(DispatchStoreError::Duplicate)
        ));
        assert_eq!(store.subscription(a.id).await.unwrap().as_ref(), Some(&a));
        let all = store.subscriptions().await.unwrap();
        assert_eq!(all.iter().map(|s| s.id).collect::<Vec<_>>(), [a.id, b.id]);
        let change = SubscriptionChange::at(now + secs(5))
            .url("https://example.org/x")
            .events(vec!["job.completed".into()])
            .description(None);
        let updated = store
            .update_subscription(a.id, &change)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.url, "https://example.org/x");
        assert_eq!(updated.events, ["job.completed"]);
        assert_eq!(updated.description, None);
        assert_eq!(updated.updated_at, now + secs(5));
        assert_eq!(updated.keys, a.keys);
        assert_eq!(store.subscription(a.id).await.unwrap(), Some(updated));
        // Whom an event goes to: enabled subscriptions whose filters match, oldest first.
        assert_eq!(
            store.subscribers("job.completed").await.unwrap(),
            [a.id, b.id]
        );
        assert_eq!(store.subscribers("job.queued").await.unwrap(), [b.id]);
        assert!(store.disable_subscription(b.id, "test", now).await.unwrap());
        assert_eq!(store.subscribers("job.completed").await.unwrap(), [a.id]);
        assert!(store.subscribers("job.queued").await.unwrap().is_empty());
        assert_eq!(
            store
                .update_subscription(SubscriptionId::new(), &change)
                .await
                .unwrap(),
            None
        );
        assert!(store.delete_subscription(b.id).await.unwrap());
        assert!(!store.delete_subscription(b.id).await.unwrap());
        assert_eq!(store.subscription(b.id).await.unwrap(), None);
    }

    pub(super) async fn health_and_disable(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let f1 = store.endpoint_failed(a.id, now).await.unwrap().unwrap();
        let f2 = store
            .endpoint_failed(a.id, now + secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f1.failing_since, now);
        assert_eq!(f2.failing_since, now, "the run keeps its start");
        assert_eq!(f2.consecutive_failures, 2);
        store.endpoint_succeeded(a.id).await.unwrap();
        let s = store.subscription(a.id).await.unwrap().unwrap();
        assert_eq!((s.failing_since, s.consecutive_failures), (None, 0));
        let f3 = store
            .endpoint_failed(a.id, now + secs(20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f3.failing_since, now + secs(20), "a success resets the run");
        assert_eq!(f3.consecutive_failures, 1);
        assert!(store.disable_subscription(a.id, "gone", now).await.unwrap());
        assert!(!store.disable_subscription(a.id, "gone", now).await.unwrap());
        let s = store.subscription(a.id).await.unwrap().unwrap();
        assert!(!s.enabled);
        assert_eq!(s.disabled_reason.as_deref(), Some("gone"));
        let s = store
            .update_subscription(a.id, &SubscriptionChange::at(now).enabled(true))
            .await
            .unwrap()
            .unwrap();
        assert!(s.enabled);
        assert_eq!(
            (s.failing_since, s.consecutive_failures, s.disabled_reason),
            (None, 0, None),
            "enabling clears the failure record"
        );
        assert_eq!(
            store
                .endpoint_failed(SubscriptionId::new(), now)
                .await
                .unwrap(),
            None
        );
    }

    pub(super) async fn enqueue_claim_finish(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.completed", r#"{"x":1}"#, now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert_eq!(store.next_due_at().await.unwrap(), Some(now));
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert_eq!(got.payload, r#"{"x":1}"#);
        assert!(got.attempts.is_empty());
        assert!(
            store
                .claim_due(&req(now - secs(1), 10, "a"))
                .await
                .unwrap()
                .is_empty(),
            "not due yet"
        );
        let claimed = store.claim_due(&req(now, 10, "a")).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let c = &claimed[0];
        assert_eq!(c.id, d.id);
        assert_eq!(c.payload, d.payload);
        assert_eq!(c.event_type, "job.completed");
        assert_eq!(c.trigger, AttemptTrigger::Scheduled);
        assert_eq!(c.scheduled_attempts, 0);
        assert_eq!(c.subscription.id, a.id);
        assert_eq!(c.subscription.keys, a.keys);
        assert_eq!(c.lease.owner, "a");
        assert!(c.lease.expires_at > now);
        assert!(
            store
                .claim_due(&req(now, 10, "b"))
                .await
                .unwrap()
                .is_empty(),
            "leased rows are not claimed twice"
        );
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 200, AttemptTrigger::Scheduled),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Succeeded);
        assert_eq!(got.scheduled_attempts, 1);
        assert_eq!(got.attempts, [attempt(now, 200, AttemptTrigger::Scheduled)]);
        assert_eq!(got.next_attempt_at, None);
        assert_eq!(store.pending_count().await.unwrap(), 0);
        assert_eq!(store.next_due_at().await.unwrap(), None);
        assert!(
            matches!(
                store
                    .finish_attempt(
                        &c.lease,
                        &attempt(now, 200, AttemptTrigger::Scheduled),
                        AttemptOutcome::Succeeded
                    )
                    .await,
                Err(DispatchStoreError::LeaseLost)
            ),
            "a finished lease cannot be used twice"
        );
        assert_eq!(
            store
                .delivery(a.id, d.id)
                .await
                .unwrap()
                .unwrap()
                .attempts
                .len(),
            1
        );
        assert_eq!(
            store.delivery(SubscriptionId::new(), d.id).await.unwrap(),
            None,
            "deliveries are looked up within their subscription"
        );
    }

    pub(super) async fn claims_are_exclusive_and_fenced(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let batch: Vec<_> = (0..200)
            .map(|i| NewDelivery::new(a.id, "job.queued", format!("{{\"i\":{i}}}"), now))
            .collect();
        store.enqueue(&batch).await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim_due(&req(now, 3, &format!("w{w}")))
                        .await
                        .unwrap();
                    if got.is_empty() {
                        break mine;
                    }
                    mine.extend(got.into_iter().map(|c| c.id));
                    tokio::task::yield_now().await;
                }
            }));
        }
        let mut seen = HashSet::new();
        for t in tasks {
            for id in t.await.unwrap() {
                assert!(seen.insert(id), "{id} claimed twice");
            }
        }
        assert_eq!(seen.len(), 200);
    }

    pub(super) async fn expired_leases_are_reclaimed(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let first = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        assert_eq!(
            store.next_due_at().await.unwrap(),
            Some(first.lease.expires_at),
            "a leased delivery is due again when its lease expires"
        );
        let later = first.lease.expires_at + secs(1);
        let second = store.claim_due(&req(later, 1, "b")).await.unwrap();
        assert_eq!(second.len(), 1, "an expired lease is claimable");
        let second = second.into_iter().next().unwrap();
        assert_ne!(second.lease.token, first.lease.token);
        assert!(matches!(
            store
                .finish_attempt(
                    &first.lease,
                    &attempt(now, 200, AttemptTrigger::Scheduled),
                    AttemptOutcome::Succeeded
                )
                .await,
            Err(DispatchStoreError::LeaseLost)
        ));
        assert!(matches!(
            store.release(&first.lease).await,
            Err(DispatchStoreError::LeaseLost)
        ));
        store.release(&second.lease).await.unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert!(got.attempts.is_empty(), "the stale holder recorded nothing");
        let third = store.claim_due(&req(later, 1, "c")).await.unwrap();
        assert_eq!(third.len(), 1, "a released delivery is claimable at once");
    }

    pub(super) async fn per_subscription_cap(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        let mut batch: Vec<_> = (0..5)
            .map(|_| NewDelivery::new(a.id, "job.queued", "{}", now))
            .collect();
        batch.push(NewDelivery::new(b.id, "job.queued", "{}", now + secs(1)));
        store.enqueue(&batch).await.unwrap();
        let capped = DeliveryClaimRequest::new(now + secs(1), 10, "a", Duration::from_secs(30), 2);
        let got = store.claim_due(&capped).await.unwrap();
        let for_a = got.iter().filter(|c| c.subscription.id == a.id).count();
        let for_b = got.iter().filter(|c| c.subscription.id == b.id).count();
        assert_eq!((for_a, for_b), (2, 1));
        assert!(store.claim_due(&capped).await.unwrap().is_empty());
        let one = got.iter().find(|c| c.subscription.id == a.id).unwrap();
        store
            .finish_attempt(
                &one.lease,
                &attempt(now, 200, AttemptTrigger::Scheduled),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        assert_eq!(store.claim_due(&capped).await.unwrap().len(), 1);
    }

    /// A claim takes the earliest due deliveries of the subscriptions that may have more in
    /// flight, however many deliveries of a full (or disabled) subscription are due before
    /// them, and each subscription's in its due order.
    pub(super) async fn claims_take_the_earliest_due_past_full_subscriptions(
        store: Arc<dyn DispatchStore>,
    ) {
        let now = Utc::now();
        let (a, b, off) = (sub(now), sub(now), sub(now));
        for s in [&a, &b, &off] {
            store.insert_subscription(s).await.unwrap();
        }
        store
            .disable_subscription(off.id, "test", now)
            .await
            .unwrap();
        // Due times: `a` and `off` at 0..50 s, `b` at 100..103 s (after all of them).
        let early =
            |s: &Subscription, i: i64| NewDelivery::new(s.id, "job.queued", "{}", now + secs(i));
        let a_ids: Vec<_> = (0..50).map(|i| early(&a, i)).collect();
        let off_ids: Vec<_> = (0..50).map(|i| early(&off, i)).collect();
        let b_ids: Vec<_> = (100..104).map(|i| early(&b, i)).collect();
        // Enqueued out of order: the order of due times counts, not of arrival.
        for batch in [&b_ids, &off_ids, &a_ids] {
            store.enqueue(batch).await.unwrap();
        }
        let cap = |limit| {
            DeliveryClaimRequest::new(now + secs(200), limit, "a", Duration::from_secs(30), 3)
        };
        let got = store.claim_due(&cap(3)).await.unwrap();
        let ids = |got: &[ClaimedDelivery], s: &Subscription| -> HashSet<DeliveryId> {
            got.iter()
                .filter(|c| c.subscription.id == s.id)
                .map(|c| c.id)
                .collect()
        };
        let first = |v: &[NewDelivery], n: usize| -> HashSet<DeliveryId> {
            v[..n].iter().map(|d| d.id).collect()
        };
        assert_eq!(ids(&got, &a), first(&a_ids, 3), "a's three earliest");
        // `a` is full: its 47 others and the disabled subscription's 50, all due earlier, do
        // not keep b's from a claim.
        let more = store.claim_due(&cap(10)).await.unwrap();
        assert_eq!(ids(&more, &b), first(&b_ids, 3), "b's three earliest");
        assert_eq!(more.len(), 3, "a and b are full");
        // One of a's ends: its next in due order is claimed, nothing of b's (full).
        store
            .finish_attempt(
                &got.iter()
                    .find(|c| c.subscription.id == a.id)
                    .unwrap()
                    .lease,
                &attempt(now, 200, AttemptTrigger::Scheduled),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        let next = store.claim_due(&cap(10)).await.unwrap();
        assert_eq!(
            next.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![a_ids[3].id]
        );
        assert_eq!(
            store.next_due_at().await.unwrap(),
            Some(now + secs(4)),
            "a's next; the disabled subscription's are not due"
        );
    }

    pub(super) async fn disabled_subscriptions_are_skipped(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store
            .enqueue(&[NewDelivery::new(a.id, "job.queued", "{}", now)])
            .await
            .unwrap();
        store.disable_subscription(a.id, "test", now).await.unwrap();
        assert!(store
            .claim_due(&req(now, 10, "a"))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.next_due_at().await.unwrap(), None);
        assert_eq!(
            store.pending_count().await.unwrap(),
            1,
            "it waits, it is not dropped"
        );
        store
            .update_subscription(a.id, &SubscriptionChange::at(now).enabled(true))
            .await
            .unwrap();
        assert_eq!(store.claim_due(&req(now, 10, "a")).await.unwrap().len(), 1);
    }

    pub(super) async fn retry_and_fail_states(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let c = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 503, AttemptTrigger::Scheduled),
                AttemptOutcome::Retry { at: now + secs(60) },
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Retrying);
        assert_eq!(got.next_attempt_at, Some(now + secs(60)));
        assert_eq!(store.next_due_at().await.unwrap(), Some(now + secs(60)));
        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert!(store
            .claim_due(&req(now + secs(59), 1, "a"))
            .await
            .unwrap()
            .is_empty());
        let c = store
            .claim_due(&req(now + secs(60), 1, "a"))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(c.scheduled_attempts, 1);
        store
            .finish_attempt(
                &c.lease,
                &attempt(now + secs(60), 0, AttemptTrigger::Scheduled),
                AttemptOutcome::Failed,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Failed);
        assert_eq!(got.scheduled_attempts, 2);
        assert_eq!(got.attempts.len(), 2);
        assert_eq!(got.attempts[0].status_code, 503);
        assert_eq!(store.pending_count().await.unwrap(), 0);
    }

    pub(super) async fn batched_finish_is_fenced_per_attempt(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let batch: Vec<_> = (0..3)
            .map(|_| NewDelivery::new(a.id, "job.queued", "{}", now))
            .collect();
        store.enqueue(&batch).await.unwrap();
        assert!(store.finish_attempts(&[]).await.unwrap().is_empty());
        let claimed = store.claim_due(&req(now, 10, "a")).await.unwrap();
        assert_eq!(claimed.len(), 3);
        // The second lease is lost: its delivery is released and claimed again elsewhere.
        store.release(&claimed[1].lease).await.unwrap();
        let again = store.claim_due(&req(now, 10, "b")).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, claimed[1].id);
        let finished: Vec<_> = [
            (AttemptOutcome::Succeeded, 200),
            (AttemptOutcome::Succeeded, 200),
            (AttemptOutcome::Retry { at: now + secs(60) }, 503),
        ]
        .into_iter()
        .zip(&claimed)
        .map(|((outcome, code), c)| {
            FinishedAttempt::new(
                c.lease.clone(),
                attempt(now, code, AttemptTrigger::Scheduled),
                outcome,
            )
        })
        .collect();
        assert_eq!(
            store.finish_attempts(&finished).await.unwrap(),
            [true, false, true]
        );
        let first = store.delivery(a.id, claimed[0].id).await.unwrap().unwrap();
        assert_eq!(first.state, DeliveryState::Succeeded);
        assert_eq!(first.scheduled_attempts, 1);
        assert_eq!(
            first.attempts,
            [attempt(now, 200, AttemptTrigger::Scheduled)]
        );
        let second = store.delivery(a.id, claimed[1].id).await.unwrap().unwrap();
        assert_eq!(second.state, DeliveryState::Pending, "nothing written");
        assert!(second.attempts.is_empty());
        let third = store.delivery(a.id, claimed[2].id).await.unwrap().unwrap();
        assert_eq!(third.state, DeliveryState::Retrying);
        assert_eq!(third.next_attempt_at, Some(now + secs(60)));
        assert_eq!(third.attempts[0].status_code, 503);
        // The holder of the live lease still records.
        assert_eq!(
            store
                .finish_attempts(&[FinishedAttempt::new(
                    again[0].lease.clone(),
                    attempt(now, 200, AttemptTrigger::Scheduled),
                    AttemptOutcome::Succeeded,
                )])
                .await
                .unwrap(),
            [true]
        );
        assert_eq!(store.pending_count().await.unwrap(), 1);
    }

    pub(super) async fn requeue_is_manual_and_keeps_the_id(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let c = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        assert_eq!(
            store.requeue(a.id, d.id, now).await.unwrap(),
            RequeueOutcome::InFlight
        );
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 500, AttemptTrigger::Scheduled),
                AttemptOutcome::Failed,
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .requeue(SubscriptionId::new(), d.id, now)
                .await
                .unwrap(),
            RequeueOutcome::NotFound
        );
        assert_eq!(
            store.requeue(a.id, DeliveryId::new(), now).await.unwrap(),
            RequeueOutcome::NotFound
        );
        let later = now + secs(5);
        assert_eq!(
            store.requeue(a.id, d.id, later).await.unwrap(),
            RequeueOutcome::Requeued
        );
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert_eq!(got.next_attempt_at, Some(later));
        let c = store
            .claim_due(&req(later, 1, "a"))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(c.id, d.id);
        assert_eq!(c.trigger, AttemptTrigger::Manual);
        store
            .finish_attempt(
                &c.lease,
                &attempt(later, 200, AttemptTrigger::Manual),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Succeeded);
        assert_eq!(
            got.scheduled_attempts, 1,
            "manual attempts are not scheduled ones"
        );
        assert_eq!(
            got.attempts.iter().map(|a| a.trigger).collect::<Vec<_>>(),
            [AttemptTrigger::Scheduled, AttemptTrigger::Manual]
        );
    }

    pub(super) async fn listing_newest_first_with_cursor(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..7 {
            let d = NewDelivery::new(a.id, "job.queued", "{}", now + secs(i));
            ids.push(d.id);
            store
                .enqueue(&[d, NewDelivery::new(b.id, "job.queued", "{}", now)])
                .await
                .unwrap();
        }
        ids.reverse();
        let page1 = store.deliveries(a.id, 3, None).await.unwrap();
        assert_eq!(page1.iter().map(|d| d.id).collect::<Vec<_>>(), ids[0..3]);
        let page2 = store.deliveries(a.id, 3, Some(page1[2].id)).await.unwrap();
        assert_eq!(page2.iter().map(|d| d.id).collect::<Vec<_>>(), ids[3..6]);
        let page3 = store.deliveries(a.id, 3, Some(page2[2].id)).await.unwrap();
        assert_eq!(page3.iter().map(|d| d.id).collect::<Vec<_>>(), ids[6..7]);
        assert!(page1.iter().all(|d| d.subscription_id == a.id));
    }

    pub(super) async fn delete_removes_deliveries(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        assert!(store.delete_subscription(a.id).await.unwrap());
        assert_eq!(store.pending_count().await.unwrap(), 0);
        assert!(store
            .claim_due(&req(now, 10, "a"))
            .await
            .unwrap()
            .is_empty());
        assert!(store.deliveries(a.id, 10, None).await.unwrap().is_empty());
    }
}
