//! Job events on their way to brokers: the [`Fanout`] observer turns each job event into an
//! [`EventMessage`] (the outbound webhook's type and body, cut to what the broker takes) and
//! offers it to every broker's bounded buffer ([`event_buffer`]: an [`Outbox`] that never waits
//! and drops what does not fit, counted by [`count_dropped`]), from which the broker's publisher
//! takes it ([`EventQueue`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aiwg_core::dispatch::outbound_event;
use aiwg_core::{Job, JobEvent, JobObserver};
use async_trait::async_trait;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

/// How many job events may wait for one broker; more are dropped (job workers never wait).
pub(crate) const EVENT_BUFFER: usize = 10_000;
/// How many bytes of job events may wait for one broker; more are dropped.
pub(crate) const EVENT_BUFFER_BYTES: usize = 64 * 1024 * 1024;
/// The largest event body published to RabbitMQ or Redis (RabbitMQ 4's default
/// `max_message_size`); larger ones are cut.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// Room for the headers of a NATS event below the server's `max_payload` (which counts them).
#[allow(dead_code)]
pub(crate) const NATS_HEADER_ROOM: usize = 1024;
/// NATS's default `max_payload`, until the server tells its own.
pub(crate) const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// A job event on its way to a broker: the outbound webhook's type and body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventMessage {
    /// `job.completed`, …
    pub event_type: String,
    /// The job.
    pub job_id: String,
    /// The webhook body (`{"type", "event", "timestamp", "data"}`).
    pub body: String,
}

impl EventMessage {
    /// What it costs the buffer.
    fn weight(&self) -> usize {
        self.body.len() + self.event_type.len() + self.job_id.len()
    }
}

/// Counts a job event that will never reach `broker` (`aiwg_broker_events_dropped_total`):
/// `reason` is `buffer_full` (the observer found no room), `refused` (the broker refused it in a
/// way retrying cannot cure) or `stopped` (the publisher was shut down).
pub(crate) fn count_dropped(broker: &'static str, reason: &'static str, events: u64) {
    metrics::counter!("aiwg_broker_events_dropped_total", "broker" => broker, "reason" => reason)
        .increment(events);
}

/// How large a batch of events may grow.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batch {
    /// Events, at most.
    pub(crate) events: usize,
    /// Bytes ([`EventMessage::weight`]): events are added while the batch holds fewer.
    pub(crate) bytes: usize,
}

/// What the two ends of one broker's event buffer share.
#[derive(Debug)]
struct Gauge {
    /// Bytes of the events waiting ([`EventMessage::weight`]).
    waiting: AtomicUsize,
    /// The most bytes that may wait.
    capacity: usize,
    /// The largest body the broker takes; larger ones are cut.
    max_body: AtomicUsize,
}

/// The observer's end of one broker's event buffer: adds without ever waiting.
#[derive(Clone, Debug)]
pub(crate) struct Outbox {
    broker: &'static str,
    tx: mpsc::Sender<EventMessage>,
    gauge: Arc<Gauge>,
}

/// The publisher's end of one broker's event buffer.
#[derive(Debug)]
pub(crate) struct EventQueue {
    broker: &'static str,
    rx: mpsc::Receiver<EventMessage>,
    gauge: Arc<Gauge>,
    /// Publish what is buffered, then end.
    pub(crate) drain: CancellationToken,
    /// End now.
    pub(crate) stop: CancellationToken,
}

/// One broker's event buffer: at most `count` events and `bytes` bytes, bodies cut to
/// `max_body`.
pub(crate) fn event_buffer(
    broker: &'static str,
    count: usize,
    bytes: usize,
    max_body: usize,
) -> (Outbox, EventQueue) {
    let (tx, rx) = mpsc::channel(count);
    let gauge = Arc::new(Gauge {
        waiting: AtomicUsize::new(0),
        capacity: bytes,
        max_body: AtomicUsize::new(max_body),
    });
    (
        Outbox {
            broker,
            tx,
            gauge: gauge.clone(),
        },
        EventQueue {
            broker,
            rx,
            gauge,
            drain: CancellationToken::new(),
            stop: CancellationToken::new(),
        },
    )
}

impl Outbox {
    /// Queues `msg` when there is room; else drops it (logged and counted). Never waits.
    pub(crate) fn offer(&self, msg: EventMessage) -> bool {
        let weight = msg.weight();
        let gauge = &self.gauge;
        let room = gauge
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                w.checked_add(weight).filter(|n| *n <= gauge.capacity)
            })
            .is_ok();
        let refused = if room {
            match self.tx.try_send(msg) {
                Ok(()) => return true,
                Err(e) => {
                    gauge.waiting.fetch_sub(weight, Ordering::AcqRel);
                    match e {
                        TrySendError::Full(m) => ("buffer_full", m),
                        TrySendError::Closed(m) => ("stopped", m),
                    }
                }
            }
        } else {
            ("buffer_full", msg)
        };
        match refused {
            ("stopped", m) => tracing::debug!(
                broker = self.broker, job = %m.job_id, event = %m.event_type,
                "event not published: the broker's publisher has stopped"
            ),
            (_, m) => tracing::warn!(
                broker = self.broker, job = %m.job_id, event = %m.event_type,
                "event dropped: the broker's buffer is full (10 000 events or 64 MiB waiting)"
            ),
        }
        count_dropped(self.broker, refused.0, 1);
        false
    }
}

