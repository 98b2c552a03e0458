//! Message brokers as aiwg trigger sources and event sinks: NATS JetStream, RabbitMQ (AMQP
//! 0.9.1) and Redis Streams, one optional feature each (`nats`, `amqp`, `redis`).
//!
//! # The pipeline
//!
//! 1. **Consume.** A trigger message's body is the body of `POST /workflows/trigger`
//!    (`{"workflow", "project"?, "guidance"?, "params"?, "priority"?, "idempotency_key"?}`). It
//!    is read from a JetStream durable pull consumer, a durable RabbitMQ queue, or a Redis
//!    Streams consumer group.
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
//! 3. **Acknowledge.** Only once the job is stored. A refusal that retrying cannot cure (bad
//!    JSON, unknown workflow, invalid parameters, a project outside the roots) is acknowledged
//!    and its [`Problem`] document — the body the HTTP API would have
//!    answered — is published to the dead-letter subject / routing key / stream, so a message
//!    is never retried forever. A transient refusal (queue full, shutting down, a store
//!    failure) is negatively acknowledged and redelivered after [`retry_delay`](NatsConfig::retry_delay).
//! 4. **Publish events.** [`Brokers::observer`] is a [`JobObserver`]: every job event that
//!    becomes an outbound webhook (`job.queued`, `job.started`, `job.step.completed`,
//!    `job.completed`, …) is published with the webhook's body to the configured events
//!    subject / exchange / stream, waiting for the broker's confirmation and retrying (in order)
//!    across reconnects, so a broker restart loses nothing while the server runs.
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
//! [`RunningBrokers::shutdown_within`] publishes what is still buffered before it stops (events
//! of jobs that finished during the engine's shutdown); [`RunningBrokers::shutdown`] stops at
//! once, dropping them.
//!
//! Each consumer reconnects by itself after a broker restart; unacknowledged messages are
//! redelivered by the broker and de-duplicated by their key. A RabbitMQ connection that stops
//! answering (connecting, declaring, a publish's confirm, an acknowledgement: 10 s each) is
//! given up and made again, as after a restart.
//!
//! # Configuration
//!
//! ```yaml
//! brokers:
//!   nats:  { url: "nats://127.0.0.1:4222", stream: AIWG, consumer: aiwg,
//!            trigger_subject: aiwg.trigger, events_subject: aiwg.events,
//!            dead_letter_subject: aiwg.dead }
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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::audit::{AuditRecord, Decision};
use aiwg_core::config::ConfigError;
use aiwg_core::dispatch::outbound_event;
use aiwg_core::http::{openapi::idempotency_key_ok, trigger_body, Problem};
use aiwg_core::{Engine, Job, JobEvent, JobId, JobObserver, SubmitError};
use async_trait::async_trait;
use serde::{Deserialize, Deserializer};
use sha2::Digest;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;

/// How many job events may wait for one broker; more are dropped (job workers never wait).
const EVENT_BUFFER: usize = 10_000;
/// How many bytes of job events may wait for one broker; more are dropped.
const EVENT_BUFFER_BYTES: usize = 64 * 1024 * 1024;
/// The largest event body published to RabbitMQ or Redis (RabbitMQ 4's default
/// `max_message_size`); larger ones are cut.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Room for the headers of a NATS event below the server's `max_payload` (which counts them).
#[allow(dead_code)]
pub(crate) const NATS_HEADER_ROOM: usize = 1024;
/// NATS's default `max_payload`, until the server tells its own.
const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|t| {
        humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration `{t}` ({e}); use e.g. \"30s\""))
        })
    })
    .transpose()
}

/// `brokers.nats`: NATS JetStream.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server (`nats://127.0.0.1:4222`; may carry a user and password or a token). Never
    /// printed.
    pub url: String,
    /// The JetStream stream holding the trigger, event and dead-letter subjects; created with
    /// those subjects when missing.
    pub stream: String,
    /// The durable pull consumer's name (default `aiwg`).
    #[serde(default = "default_group")]
    pub consumer: String,
    /// Where trigger messages are published (default `aiwg.trigger`).
    #[serde(default = "nats_trigger")]
    pub trigger_subject: String,
    /// Where job events are published (default `aiwg.events`; the event type is in the
    /// `Aiwg-Event-Type` header).
    #[serde(default = "nats_events")]
    pub events_subject: String,
    /// Where refused messages are answered with their problem document (default `aiwg.dead`).
    #[serde(default = "nats_dead")]
    pub dead_letter_subject: String,
    /// How long a delivered message may stay unacknowledged before redelivery (default 30s).
    #[serde(default, deserialize_with = "duration")]
    pub ack_wait: Option<Duration>,
    /// The delay before a transiently refused message comes again (default 5s).
    #[serde(default, deserialize_with = "duration")]
    pub retry_delay: Option<Duration>,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &"<redacted>")
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("trigger_subject", &self.trigger_subject)
            .field("events_subject", &self.events_subject)
            .field("dead_letter_subject", &self.dead_letter_subject)
            .finish_non_exhaustive()
    }
}

