//! A `metrics` recorder for tests: every counter increment, readable by name and labels.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counts every counter increment, keyed `name{k=v,...}` (labels sorted); gauges and
/// histograms are ignored. Install it around the code under test with
/// `metrics::with_local_recorder(&capture, || …)`.
///
/// ```
/// use aiwg_core::test_util::MetricsCapture;
///
/// let capture = MetricsCapture::default();
/// metrics::with_local_recorder(&capture, || {
///     metrics::counter!("jobs_total", "status" => "done", "kind" => "a").increment(2);
/// });
/// assert_eq!(capture.get("jobs_total{kind=a,status=done}"), 2);
/// assert_eq!(capture.get("jobs_total{kind=b,status=done}"), 0);
/// ```
#[derive(Debug, Default)]
pub struct MetricsCapture {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl MetricsCapture {
    /// The counter `key` (`name{k=v,...}`, labels sorted), 0 when it was never incremented.
    #[must_use]
    pub fn get(&self, key: &str) -> u64 {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

impl metrics::Recorder for MetricsCapture {
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
        let counter = Arc::clone(
            self.counters
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(name)
                .or_default(),
        );
        metrics::Counter::from_arc(counter)
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
