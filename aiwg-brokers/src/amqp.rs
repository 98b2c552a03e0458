//! RabbitMQ (AMQP 0.9.1) with lapin: a durable queue for triggers; events and dead letters
//! published persistent, with publisher confirms.

use std::future::Future;
use std::time::Duration;

use aiwg_core::http::Problem;
use aiwg_core::Engine;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_util::sync::CancellationToken;

use crate::config::max_message_bytes;
use crate::events::{EventMessage, EventQueue};
use crate::publish::{self, Publisher, Sent};
use crate::submit::{dead_letter_body, problem_document_within, submit_bounded};
use crate::{pause, reconnect_delay, take_ready, AmqpConfig, BrokerError, Ready, Started, Verdict};

const BROKER: &str = "amqp";

/// How long one exchange with the server may take (connecting and declaring, a publish and its
/// confirm, an acknowledgement, a close) before the connection is given up and made again. A
/// server that stops answering would otherwise hold the consumer, or the events, forever: the
/// heartbeat only watches a connection once it is open.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// What ended an exchange with the server: its error, or no answer within [`ANSWER_WITHIN`].
#[derive(Debug, thiserror::Error)]
enum Trouble {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("no answer from the server within {0:?}")]
    NoAnswer(Duration),
    /// The server confirmed a publish negatively (`basic.nack`: it could not take it now).
    #[error("the server did not take the message (negative publisher confirm)")]
    Nacked,
    /// The configured dead-letter exchange is not there (or may not be used).
    #[error(
        "brokers.amqp.dead_letter_exchange: exchange `{name}` cannot be used ({source}); \
         declare it on the server, or use \"\" (the default exchange)"
    )]
    DeadLetterExchange { name: String, source: lapin::Error },
}

/// `exchange`, given up after [`ANSWER_WITHIN`].
async fn answered<T, E: Into<Trouble>>(
    exchange: impl Future<Output = Result<T, E>>,
) -> Result<T, Trouble> {
    match tokio::time::timeout(ANSWER_WITHIN, exchange).await {
        Ok(answer) => answer.map_err(Into::into),
        Err(_) => Err(Trouble::NoAnswer(ANSWER_WITHIN)),
    }
}

/// Closes `conn`, waiting at most [`ANSWER_WITHIN`] for the server to agree.
async fn close(conn: &Connection, why: &str) {
    let _ = answered(conn.close(200, why.into())).await;
}

fn dead_key(cfg: &AmqpConfig) -> String {
    cfg.dead_letter_routing_key
        .clone()
        .unwrap_or_else(|| format!("{}.dead", cfg.queue))
}

