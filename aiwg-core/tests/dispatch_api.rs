//! The subscription management API (what `/webhooks` serves).

use std::time::Duration;

use aiwg_core::dispatch::{
    CreateSubscription, DeliveryId, DispatchConfig, DispatchError, Dispatcher, OutboundEvent,
    RetryPolicy, SubscriptionId, UpdateSubscription,
};
use serde_json::json;

fn create(url: &str, events: &[&str]) -> CreateSubscription {
    CreateSubscription {
        url: url.into(),
        events: events.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn invalid(r: Result<impl std::fmt::Debug, DispatchError>) -> String {
    match r {
        Err(DispatchError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn create_validates_and_returns_the_secret_once() {
    let d = Dispatcher::builder().build().unwrap();
    let c = d
        .create(CreateSubscription {
            description: Some("ci".into()),
            ..create(
                "https://example.com/hook",
                &["job.completed", "job.*", "job.completed"],
            )
        })
        .await
        .unwrap();
    assert!(c.secret.starts_with("whsec_"));
    let json = serde_json::to_value(&c).unwrap();
    for key in ["id", "url", "events", "secret", "enabled", "created_at"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(json["events"], json!(["job.completed", "job.*"]));
    assert_eq!(json["enabled"], true);
    // The secret never appears again.
    let got = serde_json::to_string(&d.get(c.subscription.id).await.unwrap()).unwrap();
    let listed = serde_json::to_string(&d.list().await.unwrap()).unwrap();
    let key_b64 = &c.secret["whsec_".len()..];
    assert!(!got.contains(key_b64) && !listed.contains(key_b64));
    assert!(!format!("{c:?}").contains(key_b64));
    let stored = d
        .store()
        .subscription(c.subscription.id)
        .await
        .unwrap()
        .unwrap();
    assert!(!format!("{stored:?}").contains(key_b64), "Debug hides keys");

    assert!(invalid(d.create(create("ftp://example.com/", &["*"])).await).contains("http"));
    assert!(invalid(d.create(create("not a url", &["*"])).await).contains("URL"));
    assert!(invalid(d.create(create("https://example.com/", &[])).await).contains("event"));
    assert!(invalid(
        d.create(create("https://example.com/", &["job.done"]))
            .await
    )
    .contains("job.done"));
    let with_secret = |s: &str| CreateSubscription {
        secret: Some(s.into()),
        ..create("https://example.com/", &["*"])
    };
    assert!(invalid(d.create(with_secret("hunter2")).await).contains("whsec_"));
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    assert_eq!(d.create(with_secret(given)).await.unwrap().secret, given);
    assert_eq!(d.list().await.unwrap().webhooks.len(), 2);
}

#[tokio::test]
async fn create_accepts_the_http_body() {
    let body: CreateSubscription = serde_json::from_value(json!({
        "url": "https://example.com/x", "events": ["*"], "description": "d"
    }))
    .unwrap();
    let d = Dispatcher::builder().build().unwrap();
    assert_eq!(
        d.create(body)
            .await
            .unwrap()
            .subscription
            .description
            .as_deref(),
        Some("d")
    );
    assert!(serde_json::from_value::<CreateSubscription>(
        json!({"url": "x", "events": [], "extra": 1})
    )
    .is_err());
    let patch: UpdateSubscription = serde_json::from_value(json!({"enabled": false})).unwrap();
    assert_eq!(patch.enabled, Some(false));
}

#[tokio::test]
async fn update_get_list_delete() {
    let d = Dispatcher::builder().build().unwrap();
    let a = d
        .create(create("https://a.example/", &["*"]))
        .await
        .unwrap()
        .subscription;
    let b = d
        .create(create("https://b.example/", &["job.failed"]))
        .await
        .unwrap()
        .subscription;
    let ids: Vec<_> = d
        .list()
        .await
        .unwrap()
        .webhooks
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, [a.id, b.id], "oldest first");
    let changed = d
        .update(
            a.id,
            UpdateSubscription {
                url: Some("https://c.example/new".into()),
                events: Some(vec!["job.started".into()]),
                enabled: Some(false),
                description: Some("now".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.url, "https://c.example/new");
    assert_eq!(changed.events, ["job.started"]);
    assert!(!changed.enabled);
    assert_eq!(changed.description.as_deref(), Some("now"));
    assert!(changed.updated_at >= a.updated_at);
    assert_eq!(d.get(a.id).await.unwrap(), changed);
    let cleared = d
        .update(
            a.id,
            UpdateSubscription {
                description: Some(String::new()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(cleared.description, None);
    invalid(
        d.update(
            a.id,
            UpdateSubscription {
                url: Some("gopher://x".into()),
                ..Default::default()
            },
        )
        .await,
    );
    invalid(
        d.update(
            a.id,
            UpdateSubscription {
                events: Some(vec![]),
                ..Default::default()
            },
        )
        .await,
    );
    assert!(matches!(
        d.update(SubscriptionId::new(), UpdateSubscription::default())
            .await,
        Err(DispatchError::NotFound)
    ));
    // A disabled subscription gets no deliveries; the other one does.
    assert_eq!(
        d.publish(OutboundEvent::new("job.started", json!({})))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        d.publish(OutboundEvent::new("job.failed", json!({})))
            .await
            .unwrap(),
        1
    );
    d.delete(b.id).await.unwrap();
    assert!(matches!(d.delete(b.id).await, Err(DispatchError::NotFound)));
    assert!(matches!(d.get(b.id).await, Err(DispatchError::NotFound)));
    assert_eq!(
        d.pending_deliveries().await.unwrap(),
        0,
        "deleting removes its deliveries"
    );
    assert!(matches!(
        "nope".parse::<SubscriptionId>(),
        Err(DispatchError::NotFound)
    ));
    assert!(matches!(
        d.rotate_secret(b.id).await,
        Err(DispatchError::NotFound)
    ));
}

#[tokio::test]
async fn delivery_log_pages_newest_first() {
    let d = Dispatcher::builder().build().unwrap();
    let s = d
        .create(create("https://a.example/", &["*"]))
        .await
        .unwrap()
        .subscription;
    for i in 0..5 {
        d.publish(OutboundEvent::new("job.queued", json!({ "i": i })))
            .await
            .unwrap();
    }
    let p1 = d.deliveries(s.id, 2, None).await.unwrap();
    assert_eq!(p1.deliveries.len(), 2);
    let json = serde_json::to_value(&p1).unwrap();
    assert_eq!(
        json["deliveries"][0]["payload"]["data"]["i"], 4,
        "newest first"
    );
    assert_eq!(json["deliveries"][0]["state"], "pending");
    assert_eq!(json["deliveries"][0]["attempts"], json!([]));
    assert!(json["deliveries"][0]["id"]
        .as_str()
        .unwrap()
        .starts_with("msg_"));
    let p2 = d
        .deliveries(s.id, 2, p1.next_cursor.as_deref())
        .await
        .unwrap();
    let p3 = d
        .deliveries(s.id, 2, p2.next_cursor.as_deref())
        .await
        .unwrap();
    assert_eq!(p3.deliveries.len(), 1);
    assert_eq!(p3.next_cursor, None);
    let all: Vec<_> = [&p1, &p2, &p3]
        .iter()
        .flat_map(|p| p.deliveries.iter().map(|x| x.id))
        .collect();
    let mut sorted = all.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(all, sorted);
    let one = d.delivery(s.id, all[0]).await.unwrap();
    assert_eq!(one.id, all[0]);
    invalid(d.deliveries(s.id, 2, Some("garbage")).await);
    assert!(matches!(
        d.deliveries(SubscriptionId::new(), 2, None).await,
        Err(DispatchError::NotFound)
    ));
    assert!(matches!(
        "msg_x".parse::<DeliveryId>().map_err(DispatchError::from),
        Err(DispatchError::NotFound)
    ));
}

#[tokio::test]
async fn builder_and_config() {
    let cfg: DispatchConfig = serde_json::from_value(json!({
        "retry": ["1s", "30s"], "workers": 3, "allow_private_targets": true,
        "disable_after": "1h", "rotation_grace": "10m", "allowed_subnets": ["10.0.0.0/8"]
    }))
    .unwrap();
    let d = Dispatcher::builder().config(&cfg).build().unwrap();
    assert!(format!("{d:?}").contains("workers: 3"));
    let r = d.create(create("http://10.1.2.3/", &["*"])).await.unwrap();
    let rot = d.rotate_secret(r.subscription.id).await.unwrap();
    let grace = rot.previous_expires_at - chrono::Utc::now();
    assert!(grace <= chrono::Duration::minutes(10) && grace > chrono::Duration::minutes(9));
    assert!(matches!(
        Dispatcher::builder().workers(0).build(),
        Err(DispatchError::Invalid(_))
    ));
    assert!(matches!(
        Dispatcher::builder().timeout(Duration::ZERO).build(),
        Err(DispatchError::Invalid(_))
    ));
    assert_eq!(RetryPolicy::parse("short").unwrap().max_attempts(), 3);
    // start needs a runtime; outside one it says so instead of panicking.
    let d2 = Dispatcher::builder().build().unwrap();
    let err = std::thread::spawn(move || d2.start()).join().unwrap();
    assert!(matches!(err, Err(DispatchError::Invalid(_))));
}
