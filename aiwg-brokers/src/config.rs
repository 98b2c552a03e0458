//! The `brokers:` configuration: one section per broker ([`NatsConfig`], [`AmqpConfig`],
//! [`RedisConfig`]) under [`BrokersConfig`], with their defaults, the `duration` parser of their
//! delays, URLs never printed by `Debug`, and the check that refuses a dead-letter or events
//! destination the trigger source reads back ([`refuse_loops`]).

use std::time::Duration;

use aiwg_core::config::ConfigError;
use serde::{Deserialize, Deserializer};

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    s.map(|t| {
        humantime::parse_duration(t.trim()).map_err(|e| {
            serde::de::Error::custom(format!("invalid duration `{t}` ({e}); use e.g. \"30s\""))
        })
    })
    .transpose()
}

/// The default of `max_message_bytes`: 1 MiB.
#[cfg_attr(
    not(any(feature = "nats", feature = "amqp", feature = "redis")),
    allow(dead_code)
)]
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

fn byte_limit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom(ZERO_LIMIT)),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

const ZERO_LIMIT: &str =
    "must be at least 1 (bytes; default 1048576, 1 MiB): a limit of 0 would refuse every message";

/// The largest trigger body parsed (`max_message_bytes`, or its default).
#[cfg_attr(
    not(any(feature = "nats", feature = "amqp", feature = "redis")),
    allow(dead_code)
)]
pub(crate) fn max_message_bytes(configured: Option<usize>) -> usize {
    configured.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
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
    /// The largest trigger body parsed, in bytes (default 1048576, 1 MiB; 0 is refused). A
    /// larger message is not parsed: it is refused (`payload-too-large`, its size and the limit
    /// in the problem's detail) and dead-lettered with the first 64 KiB of its body.
    #[serde(default, deserialize_with = "byte_limit")]
    pub max_message_bytes: Option<usize>,
    /// How long the stream keeps a message (triggers, events and dead letters alike; default
    /// 7d; 0 is refused). Set on the stream at start, an existing one's updated to match.
    #[serde(default, deserialize_with = "duration")]
    pub max_age: Option<Duration>,
    /// The most bytes the stream keeps; the oldest messages go first (default 1073741824,
    /// 1 GiB; 0 is refused). Set on the stream at start, an existing one's updated to match.
    #[serde(default, deserialize_with = "byte_limit")]
    pub max_bytes: Option<usize>,
}

/// The default of `brokers.nats.max_age`: 7 days.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) const DEFAULT_NATS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default of `brokers.nats.max_bytes`: 1 GiB.
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
pub(crate) const DEFAULT_NATS_MAX_BYTES: usize = 1024 * 1024 * 1024;

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &"<redacted>")
            .field("stream", &self.stream)
            .field("consumer", &self.consumer)
            .field("trigger_subject", &self.trigger_subject)
            .field("events_subject", &self.events_subject)
            .field("dead_letter_subject", &self.dead_letter_subject)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.max_bytes)
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
    /// Messages delivered and not yet acknowledged, at most (default 64): those that arrive
    /// together are handled together.
    #[serde(default)]
    pub prefetch: Option<u16>,
    /// The delay before a transiently refused message comes again (default 5s).
    #[serde(default, deserialize_with = "duration")]
    pub retry_delay: Option<Duration>,
    /// The largest trigger body parsed, in bytes (default 1048576, 1 MiB; 0 is refused). A
    /// larger message is not parsed: it is refused (`payload-too-large`, its size and the limit
    /// in the problem's detail) and dead-lettered with the first 64 KiB of its body.
    #[serde(default, deserialize_with = "byte_limit")]
    pub max_message_bytes: Option<usize>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &"<redacted>")
            .field("queue", &self.queue)
            .field("events_exchange", &self.events_exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_routing_key", &self.dead_letter_routing_key)
            .field("max_message_bytes", &self.max_message_bytes)
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
    /// The consumer group (default `aiwg`). Created at the stream's end when missing at start;
    /// one lost while consuming is made again at the stream's start, so that no entry is
    /// skipped (those handled already come again and find their jobs).
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
    /// The largest trigger body parsed, in bytes (default 1048576, 1 MiB; 0 is refused). A
    /// larger entry is not parsed: it is refused (`payload-too-large`, its size and the limit
    /// in the problem's detail) and dead-lettered with the first 64 KiB of its body.
    #[serde(default, deserialize_with = "byte_limit")]
    pub max_message_bytes: Option<usize>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &"<redacted>")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("events_stream", &self.events_stream)
            .field("dead_letter_stream", &self.dead_letter_stream)
            .field("max_message_bytes", &self.max_message_bytes)
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

