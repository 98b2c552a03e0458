//! Trigger messages taken from the brokers (`aiwg-brokers`) and stored as jobs, beside a bare
//! consumer of the same client library that takes and acknowledges the same messages.
//!
//! For each broker that answers on loopback (NATS JetStream on 4222, RabbitMQ on 5672, Redis
//! on 6379; `scripts/ensure-brokers.sh` starts them), every round publishes
//! `AIWG_BROKER_TRIGGERS` (default 4 000) trigger messages (`{"workflow": "check"}`, each with
//! an id of its own) as fast as the client library sends them, and times from the first
//! publish until the last one is handled:
//!
//! - ours: [`Brokers::start`] consuming them, each parsed, stored as a job (memory store; the
//!   workflow's one step waits for an approval, so a job costs a claim and a pause and runs
//!   nothing), audited and acknowledged; the end is the last job's creation, seen by an
//!   observer;
//! - bare: a consumer of the same library on a stream, queue or group of its own, with the same
//!   prefetch (RabbitMQ 64, or `AIWG_BROKER_PREFETCH`; Redis `COUNT 64`; JetStream the library's pull default), taking each
//!   message and acknowledging it (JetStream `ack`, AMQP `basic.ack`, one `XACK` a read).
//!
//! `AIWG_BROKERS=nats,redis` measures only those brokers. With `AIWG_BROKER_STORE=postgres` our jobs and audit trail are in PostgreSQL
//! (`AIWG_TEST_DATABASE_URL`, a schema of its own, 8 connections) and the ratios are named
//! `broker_triggers_<broker>_postgres_vs_bare`.
//!
//! Sides alternate, `AIWG_BROKER_ROUNDS` rounds each (default 6). Prints, per broker,
//! `ratio broker_triggers_<broker>_vs_bare <v>`: our messages a second over the bare consumer's
//! (medians of the rounds).
//!
//! `cargo bench -p aiwg-benches --bench broker_triggers`

use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_benches::brokers::{reachable, unique, Arrivals};
use aiwg_benches::{env_usize, median};
use aiwg_brokers::{Brokers, BrokersConfig, RunningBrokers};
use aiwg_core::audit::{AuditLog, PgAuditStore};
use aiwg_core::store::PgStore;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::workflow::ApprovalGate;
use aiwg_core::{Engine, Job, JobEvent, JobEventKind, JobObserver, Step, Workflow};
use futures_util::StreamExt;
use sqlx::PgPool;

/// The trigger every message carries.
const BODY: &[u8] = br#"{"workflow":"check","guidance":"look at the failing test"}"#;

/// Counts the jobs created.
struct Created(Arc<Arrivals>);

#[async_trait::async_trait]
impl JobObserver for Created {
    async fn on_event(&self, _job: &Job, event: &JobEvent) {
        if matches!(event.kind, JobEventKind::Status { from: None, .. }) {
            self.0.add(1);
        }
    }
}

/// An engine whose jobs wait for an approval, counting the jobs created, consuming `config`;
/// its jobs and audit trail in PostgreSQL when `pg` is given.
async fn start_ours(
    config: serde_json::Value,
    pg: Option<&PgPool>,
) -> (Arc<Arrivals>, RunningBrokers, Engine) {
    let brokers = Brokers::new(BrokersConfig::from_value(config).unwrap()).unwrap();
    let created = Arc::new(Arrivals::default());
    let mut step = Step::prompt("run", "x", "check");
    step.approval = ApprovalGate::Required;
    let mut builder = Engine::builder()
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(Workflow::new("check").step(step))
        .observer(Arc::new(Created(created.clone())))
        .queue_capacity(1_000_000)
        .workers(2);
    if let Some(pool) = pg {
        let store = PgStore::from_pool(pool.clone()).await.unwrap();
        store.migrate().await.unwrap();
        let audit = PgAuditStore::new(pool.clone());
        audit.migrate().await.unwrap();
        builder = builder
            .store(Arc::new(store))
            .audit(AuditLog::new(Arc::new(audit)));
    }
    let engine = builder.build().unwrap();
    let running = brokers.start(engine.clone()).await.unwrap();
    (created, running, engine)
}

/// A broker's publisher, our jobs counted, the bare consumer's messages counted, our brokers
/// and engine, and the name of what the bench made on the broker.
type Sides = (
    Box<dyn Broker>,
    Arc<Arrivals>,
    Arc<Arrivals>,
    RunningBrokers,
    Engine,
    String,
);

/// One broker: how to publish a round of triggers to our side and to the bare side.
#[async_trait::async_trait]
trait Broker: Send + Sync {
    /// Publishes `n` trigger messages (ids `<round>-<i>`) where our consumer (`ours`) or the
    /// bare one reads.
    async fn publish(&self, ours: bool, round: usize, n: usize);
}

mod nats_side {
    use super::*;
    use async_nats::jetstream::{self, consumer::pull};
    use async_nats::HeaderMap;

    pub(super) struct Nats {
        client: async_nats::Client,
        name: String,
    }

