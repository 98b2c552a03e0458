//! Job events published to the brokers (`aiwg-brokers`), beside a bare publisher of the same
//! client library sending the same messages.
//!
//! For each broker that answers on loopback (NATS JetStream on 4222, RabbitMQ on 5672, Redis
//! on 6379; `scripts/ensure-brokers.sh` starts them), every round offers `AIWG_BROKER_EVENTS`
//! (default 5 000, at most the brokers' buffer of 10 000) `job.completed` events of as many
//! jobs to [`Brokers::observer`] at once and times until a reader on the broker's side has
//! received all of them. The baseline publishes the same events (the outbound body built from
//! the job, the same headers, each confirmed by the broker: a JetStream ack, a publisher
//! confirm, an `XADD` reply) from one task with the client library's pipelining: up to 256
//! unconfirmed at once (JetStream, RabbitMQ), or `XADD`s 256 to a pipeline (Redis). Sides
//! alternate, `AIWG_BROKER_ROUNDS` rounds each (default 6); every round's events are new jobs,
//! so JetStream's de-duplication drops none.
//!
//! Prints, per broker, `ratio broker_events_<broker>_vs_bare <v>`: our events a second over the
//! bare publisher's (medians of the rounds).
//!
//! `cargo bench -p aiwg-benches --bench broker_events`

use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_benches::brokers::{reachable, unique, Arrivals};
use aiwg_benches::{env_usize, median};
use aiwg_brokers::{Brokers, BrokersConfig, RunningBrokers};
use aiwg_core::dispatch::outbound_event;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, Job, JobEvent, JobId, JobObserver, JobRequest, Step, Workflow};
use futures_util::stream::{FuturesOrdered, StreamExt};

/// Unconfirmed messages the bare publishers keep in flight.
const WINDOW: usize = 256;

/// A finished job of a one-step workflow and its `job.completed` event, for copies with new ids.
async fn finished_job() -> (Job, JobEvent) {
    let engine = Engine::builder()
        .executor(
            "x",
            Arc::new(ScriptedExecutor::succeeding("all checks passed")),
        )
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
        .workers(1)
        .build()
        .unwrap();
    let job = engine
        .submission(JobRequest::new("check").guidance("look at the failing test"))
        .await
        .unwrap()
        .job;
    let job = engine.wait(job.id, Duration::from_secs(10)).await.unwrap();
    let events = engine.store().events(job.id, 0).await.unwrap();
    let done = events
        .into_iter()
        .rfind(JobEvent::is_terminal)
        .expect("a terminal event");
    engine.shutdown(Duration::from_secs(1)).await;
    (job, done)
}

/// `n` copies of `job` and its event, each a job of its own.
fn copies(job: &Job, event: &JobEvent, n: usize) -> Vec<(Job, JobEvent)> {
    (0..n)
        .map(|_| {
            let mut j = job.clone();
            j.id = JobId::new();
            let mut e = event.clone();
            e.job_id = j.id;
            (j, e)
        })
        .collect()
}

/// One broker's two sides.
struct Sides {
    name: &'static str,
    received: Arc<Arrivals>,
    observer: Arc<dyn JobObserver>,
    running: RunningBrokers,
    engine: Engine,
    bare: Box<dyn Bare>,
}

#[async_trait::async_trait]
trait Bare: Send + Sync {
    /// Publishes every event's outbound message, confirmed by the broker.
    async fn publish(&self, events: &[(Job, JobEvent)]);
}

async fn start_ours(config: serde_json::Value) -> (Arc<dyn JobObserver>, RunningBrokers, Engine) {
    let brokers = Brokers::new(BrokersConfig::from_value(config).unwrap()).unwrap();
    let observer = brokers.observer();
    let engine = Engine::builder()
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
        .workers(1)
        .build()
        .unwrap();
    let running = brokers.start(engine.clone()).await.unwrap();
    (observer, running, engine)
}

mod nats_side {
    use super::*;
    use async_nats::jetstream;
    use async_nats::HeaderMap;
    use sha2::Digest;

    pub(super) struct BareNats {
        js: jetstream::Context,
        subject: String,
    }

    #[async_trait::async_trait]
    impl Bare for BareNats {
        async fn publish(&self, events: &[(Job, JobEvent)]) {
            let mut acks = FuturesOrdered::new();
            for (job, event) in events {
                let out = outbound_event(job, event).unwrap();
                let body = out.body();
                let mut headers = HeaderMap::new();
                let id = hex::encode(&sha2::Sha256::digest(body.as_bytes())[..16]);
                headers.insert("Nats-Msg-Id", id.as_str());
                headers.insert("Aiwg-Event-Type", out.event_type.as_str());
                headers.insert("Aiwg-Job-Id", job.id.to_string().as_str());
                headers.insert("Content-Type", "application/json");
                let ack = self
                    .js
                    .publish_with_headers(self.subject.clone(), headers, body.into())
                    .await
                    .unwrap();
                acks.push_back(std::future::IntoFuture::into_future(ack));
                if acks.len() >= WINDOW {
                    acks.next().await.unwrap().unwrap();
                }
            }
            while let Some(ack) = acks.next().await {
                ack.unwrap();
            }
        }
    }