/// Checks what deserializing cannot: a destination the trigger source reads back
/// ([`refuse_loops`]), a `max_message_bytes` or `max_bytes` of 0 (refused when read too, but
/// the field may have been set since), a NATS `max_age` of 0.
pub(crate) fn check(config: &BrokersConfig) -> Result<(), ConfigError> {
    refuse_loops(config)?;
    let limits = [
        ("nats", config.nats.as_ref().map(|c| c.max_message_bytes)),
        ("amqp", config.amqp.as_ref().map(|c| c.max_message_bytes)),
        ("redis", config.redis.as_ref().map(|c| c.max_message_bytes)),
    ];
    if let Some(c) = &config.nats {
        if c.max_bytes == Some(0) {
            return Err(ConfigError::new("brokers.nats.max_bytes", ZERO_LIMIT));
        }
        if c.max_age == Some(Duration::ZERO) {
            return Err(ConfigError::new(
                "brokers.nats.max_age",
                "must be longer than 0 (default 7d): messages would be kept for no time",
            ));
        }
    }
    for (name, limit) in limits {
        if limit == Some(Some(0)) {
            return Err(ConfigError::new(
                format!("brokers.{name}.max_message_bytes"),
                ZERO_LIMIT,
            ));
        }
    }
    Ok(())
}

/// Refuses a destination the trigger source reads back: refused messages (or events) would
/// come again as triggers, be refused again, forever.
pub(crate) fn refuse_loops(config: &BrokersConfig) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_message_size_limit_of_zero_is_refused_naming_its_key() {
        for name in ["nats", "amqp", "redis"] {
            let section = match name {
                "nats" => serde_json::json!({"url": "nats://h", "stream": "S"}),
                "amqp" => serde_json::json!({"url": "amqp://h", "queue": "q"}),
                _ => serde_json::json!({"url": "redis://h", "stream": "s"}),
            };
            let mut zero = section.clone();
            zero["max_message_bytes"] = serde_json::json!(0);
            let err = BrokersConfig::from_value(serde_json::json!({ name: zero })).unwrap_err();
            assert_eq!(err.key, format!("brokers.{name}.max_message_bytes"));
            assert!(err.reason.contains("at least 1"), "{}", err.reason);
            // Set to 0 after reading: refused by the check that `Brokers::new` makes.
            let mut c = BrokersConfig::from_value(serde_json::json!({ name: section })).unwrap();
            match name {
                "nats" => c.nats.as_mut().unwrap().max_message_bytes = Some(0),
                "amqp" => c.amqp.as_mut().unwrap().max_message_bytes = Some(0),
                _ => c.redis.as_mut().unwrap().max_message_bytes = Some(0),
            }
            let err = check(&c).unwrap_err();
            assert_eq!(err.key, format!("brokers.{name}.max_message_bytes"));
        }
        let c = BrokersConfig::from_value(serde_json::json!({"redis":
            {"url": "redis://h", "stream": "s", "max_message_bytes": 10}}))
        .unwrap();
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(max_message_bytes(redis.max_message_bytes), 10);
        assert_eq!(max_message_bytes(None), 1024 * 1024);
        assert!(check(&c).is_ok());
    }

    #[test]
    fn a_nats_stream_limit_of_zero_is_refused_naming_its_key() {
        let read = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"url": "nats://h", "stream": "S"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            BrokersConfig::from_value(serde_json::json!({ "nats": c }))
                .and_then(|c| check(&c))
                .err()
                .map(|e| e.key)
        };
        assert_eq!(
            read(serde_json::json!({"max_bytes": 0})).as_deref(),
            Some("brokers.nats.max_bytes")
        );
        assert_eq!(
            read(serde_json::json!({"max_age": "0s"})).as_deref(),
            Some("brokers.nats.max_age")
        );
        assert_eq!(
            read(serde_json::json!({"max_age": "1h", "max_bytes": 1})),
            None
        );
    }
}
