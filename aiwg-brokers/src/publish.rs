//! Publishing job events, the same for every broker: [`publish_events`] takes the events
//! waiting in a broker's buffer ([`EventQueue`]) a batch at a time, hands the batch to the
//! broker's [`Publisher`], which sends it whole before it waits for the broker's
//! confirmations, and then retries, in their order and before anything newer, the events the
//! broker did not confirm.
//!
//! One round trip is thus shared by every event that waited while the one before was on its
//! way: a lone event goes out at once, a burst (a thousand jobs finishing together) in batches
//! of up to [`PUBLISH_BATCH`] (256 events, about 1 MiB), instead of one round trip an event.
//!
//! **Order.** A batch is sent in the buffer's order on one connection, and the brokers store
//! it in that order. An event not confirmed is published again ahead of every later one, so
//! after a lost connection (where what the broker stored is a beginning of the batch) the
//! events arrive in order. Only a broker that refuses one event for the moment but stores the
//! next (RabbitMQ's negative confirm, Redis out of memory for one entry) puts the refused one
//! after those of its batch that it stored.

use std::fmt::Display;
use std::future::Future;

use crate::events::{count_dropped, Batch, EventMessage, EventQueue};
use crate::{pause, reconnect_delay};

/// How large one batch grows: up to 256 events, and events are added while it holds less than
/// 1 MiB (a batch of large bodies is a few events, so it is sent within the brokers' answer
/// limits; one event larger than that goes alone).
pub(crate) const PUBLISH_BATCH: Batch = Batch {
    events: 256,
    bytes: 1 << 20,
};

/// What the broker did with one event of a batch.
#[derive(Debug)]
pub(crate) enum Sent<E> {
    /// Stored: confirmed by the broker.
    Confirmed,
    /// Refused in a way publishing again cannot cure (too large, not allowed): dropped.
    Refused(E),
    /// Not confirmed: a lost connection, no answer, a refusal for the moment. Published again
    /// after a pause.
    Retry(E),
    /// Not taken because a refusal of an earlier event of the batch closed what it was sent on
    /// (a RabbitMQ channel): published again at once, without a pause.
    Again,
}

/// One broker's way of publishing a batch of events.
pub(crate) trait Publisher: Send {
    /// Why an event was not confirmed.
    type Error: Display + Send;

    /// The broker, in logs and metrics (`nats`, `amqp`, `redis`).
    const BROKER: &'static str;

    /// Sends every event of `batch` in its order, then waits for the broker's answers: one a
    /// event, in the batch's order. `Err`: nothing of the batch was sent (no connection).
    fn publish(
        &mut self,
        batch: &[EventMessage],
    ) -> impl Future<Output = Result<Vec<Sent<Self::Error>>, Self::Error>> + Send;

