//! Message brokers as aiwg trigger sources and event sinks: NATS JetStream, RabbitMQ (AMQP
//! 0.9.1) and Redis Streams, one optional feature each (`nats`, `amqp`, `redis`).
//!
//! # The pipeline
//!
//! 1. **Consume.** A trigger message's body is the body of `POST /workflows/trigger`
//!    (`{"workflow", "project"?, "guidance"?, "params"?, "priority"?, "idempotency_key"?}`). It
//!    is read from a JetStream durable pull consumer, a durable RabbitMQ queue, or a Redis
//!    Streams consumer group.
//!
//!    A body larger than the broker's `max_message_bytes` (default 1 MiB) is not parsed: it is
//!    refused as `payload-too-large` (413, its size and the limit in the detail) and
//!    dead-lettered like any refusal (audited, counted in
//!    `aiwg_trigger_decisions_total{source, decision="refused"}`). The limit bounds what is
//!    parsed; what the client library receives is bounded by the broker's own limit (NATS
//!    `max_payload`, RabbitMQ `max_message_size`, Redis `proto-max-bulk-len`).
//! 2. **Submit.** [`submit_message`] parses it exactly as the HTTP API does
//!    ([`aiwg_core::http::trigger_body`]) and submits the job with an idempotency key made of
//!    the broker, the stream/queue and the message id (`nats:<stream>:<id>`): the JetStream
//!    `Nats-Msg-Id` header or stream sequence, the AMQP `message_id`, the Redis entry id. A
//!    body's own `idempotency_key` wins over the message id. A redelivered message therefore
//!    finds its job and starts nothing new. Every attempt is recorded in the engine's audit
//!    trail with the broker as its source.
//!
//!    RabbitMQ has no id of its own for a message (a delivery tag counts from 1 again on every
//!    channel, so it would give another message's key after a reconnect): a message without
//!    `message_id` (and without `idempotency_key` in its body) is submitted without a key, at
//!    least once — redelivered after an acknowledgement that was lost, it runs again.
//!    **Publishers should set `message_id`** (unique per message) for exactly once.
//!
//!    Messages that arrive together are handled together: what the consumer has ready at
//!    once (NATS: up to 64; RabbitMQ: up to `prefetch`, default 64; Redis: a read of up to 64
//!    entries) is submitted at once, so a store that writes concurrent submissions together
//!    (PostgreSQL) does, and the acknowledgements go out together (Redis: one `XACK` a read).
//!    The jobs of one such batch may therefore be stored in another order than their messages.
//! 3. **Acknowledge.** Only once the job is stored. A refusal that retrying cannot cure (bad
//!    JSON, unknown workflow, invalid parameters, a project outside the roots, a body over
//!    `max_message_bytes`) is acknowledged once its dead letter (below) — the message with the
//!    [`Problem`] document the HTTP API would have answered — is published to the dead-letter
//!    subject / routing key / stream, so a message is never retried forever. A transient refusal (queue full, shutting down, a store
//!    failure) is negatively acknowledged and redelivered after [`retry_delay`](NatsConfig::retry_delay).
//! 4. **Publish events.** [`Brokers::observer`] is a [`JobObserver`]: every job event that
//!    becomes an outbound webhook (`job.queued`, `job.started`, `job.step.completed`,
//!    `job.completed`, …) is published with the webhook's body to the configured events
//!    subject / exchange / stream, waiting for the broker's confirmation and retrying (in order)
//!    across reconnects, so a broker restart loses nothing while the server runs.
//!
//!    The events waiting for a broker go in batches of up to 256 (and about 1 MiB): a batch is sent whole (a
//!    JetStream publish, an AMQP `basic.publish` on one channel, one pipeline of `XADD`s), then
//!    its confirmations are awaited (JetStream acks, publisher confirms, the `XADD` replies),
//!    so a burst of events costs a round trip a batch, not an event; a lone event goes at once.
//!    An event not confirmed is published again ahead of every later one. After a lost
//!    connection the order is kept; a broker that refuses one event for the moment but takes
//!    the next (a RabbitMQ negative confirm, a Redis `OOM` for one entry) gets the refused one
//!    after the others of its batch.
//!
//!    The observer never waits for a broker: each broker has a buffer of at most 10 000 events
//!    and 64 MiB, and an event that does not fit (the broker has been away long enough to fill
//!    it) is dropped, logged at `warn` and counted in the metric
//!    `aiwg_broker_events_dropped_total{broker, reason="buffer_full"}`. A body larger than the
//!    broker takes (NATS: the server's `max_payload` less 1 KiB for the headers; RabbitMQ and
//!    Redis: 16 MiB) is cut as the webhook dispatcher cuts it (long texts of `result` and
//!    `error` shortened, `data.truncated: true`). An event the broker refuses in a way retrying
//!    cannot cure (NATS: larger than `max_payload`; RabbitMQ: `PRECONDITION_FAILED`,
//!    `ACCESS_REFUSED`; Redis: an error reply such as `WRONGTYPE` or `NOPERM`) is dropped with an
//!    `error` log (`reason="refused"`) instead of holding back every later one.
//!
//! # Dead letters
//!
//! A dead letter keeps the refused message's own body — all of it, or its first 64 KiB when it
//! is larger than `max_message_bytes` (then marked as cut) — so it can be inspected, and
//! published again as a trigger once what refused it is fixed. The problem document (JSON:
//! `type`, `title`, `status`, `detail`; in a header at most 2 KiB, its `detail` cut to fit)
//! goes beside it:
//!
//! | broker | body | problem | also |
//! |---|---|---|---|
//! | NATS | the payload | header `Aiwg-Problem` | `Aiwg-Message-Id` (the id of the key), `Aiwg-Subject` (where it came from), `Nats-Msg-Id: dead:<id>`, the message's `Content-Type`, `Aiwg-Body-Truncated: true` when cut (also when the body and headers would not fit in the server's `max_payload`) |
//! | RabbitMQ | the body | header `aiwg-problem` | the message's headers, content type and encoding; `aiwg-queue`; its `message_id` as `message_id`, `correlation_id` and header `aiwg-message-id`; `aiwg-body-truncated: true` (a boolean) when cut |
//! | Redis | field `body` | field `problem` | `message_id` (the entry id); `body_truncated: "true"` when cut |
//!
//! (Before this format the NATS and RabbitMQ payload was the problem document itself.)
//!
//! [`RunningBrokers::shutdown_within`] publishes what is still buffered before it stops (events
//! of jobs that finished during the engine's shutdown); [`RunningBrokers::shutdown`] stops at
//! once, dropping them.
//!
//! # The NATS stream and consumer
//!
//! The stream holds the trigger, events and dead-letter subjects, kept for at most `max_age`
//! (default 7 days) and `max_bytes` (default 1 GiB; the oldest messages go first). At start a
//! missing stream is made so; an existing one is updated to match (the configured subjects
//! added, others left; `max_age` and `max_bytes` set), logged at `info` with what changed.
//! The durable consumer is updated when its subject or `ack_wait` differ, and refused at start
//! (naming `brokers.nats.consumer`) when it acknowledges otherwise than explicitly, which cannot
//! be updated. A durable consumer that aiwg makes at start delivers only messages published
//! from then on (`DeliverPolicy::New`): a new or renamed `consumer` does not replay the
//! stream's history (triggers published before it existed, and not taken by another consumer,
//! are not run). One lost while aiwg consumes is made again delivering every message the stream
//! holds (`DeliverPolicy::All`): nothing published while it was gone is skipped, and messages
//! handled already find their jobs by their keys — as a Redis group lost while consuming is
//! made again at `0`.
//!
//! Each consumer reconnects by itself after a broker restart; unacknowledged messages are
//! redelivered by the broker and de-duplicated by their key. A RabbitMQ connection that stops
//! answering (connecting, declaring, a publish's confirm, an acknowledgement: 10 s each) is
//! given up and made again, as after a restart.
//!
//! A Redis consumer group that disappears while aiwg consumes (`XGROUP DESTROY`, the stream's
//! key deleted, a server that lost its data) is made again at the stream's start (`0`), not its
//! end: made at the end it would silently skip every entry added while it was gone, and the
//! entries it had delivered but not seen acknowledged. Delivery stays at least once: every
//! entry still in the stream comes again, and one whose job the engine's store holds finds it
//! by its key (`redis:<stream>:<entry id>`, or the body's `idempotency_key`) and starts nothing
//! (audited as a duplicate). An entry refused before is refused and dead-lettered again, and one
//! whose job the store no longer has (deleted, or a memory store since restarted) runs again.
//! (A group missing when aiwg starts is made at the stream's end: what was there before is not
//! aiwg's.)
//!
//! Redis entries pending with a consumer that went away are claimed (`XAUTOCLAIM`) every half
//! `claim_idle`. A claim that fails is logged at `warn` and counted in
//! `aiwg_broker_errors_total{broker="redis", operation="xautoclaim"}`: a lost connection (or
//! group) is connected to again after a growing pause, as a failed read is; a refusal (no
//! permission for `XAUTOCLAIM`, a server before Redis 6.2) lets reading go on, and the claim is
//! tried again after a growing pause.
//!
//! # Configuration
//!
//! ```yaml
//! brokers:
//!   nats:  { url: "nats://127.0.0.1:4222", stream: AIWG, consumer: aiwg,
//!            trigger_subject: aiwg.trigger, events_subject: aiwg.events,
//!            dead_letter_subject: aiwg.dead, max_age: 7d, max_bytes: 1073741824 }
//!   amqp:  { url: "amqp://guest:guest@127.0.0.1:5672/%2f", queue: aiwg.trigger,
//!            events_exchange: aiwg.events, dead_letter_exchange: "", dead_letter_routing_key: aiwg.dead }
//!   redis: { url: "redis://127.0.0.1:6379", stream: aiwg:trigger, group: aiwg,
//!            events_stream: aiwg:events, dead_letter_stream: aiwg:dead }
//! ```
//!
//! ```no_run
//! # async fn demo(builder: aiwg_core::EngineBuilder) -> Result<(), Box<dyn std::error::Error>> {
//! use aiwg_brokers::{Brokers, BrokersConfig};
//!
//! let config = BrokersConfig::from_value(serde_json::json!({
//!     "redis": {"url": "redis://127.0.0.1:6379", "stream": "aiwg:trigger", "group": "aiwg",
//!               "events_stream": "aiwg:events", "dead_letter_stream": "aiwg:dead"}
//! }))?;
//! let brokers = Brokers::new(config)?;
//! // Observe before the engine is built, consume once it is.
//! let engine = builder.observer(brokers.observer()).build()?;
//! let mut running = brokers.start(engine.clone()).await?;
//! // … serve …
//! // Stop taking triggers, let running jobs finish, then publish their last events (at most
//! // 10 s more: a broker that is away does not hold the shutdown).
//! running.stop_consuming().await;
//! engine.shutdown(std::time::Duration::from_secs(30)).await;
//! running.shutdown_within(std::time::Duration::from_secs(10)).await;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::config::ConfigError;
#[cfg(doc)] // the crate docs link it
use aiwg_core::http::Problem;
use aiwg_core::{Engine, JobObserver};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "amqp")]
mod amqp;
mod config;
mod events;
#[cfg(feature = "nats")]
mod nats;
#[cfg_attr(
    not(any(feature = "nats", feature = "amqp", feature = "redis")),
    allow(dead_code)
)]
mod publish;
#[cfg(feature = "redis")]
mod redis;
mod submit;

