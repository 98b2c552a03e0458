//! The dispatcher against real HTTP receivers on loopback.

#[path = "dispatch_support.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aiwg_core::dispatch::{
    AttemptTrigger, CreateSubscription, DeliveryState, DispatchError, DispatchNotice, Dispatcher,
    DispatcherBuilder, OutboundEvent, RetryPolicy, Subscription, UpdateSubscription,
    USER_AGENT_VALUE,
};
use aiwg_core::Job;
use serde_json::json;
use standardwebhooks::Webhook;
use support::{wait_delivery, wait_until, Receiver, Reply};

fn steps(n: usize, ms: u64) -> RetryPolicy {
    RetryPolicy::from_delays(vec![Duration::from_millis(ms); n]).with_jitter(0.0)
}

/// Loopback receivers need private targets allowed.
fn local() -> DispatcherBuilder {
    Dispatcher::builder()
        .allow_private_targets(true)
        .retry(steps(5, 20))
}

async fn subscribe(
    d: &Dispatcher,
    url: String,
    events: &[&str],
) -> (aiwg_core::dispatch::SubscriptionId, String) {
    let c = d
        .create(CreateSubscription {
            url,
            events: events.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    (c.subscription.id, c.secret)
}

fn job() -> Job {
    serde_json::from_value(json!({
        "id": aiwg_core::JobId::new(), "workflow": "review", "project_path": "/srv/p", "params": {},
        "guidance": null, "priority": 0, "status": "completed", "attempt": 1, "max_attempts": 1,
        "timeout": 1000, "created_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:00:02Z",
        "retry_at": null, "progress": {"completed": ["s"], "in_progress": [], "pending": []},
        "result": {"summary": "done", "session_id": null, "cost_usd": null, "usage": null,
                   "steps": [{"name": "s", "agent": "sh", "output": "ok", "exit_code": 0,
                              "duration_ms": 1000}]},
        "error": null, "dead_letter": false,
        "trigger": {"source": "github", "repo": "o/r", "pr": 7}, "history": [],
        "cancel_requested": false, "idempotency_key": null
    }))
    .unwrap()
}

fn verify(secret: &str, req: &support::Received) -> Result<(), standardwebhooks::WebhookError> {
    Webhook::new(secret)
        .unwrap()
        .verify(&req.body, &req.headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_delivery_verifies_with_standardwebhooks() {
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    d.start().unwrap();
    let (sub, secret) = subscribe(&d, r.url("/hook"), &["job.*"]).await;
    let job = job();
    let n = d
        .publish(OutboundEvent::for_job("job.completed", &job, Some("sh")))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let req = r.wait_for(1).await.remove(0);
    verify(&secret, &req).expect("signature verifies with the standardwebhooks crate");
    assert_eq!(req.path, "/hook");
    assert_eq!(req.header("content-type"), "application/json");
    assert_eq!(req.header("user-agent"), USER_AGENT_VALUE);
    assert!(USER_AGENT_VALUE.starts_with("aiwg/"));
    let ts: i64 = req.header("webhook-timestamp").parse().unwrap();
    assert!((ts - chrono::Utc::now().timestamp()).abs() < 300);
    let body = req.json();
    assert_eq!(body["type"], "job.completed");
    assert_eq!(body["event"], "job.completed");
    assert_eq!(body["data"]["job_id"], job.id.to_string());
    assert_eq!(body["data"]["agent"], "sh");
    assert_eq!(body["data"]["exit_code"], 0);
    assert_eq!(body["data"]["duration_ms"], 1000);
    assert_eq!(body["data"]["trigger"]["pr"], 7);
    let delivered = wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(req.header("webhook-id"), delivered.id.to_string());
    assert!(!req.header("webhook-id").contains('.'));
    assert_eq!(delivered.attempts.len(), 1);
    assert_eq!(delivered.attempts[0].status_code, 200);
    assert_eq!(delivered.attempts[0].trigger, AttemptTrigger::Scheduled);
    assert_eq!(delivered.attempts[0].error, None);
    assert_eq!(d.pending_deliveries().await.unwrap(), 0);
    // A tampered body fails the independent verifier.
    let mut bad = req.clone();
    bad.body = axum::body::Bytes::from_static(b"{}");
    assert!(verify(&secret, &bad).is_err());
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_twice_then_succeeds_with_the_same_id() {
    let r = Receiver::start(|_, n| {
        Reply::status(if n < 2 { 500 } else { 200 }).body(format!("try {n}"))
    })
    .await;
    let d = local().build().unwrap();
    d.start().unwrap();
    let (sub, secret) = subscribe(&d, r.url("/"), &["job.failed"]).await;
    d.publish(OutboundEvent::new("job.failed", json!({"x": 1})))
        .await
        .unwrap();
    let delivered = wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    let codes: Vec<u16> = delivered.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [500, 500, 200]);
    assert_eq!(delivered.attempts[0].response_body, "try 0");
    assert!(delivered.attempts[0]
        .error
        .as_deref()
        .unwrap()
        .contains("500"));
    assert_eq!(delivered.scheduled_attempts, 3);
    let reqs = r.requests();
    assert_eq!(reqs.len(), 3);
    for req in &reqs {
        assert_eq!(req.header("webhook-id"), delivered.id.to_string());
        verify(&secret, req).unwrap();
    }
    let sub = d.get(sub).await.unwrap();
    assert_eq!(
        (sub.consecutive_failures, sub.failing_since),
        (0, None),
        "a success resets"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_exhausted_fails_the_delivery() {
    let r = Receiver::start(|_, _| Reply::status(503)).await;
    let d = local().retry(steps(2, 10)).build().unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    assert_eq!(failed.attempts.len(), 3);
    assert_eq!(r.count(), 3);
    assert_eq!(d.pending_deliveries().await.unwrap(), 0);
    assert!(
        d.get(sub).await.unwrap().enabled,
        "one failed delivery does not disable"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_subscription() {
    let r = Receiver::start(|_, _| Reply::status(410)).await;
    let d = local().build().unwrap();
    let mut notices = d.notices();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.started", json!({})))
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(60), notices.recv())
        .await
        .unwrap()
        .unwrap();
    match notice {
        DispatchNotice::SubscriptionDisabled {
            subscription_id,
            reason,
            ..
        } => {
            assert_eq!(subscription_id, sub);
            assert!(reason.contains("410"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let s = d.get(sub).await.unwrap();
    assert!(!s.enabled);
    assert!(s.disabled_reason.unwrap().contains("410"));
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    assert_eq!(failed.attempts.len(), 1, "410 is not retried");
    assert_eq!(r.count(), 1);
    assert_eq!(
        d.publish(OutboundEvent::new("job.started", json!({})))
            .await
            .unwrap(),
        0,
        "a disabled subscription gets no new deliveries"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let r = Receiver::start(|_, n| {
        if n == 0 {
            Reply::status(429).header("retry-after", "1")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let d = local().build().unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let delivered = wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(delivered.attempts.len(), 2);
    let gap = delivered.attempts[1].at - delivered.attempts[0].at;
    assert!(
        gap >= chrono::Duration::milliseconds(1000),
        "the second attempt waited for Retry-After (gap {gap})"
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_bounded() {
    // The receiver asks for an hour; the bound (50 ms) wins, so the retry comes quickly.
    let r = Receiver::start(|_, n| {
        if n == 0 {
            Reply::status(503).header("retry-after", "3600")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let d = local()
        .retry_after_max(Duration::from_millis(50))
        .build()
        .unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let delivered = wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(delivered.attempts.len(), 2);
    let gap = delivered.attempts[1].at - delivered.attempts[0].at;
    assert!(gap >= chrono::Duration::milliseconds(50), "gap {gap}");
    d.shutdown().await;
}

/// A receiver's `Retry-After` past the calendar's end, with no bound configured, schedules the
/// retry at the last time there is: the worker that read it does not panic, and the dispatcher
/// goes on delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_past_the_calendar_is_kept_as_the_last_time() {
    let r = Receiver::start(|req, _| {
        if req.path == "/late" {
            Reply::status(503).header("retry-after", "18446744073709551615")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let d = local()
        .workers(1)
        .retry_after_max(Duration::MAX)
        .build()
        .unwrap();
    d.start().unwrap();
    let (late, _) = subscribe(&d, r.url("/late"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let retrying = wait_delivery(&d, late, DeliveryState::Retrying).await;
    assert_eq!(
        retrying.next_attempt_at,
        Some(chrono::DateTime::<chrono::Utc>::MAX_UTC)
    );
    // The one worker is still there.
    let (on_time, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.started", json!({})))
        .await
        .unwrap();
    wait_delivery(&d, on_time, DeliveryState::Succeeded).await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_then_up_loses_nothing() {
    // Reserve a port, then close it: connections are refused until the receiver starts.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let d = local().retry(steps(200, 25)).build().unwrap();
    d.start().unwrap();
    let (sub, secret) = subscribe(&d, format!("http://{addr}/"), &["*"]).await;
    for i in 0..20 {
        d.publish(OutboundEvent::new("job.queued", json!({ "i": i })))
            .await
            .unwrap();
    }
    // Every delivery failed at least once with a network error.
    wait_until("every delivery to fail once", || async {
        let page = d.deliveries(sub, 100, None).await.unwrap();
        (page.deliveries.len() == 20
            && page.deliveries.iter().all(|x| {
                x.state == DeliveryState::Retrying
                    && x.attempts
                        .first()
                        .is_some_and(|a| a.status_code == 0 && a.error.is_some())
            }))
        .then_some(())
    })
    .await;
    assert_eq!(d.pending_deliveries().await.unwrap(), 20);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let r = Receiver::serve(listener, |_, _| Reply::status(204));
    wait_until("every delivery to succeed", || async {
        let page = d.deliveries(sub, 100, None).await.unwrap();
        page.deliveries
            .iter()
            .all(|x| x.state == DeliveryState::Succeeded)
            .then_some(())
    })
    .await;
    let reqs = r.requests();
    let ids: HashSet<_> = reqs
        .iter()
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(ids.len(), 20, "every event arrived");
    let bodies: HashSet<_> = reqs
        .iter()
        .map(|q| q.json()["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(bodies, (0..20).collect());
    for q in &reqs {
        verify(&secret, q).unwrap();
    }
    assert_eq!(d.pending_deliveries().await.unwrap(), 0);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_signs_with_both_keys() {
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    d.start().unwrap();
    let (sub, old) = subscribe(&d, r.url("/"), &["*"]).await;
    let rotated = d.rotate_secret(sub).await.unwrap();
    assert_ne!(rotated.secret, old);
    assert!(rotated.previous_expires_at > chrono::Utc::now() + chrono::Duration::hours(23));
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let req = r.wait_for(1).await.remove(0);
    let sigs: Vec<&str> = req.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    verify(&old, &req).expect("old key");
    verify(&rotated.secret, &req).expect("new key");
    // Each signature on its own: one is the new key's, the other the old key's.
    for (sig, secret) in sigs.iter().zip([&rotated.secret, &old]) {
        let mut one = req.clone();
        one.headers
            .insert("webhook-signature", sig.parse().unwrap());
        verify(secret, &one).unwrap();
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_grace_ends() {
    let r = Receiver::ok().await;
    let d = local().rotation_grace(Duration::ZERO).build().unwrap();
    d.start().unwrap();
    let (sub, old) = subscribe(&d, r.url("/"), &["*"]).await;
    let rotated = d.rotate_secret(sub).await.unwrap();
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let req = r.wait_for(1).await.remove(0);
    assert_eq!(req.header("webhook-signature").split(' ').count(), 1);
    verify(&rotated.secret, &req).unwrap();
    assert!(verify(&old, &req).is_err(), "the old key no longer signs");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let target = Receiver::ok().await;
    let location = target.url("/stolen");
    let r = Receiver::start(move |_, _| Reply::status(307).header("location", &location)).await;
    let d = local().retry(RetryPolicy::none()).build().unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    assert_eq!(failed.attempts[0].status_code, 307);
    assert_eq!(r.count(), 1);
    assert_eq!(target.count(), 0, "the redirect target was never called");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_truncated() {
    let r = Receiver::start(|_, _| Reply::status(500).body("x".repeat(50_000))).await;
    let d = local().retry(RetryPolicy::none()).build().unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    assert_eq!(failed.attempts[0].response_body.len(), 20_000);
    assert!(failed.attempts[0].response_body.bytes().all(|b| b == b'x'));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_retry_keeps_the_webhook_id() {
    let r = Receiver::start(|_, _| Reply::status(500)).await;
    let d = local().retry(RetryPolicy::none()).build().unwrap();
    d.start().unwrap();
    let (sub, secret) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let failed = wait_delivery(&d, sub, DeliveryState::Failed).await;
    r.set_script(|_, _| Reply::status(200));
    d.retry_delivery(sub, failed.id).await.unwrap();
    let delivered = wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(delivered.id, failed.id);
    assert_eq!(
        delivered
            .attempts
            .iter()
            .map(|a| (a.status_code, a.trigger))
            .collect::<Vec<_>>(),
        [
            (500, AttemptTrigger::Scheduled),
            (200, AttemptTrigger::Manual)
        ]
    );
    let reqs = r.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("webhook-id"), reqs[1].header("webhook-id"));
    verify(&secret, &reqs[1]).unwrap();
    assert!(matches!(
        d.retry_delivery(sub, aiwg_core::dispatch::DeliveryId::new())
            .await,
        Err(DispatchError::NotFound)
    ));
    d.update(
        sub,
        UpdateSubscription {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        d.retry_delivery(sub, failed.id).await,
        Err(DispatchError::Conflict(_))
    ));
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_is_disabled_after_the_window() {
    let r = Receiver::start(|_, _| Reply::status(500)).await;
    let d = local()
        .retry(steps(1000, 10))
        .disable_after(Duration::from_millis(100))
        .build()
        .unwrap();
    let mut notices = d.notices();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(60), notices.recv())
        .await
        .unwrap()
        .unwrap();
    let DispatchNotice::SubscriptionDisabled {
        subscription_id,
        reason,
        ..
    } = notice
    else {
        panic!("unexpected notice");
    };
    assert_eq!(subscription_id, sub);
    assert!(reason.contains("failing continuously"), "{reason}");
    let s = d.get(sub).await.unwrap();
    assert!(!s.enabled);
    assert!(s.consecutive_failures >= 2);
    // The open delivery waits while the subscription is disabled…
    let seen = r.count();
    assert_eq!(d.pending_deliveries().await.unwrap(), 1);
    // …and goes once it is enabled again (which clears the failure record).
    r.set_script(|_, _| Reply::status(200));
    let s = d
        .update(
            sub,
            UpdateSubscription {
                enabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((s.consecutive_failures, s.failing_since), (0, None));
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert!(r.count() > seen);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_cap_is_enforced_before_anything_is_stored() {
    let r = Receiver::ok().await;
    let d = local().max_payload_bytes(1024).build().unwrap();
    let (_sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    let err = d
        .publish(OutboundEvent::new(
            "job.queued",
            json!({ "big": "x".repeat(2000) }),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DispatchError::PayloadTooLarge { limit: 1024, size } if size > 2000),
        "{err:?}"
    );
    assert!(err.to_string().contains("1024"));
    assert_eq!(d.pending_deliveries().await.unwrap(), 0);
    assert!(matches!(
        d.publish(OutboundEvent::new("job.exploded", json!({})))
            .await,
        Err(DispatchError::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_is_written_before_any_attempt() {
    // Not started: publishing stores the deliveries; starting later sends them.
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["job.completed"]).await;
    assert_eq!(
        d.publish(OutboundEvent::new("job.completed", json!({})))
            .await
            .unwrap(),
        1
    );
    let page = d.deliveries(sub, 10, None).await.unwrap();
    assert_eq!(page.deliveries[0].state, DeliveryState::Pending);
    assert_eq!(d.pending_deliveries().await.unwrap(), 1);
    assert_eq!(r.count(), 0);
    d.start().unwrap();
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(r.count(), 1);
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_on_one_store_send_each_delivery_once() {
    let r = Receiver::ok().await;
    let store: std::sync::Arc<dyn aiwg_core::dispatch::DispatchStore> =
        std::sync::Arc::new(aiwg_core::dispatch::MemoryDispatchStore::new());
    let a = local()
        .store(store.clone())
        .instance_id("a")
        .build()
        .unwrap();
    let b = local()
        .store(store.clone())
        .instance_id("b")
        .poll_interval(Duration::from_millis(10))
        .build()
        .unwrap();
    a.start().unwrap();
    b.start().unwrap();
    let (sub, _) = subscribe(&a, r.url("/"), &["*"]).await;
    for i in 0..200 {
        a.publish(OutboundEvent::new("job.queued", json!({ "i": i })))
            .await
            .unwrap();
    }
    r.wait_for(200).await;
    wait_until("everything delivered", || async {
        (a.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    let reqs = r.requests();
    let ids: HashSet<_> = reqs
        .iter()
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(
        (reqs.len(), ids.len()),
        (200, 200),
        "no delivery sent twice"
    );
    let page = b.deliveries(sub, 100, None).await.unwrap();
    assert!(page.deliveries.iter().all(|x| x.attempts.len() == 1));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_to_ten_subscriptions_exactly_once() {
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    d.start().unwrap();
    let mut subs = Vec::new();
    for i in 0..10 {
        let (id, _) = subscribe(&d, r.url(&format!("/s{i}")), &["job.*"]).await;
        subs.push((id, format!("/s{i}")));
    }
    for i in 0..1000 {
        let n = d
            .publish(OutboundEvent::new("job.completed", json!({ "i": i })))
            .await
            .unwrap();
        assert_eq!(n, 10);
    }
    r.wait_for(10_000).await;
    wait_until("the outbox to drain", || async {
        (d.pending_deliveries().await.unwrap() == 0).then_some(())
    })
    .await;
    let reqs = r.requests();
    assert_eq!(reqs.len(), 10_000, "nothing sent twice");
    let mut received: HashMap<String, HashSet<String>> = HashMap::new();
    for q in &reqs {
        let fresh = received
            .entry(q.path.clone())
            .or_default()
            .insert(q.header("webhook-id").to_owned());
        assert!(fresh, "duplicate delivery {}", q.header("webhook-id"));
    }
    // Each subscription's delivery log lists exactly the ids its receiver saw.
    for (id, path) in subs {
        let mut logged = HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = d.deliveries(id, 100, cursor.as_deref()).await.unwrap();
            for x in &page.deliveries {
                assert_eq!(x.state, DeliveryState::Succeeded);
                assert_eq!(x.attempts.len(), 1);
                logged.insert(x.id.to_string());
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(logged.len(), 1000);
        assert_eq!(&logged, &received[&path]);
    }
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_sending() {
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    d.start().unwrap();
    d.start().unwrap();
    let (sub, _) = subscribe(&d, r.url("/"), &["*"]).await;
    d.shutdown().await;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    // Nothing is sent while stopped; a restart picks the delivery up.
    assert_eq!(d.pending_deliveries().await.unwrap(), 1);
    assert_eq!(r.count(), 0);
    d.start().unwrap();
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(r.count(), 1);
    d.shutdown().await;
}

#[tokio::test]
async fn subscriptions_in_the_store_are_signed_with_their_keys() {
    // A subscription inserted straight into a shared store (as another instance would).
    let r = Receiver::ok().await;
    let d = local().build().unwrap();
    let secret = aiwg_core::dispatch::SigningSecret::generate();
    let sub = Subscription::new(
        r.url("/"),
        vec!["*".into()],
        None,
        secret.clone(),
        chrono::Utc::now(),
    );
    d.store().insert_subscription(&sub).await.unwrap();
    d.start().unwrap();
    d.publish(OutboundEvent::new("job.cancelled", json!({})))
        .await
        .unwrap();
    let req = r.wait_for(1).await.remove(0);
    verify(secret.expose(), &req).unwrap();
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_store_loses_nothing() {
    // The first instance writes the outbox and goes away before sending anything; a new
    // instance on the same store delivers everything, with the ids written the first time.
    let r = Receiver::ok().await;
    let store: std::sync::Arc<dyn aiwg_core::dispatch::DispatchStore> =
        std::sync::Arc::new(aiwg_core::dispatch::MemoryDispatchStore::new());
    let first = local().store(store.clone()).build().unwrap();
    let (sub, secret) = subscribe(&first, r.url("/"), &["*"]).await;
    for i in 0..10 {
        first
            .publish(OutboundEvent::new("job.queued", json!({ "i": i })))
            .await
            .unwrap();
    }
    let written: HashSet<String> = first
        .deliveries(sub, 100, None)
        .await
        .unwrap()
        .deliveries
        .iter()
        .map(|x| x.id.to_string())
        .collect();
    drop(first);
    let second = local().store(store).build().unwrap();
    second.start().unwrap();
    let reqs = r.wait_for(10).await;
    let got: HashSet<String> = reqs
        .iter()
        .map(|q| q.header("webhook-id").to_owned())
        .collect();
    assert_eq!(got, written);
    for q in &reqs {
        verify(&secret, q).unwrap();
    }
    second.shutdown().await;
}
