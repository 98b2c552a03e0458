//! NATS JetStream: a durable pull consumer for triggers; events and dead letters published
//! with JetStream acknowledgement.

use std::time::Duration;

use aiwg_core::Engine;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, AckKind, ErrorCode};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::config::{max_message_bytes, DEFAULT_NATS_MAX_AGE, DEFAULT_NATS_MAX_BYTES};
use crate::events::{EventMessage, EventQueue, NATS_HEADER_ROOM};
use crate::publish::{self, Publisher, Sent};
use crate::submit::{dead_letter_body, problem_document_within, submit_bounded};
use crate::{pause, reconnect_delay, take_ready, BrokerError, NatsConfig, Ready, Started, Verdict};

const BROKER: &str = "nats";

/// The most trigger messages handled at once (those the pull consumer has ready together).
const TRIGGER_BATCH: usize = 64;

pub(crate) async fn start(
    cfg: NatsConfig,
    engine: Engine,
    events: EventQueue,
    cancel: CancellationToken,
) -> Result<Started, BrokerError> {
    let client = async_nats::ConnectOptions::new()
        .name("aiwg")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(cfg.url.as_str())
        .await
        .map_err(|e| BrokerError::setup(BROKER, "cannot connect", e))?;
    let js = jetstream::new(client);
    // Fail fast when the server is not reachable at start.
    tokio::time::timeout(
        Duration::from_secs(10),
        setup_consumer(&js, &cfg, FirstDelivery::New),
    )
    .await
    .map_err(|e| BrokerError::setup(BROKER, "no answer from the server", e))??;
    // Connected: events are cut to what this server takes from now on.
    events.set_max_body(body_limit(&js.client()));
    let consumer = tokio::spawn(consume(js.clone(), cfg.clone(), engine, cancel));
    let publisher = tokio::spawn(publish_events(js, cfg, events));
    Ok(Started {
        consumer,
        publisher: Some(publisher),
    })
}

/// Which messages a durable consumer that aiwg makes delivers first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FirstDelivery {
    /// Those published from now on (at start: a new or renamed consumer does not replay the
    /// stream's history).
    New,
    /// Every message the stream holds (a consumer lost while consuming: nothing published
    /// while it was gone is skipped; what was handled already finds its job by its key).
    All,
}

/// The stream as the configuration wants it.
fn stream_config(cfg: &NatsConfig) -> jetstream::stream::Config {
    let mut subjects = vec![cfg.trigger_subject.clone()];
    for s in [&cfg.events_subject, &cfg.dead_letter_subject] {
        if !subjects.contains(s) {
            subjects.push(s.clone());
        }
    }
    jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects,
        max_age: cfg.max_age.unwrap_or(DEFAULT_NATS_MAX_AGE),
        max_bytes: i64::try_from(cfg.max_bytes.unwrap_or(DEFAULT_NATS_MAX_BYTES))
            .unwrap_or(i64::MAX),
        ..Default::default()
    }
}

/// `current` changed to what `wanted` asks (subjects added, never removed: others may publish
/// to the stream; `max_age` and `max_bytes` set), and what changed; `None` when it matches.
fn reconcile_stream(
    mut current: jetstream::stream::Config,
    wanted: &jetstream::stream::Config,
) -> Option<(jetstream::stream::Config, Vec<String>)> {
    let mut changes = Vec::new();
    for s in &wanted.subjects {
        if !current.subjects.contains(s) {
            changes.push(format!("subject `{s}` added"));
            current.subjects.push(s.clone());
        }
    }
    if current.max_age != wanted.max_age {
        changes.push(format!(
            "max_age {} → {}",
            humantime::format_duration(current.max_age),
            humantime::format_duration(wanted.max_age)
        ));
        current.max_age = wanted.max_age;
    }
    if current.max_bytes != wanted.max_bytes {
        changes.push(format!(
            "max_bytes {} → {}",
            current.max_bytes, wanted.max_bytes
        ));
        current.max_bytes = wanted.max_bytes;
    }
    (!changes.is_empty()).then_some((current, changes))
}

