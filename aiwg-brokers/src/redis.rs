//! Redis Streams: a consumer group for triggers (its own pending entries first after a
//! reconnect, entries idle with a departed consumer claimed), `XADD` for events and dead letters.

use std::time::Duration;

use aiwg_core::Engine;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::max_message_bytes;
use crate::events::{EventMessage, EventQueue};
use crate::publish::{self, Publisher, Sent};
use crate::submit::{dead_letter_body, submit_bounded};
use crate::{pause, problem_document, reconnect_delay, BrokerError, RedisConfig, Started, Verdict};

const BROKER: &str = "redis";

/// How long a batch of events (up to about 1 MiB of `XADD`s) may take to be answered before
/// the connection is given up and the batch sent again (the client's default is 500 ms).
const PUBLISH_ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The most entries one read takes: handled together (submitted at once, one `XACK`).
const READ_COUNT: usize = 64;

/// How long one `XREADGROUP` waits at the server for new entries.
const BLOCK: Duration = Duration::from_secs(1);

/// How long the reading connection waits for an answer: the block and then some for a slow
/// server. (The client's default, 500 ms, is shorter than the block: every idle read timed out
/// and the consumer connected again twice a second.)
const READ_ANSWER_WITHIN: Duration = Duration::from_secs(6);

pub(crate) async fn start(
    cfg: RedisConfig,
    engine: Engine,
    events: Option<EventQueue>,
    cancel: CancellationToken,
) -> Result<Started, BrokerError> {
    let client = redis::Client::open(cfg.url.as_str())
        .map_err(|e| BrokerError::setup(BROKER, "invalid url", e))?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|e| BrokerError::setup(BROKER, "no answer from the server", e))?
    .map_err(|e| BrokerError::setup(BROKER, "cannot connect", e))?;
    ensure_group(&mut con, &cfg, NEW_GROUP_AT)
        .await
        .map_err(|e| BrokerError::setup(BROKER, format!("group `{}`", cfg.group), e))?;
    let consumer = tokio::spawn(consume(client.clone(), cfg.clone(), engine, cancel));
    let publisher = match (cfg.events_stream.clone(), events) {
        (Some(stream), Some(events)) => Some(tokio::spawn(publish_events(client, stream, events))),
        _ => None,
    };
    Ok(Started {
        consumer,
        publisher,
    })
}

/// Where a consumer group made at start begins: the stream's end (what was added before aiwg
/// first read the stream is not a trigger for it).
const NEW_GROUP_AT: &str = "$";

/// Where a consumer group made again while consuming begins: the stream's start. The group
/// existed (the start made it), so it was lost (`XGROUP DESTROY`, the key deleted, a server
/// that lost its data): made at the end, it would skip every entry added while it was gone, and
/// the entries it had delivered but not yet seen acknowledged. Every entry still in the stream
/// comes again instead; one whose job exists finds it by its key (a duplicate, nothing runs).
const LOST_GROUP_AT: &str = "0";

/// Makes the consumer group (and the stream) when missing, beginning at `at`; `Ok(true)` when
/// it was made.
async fn ensure_group(
    con: &mut MultiplexedConnection,
    cfg: &RedisConfig,
    at: &str,
) -> redis::RedisResult<bool> {
    let created: redis::RedisResult<()> = con
        .xgroup_create_mkstream(&cfg.stream, &cfg.group, at)
        .await;
    match created {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
        Err(e) => Err(e),
    }
}

fn consumer_name(cfg: &RedisConfig) -> String {
    cfg.consumer
        .clone()
        .unwrap_or_else(|| format!("aiwg-{}", std::process::id()))
}

fn dead_stream(cfg: &RedisConfig) -> String {
    cfg.dead_letter_stream
        .clone()
        .unwrap_or_else(|| format!("{}:dead", cfg.stream))
}