/// `brokers.amqp`: RabbitMQ (AMQP 0.9.1).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The server, with credentials (`amqp://guest:guest@127.0.0.1:5672/%2f`). Never printed.
    pub url: String,
    /// The durable queue trigger messages are read from (declared when missing).
    pub queue: String,
    /// The durable topic exchange job events are published to (declared when missing), with
    /// the event type as routing key. Default: no event publishing.
    #[serde(default)]
    pub events_exchange: Option<String>,
    /// The exchange refused messages are published to (default `""`, the default exchange). A
    /// named one must exist: it is checked (declared passively) at start and on every
    /// reconnect, and the start fails naming this key when it is missing.
    #[serde(default)]
    pub dead_letter_exchange: String,
    /// Their routing key (default `<queue>.dead`; with the default exchange, a queue of that
    /// name is declared).
    #[serde(default)]
    pub dead_letter_routing_key: Option<String>,
    /// Messages in flight at once (default 16).
    #[serde(default)]
    pub prefetch: Option<u16>,
    /// The delay before a transiently refused message comes again (default 5s).
    #[serde(default, deserialize_with = "duration")]
    pub retry_delay: Option<Duration>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &"<redacted>")
            .field("queue", &self.queue)
            .field("events_exchange", &self.events_exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_routing_key", &self.dead_letter_routing_key)
            .finish_non_exhaustive()
    }
}

/// `brokers.redis`: Redis Streams.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// The server (`redis://127.0.0.1:6379`; may carry a password). Never printed.
    pub url: String,
    /// The stream trigger entries are read from; the body is the entry's `body` field.
    pub stream: String,
    /// The consumer group (created at the stream's end when missing; default `aiwg`).
    #[serde(default = "default_group")]
    pub group: String,
    /// This consumer's name in the group (default `aiwg-<pid>`).
    #[serde(default)]
    pub consumer: Option<String>,
    /// The stream job events are added to (fields `type`, `job_id`, `body`). Default: none.
    #[serde(default)]
    pub events_stream: Option<String>,
    /// The stream refused entries are added to (fields `problem`, `message_id`, `body`;
    /// default `<stream>:dead`).
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
    /// Entries pending this long with a consumer that went away are claimed (default 60s).
    #[serde(default, deserialize_with = "duration")]
    pub claim_idle: Option<Duration>,
    /// The delay before a transiently refused entry is tried again (default 5s).
    #[serde(default, deserialize_with = "duration")]
    pub retry_delay: Option<Duration>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("events_stream", &self.events_stream)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .finish_non_exhaustive()
    }
}

fn default_group() -> String {
    "aiwg".into()
}
fn nats_trigger() -> String {
    "aiwg.trigger".into()
}
fn nats_events() -> String {
    "aiwg.events".into()
}
fn nats_dead() -> String {
    "aiwg.dead".into()
}

/// The `brokers:` section.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokersConfig {
    /// `brokers.nats`.
    pub nats: Option<NatsConfig>,
    /// `brokers.amqp`.
    pub amqp: Option<AmqpConfig>,
    /// `brokers.redis`.
    pub redis: Option<RedisConfig>,
}

impl BrokersConfig {
    /// Reads the `brokers:` section (`null` is no brokers); errors name the full key
    /// (`brokers.nats.strem: unknown key`).
    pub fn from_value(value: serde_json::Value) -> Result<Self, ConfigError> {
        if value.is_null() {
            return Ok(Self::default());
        }
        aiwg_core::config::section("brokers", value)
    }

    /// Whether no broker is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nats.is_none() && self.amqp.is_none() && self.redis.is_none()
    }
}

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

/// What became of one trigger message.
#[derive(Debug)]
#[non_exhaustive]
pub enum Verdict {
    /// The job is stored: acknowledge the message.
    Stored {
        /// The job.
        job_id: JobId,
        /// `false` when the message's key found an existing job (a redelivery).
        created: bool,
    },
    /// Refused for good: acknowledge it and publish the problem document to the dead-letter
    /// destination.
    Refused(Problem),
    /// Refused for now (queue full, shutting down, store failure): leave it to be redelivered.
    Retry(SubmitError),
}