/// The stream, made when missing, updated when it differs from the configuration.
async fn setup_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> Result<jetstream::stream::Stream, BrokerError> {
    let what = || format!("stream `{}`", cfg.stream);
    let wanted = stream_config(cfg);
    let stream = js
        .get_or_create_stream(wanted.clone())
        .await
        .map_err(|e| BrokerError::setup(BROKER, what(), e))?;
    let Some((updated, changes)) = reconcile_stream(stream.cached_info().config.clone(), &wanted)
    else {
        return Ok(stream);
    };
    tracing::info!(
        stream = %cfg.stream, changes = %changes.join(", "),
        "nats: the stream differs from the configuration; updating it"
    );
    js.update_stream(updated).await.map_err(|e| {
        BrokerError::setup(
            BROKER,
            format!("{} (updating it: {})", what(), changes.join(", ")),
            e,
        )
    })?;
    js.get_stream(&cfg.stream)
        .await
        .map_err(|e| BrokerError::setup(BROKER, what(), e))
}

/// The durable consumer the configuration wants: made when missing (delivering `first`),
/// updated when its subject or `ack_wait` differ; one that acknowledges otherwise than
/// explicitly is refused (that cannot be updated).
async fn setup_consumer(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    first: FirstDelivery,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BrokerError> {
    let stream = setup_stream(js, cfg).await?;
    let what = || format!("consumer `{}`", cfg.consumer);
    let ack_wait = cfg.ack_wait.unwrap_or(Duration::from_secs(30));
    if let Ok(existing) = stream.get_consumer::<pull::Config>(&cfg.consumer).await {
        let current = existing.cached_info().config.clone();
        if current.ack_policy != AckPolicy::Explicit {
            return Err(BrokerError::setup(
                BROKER,
                format!(
                    "brokers.nats.consumer: the durable consumer `{}` exists with ack_policy \
                     {:?}; aiwg needs explicit acknowledgement (delete it, or name another)",
                    cfg.consumer, current.ack_policy
                ),
                std::io::Error::other("ack_policy cannot be updated"),
            ));
        }
        if current.filter_subject == cfg.trigger_subject && current.ack_wait == ack_wait {
            return Ok(existing);
        }
        tracing::info!(
            consumer = %cfg.consumer, filter_subject = %cfg.trigger_subject,
            ack_wait = ?ack_wait,
            "nats: the consumer differs from the configuration; updating it"
        );
        let mut updated =
            <pull::Config as jetstream::consumer::FromConsumer>::try_from_consumer_config(current)
                .map_err(|e| BrokerError::Setup {
                    broker: BROKER,
                    what: what(),
                    source: e,
                })?;
        updated.filter_subject = cfg.trigger_subject.clone();
        updated.ack_wait = ack_wait;
        // Creating an existing durable consumer with a changed config updates it (the client's
        // `update_consumer` needs its `server_2_10` feature).
        return stream
            .create_consumer(updated)
            .await
            .map_err(|e| BrokerError::setup(BROKER, format!("{} (updating it)", what()), e));
    }
    stream
        .create_consumer(pull::Config {
            durable_name: Some(cfg.consumer.clone()),
            filter_subject: cfg.trigger_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait,
            deliver_policy: match first {
                FirstDelivery::New => DeliverPolicy::New,
                FirstDelivery::All => DeliverPolicy::All,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| BrokerError::setup(BROKER, what(), e))
}

async fn consume(
    js: jetstream::Context,
    cfg: NatsConfig,
    engine: Engine,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        // (Re)created each time: it may have been deleted or the server restarted. It existed
        // (the start made it): made again, it delivers every message the stream holds.
        let messages = match setup_consumer(&js, &cfg, FirstDelivery::All).await {
            Ok(c) => c.messages().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "nats: cannot consume; retrying");
                failures += 1;
                if !pause(reconnect_delay(failures), &cancel).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                n = messages.next() => n,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "nats: consumer stream error");
                    break;
                }
                Some(Ok(msg)) => {
                    failures = 0;
                    // The messages that came together: submitted together, acknowledged
                    // together (each message's own answer, in flight at once).
                    let mut batch = vec![msg];
                    let ready = take_ready(&mut messages, &mut batch, TRIGGER_BATCH);
                    futures_util::future::join_all(
                        batch.into_iter().map(|m| handle(&js, &cfg, &engine, m)),
                    )
                    .await;
                    match ready {
                        Ready::Open => {}
                        Ready::Ended => break,
                        Ready::Failed(e) => {
                            tracing::warn!(error = %e, "nats: consumer stream error");
                            break;
                        }
                    }
                }
            }
        }
        failures += 1;
        if !pause(reconnect_delay(failures), &cancel).await {
            return;
        }
    }
}