    pub(super) async fn sides() -> Sides {
        let url = "nats://127.0.0.1:4222";
        let name = unique();
        let events_subject = format!("{name}.events");
        let (observer, running, engine) = start_ours(serde_json::json!({"nats": {
            "url": url, "stream": format!("AIWG_{name}"), "consumer": "aiwg",
            "trigger_subject": format!("{name}.trigger"), "events_subject": events_subject,
            "dead_letter_subject": format!("{name}.dead")}}))
        .await;
        let client = async_nats::connect(url).await.unwrap();
        let received = Arc::new(Arrivals::default());
        let mut sub = client.subscribe(events_subject.clone()).await.unwrap();
        let counter = received.clone();
        tokio::spawn(async move {
            while sub.next().await.is_some() {
                counter.add(1);
            }
        });
        client.flush().await.unwrap();
        Sides {
            name: "nats",
            received,
            observer,
            running,
            engine,
            bare: Box::new(BareNats {
                js: jetstream::new(client),
                subject: events_subject,
            }),
        }
    }

    /// The stream the bench made.
    pub(super) async fn clean_up() {
        let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
        let js = jetstream::new(client);
        let prefix = format!("AIWG_bench{}x", std::process::id());
        let mut names = js.stream_names();
        let mut mine = Vec::new();
        while let Some(Ok(n)) = names.next().await {
            if n.starts_with(&prefix) {
                mine.push(n);
            }
        }
        for n in mine {
            let _ = js.delete_stream(n).await;
        }
    }
}

mod amqp_side {
    use super::*;
    use lapin::options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    pub(super) struct BareAmqp {
        channel: Channel,
        exchange: String,
        /// Kept open while the bench runs.
        _conn: Connection,
    }

    #[async_trait::async_trait]
    impl Bare for BareAmqp {
        async fn publish(&self, events: &[(Job, JobEvent)]) {
            let mut confirms = FuturesOrdered::new();
            for (job, event) in events {
                let out = outbound_event(job, event).unwrap();
                let body = out.body();
                let mut headers = FieldTable::default();
                headers.insert(
                    "aiwg-job-id".into(),
                    AMQPValue::LongString(job.id.to_string().as_str().into()),
                );
                let confirm = self
                    .channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        out.event_type.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_delivery_mode(2)
                            .with_type(out.event_type.as_str().into())
                            .with_headers(headers),
                    )
                    .await
                    .unwrap();
                confirms.push_back(confirm);
                if confirms.len() >= WINDOW {
                    assert!(confirms.next().await.unwrap().unwrap().is_ack());
                }
            }
            while let Some(c) = confirms.next().await {
                assert!(c.unwrap().is_ack());
            }
        }
    }

    pub(super) async fn sides() -> (Sides, String) {
        let name = unique();
        let exchange = format!("{name}.events");
        let (observer, running, engine) = start_ours(serde_json::json!({"amqp": {
            "url": URL, "queue": format!("{name}.trigger"), "events_exchange": exchange,
            "dead_letter_exchange": "", "dead_letter_routing_key": format!("{name}.dead")}}))
        .await;
        // The publisher declares the exchange when it connects; so does this side, the same way.
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let reader = conn.create_channel().await.unwrap();
        reader
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let queue = reader
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        reader
            .queue_bind(
                queue.name().as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = reader
            .basic_consume(
                queue.name().as_str().into(),
                "bench".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = Arc::new(Arrivals::default());
        let counter = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = consumer.next().await {
                counter.add(1);
            }
        });
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let sides = Sides {
            name: "amqp",
            received,
            observer,
            running,
            engine,
            bare: Box::new(BareAmqp {
                channel,
                exchange: exchange.clone(),
                _conn: conn,
            }),
        };
        (sides, exchange)
    }

    /// The exchange and the queues the bench made.
    pub(super) async fn clean_up(exchange: &str) {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
        for kind in [".trigger", ".dead"] {
            let queue = exchange.replace(".events", kind);
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

mod redis_side {
    use super::*;
    use redis::AsyncCommands;

    const URL: &str = "redis://127.0.0.1:6379";

    pub(super) struct BareRedis {
        con: redis::aio::MultiplexedConnection,
        stream: String,
    }

    #[async_trait::async_trait]
    impl Bare for BareRedis {
        async fn publish(&self, events: &[(Job, JobEvent)]) {
            let mut con = self.con.clone();
            for chunk in events.chunks(WINDOW) {
                let mut pipe = redis::pipe();
                for (job, event) in chunk {
                    let out = outbound_event(job, event).unwrap();
                    let body = out.body();
                    pipe.xadd(
                        &self.stream,
                        "*",
                        &[
                            ("type", out.event_type.as_str()),
                            ("job_id", job.id.to_string().as_str()),
                            ("body", body.as_str()),
                        ],
                    );
                }
                let ids: Vec<String> = pipe.query_async(&mut con).await.unwrap();
                assert_eq!(ids.len(), chunk.len());
            }
        }
    }

    pub(super) async fn sides() -> (Sides, String) {
        let name = unique();
        let stream = format!("{name}.events");
        let (observer, running, engine) = start_ours(serde_json::json!({"redis": {
            "url": URL, "stream": format!("{name}.trigger"), "group": "aiwg",
            "events_stream": stream, "dead_letter_stream": format!("{name}.dead")}}))
        .await;
        let client = redis::Client::open(URL).unwrap();
        let con = client.get_multiplexed_async_connection().await.unwrap();
        // Its own connection, answering later than a blocking read's second.
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(6)));
        let mut reader = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let received = Arc::new(Arrivals::default());
        let counter = received.clone();
        let key = stream.clone();
        tokio::spawn(async move {
            let mut last = "$".to_owned();
            loop {
                let opts = redis::streams::StreamReadOptions::default()
                    .block(1000)
                    .count(10_000);
                let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                    reader.xread_options(&[&key], &[&last], &opts).await;
                let Ok(reply) = read else { return };
                for s in reply.map(|r| r.keys).unwrap_or_default() {
                    if let Some(id) = s.ids.last() {
                        last = id.id.clone();
                    }
                    counter.add(s.ids.len());
                }
            }
        });
        let sides = Sides {
            name: "redis",
            received,
            observer,
            running,
            engine,
            bare: Box::new(BareRedis {
                con,
                stream: stream.clone(),
            }),
        };
        (sides, stream)
    }

    /// The streams the bench made.
    pub(super) async fn clean_up(stream: &str) {
        let client = redis::Client::open(URL).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let trigger = stream.replace(".events", ".trigger");
        let dead = stream.replace(".events", ".dead");
        let _: redis::RedisResult<()> = con.del(&[stream, &trigger, &dead]).await;
    }
}

