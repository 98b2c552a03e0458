//! The SSRF guard with the default policy: private targets refused at create time and at
//! connect time, allowed only when configured.

#[path = "dispatch_support.rs"]
mod support;

use aiwg_core::dispatch::{
    CreateSubscription, DeliveryState, DispatchError, Dispatcher, OutboundEvent, RetryPolicy,
    SigningSecret, Subscription,
};
use serde_json::json;
use support::{wait_delivery, Receiver};

const REFUSED: [&str; 4] = [
    "http://127.0.0.1/hook",
    "http://10.0.0.1/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/hook",
];

#[tokio::test]
async fn private_literals_are_refused_at_create() {
    let d = Dispatcher::builder().build().unwrap();
    for url in REFUSED
        .iter()
        .chain(&["http://[::ffff:127.0.0.1]/", "http://0x7f.1/"])
    {
        let err = d
            .create(CreateSubscription {
                url: (*url).to_owned(),
                events: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DispatchError::Invalid(m) if m.contains("not a public address")),
            "{url}: {err:?}"
        );
    }
    assert!(d.list().await.unwrap().webhooks.is_empty());
}

/// Subscriptions that reached the store anyway (another instance's looser policy, DNS names)
/// are refused when the connection would be made; the receiver sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_at_connect_time() {
    let r = Receiver::ok().await;
    let port = r.addr.port();
    let d = Dispatcher::builder()
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let mut urls: Vec<String> = REFUSED.iter().map(|s| (*s).to_owned()).collect();
    urls.push(format!("http://127.0.0.1:{port}/literal"));
    urls.push(format!("http://localhost:{port}/name"));
    urls.push(format!("http://[::ffff:127.0.0.1]:{port}/mapped"));
    let mut subs = Vec::new();
    for url in &urls {
        let sub = Subscription::new(
            url.clone(),
            vec!["*".into()],
            None,
            SigningSecret::generate(),
            chrono::Utc::now(),
        );
        d.store().insert_subscription(&sub).await.unwrap();
        subs.push(sub.id);
    }
    d.start().unwrap();
    assert_eq!(
        d.publish(OutboundEvent::new("job.queued", json!({})))
            .await
            .unwrap(),
        urls.len()
    );
    for (sub, url) in subs.iter().zip(&urls) {
        let failed = wait_delivery(&d, *sub, DeliveryState::Failed).await;
        let a = &failed.attempts[0];
        assert_eq!(a.status_code, 0, "{url}");
        let err = a.error.as_deref().unwrap_or_default();
        assert!(err.contains("refused"), "{url}: {err}");
    }
    assert_eq!(r.count(), 0, "no request reached the loopback receiver");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_subnet_is_reachable() {
    let r = Receiver::ok().await;
    let d = Dispatcher::builder()
        .allow_subnet("127.0.0.0/8")
        .build()
        .unwrap();
    d.start().unwrap();
    let sub = d
        .create(CreateSubscription {
            url: r.url("/ok"),
            events: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .subscription
        .id;
    d.publish(OutboundEvent::new("job.queued", json!({})))
        .await
        .unwrap();
    wait_delivery(&d, sub, DeliveryState::Succeeded).await;
    assert_eq!(r.count(), 1);
    // Other private ranges stay refused.
    assert!(d
        .create(CreateSubscription {
            url: "http://10.0.0.1/".into(),
            events: vec!["*".into()],
            ..Default::default()
        })
        .await
        .is_err());
    assert!(matches!(
        Dispatcher::builder().allow_subnet("10.0.0.0/99").build(),
        Err(DispatchError::Invalid(_))
    ));
    d.shutdown().await;
}