async fn handle(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    engine: &Engine,
    msg: jetstream::Message,
) {
    let id = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_owned())
        .filter(|v| !v.is_empty())
        .or_else(|| {
            msg.info()
                .ok()
                .map(|i| format!("seq:{}", i.stream_sequence))
        })
        .unwrap_or_default();
    // Checked before anything reads the payload (it is not copied).
    let limit = max_message_bytes(cfg.max_message_bytes);
    match submit_bounded(engine, BROKER, &cfg.stream, Some(&id), &msg.payload, limit).await {
        Verdict::Stored { .. } => {
            if let Err(e) = msg.double_ack().await {
                // Redelivered later and found by its key.
                tracing::warn!(error = %e, "nats: ack failed");
            }
        }
        Verdict::Refused(problem) => {
            let max_payload = js.client().max_payload();
            let (headers, body) = dead_letter(&msg, &id, &problem, limit, max_payload);
            let sent = match js
                .publish_with_headers(cfg.dead_letter_subject.clone(), headers, body)
                .await
            {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => {
                    let _ = msg.double_ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nats: dead letter not published; redelivering");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(
                            cfg.retry_delay.unwrap_or(Duration::from_secs(5)),
                        )))
                        .await;
                }
            }
        }
        Verdict::Retry(e) => {
            tracing::info!(error = %e, "nats: trigger refused for now; redelivering");
            let _ = msg
                .ack_with(AckKind::Nak(Some(
                    cfg.retry_delay.unwrap_or(Duration::from_secs(5)),
                )))
                .await;
        }
    }
}

/// The most bytes a dead letter's `Aiwg-Problem` header takes (its detail is cut to fit).
const PROBLEM_HEADER_MAX: usize = 2048;

/// The dead letter of `msg` (its id `id`), refused with `problem`: its own body (the first
/// 64 KiB when larger than `limit`, and at most what fits in `max_payload` beside the
/// headers) with the problem document and where the message came from in headers.
fn dead_letter(
    msg: &jetstream::Message,
    id: &str,
    problem: &aiwg_core::http::Problem,
    limit: usize,
    max_payload: usize,
) -> (HeaderMap, bytes::Bytes) {
    let mut headers = HeaderMap::new();
    // Values that came in as headers or are ours; a broken one is left out, not a panic.
    let add = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(v) = value.parse::<async_nats::HeaderValue>() {
            headers.insert(name, v);
        }
    };
    let problem = problem_document_within(problem, PROBLEM_HEADER_MAX);
    add(&mut headers, "Nats-Msg-Id", &format!("dead:{id}"));
    add(&mut headers, "Aiwg-Message-Id", id);
    add(&mut headers, "Aiwg-Subject", msg.subject.as_str());
    add(&mut headers, "Aiwg-Problem", &problem);
    let content_type = msg.headers.as_ref().and_then(|h| h.get("Content-Type"));
    if let Some(t) = content_type {
        add(&mut headers, "Content-Type", t.as_str());
    }
    let (kept, mut cut) = dead_letter_body(&msg.payload, limit);
    // The server counts the headers in `max_payload`: room for them, the marker and framing.
    let header_bytes = 2 * id.len()
        + msg.subject.len()
        + problem.len()
        + content_type.map_or(0, |t| t.as_str().len())
        + 256;
    let room = max_payload.saturating_sub(header_bytes);
    let mut len = kept.len();
    if len > room {
        len = room;
        cut = true;
    }
    if cut {
        add(&mut headers, "Aiwg-Body-Truncated", "true");
    }
    (headers, msg.payload.slice(..len))
}