/// Times our side and the bare side of one broker, alternated; prints the figures and the ratio.
async fn measure(sides: Sides, events: usize, rounds: usize, job: &Job, event: &JobEvent) {
    let Sides {
        name,
        received,
        observer,
        running,
        engine,
        bare,
    } = sides;
    let ours = || async {
        let batch = copies(job, event, events);
        let from = received.count();
        let start = Instant::now();
        for (j, e) in &batch {
            observer.on_event(j, e).await;
        }
        received.wait_for(from, events).await;
        events as f64 / start.elapsed().as_secs_f64()
    };
    let theirs = || async {
        let batch = copies(job, event, events);
        let from = received.count();
        let start = Instant::now();
        bare.publish(&batch).await;
        received.wait_for(from, events).await;
        events as f64 / start.elapsed().as_secs_f64()
    };
    // One round of each first, not counted: connections made, the stream and queue warm.
    ours().await;
    theirs().await;
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            o.push(ours().await);
            b.push(theirs().await);
        } else {
            b.push(theirs().await);
            o.push(ours().await);
        }
    }
    let (o, b) = (median(o), median(b));
    println!("{name}: aiwg {o:.0} events/s, bare publisher {b:.0} events/s ({events} events a round, {rounds} rounds each)");
    running.shutdown().await;
    engine.shutdown(Duration::from_secs(1)).await;
    println!("ratio broker_events_{name}_vs_bare {:.3}", o / b);
}

fn main() {
    let events = env_usize("AIWG_BROKER_EVENTS", 5_000).clamp(1, 10_000);
    let rounds = env_usize("AIWG_BROKER_ROUNDS", 6).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (job, event) = finished_job().await;
        let body = outbound_event(&job, &event).unwrap().body();
        println!("each event: {} ({} bytes)", event_type(&body), body.len());
        if reachable(4222) {
            measure(nats_side::sides().await, events, rounds, &job, &event).await;
            nats_side::clean_up().await;
        } else {
            println!("skipping nats: nothing on 127.0.0.1:4222 (scripts/ensure-brokers.sh)");
        }
        if reachable(5672) {
            let (sides, exchange) = amqp_side::sides().await;
            measure(sides, events, rounds, &job, &event).await;
            amqp_side::clean_up(&exchange).await;
        } else {
            println!("skipping amqp: nothing on 127.0.0.1:5672 (scripts/ensure-brokers.sh)");
        }
        if reachable(6379) {
            let (sides, stream) = redis_side::sides().await;
            measure(sides, events, rounds, &job, &event).await;
            redis_side::clean_up(&stream).await;
        } else {
            println!("skipping redis: nothing on 127.0.0.1:6379 (scripts/ensure-brokers.sh)");
        }
    });
}

fn event_type(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).unwrap()["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