#[allow(dead_code)] // without any broker feature nothing publishes
impl EventQueue {
    /// The next event to publish, waiting for one; `None` when the publisher is to end: it was
    /// stopped, or asked to drain and nothing is left.
    pub(crate) async fn next(&mut self) -> Option<EventMessage> {
        let ev = loop {
            if self.stop.is_cancelled() {
                return None;
            }
            if self.drain.is_cancelled() {
                break self.rx.try_recv().ok()?;
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return None,
                () = self.drain.cancelled() => {}
                ev = self.rx.recv() => break ev?,
            }
        };
        self.gauge.waiting.fetch_sub(ev.weight(), Ordering::AcqRel);
        Some(ev)
    }

    /// Waits for the next event as [`next`](Self::next) does, and adds it to `batch` with those
    /// waiting behind it ([`take_waiting`](Self::take_waiting)). False when the publisher is to
    /// end.
    pub(crate) async fn next_batch(&mut self, batch: &mut Vec<EventMessage>, max: Batch) -> bool {
        let Some(first) = self.next().await else {
            return false;
        };
        batch.push(first);
        self.take_waiting(batch, max);
        true
    }

    /// Adds to `batch` the events waiting now, without waiting, while it holds fewer than
    /// `max.events` events and `max.bytes` bytes (so the last one added may pass the bytes);
    /// none once the publisher is stopped.
    pub(crate) fn take_waiting(&mut self, batch: &mut Vec<EventMessage>, max: Batch) {
        if self.stop.is_cancelled() {
            return;
        }
        let held: usize = batch.iter().map(EventMessage::weight).sum();
        let mut bytes = held;
        while batch.len() < max.events && bytes < max.bytes {
            let Ok(ev) = self.rx.try_recv() else { break };
            bytes += ev.weight();
            batch.push(ev);
        }
        self.gauge.waiting.fetch_sub(bytes - held, Ordering::AcqRel);
    }

    /// Fires when the publisher is to end now (pauses between attempts end with it).
    pub(crate) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Bodies larger than `n` bytes are cut from now on (the broker told its limit).
    #[allow(dead_code)]
    pub(crate) fn set_max_body(&self, n: usize) {
        self.gauge.max_body.store(n, Ordering::Relaxed);
    }
}

impl Drop for EventQueue {
    /// What is left is never published: counted and told.
    fn drop(&mut self) {
        let mut left = 0u64;
        while self.rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            tracing::warn!(
                broker = self.broker,
                events = left,
                "job events not published: the broker's publisher stopped"
            );
            metrics::counter!(
                "aiwg_broker_events_dropped_total", "broker" => self.broker, "reason" => "stopped"
            )
            .increment(left);
        }
    }
}

pub(crate) struct Fanout {
    pub(crate) outboxes: Vec<Outbox>,
}