/// Connects and declares what the configuration names.
async fn open(cfg: &AmqpConfig) -> lapin::Result<(Connection, Channel)> {
    let conn = Connection::connect(
        &cfg.url,
        ConnectionProperties::default().with_connection_name("aiwg".into()),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        cfg.queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    if cfg.dead_letter_exchange.is_empty() {
        ch.queue_declare(
            dead_key(cfg).as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    }
    if let Some(x) = &cfg.events_exchange {
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    Ok((conn, ch))
}

/// Checks that the named dead-letter exchange exists (a passive declaration): publishing to
/// one that does not closes the channel, and the refused message would come back first,
/// forever. The channel is closed by the server when it does not.
async fn check_dead_letter_exchange(ch: &Channel, cfg: &AmqpConfig) -> Result<(), Trouble> {
    if cfg.dead_letter_exchange.is_empty() {
        return Ok(());
    }
    ch.exchange_declare(
        cfg.dead_letter_exchange.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|source| Trouble::DeadLetterExchange {
        name: cfg.dead_letter_exchange.clone(),
        source,
    })
}

/// Connects, declares and checks what the consumer needs; the connection is closed when a
/// check fails.
async fn open_checked(cfg: &AmqpConfig) -> Result<(Connection, Channel), Trouble> {
    let (conn, ch) = open(cfg).await?;
    if let Err(e) = check_dead_letter_exchange(&ch, cfg).await {
        close(&conn, "dead-letter exchange missing").await;
        return Err(e);
    }
    Ok((conn, ch))
}

pub(crate) async fn start(
    cfg: AmqpConfig,
    engine: Engine,
    events: Option<EventQueue>,
    cancel: CancellationToken,
) -> Result<Started, BrokerError> {
    // Fail fast when the server is not reachable at start.
    let (conn, _) = answered(open_checked(&cfg)).await.map_err(|e| match e {
        Trouble::NoAnswer(_) => BrokerError::setup(BROKER, "no answer from the server", e),
        Trouble::Amqp(_) | Trouble::Nacked => {
            BrokerError::setup(BROKER, "cannot connect or declare", e)
        }
        Trouble::DeadLetterExchange { name, source } => BrokerError::setup(
            BROKER,
            format!(
                "brokers.amqp.dead_letter_exchange: no usable exchange `{name}` on the server \
                 (declare it, or use \"\" for the default exchange)"
            ),
            source,
        ),
    })?;
    close(&conn, "set up").await;
    let consumer = tokio::spawn(consume(cfg.clone(), engine, cancel));
    let publisher = match (cfg.events_exchange.clone(), events) {
        (Some(exchange), Some(events)) => Some(tokio::spawn(publish_events(cfg, exchange, events))),
        _ => None,
    };
    Ok(Started {
        consumer,
        publisher,
    })
}

async fn consume(cfg: AmqpConfig, engine: Engine, cancel: CancellationToken) {
    let prefetch = cfg.prefetch.unwrap_or(64);
    let mut failures = 0u32;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let opened = async {
            let (conn, ch) = open_checked(&cfg).await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = ch
                .basic_consume(
                    cfg.queue.as_str().into(),
                    "aiwg".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, Trouble>((conn, ch, consumer))
        };
        let (conn, ch, mut consumer) = match answered(opened).await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "amqp: cannot consume; retrying");
                if !pause(reconnect_delay(failures), &cancel).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => {
                    close(&conn, "shutting down").await;
                    return;
                }
                n = consumer.next() => n,
            };
            match next {
                Some(Ok(delivery)) => {
                    // The deliveries that came together (at most `prefetch`): submitted
                    // together, acknowledged together.
                    let mut batch = vec![delivery];
                    let ready = take_ready(&mut consumer, &mut batch, usize::from(prefetch));
                    let handled = futures_util::future::join_all(
                        batch
                            .into_iter()
                            .map(|d| handle(&ch, &cfg, &engine, &cancel, d)),
                    )
                    .await;
                    let mut broken = None;
                    for h in handled {
                        match h {
                            // Only a message done with clears the failures: one requeued again
                            // and again (its dead letter refused) keeps the reconnect pause
                            // growing.
                            Ok(true) => failures = 0,
                            Ok(false) => {}
                            Err(e) => broken = broken.or(Some(e)),
                        }
                    }
                    if let Some(e) = broken {
                        tracing::warn!(error = %e, "amqp: acknowledgement failed; reconnecting");
                        break;
                    }
                    match ready {
                        Ready::Open => {}
                        Ready::Ended => break,
                        Ready::Failed(e) => {
                            tracing::warn!(error = %e, "amqp: consumer error; reconnecting");
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "amqp: consumer error; reconnecting");
                    break;
                }
                None => break,
            }
        }
        close(&conn, "reconnecting").await;
        failures += 1;
        if !pause(reconnect_delay(failures), &cancel).await {
            return;
        }
    }
}

/// Handles one delivery to its acknowledgement: `Ok(true)` once done with (its job stored, or
/// its dead letter confirmed) and acknowledged, `Ok(false)` when requeued, `Err` when the
/// acknowledgement failed (the connection is to be made again).
async fn handle(
    ch: &Channel,
    cfg: &AmqpConfig,
    engine: &Engine,
    cancel: &CancellationToken,
    delivery: lapin::message::Delivery,
) -> Result<bool, Trouble> {
    // Never the delivery tag: it counts from 1 again on every channel, so after a reconnect it
    // would be another message's key.
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned())
        .filter(|m| !m.is_empty());
    // Checked before anything reads the body (it is not copied).
    let verdict = submit_bounded(
        engine,
        BROKER,
        &cfg.queue,
        id.as_deref(),
        &delivery.data,
        max_message_bytes(cfg.max_message_bytes),
    )
    .await;
    let done = match verdict {
        Verdict::Stored { .. } => Ok(true),
        Verdict::Refused(problem) => dead_letter(ch, cfg, &delivery, id.as_deref(), &problem).await,
        Verdict::Retry(e) => {
            tracing::info!(error = %e, "amqp: trigger refused for now; requeueing");
            pause(cfg.retry_delay.unwrap_or(Duration::from_secs(5)), cancel).await;
            Ok(false)
        }
    };
    match done {
        Ok(true) => answered(delivery.ack(BasicAckOptions::default()))
            .await
            .map(|_| true),
        Ok(false) | Err(_) => answered(delivery.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        }))
        .await
        .map(|_| false),
    }
}

