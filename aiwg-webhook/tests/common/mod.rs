//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aiwg_core::{JobId, JobRequest};
use aiwg_webhook::{Hooks, MockJobSubmitter, TriggersConfig};
use hmac::{Hmac, Mac};
use http::HeaderMap;

/// The fixed "now" of the tests (Unix seconds).
pub const NOW: i64 = 1_700_000_000;

pub fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    h
}

pub fn hooks(yaml: &str) -> Hooks {
    let config: TriggersConfig = serde_norway::from_str(yaml).expect("config");
    Hooks::builder(config)
        .clock(|| NOW)
        .build()
        .expect("builds")
}

/// A submitter that must never be called.
pub fn never() -> MockJobSubmitter {
    let mut m = MockJobSubmitter::new();
    m.expect_submit().never();
    m.expect_workflows().returning(workflows);
    m
}

/// A submitter expecting exactly `times` calls; captures the requests.
pub fn capturing(times: usize) -> (MockJobSubmitter, Arc<Mutex<Vec<JobRequest>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut m = MockJobSubmitter::new();
    let s = Arc::clone(&seen);
    m.expect_submit().times(times).returning(move |r| {
        s.lock().expect("lock").push(r);
        Ok(JobId::new())
    });
    m.expect_workflows().returning(workflows);
    (m, seen)
}

pub fn workflows() -> Vec<(String, String)> {
    vec![
        ("review".into(), "Review a pull request".into()),
        ("fix".into(), "Fix an issue".into()),
        ("deploy".into(), "Deploy".into()),
    ]
}

/// Counts every counter increment, keyed `name{k=v,...}` (labels sorted).
#[derive(Default)]
pub struct Capture {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Capture {
    pub fn get(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .expect("lock")
            .get(key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl metrics::Recorder for Capture {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let c = Arc::clone(self.counters.lock().expect("lock").entry(name).or_default());
        metrics::Counter::from_arc(c)
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}
