//! `aiwg_deliveries_total{outcome}` through the `metrics` facade (a global recorder, so this
//! test binary holds this one test only).

#[path = "dispatch_support.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::dispatch::{
    CreateSubscription, DeliveryState, Dispatcher, OutboundEvent, RetryPolicy,
};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use serde_json::json;
use support::{wait_delivery, Receiver, Reply};

#[derive(Default)]
struct Cell(AtomicU64);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

#[derive(Default, Clone)]
struct Capture(Arc<Mutex<HashMap<String, Arc<Cell>>>>);

impl Capture {
    fn get(&self, name: &str, outcome: &str) -> u64 {
        let key = format!("{name}{{outcome={outcome}}}");
        self.0
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let cell = self.0.lock().unwrap().entry(name).or_default().clone();
        Counter::from_arc(cell)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_counted_by_outcome() {
    let capture = Capture::default();
    metrics::set_global_recorder(capture.clone()).unwrap();
    let r = Receiver::start(|req, _| match req.path.as_str() {
        "/gone" => Reply::status(410),
        "/down" => Reply::status(500),
        _ => Reply::status(200),
    })
    .await;
    let flaky = Receiver::start(|_, n| Reply::status(if n == 0 { 502 } else { 200 })).await;
    let d = Dispatcher::builder()
        .allow_private_targets(true)
        .retry(RetryPolicy::from_delays([Duration::from_millis(20)]).with_jitter(0.0))
        .build()
        .unwrap();
    d.start().unwrap();
    let mut subs = Vec::new();
    for url in [flaky.url("/"), r.url("/gone"), r.url("/down")] {
        let c = d
            .create(CreateSubscription {
                url,
                events: vec!["*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        subs.push(c.subscription.id);
    }
    d.publish(OutboundEvent::new("job.completed", json!({})))
        .await
        .unwrap();
    wait_delivery(&d, subs[0], DeliveryState::Succeeded).await;
    wait_delivery(&d, subs[1], DeliveryState::Failed).await;
    wait_delivery(&d, subs[2], DeliveryState::Failed).await;
    let m = "aiwg_deliveries_total";
    assert_eq!(capture.get(m, "succeeded"), 1);
    assert_eq!(capture.get(m, "retrying"), 2);
    assert_eq!(capture.get(m, "gone"), 1);
    assert_eq!(capture.get(m, "failed"), 1);
    assert_eq!(d.pending_deliveries().await.unwrap(), 0);
    d.shutdown().await;
}