/// The most bytes a dead letter's `aiwg-problem` header takes (its detail is cut to fit).
const PROBLEM_HEADER_MAX: usize = 2048;

/// Publishes the dead letter of `delivery` (`id`: its `message_id`, when it has one), refused
/// with `problem`: its own body (the first 64 KiB when larger than `max_message_bytes`), content
/// type and headers, with the problem document added in the header `aiwg-problem`; `Ok(true)`
/// once confirmed.
async fn dead_letter(
    ch: &Channel,
    cfg: &AmqpConfig,
    delivery: &lapin::message::Delivery,
    id: Option<&str>,
    problem: &Problem,
) -> Result<bool, Trouble> {
    let (body, cut) = dead_letter_body(&delivery.data, max_message_bytes(cfg.max_message_bytes));
    let original = &delivery.properties;
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        "aiwg-problem".into(),
        AMQPValue::LongString(problem_document_within(problem, PROBLEM_HEADER_MAX).into()),
    );
    headers.insert(
        "aiwg-queue".into(),
        AMQPValue::LongString(cfg.queue.as_str().into()),
    );
    if cut {
        headers.insert("aiwg-body-truncated".into(), AMQPValue::Boolean(true));
    }
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(t) = original.content_type() {
        properties = properties.with_content_type(t.clone());
    }
    if let Some(e) = original.content_encoding() {
        properties = properties.with_content_encoding(e.clone());
    }
    if let Some(id) = id {
        headers.insert("aiwg-message-id".into(), AMQPValue::LongString(id.into()));
        properties = properties
            .with_message_id(id.into())
            .with_correlation_id(id.into());
    }
    let properties = properties.with_headers(headers);
    let confirm = answered(async {
        ch.basic_publish(
            cfg.dead_letter_exchange.as_str().into(),
            dead_key(cfg).as_str().into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await
    })
    .await?;
    Ok(confirm.is_ack())
}

/// Whether the server refused a publish in a way publishing again cannot cure: the message is
/// larger than its `max_message_size` (`PRECONDITION_FAILED`), or this user may not publish
/// to the exchange (`ACCESS_REFUSED`).
fn refused_for_good(e: &Trouble) -> bool {
    let Trouble::Amqp(e) = e else {
        return false;
    };
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(
        p.kind(),
        AMQPErrorKind::Soft(
            AMQPSoftError::PRECONDITIONFAILED
                | AMQPSoftError::CONTENTTOOLARGE
                | AMQPSoftError::ACCESSREFUSED
        )
    ))
}

/// Job events to the events exchange (routing key: the event type), persistent: the batch is
/// sent on one channel, then its publisher confirms awaited, all within [`ANSWER_WITHIN`].
struct Events {
    cfg: AmqpConfig,
    exchange: String,
    open: Option<(Connection, Channel)>,
}