async fn consume(
    client: redis::Client,
    cfg: RedisConfig,
    engine: Engine,
    cancel: CancellationToken,
) {
    let me = consumer_name(&cfg);
    let claim_idle = cfg.claim_idle.unwrap_or(Duration::from_secs(60));
    let retry_delay = cfg.retry_delay.unwrap_or(Duration::from_secs(5));
    let mut failures = 0u32;
    // XAUTOCLAIMs refused in a row.
    let mut claim_failures = 0u32;
    'connect: loop {
        if cancel.is_cancelled() {
            return;
        }
        // One connection blocks in XREADGROUP, the other acknowledges and publishes.
        let cons = async {
            let config =
                AsyncConnectionConfig::new().set_response_timeout(Some(READ_ANSWER_WITHIN));
            let mut read = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let write = client.get_multiplexed_async_connection().await?;
            if ensure_group(&mut read, &cfg, LOST_GROUP_AT).await? {
                tracing::warn!(
                    stream = %cfg.stream, group = %cfg.group,
                    "redis: the consumer group was gone; made again at the stream's start \
                     (entries already handled come again and find their jobs)"
                );
            }
            Ok::<_, redis::RedisError>((read, write))
        };
        let (mut read, mut write) = match cons.await {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "redis: cannot consume; retrying");
                if !pause(reconnect_delay(failures), &cancel).await {
                    return;
                }
                continue;
            }
        };
        // Our own pending entries first (delivered before a restart, never acknowledged).
        let mut pending = true;
        // `None`: a claim_idle beyond the clock's end never claims.
        let mut next_claim = Some(Instant::now());
        loop {
            if cancel.is_cancelled() {
                return;
            }
            if next_claim.is_some_and(|t| Instant::now() >= t) {
                let now = Instant::now();
                next_claim = claim_after(now, claim_idle);
                let claimed: redis::RedisResult<redis::Value> = redis::cmd("XAUTOCLAIM")
                    .arg(&cfg.stream)
                    .arg(&cfg.group)
                    .arg(&me)
                    .arg(millis(claim_idle))
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(100)
                    .query_async(&mut write)
                    .await;
                match claimed {
                    Ok(_) => {
                        claim_failures = 0;
                        pending = true;
                    }
                    Err(e) => {
                        count_error("xautoclaim");
                        if e.code() == Some("NOGROUP") || !refused_for_good(&e) {
                            // The connection (or the group) is gone: as after a failed read,
                            // connect again (making the group again) after a growing pause.
                            failures += 1;
                            tracing::warn!(
                                error = %e, stream = %cfg.stream, group = %cfg.group,
                                "redis: XAUTOCLAIM failed; reconnecting"
                            );
                            if !pause(reconnect_delay(failures), &cancel).await {
                                return;
                            }
                            continue 'connect;
                        }
                        // Refused (no permission, a server without XAUTOCLAIM): reading goes on,
                        // entries of departed consumers wait; tried again after a growing pause.
                        claim_failures += 1;
                        let delay = reconnect_delay(claim_failures);
                        next_claim = next_claim.map(|t| t.max(now + delay));
                        tracing::warn!(
                            error = %e, stream = %cfg.stream, group = %cfg.group,
                            "redis: XAUTOCLAIM refused: entries pending with consumers that went \
                             away are not claimed; trying again later"
                        );
                    }
                }
            }
            let start = if pending { "0" } else { ">" };
            let read_cmd = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&cfg.group)
                .arg(&me)
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&cfg.stream)
                .arg(start)
                .to_owned();
            let reply: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
                () = cancel.cancelled() => return,
                r = read_cmd.query_async(&mut read) => r,
            };
            let entries: Vec<StreamId> = match reply {
                Ok(r) => r
                    .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                    .unwrap_or_default(),
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "redis: read failed; reconnecting");
                    if !pause(reconnect_delay(failures), &cancel).await {
                        return;
                    }
                    continue 'connect;
                }
            };
            if pending && entries.is_empty() {
                failures = 0;
                pending = false;
                continue;
            }
            // The entries read together: submitted together, then acknowledged with one XACK.
            let outcomes = futures_util::future::join_all(
                entries
                    .iter()
                    .map(|entry| handle(write.clone(), &cfg, &engine, entry)),
            )
            .await;
            let done: Vec<&str> = entries
                .iter()
                .zip(&outcomes)
                .filter(|(_, o)| matches!(o, Ok(true)))
                .map(|(e, _)| e.id.as_str())
                .collect();
            let acked: redis::RedisResult<()> = if done.is_empty() {
                Ok(())
            } else {
                write
                    .xack::<_, _, _, i64>(&cfg.stream, &cfg.group, &done)
                    .await
                    .map(drop)
            };
            let retry = outcomes.iter().any(|o| matches!(o, Ok(false)));
            let failed = entries
                .iter()
                .zip(outcomes)
                .find_map(|(entry, o)| o.err().map(|e| (e, entry.id.as_str())))
                .or_else(|| acked.err().map(|e| (e, "acknowledgement")));
            if let Some((e, entry)) = failed {
                // The entry stays pending and comes again after the pause (a dead-letter
                // stream that refuses it would otherwise be a hot loop resubmitting it).
                failures += 1;
                tracing::warn!(
                    error = %e, entry = %entry,
                    "redis: dead letter or acknowledgement failed; reconnecting"
                );
                if !pause(reconnect_delay(failures), &cancel).await {
                    return;
                }
                continue 'connect;
            }
            // Only a batch handled to its end clears the failures: a read that succeeds
            // between failing acknowledgements must not reset the pause.
            failures = 0;
            if retry {
                // Left pending; read again from our pending list after the delay.
                pending = true;
                if !pause(retry_delay, &cancel).await {
                    return;
                }
            }
        }
    }
}

/// Counts a command that failed (`aiwg_broker_errors_total{broker="redis", operation}`).
fn count_error(operation: &'static str) {
    metrics::counter!("aiwg_broker_errors_total", "broker" => BROKER, "operation" => operation)
        .increment(1);
}