    #[async_trait::async_trait]
    impl Broker for Nats {
        async fn publish(&self, ours: bool, round: usize, n: usize) {
            let side = if ours { "trigger" } else { "bare" };
            let subject = format!("{}.{side}", self.name);
            for i in 0..n {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{side}-{round}-{i}").as_str());
                self.client
                    .publish_with_headers(subject.clone(), headers, BODY.into())
                    .await
                    .unwrap();
            }
            self.client.flush().await.unwrap();
        }
    }

    pub(super) async fn sides(pg: Option<&PgPool>) -> Sides {
        let url = "nats://127.0.0.1:4222";
        let name = unique();
        let (ours, running, engine) = start_ours(serde_json::json!({"nats": {
            "url": url, "stream": format!("AIWG_{name}"), "consumer": "aiwg",
            "trigger_subject": format!("{name}.trigger"), "events_subject": format!("{name}.events"),
            "dead_letter_subject": format!("{name}.dead")}}), pg)
        .await;
        let client = async_nats::connect(url).await.unwrap();
        let js = jetstream::new(client.clone());
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: format!("BARE_{name}"),
                subjects: vec![format!("{name}.bare")],
                ..Default::default()
            })
            .await
            .unwrap();
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("bare".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        let bare = Arc::new(Arrivals::default());
        let counter = bare.clone();
        let mut messages = consumer.messages().await.unwrap();
        tokio::spawn(async move {
            while let Some(Ok(m)) = messages.next().await {
                m.ack().await.unwrap();
                counter.add(1);
            }
        });
        (
            Box::new(Nats {
                client,
                name: name.clone(),
            }),
            ours,
            bare,
            running,
            engine,
            name,
        )
    }

    pub(super) async fn clean_up(name: &str) {
        let js = jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
        let _ = js.delete_stream(format!("AIWG_{name}")).await;
        let _ = js.delete_stream(format!("BARE_{name}")).await;
    }
}

mod amqp_side {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    pub(super) struct Amqp {
        channel: Channel,
        name: String,
        _conn: Connection,
    }