pub use config::{AmqpConfig, BrokersConfig, NatsConfig, RedisConfig};
pub use events::EventMessage;
pub use submit::{
    message_key, problem_document, submit_message, submit_message_without_id, Verdict,
};

use config::check;
#[cfg(test)]
use config::refuse_loops;
use events::{
    event_buffer, EventQueue, Fanout, Outbox, EVENT_BUFFER, EVENT_BUFFER_BYTES, MAX_BODY,
    NATS_DEFAULT_MAX_PAYLOAD, NATS_HEADER_ROOM,
};

/// Why the brokers could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The configuration is wrong (or names a broker this build lacks).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting or setting up the broker failed.
    #[error("{broker}: {what}")]
    Setup {
        /// `nats`, `amqp` or `redis`.
        broker: &'static str,
        /// What failed.
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BrokerError {
    #[allow(dead_code)]
    pub(crate) fn setup(
        broker: &'static str,
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BrokerError::Setup {
            broker,
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// The configured brokers, before they start.
pub struct Brokers {
    config: BrokersConfig,
    outboxes: Vec<Outbox>,
    queues: Vec<(&'static str, EventQueue)>,
}

impl std::fmt::Debug for Brokers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Brokers")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Brokers {
    /// Checks the configuration: a configured broker this build has no feature for is an
    /// error naming its key (`brokers.amqp`), and so is a dead-letter or events destination
    /// that the trigger source reads (`brokers.redis.dead_letter_stream` equal to `stream`):
    /// every refused message, or every event, would come back as a trigger, forever; and a
    /// `max_message_bytes` of 0.
    pub fn new(config: BrokersConfig) -> Result<Self, BrokerError> {
        check(&config)?;
        let mut names = Vec::new();
        if config.nats.is_some() {
            if !cfg!(feature = "nats") {
                return Err(missing("nats"));
            }
            names.push("nats");
        }
        if config.amqp.is_some() {
            if !cfg!(feature = "amqp") {
                return Err(missing("amqp"));
            }
            names.push("amqp");
        }
        if config.redis.is_some() {
            if !cfg!(feature = "redis") {
                return Err(missing("redis"));
            }
            names.push("redis");
        }
        let mut outboxes = Vec::new();
        let mut queues = Vec::new();
        for name in names {
            // A broker with nowhere to publish events gets none.
            let max_body = match name {
                "nats" => NATS_DEFAULT_MAX_PAYLOAD - NATS_HEADER_ROOM,
                "amqp"
                    if config
                        .amqp
                        .as_ref()
                        .is_some_and(|c| c.events_exchange.is_none()) =>
                {
                    continue
                }
                "redis"
                    if config
                        .redis
                        .as_ref()
                        .is_some_and(|c| c.events_stream.is_none()) =>
                {
                    continue
                }
                _ => MAX_BODY,
            };
            let (outbox, queue) = event_buffer(name, EVENT_BUFFER, EVENT_BUFFER_BYTES, max_body);
            outboxes.push(outbox);
            queues.push((name, queue));
        }
        Ok(Self {
            config,
            outboxes,
            queues,
        })
    }

    /// The observer that hands every job event to the brokers' publishers (register it with
    /// [`EngineBuilder::observer`](aiwg_core::EngineBuilder::observer)).
    #[must_use]
    pub fn observer(&self) -> Arc<dyn JobObserver> {
        Arc::new(Fanout {
            outboxes: self.outboxes.clone(),
        })
    }

    /// Connects to every configured broker (an unreachable one is an error), sets up its
    /// streams, queues and consumers, and starts consuming triggers and publishing events.
    pub async fn start(mut self, engine: Engine) -> Result<RunningBrokers, BrokerError> {
        let cancel = CancellationToken::new();
        #[allow(unused_mut)] // without any broker feature nothing is started
        let mut running = RunningBrokers {
            consuming: cancel.clone(),
            draining: CancellationToken::new(),
            publishing: CancellationToken::new(),
            consumers: Vec::new(),
            publishers: Vec::new(),
        };
        #[allow(unused_variables, unused_mut)]
        let mut take = |name: &str| {
            let i = self.queues.iter().position(|(n, _)| *n == name)?;
            let mut queue = self.queues.remove(i).1;
            queue.drain = running.draining.clone();
            queue.stop = running.publishing.clone();
            Some(queue)
        };
        // A broker that cannot start stops the ones already started.
        #[allow(unused_macros)]
        macro_rules! launch {
            ($started:expr) => {
                match $started.await {
                    Ok(Started {
                        consumer,
                        publisher,
                    }) => {
                        running.consumers.push(consumer);
                        running.publishers.extend(publisher);
                    }
                    Err(e) => {
                        running.shutdown().await;
                        return Err(e);
                    }
                }
            };
        }
        #[cfg(feature = "nats")]
        if let (Some(cfg), Some(events)) = (self.config.nats.clone(), take("nats")) {
            launch!(nats::start(cfg, engine.clone(), events, cancel.clone()));
        }
        #[cfg(feature = "amqp")]
        if let Some(cfg) = self.config.amqp.clone() {
            launch!(amqp::start(
                cfg,
                engine.clone(),
                take("amqp"),
                cancel.clone()
            ));
        }
        #[cfg(feature = "redis")]
        if let Some(cfg) = self.config.redis.clone() {
            launch!(redis::start(
                cfg,
                engine.clone(),
                take("redis"),
                cancel.clone()
            ));
        }
        let _ = (&engine, &cancel);
        Ok(running)
    }
}

fn missing(name: &str) -> BrokerError {
    BrokerError::Config(ConfigError::new(
        format!("brokers.{name}"),
        format!("this build of aiwg has no `{name}` support (cargo feature `{name}`)"),
    ))
}

/// What one broker started: its consumer and, when it publishes events, its publisher.
#[allow(dead_code)]
pub(crate) struct Started {
    pub(crate) consumer: JoinHandle<()>,
    pub(crate) publisher: Option<JoinHandle<()>>,
}

/// The running consumers and publishers.
///
/// To stop without losing the events of jobs that finish while the engine shuts down, stop
/// consuming first, shut the engine down, then let the publishers drain:
///
/// ```no_run
/// # async fn demo(mut running: aiwg_brokers::RunningBrokers, engine: aiwg_core::Engine) {
/// use std::time::Duration;
/// running.stop_consuming().await; // no new trigger
/// engine.shutdown(Duration::from_secs(30)).await; // running jobs finish: their events buffered
/// running.shutdown_within(Duration::from_secs(10)).await; // … and published
/// # }
/// ```
#[derive(Debug)]
pub struct RunningBrokers {
    consuming: CancellationToken,
    draining: CancellationToken,
    publishing: CancellationToken,
    consumers: Vec<JoinHandle<()>>,
    publishers: Vec<JoinHandle<()>>,
}

impl RunningBrokers {
    /// Stops taking trigger messages (a message being handled is finished first); job events
    /// are still published. Returns once every consumer has ended.
    pub async fn stop_consuming(&mut self) {
        self.consuming.cancel();
        for t in self.consumers.drain(..) {
            let _ = t.await;
        }
    }

    /// Stops consuming, then publishes the job events already buffered for at most `grace`
    /// (retrying across reconnects as usual) and stops; events still buffered then are dropped
    /// (logged, counted with `reason="stopped"`). Events of jobs that finish after this returns
    /// are not published.
    pub async fn shutdown_within(mut self, grace: Duration) {
        self.stop_consuming().await;
        self.draining.cancel();
        let mut all = futures_util::future::join_all(std::mem::take(&mut self.publishers));
        if tokio::time::timeout(grace, &mut all).await.is_err() {
            self.publishing.cancel();
            all.await;
        }
    }

    /// Stops consuming and publishing at once (a message being handled is finished first;
    /// events not yet published are dropped, logged and counted). See
    /// [`shutdown_within`](Self::shutdown_within) to publish them first.
    pub async fn shutdown(mut self) {
        self.publishing.cancel();
        self.stop_consuming().await;
        for t in self.publishers.drain(..) {
            let _ = t.await;
        }
    }
}

/// Waits `d`, or less when `cancel` fires; false when cancelled.
#[allow(dead_code)]
pub(crate) async fn pause(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// How a stream of messages stands after [`take_ready`].
#[allow(dead_code)] // without any broker feature nothing consumes
#[derive(Debug)]
pub(crate) enum Ready<E> {
    /// It may yield more.
    Open,
    /// It ended.
    Ended,
    /// It failed (after the messages taken).
    Failed(E),
}

/// Adds to `batch` the messages `stream` has ready now, without waiting, up to `max` in all:
/// the messages that arrived together are handled together (their jobs submitted at once, their
/// acknowledgements sent together).
#[allow(dead_code)] // without any broker feature nothing consumes
pub(crate) fn take_ready<T, E, S>(stream: &mut S, batch: &mut Vec<T>, max: usize) -> Ready<E>
where
    S: futures_util::Stream<Item = Result<T, E>> + Unpin,
{
    use futures_util::{FutureExt, StreamExt};
    while batch.len() < max {
        match stream.next().now_or_never() {
            None => break,
            Some(None) => return Ready::Ended,
            Some(Some(Ok(m))) => batch.push(m),
            Some(Some(Err(e))) => return Ready::Failed(e),
        }
    }
    Ready::Open
}

/// Growing delays for reconnecting: 100 ms doubling to 5 s.
#[allow(dead_code)]
pub(crate) fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key of the loop [`refuse_loops`] finds in `config`.
    fn refused_key(config: serde_json::Value) -> Option<String> {
        refuse_loops(&BrokersConfig::from_value(config).unwrap())
            .err()
            .map(|e| e.key)
    }

    #[test]
    fn a_destination_the_trigger_source_reads_is_refused_naming_its_key() {
        let nats = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"url": "nats://x", "stream": "S"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            refused_key(serde_json::json!({ "nats": c }))
        };
        assert_eq!(
            nats(serde_json::json!({"dead_letter_subject": "aiwg.trigger"})).as_deref(),
            Some("brokers.nats.dead_letter_subject")
        );
        // Brokers::new refuses it (before it looks at the build's features).
        let looped = BrokersConfig::from_value(serde_json::json!({"redis":
            {"url": "redis://h", "stream": "s", "dead_letter_stream": "s"}}))
        .unwrap();
        match Brokers::new(looped) {
            Err(BrokerError::Config(e)) => {
                assert_eq!(e.key, "brokers.redis.dead_letter_stream");
                assert!(e.reason.contains("forever"), "{}", e.reason);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            nats(serde_json::json!({"trigger_subject": "t", "events_subject": "t"})).as_deref(),
            Some("brokers.nats.events_subject")
        );
        // A wildcard trigger subject reads what it matches.
        assert_eq!(
            nats(serde_json::json!({"trigger_subject": "aiwg.>"})).as_deref(),
            Some("brokers.nats.dead_letter_subject")
        );
        assert_eq!(
            nats(
                serde_json::json!({"trigger_subject": "x.*", "events_subject": "x.ev",
                "dead_letter_subject": "y.dead"})
            )
            .as_deref(),
            Some("brokers.nats.events_subject")
        );
        assert_eq!(
            nats(serde_json::json!({"trigger_subject": "aiwg.*.t"})),
            None
        );
        assert_eq!(nats(serde_json::json!({})), None);

        let amqp = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"url": "amqp://h", "queue": "q"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            refused_key(serde_json::json!({ "amqp": c }))
        };
        assert_eq!(
            amqp(serde_json::json!({"dead_letter_routing_key": "q"})).as_deref(),
            Some("brokers.amqp.dead_letter_routing_key")
        );
        // Through a named exchange the routing key is that exchange's business.
        assert_eq!(
            amqp(
                serde_json::json!({"dead_letter_routing_key": "q", "dead_letter_exchange": "dlx"})
            ),
            None
        );
        assert_eq!(amqp(serde_json::json!({})), None);

        let redis = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"url": "redis://h", "stream": "s"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            refused_key(serde_json::json!({ "redis": c }))
        };
        assert_eq!(
            redis(serde_json::json!({"dead_letter_stream": "s"})).as_deref(),
            Some("brokers.redis.dead_letter_stream")
        );
        assert_eq!(
            redis(serde_json::json!({"events_stream": "s"})).as_deref(),
            Some("brokers.redis.events_stream")
        );
        assert_eq!(
            redis(serde_json::json!({"events_stream": "e", "dead_letter_stream": "d"})),
            None
        );
    }
}