/// The idempotency key of a message: `<broker>:<namespace>:<id>`, hashed when it would not be
/// a valid key (longer than 255 bytes or not printable ASCII).
#[must_use]
pub fn message_key(broker: &str, namespace: &str, id: &str) -> String {
    let key = format!("{broker}:{namespace}:{id}");
    if idempotency_key_ok(&key) {
        return key;
    }
    let digest = hex::encode(sha2::Sha256::digest(id.as_bytes()));
    let ns: String = namespace
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(100)
        .collect();
    format!("{broker}:{ns}:sha256:{digest}")
}

/// Submits the trigger message `body` from `broker` (`nats`, `amqp`, `redis` or a host's own
/// name) with the id `message_id` in `namespace` (the stream or queue), and records the
/// decision in the engine's audit trail.
pub async fn submit_message(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: &str,
    body: &[u8],
) -> Verdict {
    submit(engine, broker, namespace, Some(message_id), body).await
}

/// Like [`submit_message`] for a message without an id (an AMQP message whose publisher set
/// no `message_id`): the job's idempotency key is the body's own `idempotency_key` when it has
/// one, else there is none, and a redelivery of the message runs it again (at least once).
pub async fn submit_message_without_id(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    body: &[u8],
) -> Verdict {
    submit(engine, broker, namespace, None, body).await
}

async fn submit(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: Option<&str>,
    body: &[u8],
) -> Verdict {
    let mut record = AuditRecord::new(broker, Decision::Refused);
    if let Some(id) = message_id {
        record = record.delivery_id(id);
    }
    let verdict = decide(engine, broker, namespace, message_id, body, &mut record).await;
    match &verdict {
        Verdict::Stored { job_id, created } => {
            record.job_id = Some(*job_id);
            record.decision = if *created {
                Decision::Accepted
            } else {
                record.reason = Some("message seen before: the same job".into());
                Decision::Duplicate
            };
        }
        Verdict::Refused(p) => record.reason = Some(p.detail().to_owned()),
        Verdict::Retry(e) => record.reason = Some(format!("{e} (the message will come again)")),
    }
    engine.audit().record(record).await;
    verdict
}

async fn decide(
    engine: &Engine,
    broker: &'static str,
    namespace: &str,
    message_id: Option<&str>,
    body: &[u8],
    record: &mut AuditRecord,
) -> Verdict {
    let parsed = match trigger_body(body) {
        Ok(b) => b,
        Err(p) => return Verdict::Refused(p),
    };
    record.workflow = Some(parsed.workflow.clone());
    let own_key = parsed.idempotency_key.clone();
    let mut request = match parsed.into_job_request() {
        Ok(r) => r,
        Err(p) => return Verdict::Refused(p),
    };
    request.idempotency_key = match (own_key, message_id) {
        (Some(k), _) => Some(message_key(broker, namespace, &format!("key:{k}"))),
        (None, Some(id)) => Some(message_key(broker, namespace, id)),
        (None, None) => None,
    };
    request.trigger = aiwg_core::TriggerInfo::new(broker);
    request.trigger.delivery_id = message_id.map(str::to_owned);
    match engine.submission(request).await {
        Ok(s) => Verdict::Stored {
            job_id: s.job.id,
            created: s.created,
        },
        Err(e) if e.is_transient() => Verdict::Retry(e),
        Err(e) => Verdict::Refused(Problem::from(&e)),
    }
}

