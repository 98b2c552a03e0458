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
//!    `Nats-Msg-Id` header or stream sequence, the AMQP `message_id` (or the delivery tag when
//!    the publisher set none), the Redis entry id. A body's own `idempotency_key` wins over the
//!    message id. A redelivered message therefore finds its job and starts nothing new. Every
//!    attempt is recorded in the engine's audit trail with the broker as its source.
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
//! let running = brokers.start(engine).await?;
//! // … serve …
//! running.shutdown().await;
//! # Ok(()) }
//! ```

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
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "amqp")]
mod amqp;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;

/// How many job events wait for one broker before job workers are slowed down.
const EVENT_BUFFER: usize = 10_000;

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
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The server (`nats://127.0.0.1:4222`).
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
    /// The exchange refused messages are published to (default `""`, the default exchange).
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
    let mut record = AuditRecord::new(broker, Decision::Refused).delivery_id(message_id);
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
    message_id: &str,
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
    request.idempotency_key = Some(match own_key {
        Some(k) => message_key(broker, namespace, &format!("key:{k}")),
        None => message_key(broker, namespace, message_id),
    });
    request.trigger = aiwg_core::TriggerInfo::new(broker);
    request.trigger.delivery_id = Some(message_id.to_owned());
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

struct Fanout {
    senders: Vec<mpsc::Sender<EventMessage>>,
}

#[async_trait]
impl JobObserver for Fanout {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        let Some(out) = outbound_event(job, event) else {
            return;
        };
        let msg = EventMessage {
            event_type: out.event_type.clone(),
            job_id: job.id.to_string(),
            body: out.body(),
        };
        for tx in &self.senders {
            // A full buffer slows this job's worker rather than dropping the event.
            let _ = tx.send(msg.clone()).await;
        }
    }
}

/// The configured brokers, before they start.
pub struct Brokers {
    config: BrokersConfig,
    senders: Vec<mpsc::Sender<EventMessage>>,
    receivers: Vec<(&'static str, mpsc::Receiver<EventMessage>)>,
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
    /// error naming its key (`brokers.amqp`).
    pub fn new(config: BrokersConfig) -> Result<Self, BrokerError> {
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
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for name in names {
            let (tx, rx) = mpsc::channel(EVENT_BUFFER);
            senders.push(tx);
            receivers.push((name, rx));
        }
        Ok(Self {
            config,
            senders,
            receivers,
        })
    }

    /// The observer that hands every job event to the brokers' publishers (register it with
    /// [`EngineBuilder::observer`](aiwg_core::EngineBuilder::observer)).
    #[must_use]
    pub fn observer(&self) -> Arc<dyn JobObserver> {
        Arc::new(Fanout {
            senders: self.senders.clone(),
        })
    }

    /// Connects to every configured broker (an unreachable one is an error), sets up its
    /// streams, queues and consumers, and starts consuming triggers and publishing events.
    pub async fn start(mut self, engine: Engine) -> Result<RunningBrokers, BrokerError> {
        let cancel = CancellationToken::new();
        #[allow(unused_mut)] // without any broker feature nothing is started
        let mut running = RunningBrokers {
            cancel: cancel.clone(),
            tasks: Vec::new(),
        };
        #[allow(unused_variables, unused_mut)]
        let mut take = |name: &str| {
            let i = self.receivers.iter().position(|(n, _)| *n == name)?;
            Some(self.receivers.remove(i).1)
        };
        // A broker that cannot start stops the ones already started.
        #[allow(unused_macros)]
        macro_rules! launch {
            ($started:expr) => {
                match $started.await {
                    Ok(tasks) => running.tasks.extend(tasks),
                    Err(e) => {
                        running.shutdown().await;
                        return Err(e);
                    }
                }
            };
        }
        #[cfg(feature = "nats")]
        if let (Some(cfg), Some(rx)) = (self.config.nats.clone(), take("nats")) {
            launch!(nats::start(cfg, engine.clone(), rx, cancel.clone()));
        }
        #[cfg(feature = "amqp")]
        if let (Some(cfg), Some(rx)) = (self.config.amqp.clone(), take("amqp")) {
            launch!(amqp::start(cfg, engine.clone(), rx, cancel.clone()));
        }
        #[cfg(feature = "redis")]
        if let (Some(cfg), Some(rx)) = (self.config.redis.clone(), take("redis")) {
            launch!(redis::start(cfg, engine.clone(), rx, cancel.clone()));
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

/// The running consumers and publishers.
#[derive(Debug)]
pub struct RunningBrokers {
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningBrokers {
    /// Stops consuming and publishing (a message being handled is finished first; events not
    /// yet published are dropped).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
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
            "amqp": {"url": "amqp://guest:hunter2@h/%2f", "queue": "q"}
        }))
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