    /// After a batch that was not wholly confirmed or refused: give up a connection the failure
    /// may have left unusable, so that the next batch makes a new one.
    fn failed(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The largest body the broker takes now (bodies offered from then on are cut to it), when
    /// the broker tells it.
    fn max_body(&self) -> Option<usize> {
        None
    }

    /// The publisher ends: close what it holds open.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Publishes `events` through `publisher` until the queue ends (stopped, or drained and empty).
pub(crate) async fn publish_events<P: Publisher>(mut publisher: P, mut events: EventQueue) {
    let stop = events.stop_token();
    let broker = P::BROKER;
    // The batch being published: events not confirmed yet, oldest first.
    let mut batch: Vec<EventMessage> = Vec::with_capacity(PUBLISH_BATCH.events);
    let mut failures = 0u32;
    loop {
        if batch.is_empty() {
            if !events.next_batch(&mut batch, PUBLISH_BATCH).await {
                publisher.close().await;
                return;
            }
        } else {
            // Events retried go first; what arrived meanwhile fills the rest.
            events.take_waiting(&mut batch, PUBLISH_BATCH);
        }
        if let Some(n) = publisher.max_body() {
            events.set_max_body(n);
        }
        let first_retry = match publisher.publish(&batch).await {
            Err(e) => Some(e),
            Ok(answers) => settle(broker, &mut batch, answers),
        };
        let Some(e) = first_retry else {
            failures = 0;
            continue;
        };
        failures += 1;
        tracing::warn!(
            error = %e, events = batch.len(), first = %batch[0].event_type,
            "{broker}: events not published yet; retrying"
        );
        publisher.failed().await;
        if !pause(reconnect_delay(failures), &stop).await {
            count_dropped(broker, "stopped", batch.len() as u64);
            publisher.close().await;
            return;
        }
    }
}

/// Keeps in `batch`, in order, the events to publish again, and drops the ones confirmed or
/// refused for good (those logged and counted). Answers the first retry's error, if any.
fn settle<E: Display>(
    broker: &'static str,
    batch: &mut Vec<EventMessage>,
    answers: Vec<Sent<E>>,
) -> Option<E> {
    debug_assert_eq!(answers.len(), batch.len(), "one answer an event");
    let mut answers = answers.into_iter();
    let mut first_retry = None;
    batch.retain(|ev| match answers.next() {
        Some(Sent::Confirmed) => false,
        Some(Sent::Refused(e)) => {
            tracing::error!(
                error = %e, event = %ev.event_type, job = %ev.job_id, size = ev.body.len(),
                "{broker}: event refused by the server for good; dropped"
            );
            count_dropped(broker, "refused", 1);
            false
        }
        Some(Sent::Retry(e)) => {
            first_retry.get_or_insert(e);
            true
        }
        Some(Sent::Again) => true,
        // No answer for it (a publisher answering too few): sent again, never lost.
        None => true,
    });
    first_retry
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::events::event_buffer;
    use aiwg_core::test_util::MetricsCapture;

    /// A broker that answers each publish from a script, and records what it stored.
    #[derive(Clone, Default)]
    struct Scripted {
        /// Per batch: `Err` (no connection) or an answer per event: 'c'onfirm, 'r'efuse, 'x' retry.
        script: Arc<Mutex<VecDeque<Result<&'static str, ()>>>>,
        /// The bodies stored, in order.
        stored: Arc<Mutex<Vec<String>>>,
        /// The batches as they were sent.
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        failed: Arc<Mutex<u32>>,
    }

    impl Publisher for Scripted {
        type Error = String;
        const BROKER: &'static str = "redis";

        async fn publish(&mut self, batch: &[EventMessage]) -> Result<Vec<Sent<String>>, String> {
            let bodies: Vec<String> = batch.iter().map(|e| e.body.clone()).collect();
            self.batches.lock().unwrap().push(bodies);
            let step = self.script.lock().unwrap().pop_front();
            let answers = match step {
                Some(Err(())) => return Err("no connection".into()),
                Some(Ok(a)) => a,
                None => "",
            };
            let mut out = Vec::new();
            for (i, ev) in batch.iter().enumerate() {
                match answers.as_bytes().get(i).copied().unwrap_or(b'c') {
                    b'c' => {
                        self.stored.lock().unwrap().push(ev.body.clone());
                        out.push(Sent::Confirmed);
                    }
                    b'r' => out.push(Sent::Refused("too large".into())),
                    _ => out.push(Sent::Retry("no answer".into())),
                }
            }
            Ok(out)
        }

        async fn failed(&mut self) {
            *self.failed.lock().unwrap() += 1;
        }
    }

    fn message(i: usize) -> EventMessage {
        EventMessage {
            event_type: "job.completed".into(),
            job_id: format!("j{i}"),
            body: format!("e{i}"),
        }
    }

    fn names(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("e{i}")).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_events_go_together_and_unconfirmed_ones_again_first_in_order() {
        let (outbox, queue) = event_buffer("redis", 10_000, 1 << 20, 1 << 20);
        let broker = Scripted::default();
        // Batch 1: e0..e9, e3 refused for good, e5 and e7 not confirmed.
        // Batch 2: e5, e7 and what came meanwhile: no connection at all.
        // Batch 3: all confirmed.
        broker
            .script
            .lock()
            .unwrap()
            .extend([Ok("cccrcxcxcc"), Err(()), Ok("")]);
        for i in 0..10 {
            assert!(outbox.offer(message(i)));
        }
        let drain = queue.drain.clone();
        let publisher = tokio::spawn(publish_events(broker.clone(), queue));
        // The first batch sent (the publisher now pauses before retrying): two more arrive.
        tokio::time::timeout(Duration::from_secs(5), async {
            while broker.batches.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        for i in 10..12 {
            assert!(outbox.offer(message(i)));
        }
        drain.cancel();
        tokio::time::timeout(Duration::from_secs(60), publisher)
            .await
            .expect("the publisher ended once drained")
            .unwrap();
        let batches = broker.batches.lock().unwrap().clone();
        assert_eq!(
            batches[0],
            names(0..10),
            "the ten waiting went in one batch"
        );
        assert_eq!(
            batches[1],
            ["e5", "e7", "e10", "e11"],
            "retried first, in order"
        );
        assert_eq!(
            batches[2], batches[1],
            "the same batch after the failed connection"
        );
        assert_eq!(batches.len(), 3);
        let stored = broker.stored.lock().unwrap().clone();
        assert_eq!(
            stored,
            ["e0", "e1", "e2", "e4", "e6", "e8", "e9", "e5", "e7", "e10", "e11"]
        );
        assert_eq!(*broker.failed.lock().unwrap(), 2, "a failure a batch");
    }

    #[test]
    fn a_refused_event_is_dropped_and_counted_and_retried_ones_kept_in_order() {
        let counters = MetricsCapture::default();
        let mut batch: Vec<EventMessage> = (0..5).map(message).collect();
        let answers = vec![
            Sent::Retry("lost".to_owned()),
            Sent::Confirmed,
            Sent::Refused("too large".to_owned()),
            Sent::Retry("later".to_owned()),
            Sent::Confirmed,
        ];
        let first = metrics::with_local_recorder(&counters, || settle("nats", &mut batch, answers));
        assert_eq!(first.as_deref(), Some("lost"));
        let kept: Vec<&str> = batch.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(kept, ["e0", "e3"]);
        assert_eq!(
            counters.get("aiwg_broker_events_dropped_total{broker=nats,reason=refused}"),
            1
        );
        // Sent again at once: kept, in order, but no retry (no pause).
        let mut batch: Vec<EventMessage> = (0..3).map(message).collect();
        let answers: Vec<Sent<String>> = vec![
            Sent::Refused("not allowed".to_owned()),
            Sent::Again,
            Sent::Again,
        ];
        assert!(settle("amqp", &mut batch, answers).is_none());
        let kept: Vec<&str> = batch.iter().map(|e| e.body.as_str()).collect();
        assert_eq!(kept, ["e1", "e2"]);
        // Every one confirmed: nothing kept, nothing to retry.
        let mut batch: Vec<EventMessage> = (0..2).map(message).collect();
        let answers: Vec<Sent<String>> = vec![Sent::Confirmed, Sent::Confirmed];
        assert!(settle("nats", &mut batch, answers).is_none());
        assert!(batch.is_empty());
    }
}