    #[async_trait::async_trait]
    impl Broker for Amqp {
        async fn publish(&self, ours: bool, round: usize, n: usize) {
            let side = if ours { "trigger" } else { "bare" };
            let queue = format!("{}.{side}", self.name);
            for i in 0..n {
                let id = format!("{side}-{round}-{i}");
                self.channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        BODY,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_message_id(id.as_str().into()),
                    )
                    .await
                    .unwrap();
            }
        }
    }

    pub(super) async fn sides(pg: Option<&PgPool>) -> Sides {
        let name = unique();
        // `AIWG_BROKER_PREFETCH`: both sides' prefetch (default: ours, 64).
        let prefetch = u16::try_from(env_usize("AIWG_BROKER_PREFETCH", 64)).unwrap_or(64);
        let (ours, running, engine) = start_ours(
            serde_json::json!({"amqp": {
            "url": URL, "queue": format!("{name}.trigger"), "prefetch": prefetch,
            "dead_letter_exchange": "", "dead_letter_routing_key": format!("{name}.dead")}}),
            pg,
        )
        .await;
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let reader = conn.create_channel().await.unwrap();
        let queue = format!("{name}.bare");
        reader
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        reader
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = reader
            .basic_consume(
                queue.as_str().into(),
                "bare".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let bare = Arc::new(Arrivals::default());
        let counter = bare.clone();
        tokio::spawn(async move {
            let _reader = reader;
            while let Some(Ok(d)) = consumer.next().await {
                d.ack(BasicAckOptions::default()).await.unwrap();
                counter.add(1);
            }
        });
        let channel = conn.create_channel().await.unwrap();
        let broker = Amqp {
            channel,
            name: name.clone(),
            _conn: conn,
        };
        (Box::new(broker), ours, bare, running, engine, name)
    }

    pub(super) async fn clean_up(name: &str) {
        let conn = Connection::connect(URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        for q in ["trigger", "bare", "dead"] {
            let _ = ch
                .queue_delete(
                    format!("{name}.{q}").as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch
            .exchange_delete(
                format!("{name}.events").as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

mod redis_side {
    use super::*;
    use redis::streams::{StreamReadOptions, StreamReadReply};
    use redis::AsyncCommands;

    const URL: &str = "redis://127.0.0.1:6379";

    pub(super) struct Redis {
        con: redis::aio::MultiplexedConnection,
        name: String,
    }

    #[async_trait::async_trait]
    impl Broker for Redis {
        async fn publish(&self, ours: bool, _round: usize, n: usize) {
            let side = if ours { "trigger" } else { "bare" };
            let stream = format!("{}:{side}", self.name);
            let mut con = self.con.clone();
            for start in (0..n).step_by(256) {
                let mut pipe = redis::pipe();
                for _ in start..n.min(start + 256) {
                    pipe.xadd(&stream, "*", &[("body", BODY)]).ignore();
                }
                let () = pipe.query_async(&mut con).await.unwrap();
            }
        }
    }

    pub(super) async fn sides(pg: Option<&PgPool>) -> Sides {
        let name = unique();
        let (ours, running, engine) = start_ours(
            serde_json::json!({"redis": {
            "url": URL, "stream": format!("{name}:trigger"), "group": "aiwg",
            "dead_letter_stream": format!("{name}:dead")}}),
            pg,
        )
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
        let stream = format!("{name}:bare");
        let () = reader
            .xgroup_create_mkstream(&stream, "bare", "$")
            .await
            .unwrap();
        let bare = Arc::new(Arrivals::default());
        let counter = bare.clone();
        tokio::spawn(async move {
            let opts = StreamReadOptions::default()
                .group("bare", "bench")
                .count(64)
                .block(1000);
            loop {
                let read: redis::RedisResult<Option<StreamReadReply>> =
                    reader.xread_options(&[&stream], &[">"], &opts).await;
                let Ok(reply) = read else { return };
                let ids: Vec<String> = reply
                    .map(|r| {
                        r.keys
                            .into_iter()
                            .flat_map(|k| k.ids)
                            .map(|e| e.id)
                            .collect()
                    })
                    .unwrap_or_default();
                if ids.is_empty() {
                    continue;
                }
                let _: i64 = reader.xack(&stream, "bare", &ids).await.unwrap();
                counter.add(ids.len());
            }
        });
        (
            Box::new(Redis {
                con,
                name: name.clone(),
            }),
            ours,
            bare,
            running,
            engine,
            name,
        )
    }

    pub(super) async fn clean_up(name: &str) {
        let client = redis::Client::open(URL).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = ["trigger", "bare", "dead"]
            .iter()
            .map(|k| format!("{name}:{k}"))
            .collect();
        let _: redis::RedisResult<()> = con.del(&keys).await;
    }
}

/// Times both sides of one broker, alternated; prints the figures and the ratio.
async fn measure(
    name: &str,
    broker: &dyn Broker,
    ours: &Arrivals,
    bare: &Arrivals,
    n: usize,
    rounds: usize,
) {
    let round = |mine: bool, r: usize| async move {
        let arrivals = if mine { ours } else { bare };
        let from = arrivals.count();
        let start = Instant::now();
        broker.publish(mine, r, n).await;
        arrivals.wait_for(from, n).await;
        n as f64 / start.elapsed().as_secs_f64()
    };
    // One round of each first, not counted: connections made, the streams and queues warm.
    round(true, 0).await;
    round(false, 0).await;
    let (mut o, mut b) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        if r % 2 == 0 {
            o.push(round(true, r).await);
            b.push(round(false, r).await);
        } else {
            b.push(round(false, r).await);
            o.push(round(true, r).await);
        }
    }
    let (o, b) = (median(o), median(b));
    println!(
        "{name}: aiwg {o:.0} triggers/s, bare consumer {b:.0} messages/s ({n} a round, {rounds} rounds each)"
    );
    println!("ratio broker_triggers_{name}_vs_bare {:.3}", o / b);
}

fn main() {
    let n = env_usize("AIWG_BROKER_TRIGGERS", 4_000).max(1);
    let rounds = env_usize("AIWG_BROKER_ROUNDS", 6).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // `AIWG_BROKER_STORE=postgres`: jobs and audit trail in a schema of their own.
        let db = if std::env::var("AIWG_BROKER_STORE").is_ok_and(|s| s == "postgres") {
            let db = aiwg_benches::pg::BenchSchema::create("broker_triggers")
                .await
                .expect("AIWG_BROKER_STORE=postgres: no database (AIWG_TEST_DATABASE_URL)");
            let pool = db.pool(8).await;
            Some((db, pool))
        } else {
            None
        };
        let pg = db.as_ref().map(|(_, pool)| pool);
        let store = if pg.is_some() { "_postgres" } else { "" };
        // `AIWG_BROKERS=nats,redis`: only those.
        let only = std::env::var("AIWG_BROKERS").ok();
        for (port, broker) in [(4222, "nats"), (5672, "amqp"), (6379, "redis")] {
            if only
                .as_ref()
                .is_some_and(|o| !o.split(',').any(|b| b == broker))
            {
                continue;
            }
            if !reachable(port) {
                println!(
                    "skipping {broker}: nothing on 127.0.0.1:{port} (scripts/ensure-brokers.sh)"
                );
                continue;
            }
            let (side, ours, bare, running, engine, name) = match broker {
                "nats" => nats_side::sides(pg).await,
                "amqp" => amqp_side::sides(pg).await,
                _ => redis_side::sides(pg).await,
            };
            measure(
                &format!("{broker}{store}"),
                side.as_ref(),
                &ours,
                &bare,
                n,
                rounds,
            )
            .await;
            running.shutdown().await;
            engine.shutdown(Duration::from_secs(1)).await;
            match broker {
                "nats" => nats_side::clean_up(&name).await,
                "amqp" => amqp_side::clean_up(&name).await,
                _ => redis_side::clean_up(&name).await,
            }
        }
        if let Some((db, pool)) = db {
            pool.close().await;
            db.drop_schema().await;
        }
    });
}