impl Publisher for Events {
    type Error = Trouble;
    const BROKER: &'static str = BROKER;

    async fn publish(&mut self, batch: &[EventMessage]) -> Result<Vec<Sent<Trouble>>, Trouble> {
        if self.open.is_none() {
            self.open = Some(answered(open(&self.cfg)).await?);
        }
        let (_, ch) = self.open.as_ref().expect("just opened");
        let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
        let mut confirms = Vec::with_capacity(batch.len());
        for ev in batch {
            let mut headers = FieldTable::default();
            headers.insert(
                "aiwg-job-id".into(),
                AMQPValue::LongString(ev.job_id.as_str().into()),
            );
            let published = ch.basic_publish(
                self.exchange.as_str().into(),
                ev.event_type.as_str().into(),
                BasicPublishOptions::default(),
                ev.body.as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_type(ev.event_type.as_str().into())
                    .with_headers(headers),
            );
            confirms.push(match tokio::time::timeout_at(deadline, published).await {
                Ok(sent) => sent.map_err(Trouble::from),
                Err(_) => Err(Trouble::NoAnswer(ANSWER_WITHIN)),
            });
        }
        let mut answers = Vec::with_capacity(confirms.len());
        // A refusal closes the channel: what was sent on it after the refused event fails for
        // that alone (the server handles a channel's publishes in order, and confirmed the ones
        // before it), and goes again at once on a new channel.
        let mut closed = false;
        for confirm in confirms {
            let confirmed = match confirm {
                Ok(c) => match tokio::time::timeout_at(deadline, c).await {
                    Ok(c) => c.map_err(Trouble::from),
                    Err(_) => Err(Trouble::NoAnswer(ANSWER_WITHIN)),
                },
                Err(e) => Err(e),
            };
            answers.push(match confirmed {
                Ok(c) if c.is_ack() => Sent::Confirmed,
                Ok(_) => Sent::Retry(Trouble::Nacked),
                // The channel's closing fails every confirm after the refused one, often
                // with the refusal itself: only the first is the event the server refused.
                Err(_) if closed => Sent::Again,
                Err(e) if refused_for_good(&e) => {
                    closed = true;
                    Sent::Refused(e)
                }
                Err(e) => Sent::Retry(e),
            });
        }
        // The next batch opens a new channel.
        if closed {
            self.failed().await;
        }
        Ok(answers)
    }

    async fn failed(&mut self) {
        if let Some((conn, _)) = self.open.take() {
            close(&conn, "reconnecting").await;
        }
    }

    async fn close(&mut self) {
        if let Some((conn, _)) = self.open.take() {
            close(&conn, "shutting down").await;
        }
    }
}

async fn publish_events(cfg: AmqpConfig, exchange: String, events: EventQueue) {
    let publisher = Events {
        cfg,
        exchange,
        open: None,
    };
    publish::publish_events(publisher, events).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn refusal(kind: AMQPSoftError) -> Trouble {
        let e = AMQPError::new(AMQPErrorKind::Soft(kind), "refused".into());
        Trouble::Amqp(lapin::ErrorKind::ProtocolError(e).into())
    }

    #[test]
    fn only_refusals_that_publishing_again_cannot_cure_drop_an_event() {
        // Too large for the server's max_message_size, or not allowed: for good.
        assert!(refused_for_good(&refusal(
            AMQPSoftError::PRECONDITIONFAILED
        )));
        assert!(refused_for_good(&refusal(AMQPSoftError::ACCESSREFUSED)));
        // The exchange gone (declared again on reconnect), a lost connection, no answer: retried.
        assert!(!refused_for_good(&refusal(AMQPSoftError::NOTFOUND)));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!refused_for_good(&Trouble::Amqp(io.into())));
        assert!(!refused_for_good(&Trouble::NoAnswer(ANSWER_WITHIN)));
    }
}