/// When to look for entries to claim next, `claim_idle` being how long an entry must have been
/// idle: every half of it; `None` (never) when that is beyond the clock's end.
fn claim_after(now: Instant, claim_idle: Duration) -> Option<Instant> {
    now.checked_add(claim_idle / 2)
}

/// `d` in milliseconds for a Redis argument (a signed 64-bit number), saturated.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Handles one entry up to its acknowledgement: `Ok(true)` when it is done with (its job
/// stored, or its dead letter added) and may be acknowledged, `Ok(false)` when it stays pending
/// for a retry, `Err` when its dead letter could not be added.
async fn handle(
    mut write: MultiplexedConnection,
    cfg: &RedisConfig,
    engine: &Engine,
    entry: &StreamId,
) -> redis::RedisResult<bool> {
    let body = field(entry, "body");
    // Checked before anything reads the body (it is not copied).
    let limit = max_message_bytes(cfg.max_message_bytes);
    match submit_bounded(engine, BROKER, &cfg.stream, Some(&entry.id), &body, limit).await {
        Verdict::Stored { .. } => Ok(true),
        Verdict::Refused(problem) => {
            let (kept, cut) = dead_letter_body(&body, limit);
            let doc = problem_document(&problem);
            let mut fields: Vec<(&str, &[u8])> = vec![
                ("problem", doc.as_bytes()),
                ("message_id", entry.id.as_bytes()),
                ("body", kept),
            ];
            if cut {
                fields.push(("body_truncated", b"true"));
            }
            let _: String = write.xadd(dead_stream(cfg), "*", &fields).await?;
            Ok(true)
        }
        Verdict::Retry(e) => {
            tracing::info!(error = %e, "redis: trigger refused for now; will retry");
            Ok(false)
        }
    }
}

/// The field `name` of `entry`, borrowed when it is a byte string (the reply's own bytes, never
/// copied); empty when missing.
fn field<'a>(entry: &'a StreamId, name: &str) -> std::borrow::Cow<'a, [u8]> {
    match entry.map.get(name) {
        Some(redis::Value::BulkString(b)) => std::borrow::Cow::Borrowed(b.as_slice()),
        Some(redis::Value::SimpleString(s)) => std::borrow::Cow::Borrowed(s.as_bytes()),
        Some(_) => std::borrow::Cow::Owned(entry.get(name).unwrap_or_default()),
        None => std::borrow::Cow::Borrowed(&[]),
    }
}

/// Whether the server refused a command in a way sending it again cannot cure: an error reply
/// (`WRONGTYPE`: the key is not a stream, `NOPERM`, `ERR` …) other than the ones that pass
/// (loading, busy, out of memory, a failover). Connection errors are cured by reconnecting.
fn refused_for_good(e: &redis::RedisError) -> bool {
    match e.kind() {
        redis::ErrorKind::Server(_) | redis::ErrorKind::Extension => !matches!(
            e.code(),
            Some(
                "LOADING"
                    | "BUSY"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "OOM"
                    | "MISCONF"
                    | "NOREPLICAS"
            )
        ),
        _ => false,
    }
}

/// Job events to the events stream: the batch's `XADD`s in one pipeline, one reply each.
struct Events {
    client: redis::Client,
    stream: String,
    con: Option<MultiplexedConnection>,
}

impl Publisher for Events {
    type Error = redis::RedisError;
    const BROKER: &'static str = BROKER;

    async fn publish(
        &mut self,
        batch: &[EventMessage],
    ) -> Result<Vec<Sent<redis::RedisError>>, redis::RedisError> {
        if self.con.is_none() {
            let config =
                AsyncConnectionConfig::new().set_response_timeout(Some(PUBLISH_ANSWER_WITHIN));
            self.con = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            );
        }
        let con = self.con.as_mut().expect("just connected");
        let mut pipe = redis::pipe();
        // An error reply answers its own entry; the others are still read.
        pipe.ignore_errors();
        for ev in batch {
            pipe.xadd(
                &self.stream,
                "*",
                &[
                    ("type", ev.event_type.as_str()),
                    ("job_id", ev.job_id.as_str()),
                    ("body", ev.body.as_str()),
                ],
            );
        }
        let replies: Vec<redis::RedisResult<String>> = pipe.query_async(con).await?;
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Ok(_) => Sent::Confirmed,
                Err(e) if refused_for_good(&e) => Sent::Refused(e),
                Err(e) => Sent::Retry(e),
            })
            .collect())
    }

    async fn failed(&mut self) {
        self.con = None;
    }
}

async fn publish_events(client: redis::Client, stream: String, events: EventQueue) {
    let publisher = Events {
        client,
        stream,
        con: None,
    };
    publish::publish_events(publisher, events).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_claim_idle_never_claims_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(
            claim_after(now, Duration::from_secs(60)),
            Some(now + Duration::from_secs(30))
        );
        assert_eq!(claim_after(now, Duration::MAX), None);
        assert_eq!(millis(Duration::from_secs(60)), 60_000);
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