/// The JSON document of a refusal (what the HTTP API answers).
#[must_use]
pub fn problem_document(problem: &Problem) -> String {
    serde_json::to_string(problem).unwrap_or_else(|_| "{}".into())
}

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
pub(crate) fn count_dropped(broker: &'static str, reason: &'static str) {
    metrics::counter!("aiwg_broker_events_dropped_total", "broker" => broker, "reason" => reason)
        .increment(1);
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
#[derive(Debug)]
struct Outbox {
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
    drain: CancellationToken,
    /// End now.
    stop: CancellationToken,
}

/// One broker's event buffer: at most `count` events and `bytes` bytes, bodies cut to
/// `max_body`.
fn event_buffer(
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
    fn offer(&self, msg: EventMessage) -> bool {
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
        count_dropped(self.broker, refused.0);
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

struct Fanout {
    outboxes: Vec<Outbox>,
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
    /// every refused message, or every event, would come back as a trigger, forever.
    pub fn new(config: BrokersConfig) -> Result<Self, BrokerError> {
        refuse_loops(&config)?;
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
            outboxes: self
                .outboxes
                .iter()
                .map(|o| Outbox {
                    broker: o.broker,
                    tx: o.tx.clone(),
                    gauge: o.gauge.clone(),
                })
                .collect(),
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

/// Whether the NATS subject filter `filter` (`*` one token, `>` the rest) takes `subject`.
fn nats_matches(filter: &str, subject: &str) -> bool {
    let (mut f, mut s) = (filter.split('.'), subject.split('.'));
    loop {
        match (f.next(), s.next()) {
            (None, None) | (Some(">"), Some(_)) => return true,
            (Some(a), Some(b)) if a == "*" || a == b => {}
            _ => return false,
        }
    }
}

/// Refuses a destination the trigger source reads back: refused messages (or events) would
/// come again as triggers, be refused again, forever.
fn refuse_loops(config: &BrokersConfig) -> Result<(), ConfigError> {
    let looped = |key: &str, what: &str, source: &str| {
        Err(ConfigError::new(
            key,
            format!(
                "{what} is read as triggers ({source}): each would come back as a trigger, \
                 forever; use another"
            ),
        ))
    };
    if let Some(c) = &config.nats {
        let source = format!("trigger_subject `{}`", c.trigger_subject);
        if nats_matches(&c.trigger_subject, &c.dead_letter_subject) {
            return looped(
                "brokers.nats.dead_letter_subject",
                "the dead-letter subject",
                &source,
            );
        }
        if nats_matches(&c.trigger_subject, &c.events_subject) {
            return looped("brokers.nats.events_subject", "the events subject", &source);
        }
    }
    if let Some(c) = &config.amqp {
        if c.dead_letter_exchange.is_empty()
            && c.dead_letter_routing_key.as_deref() == Some(c.queue.as_str())
        {
            return looped(
                "brokers.amqp.dead_letter_routing_key",
                "the dead-letter routing key on the default exchange",
                &format!("queue `{}`", c.queue),
            );
        }
    }
    if let Some(c) = &config.redis {
        let source = format!("stream `{}`", c.stream);
        if c.dead_letter_stream.as_deref() == Some(c.stream.as_str()) {
            return looped(
                "brokers.redis.dead_letter_stream",
                "the dead-letter stream",
                &source,
            );
        }
        if c.events_stream.as_deref() == Some(c.stream.as_str()) {
            return looped("brokers.redis.events_stream", "the events stream", &source);
        }
    }
    Ok(())
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

/// Growing delays for reconnecting: 100 ms doubling to 5 s.
#[allow(dead_code)]
pub(crate) fn reconnect_delay(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use aiwg_core::test_util::ScriptedExecutor;
    use aiwg_core::{JobRequest, JobStatus, Step, Workflow};

    /// A metrics recorder keeping counters as `name{label=value,…}`.
    #[derive(Default)]
    struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

    impl Counters {
        fn get(&self, key: &str) -> u64 {
            self.0
                .lock()
                .unwrap()
                .get(key)
                .map_or(0, |c| c.load(Ordering::SeqCst))
        }
    }

    impl metrics::Recorder for Counters {
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
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            metrics::Counter::from_arc(self.0.lock().unwrap().entry(name).or_default().clone())
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
        let counters = Counters::default();
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

    #[test]
    fn keys_are_namespaced_and_hashed_when_unfit() {
        assert_eq!(message_key("nats", "S", "42"), "nats:S:42");
        let long = "x".repeat(300);
        let k = message_key("redis", "s", &long);
        assert!(
            k.starts_with("redis:s:sha256:") && idempotency_key_ok(&k),
            "{k}"
        );
        assert_ne!(k, message_key("redis", "s", &"y".repeat(300)));
        assert!(idempotency_key_ok(&message_key("amqp", "q", "é\n")));
    }

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

    #[test]
    fn config_errors_name_the_key() {
        let err = BrokersConfig::from_value(
            serde_json::json!({"nats": {"url": "nats://x", "strem": "S"}}),
        )
        .unwrap_err();
        assert!(err.key.starts_with("brokers.nats"), "{}", err.key);
        let err = BrokersConfig::from_value(serde_json::json!({"kafka": {}})).unwrap_err();
        assert!(err.key.contains("kafka"), "{}", err.key);
        let c = BrokersConfig::from_value(serde_json::json!({
            "amqp": {"url": "amqp://guest:hunter2@h/%2f", "queue": "q"},
            "nats": {"url": "nats://aiwg:sw0rdfish@h:4222", "stream": "S"},
            "redis": {"url": "redis://:0penSesame@h:6379", "stream": "s"}
        }))
        .unwrap();
        let printed = format!("{c:?}");
        for secret in ["hunter2", "sw0rdfish", "0penSesame"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("NatsConfig"), "{printed}");
    }
}