/// The largest event body the server takes: its `max_payload` less room for the headers.
fn body_limit(client: &async_nats::Client) -> usize {
    client.max_payload().saturating_sub(NATS_HEADER_ROOM)
}

/// Whether publishing again cannot help: the message is larger than the server (or the stream)
/// takes.
fn refused_for_good(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<jetstream::Error>())
            .is_some_and(|j| j.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
        _ => false,
    }
}

/// Job events to the events subject: each sent with its headers, the batch's JetStream acks
/// awaited once all are sent.
struct Events {
    js: jetstream::Context,
    subject: async_nats::Subject,
}

impl Publisher for Events {
    type Error = PublishError;
    const BROKER: &'static str = BROKER;

    async fn publish(
        &mut self,
        batch: &[EventMessage],
    ) -> Result<Vec<Sent<PublishError>>, PublishError> {
        let mut acks = Vec::with_capacity(batch.len());
        for ev in batch {
            // The same id on every attempt: JetStream drops a copy whose first ack was lost.
            let msg_id = hex::encode(&sha2::Sha256::digest(ev.body.as_bytes())[..16]);
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            headers.insert("Aiwg-Event-Type", ev.event_type.as_str());
            headers.insert("Aiwg-Job-Id", ev.job_id.as_str());
            headers.insert("Content-Type", "application/json");
            acks.push(
                self.js
                    .publish_with_headers(self.subject.clone(), headers, ev.body.clone().into())
                    .await,
            );
        }
        let mut answers = Vec::with_capacity(acks.len());
        for ack in acks {
            let acked = match ack {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            };
            answers.push(match acked {
                Ok(()) => Sent::Confirmed,
                Err(e) if refused_for_good(&e) => Sent::Refused(e),
                Err(e) => Sent::Retry(e),
            });
        }
        Ok(answers)
    }

    /// The server may have changed (a reconnect): later events are cut to its limit.
    fn max_body(&self) -> Option<usize> {
        Some(body_limit(&self.js.client()))
    }
}

async fn publish_events(js: jetstream::Context, cfg: NatsConfig, events: EventQueue) {
    let publisher = Events {
        js,
        subject: cfg.events_subject.into(),
    };
    publish::publish_events(publisher, events).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_updated_to_the_configured_limits_keeping_other_subjects() {
        let cfg: NatsConfig = serde_json::from_value(serde_json::json!({
            "url": "nats://h", "stream": "S", "max_age": "1h", "max_bytes": 1000
        }))
        .unwrap();
        let wanted = stream_config(&cfg);
        assert_eq!(wanted.max_age, Duration::from_secs(3600));
        assert_eq!(wanted.max_bytes, 1000);
        assert_eq!(reconcile_stream(wanted.clone(), &wanted), None);
        let current = jetstream::stream::Config {
            name: "S".into(),
            subjects: vec!["aiwg.trigger".into(), "other.>".into()],
            max_bytes: -1,
            ..Default::default()
        };
        let (updated, changes) = reconcile_stream(current, &wanted).unwrap();
        assert_eq!(
            updated.subjects,
            ["aiwg.trigger", "other.>", "aiwg.events", "aiwg.dead"]
        );
        assert_eq!(updated.max_age, Duration::from_secs(3600));
        assert_eq!(updated.max_bytes, 1000);
        assert_eq!(changes.len(), 4, "{changes:?}");
        // The defaults: a week, 1 GiB.
        let cfg: NatsConfig =
            serde_json::from_value(serde_json::json!({"url": "nats://h", "stream": "S"})).unwrap();
        let wanted = stream_config(&cfg);
        assert_eq!(wanted.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(wanted.max_bytes, 1 << 30);
    }
}