#[async_trait]
impl JobObserver for Fanout {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        if self.outboxes.is_empty() {
            return;
        }
        let Some(out) = outbound_event(job, event) else {
            return;
        };
        let body = out.body();
        for outbox in &self.outboxes {
            let max = outbox.gauge.max_body.load(Ordering::Relaxed);
            let body = if body.len() <= max {
                body.clone()
            } else {
                // Cut as the webhook dispatcher cuts it, with a marker: a body the broker would
                // refuse must not hold back the events after it.
                tracing::warn!(
                    broker = outbox.broker, job = %job.id, event = %out.event_type,
                    size = body.len(), limit = max, "event body too large for the broker: cut"
                );
                out.clone().truncated(max).body()
            };
            outbox.offer(EventMessage {
                event_type: out.event_type.clone(),
                job_id: job.id.to_string(),
                body,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use aiwg_core::test_util::{MetricsCapture, ScriptedExecutor};
    use aiwg_core::{Engine, JobId, JobRequest, JobStatus, Step, Workflow};

    fn message(body_len: usize) -> EventMessage {
        EventMessage {
            event_type: "job.completed".into(),
            job_id: "j".into(),
            body: "x".repeat(body_len),
        }
    }

    /// Everything waiting in `queue` now.
    fn waiting(queue: &mut EventQueue) -> Vec<EventMessage> {
        let mut out = Vec::new();
        while let Ok(ev) = queue.rx.try_recv() {
            queue.gauge.waiting.fetch_sub(ev.weight(), Ordering::AcqRel);
            out.push(ev);
        }
        out
    }

    #[test]
    fn a_full_buffer_drops_and_counts_instead_of_waiting() {
        let counters = MetricsCapture::default();
        let full = "aiwg_broker_events_dropped_total{broker=redis,reason=buffer_full}";
        // Bounded in events: two fit, the third is dropped.
        let (outbox, mut queue) = event_buffer("redis", 2, 1 << 20, 1 << 20);
        let offered: Vec<bool> = metrics::with_local_recorder(&counters, || {
            (0..3).map(|_| outbox.offer(message(10))).collect()
        });
        assert_eq!(offered, [true, true, false]);
        assert_eq!(counters.get(full), 1);
        assert_eq!(waiting(&mut queue).len(), 2);
        // Taken: room again.
        assert!(metrics::with_local_recorder(&counters, || outbox.offer(message(10))));

        // Bounded in bytes: 100 bytes of room take one 60-byte event, not two.
        let (outbox, mut queue) = event_buffer("redis", 100, 100, 1 << 20);
        let offered: Vec<bool> = metrics::with_local_recorder(&counters, || {
            (0..2).map(|_| outbox.offer(message(60))).collect()
        });
        assert_eq!(offered, [true, false]);
        assert_eq!(counters.get(full), 2);
        let taken = waiting(&mut queue);
        assert_eq!(taken.len(), 1);
        assert_eq!(queue.gauge.waiting.load(Ordering::SeqCst), 0);
        assert!(metrics::with_local_recorder(&counters, || outbox.offer(message(60))));

        // The publisher gone: dropped, counted as such.
        drop(queue);
        assert!(!metrics::with_local_recorder(&counters, || outbox.offer(message(1))));
        assert_eq!(
            counters.get("aiwg_broker_events_dropped_total{broker=redis,reason=stopped}"),
            1
        );
    }

    #[tokio::test]
    async fn a_batch_takes_what_waits_up_to_its_events_and_bytes() {
        let (outbox, mut queue) = event_buffer("nats", 100, 1 << 30, 1 << 30);
        for _ in 0..10 {
            assert!(outbox.offer(message(400_000)));
        }
        let mut batch = Vec::new();
        let max = Batch {
            events: 256,
            bytes: 1 << 20,
        };
        assert!(queue.next_batch(&mut batch, max).await);
        // 0, 0.4 and 0.8 MB held are under 1 MiB: three taken, the third passing it.
        assert_eq!(batch.len(), 3);
        batch.clear();
        let max = Batch {
            events: 2,
            bytes: 1 << 30,
        };
        assert!(queue.next_batch(&mut batch, max).await);
        assert_eq!(batch.len(), 2, "bounded in events");
        // A batch retried holds its events already: only what fits beside them is added.
        queue.take_waiting(
            &mut batch,
            Batch {
                events: 256,
                bytes: 1 << 20,
            },
        );
        assert_eq!(batch.len(), 3);
        // What was taken no longer counts against the buffer.
        assert_eq!(
            queue.gauge.waiting.load(Ordering::SeqCst),
            4 * message(400_000).weight()
        );
    }

    fn engine(output: &str, outbox: Outbox) -> Engine {
        Engine::builder()
            .executor("x", Arc::new(ScriptedExecutor::succeeding(output)))
            .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
            .observer(Arc::new(Fanout {
                outboxes: vec![outbox],
            }))
            .workers(1)
            .build()
            .unwrap()
    }

    async fn finished(engine: &Engine, id: JobId) -> Job {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let job = engine.get(id).await.unwrap();
                if job.status.is_terminal() {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the job did not finish: its worker waits for the brokers' buffer")
    }

    #[tokio::test]
    async fn jobs_run_and_triggers_answer_while_nobody_takes_the_events() {
        // Room for three events, nobody publishing them (a broker away for long).
        let (outbox, mut queue) = event_buffer("nats", 3, 1 << 20, 1 << 20);
        let engine = engine("ok", outbox);
        for _ in 0..3 {
            let submitted = tokio::time::timeout(
                Duration::from_secs(10),
                engine.submission(JobRequest::new("check")),
            )
            .await
            .expect("a trigger waited for the brokers' buffer")
            .unwrap();
            let job = finished(&engine, submitted.job.id).await;
            assert_eq!(job.status, JobStatus::Completed);
        }
        // The first three events (of the first job) waited; the others were dropped.
        let kept = waiting(&mut queue);
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].event_type, "job.queued");
        engine.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_body_larger_than_the_broker_takes_is_cut() {
        let (outbox, mut queue) = event_buffer("nats", 100, 1 << 20, 4096);
        let engine = engine(&"y".repeat(50_000), outbox);
        let submitted = engine.submission(JobRequest::new("check")).await.unwrap();
        finished(&engine, submitted.job.id).await;
        let events = waiting(&mut queue);
        let completed = events
            .iter()
            .find(|e| e.event_type == "job.completed")
            .expect("job.completed");
        assert!(completed.body.len() <= 4096, "{}", completed.body.len());
        let body: serde_json::Value = serde_json::from_str(&completed.body).unwrap();
        assert_eq!(body["data"]["truncated"], true, "{body}");
        assert_eq!(body["data"]["job_id"], submitted.job.id.to_string());
        // Small events go as they are.
        let queued = events
            .iter()
            .find(|e| e.event_type == "job.queued")
            .unwrap();
        assert!(!queued.body.contains("truncated"), "{}", queued.body);
        engine.shutdown(Duration::from_secs(1)).await;
    }
}
