//! RabbitMQ against the real server on 127.0.0.1:5672 (guest/guest). The shared broker is not
//! restarted: the interruption is aiwg's own connections going away and coming back (the
//! brokers stopped and started again) while messages keep arriving.
#![cfg(feature = "amqp")]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aiwg_core::audit::Decision;
use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn config(name: &str) -> Value {
    json!({"amqp": {"url": URL, "queue": format!("{name}.trigger"),
        "events_exchange": format!("{name}.events"),
        "dead_letter_routing_key": format!("{name}.dead"), "retry_delay": "200ms"}})
}

async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// A queue bound to every event of the exchange (declared before anything is published).
async fn events_queue(ch: &Channel, name: &str) -> String {
    let q = format!("{name}.test-events");
    ch.exchange_declare(
        format!("{name}.events").as_str().into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        format!("{name}.events").as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    q
}

async fn publish(ch: &Channel, name: &str, body: &str, id: Option<&str>) {
    let mut props = BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    let c = ch
        .basic_publish(
            "".into(),
            format!("{name}.trigger").as_str().into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
}

/// Deletes what a test named `name` declared (queues and the events exchange): the broker is
/// shared by every run. (`basic_get` is not a consumer, so the auto-delete events queue would
/// stay.)
async fn clean_up(ch: &Channel, name: &str) {
    for q in ["trigger", "dead", "test-events"] {
        let _ = ch
            .queue_delete(format!("{name}.{q}").as_str().into(), Default::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{name}.events").as_str().into(), Default::default())
        .await;
}

/// Takes every message waiting in `queue`.
async fn drain(ch: &Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(m);
    }
    out
}

fn completed_ids(msgs: &[lapin::message::BasicGetMessage]) -> BTreeSet<String> {
    msgs.iter()
        .filter(|m| m.delivery.routing_key.as_str() == "job.completed")
        .map(|m| {
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            assert_eq!(body["type"], "job.completed");
            body["data"]["job_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_trigger_runs_a_job_redelivery_starts_nothing_and_bad_messages_are_dead_lettered() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let events = events_queue(&ch, &name).await;
    let (engine, running) = start(config(&name)).await;
    publish(&ch, &name, r#"{"workflow": "check"}"#, Some("msg-1")).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("job.completed on the events exchange", || {
        let ch = ch.clone();
        let events = events.clone();
        let seen = seen.clone();
        async move {
            let got = drain(&ch, &events).await;
            let mut seen = seen.lock().unwrap();
            seen.extend(got);
            completed_ids(&seen).len() == 1
        }
    })
    .await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].trigger.source, "amqp");
    assert_eq!(
        completed_ids(&seen),
        BTreeSet::from([all[0].id.to_string()])
    );
    assert_eq!(seen[0].delivery.routing_key.as_str(), "job.queued");

    // The same message again (a publisher's retry, a redelivery): nothing new.
    publish(&ch, &name, r#"{"workflow": "check"}"#, Some("msg-1")).await;
    wait_until("the redelivered message", || async {
        decisions(&engine, "amqp", Decision::Duplicate).await == 1
    })
    .await;
    assert_eq!(jobs(&engine).await.len(), 1, "a redelivery started a job");

    // Malformed and refused: acknowledged, the problem document dead-lettered.
    publish(&ch, &name, "not json", Some("bad-1")).await;
    publish(&ch, &name, r#"{"workflow": "nope"}"#, Some("bad-2")).await;
    let dead = format!("{name}.dead");
    let letters = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("two dead letters", || {
        let ch = ch.clone();
        let dead = dead.clone();
        let letters = letters.clone();
        async move {
            let got = drain(&ch, &dead).await;
            let mut letters = letters.lock().unwrap();
            letters.extend(got);
            letters.len() == 2
        }
    })
    .await;
    let letters = std::mem::take(&mut *letters.lock().unwrap());
    // Each keeps the message's own body, the problem document in a header.
    let first = dead_letter_problem(&letters[0]);
    assert_eq!(first["status"], 400);
    assert_eq!(letters[0].delivery.data, b"not json");
    assert!(
        first["type"].as_str().unwrap().ends_with("invalid-body"),
        "{first}"
    );
    assert_eq!(
        letters[0]
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("bad-1")
    );
    let second = dead_letter_problem(&letters[1]);
    assert_eq!(second["status"], 404, "{second}");
    assert_eq!(letters[1].delivery.data, br#"{"workflow": "nope"}"#);
    assert_eq!(
        header(&letters[1], "aiwg-message-id").as_deref(),
        Some("bad-2")
    );
    assert_eq!(header(&letters[1], "aiwg-body-truncated"), None);
    assert_eq!(jobs(&engine).await.len(), 1);
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

#[tokio::test]
async fn a_burst_of_triggers_starts_a_job_each_and_dead_letters_the_bad_ones() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = unique();
    let (_conn, ch) = channel().await;
    let (engine, running) = start(config(&name)).await;
    // Published without waiting for each confirm: they reach the consumer together.
    let burst = trigger_burst();
    let mut confirms = Vec::new();
    for (id, body, _) in &burst {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into());
        confirms.push(
            ch.basic_publish(
                "".into(),
                format!("{name}.trigger").as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    let ids: Vec<String> = burst.iter().map(|(id, _, _)| id.clone()).collect();
    assert_each_trigger_once(&engine, "amqp", Some(&ids)).await;
    let bad = burst.iter().filter(|m| !m.2).count();
    let dead = format!("{name}.dead");
    let letters = std::sync::Mutex::new(0);
    wait_until("a dead letter a malformed message", || async {
        let got = drain(&ch, &dead).await.len();
        let mut n = letters.lock().unwrap();
        *n += got;
        *n == bad
    })
    .await;
    // Nothing left in the trigger queue, nothing unacknowledged (a passive declare counts both
    // ready messages; unacknowledged ones would come back once the consumer is gone).
    running.shutdown().await;
    let left = ch
        .queue_declare(
            format!("{name}.trigger").as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(left.message_count(), 0, "every message acknowledged");
    clean_up(&ch, &name).await;
}

/// Runs `rabbitmqctl` with `args` (the server's own tool, for users and permissions); false,
/// with a note, when it cannot be run (a panic under CI).
fn rabbitmqctl(args: &[&str]) -> bool {
    let ran = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let ok = ran.as_ref().is_ok_and(std::process::ExitStatus::success);
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("rabbitmqctl {args:?} failed: {ran:?}");
        }
        eprintln!("skipping: rabbitmqctl {args:?} could not be run ({ran:?})");
    }
    ok
}

#[tokio::test]
async fn events_the_server_refuses_for_good_are_dropped_without_holding_back_the_next() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = unique();
    // A user that may publish only job.queued and job.completed to the events exchange: the
    // server refuses every other event (ACCESS_REFUSED, which closes the channel it came on).
    let user = format!("aiwg-{name}");
    if !rabbitmqctl(&["add_user", &user, "pw"]) {
        return;
    }
    let exchange = format!("{name}.events");
    assert!(rabbitmqctl(&[
        "set_permissions",
        "-p",
        "/",
        &user,
        ".*",
        ".*",
        ".*"
    ]));
    assert!(rabbitmqctl(&[
        "set_topic_permissions",
        "-p",
        "/",
        &user,
        &exchange,
        "^job\\.(queued|completed)$",
        ".*",
    ]));
    let (_conn, ch) = channel().await;
    let queue = events_queue(&ch, &name).await;
    let mut cfg = config(&name);
    cfg["amqp"]["url"] = json!(format!("amqp://{user}:pw@127.0.0.1:5672/%2f"));
    let (engine, running) = start(cfg).await;
    // Submitted together: their events wait together, so batches hold refused events between
    // allowed ones.
    let submitted = futures_util::future::join_all(
        (0..20).map(|_| engine.submission(aiwg_core::JobRequest::new("check"))),
    )
    .await;
    let ids: Vec<String> = submitted
        .into_iter()
        .map(|s| s.unwrap().job.id.to_string())
        .collect();
    let events = std::sync::Mutex::new(Vec::new());
    wait_until("every job.completed in the events queue", || async {
        let got = drain(&ch, &queue).await;
        let mut all = events.lock().unwrap();
        for m in got {
            let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
            let job = body["data"]["job_id"].as_str().unwrap().to_owned();
            all.push((job, m.delivery.routing_key.as_str().to_owned()));
        }
        all.iter().filter(|(_, k)| k == "job.completed").count() == ids.len()
    })
    .await;
    // Each job's queued and completed, in order, once: the refused events between them were
    // dropped, and held back nothing.
    let all = events.lock().unwrap().clone();
    for id in &ids {
        let kinds: Vec<&str> = all
            .iter()
            .filter(|(j, _)| j == id)
            .map(|(_, k)| k.as_str())
            .collect();
        assert_eq!(kinds, ["job.queued", "job.completed"], "job {id}");
    }
    assert_eq!(all.len(), 2 * ids.len());
    running.shutdown().await;
    clean_up(&ch, &name).await;
    rabbitmqctl(&["delete_user", &user]);
}

#[tokio::test]
async fn a_burst_of_events_arrives_whole_each_jobs_in_order() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = unique();
    let (_conn, ch) = channel().await;
    let queue = events_queue(&ch, &name).await;
    let (engine, running) = start(config(&name)).await;
    let ids = burst(&engine).await;
    // (job id, event type) as the queue delivered them.
    let events = std::sync::Mutex::new(Vec::new());
    let take = || async {
        let taken: Vec<(String, String)> = drain(&ch, &queue)
            .await
            .into_iter()
            .map(|m| {
                let body: Value = serde_json::from_slice(&m.delivery.data).unwrap();
                let kind = m.delivery.routing_key.as_str().to_owned();
                assert_eq!(body["type"], kind.as_str());
                (body["data"]["job_id"].as_str().unwrap().to_owned(), kind)
            })
            .collect();
        let mut all = events.lock().unwrap();
        all.extend(taken);
        all.iter().filter(|(_, k)| k == "job.completed").count()
    };
    wait_until("every job.completed in the events queue", || async {
        take().await == BURST
    })
    .await;
    // Anything after the last job.completed would be an event of no job or a copy.
    take().await;
    assert_every_event_once_in_order(&events.lock().unwrap(), &ids);
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

#[tokio::test]
async fn messages_published_while_aiwg_is_disconnected_are_consumed_once_after() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let (engine, running) = start(config(&name)).await;
    for i in 0..5 {
        publish(
            &ch,
            &name,
            r#"{"workflow": "check"}"#,
            Some(&format!("m{i}")),
        )
        .await;
    }
    wait_until("the first five jobs", || async {
        jobs(&engine).await.len() == 5
    })
    .await;
    // aiwg's connections go away; messages keep arriving (and the first five come again).
    running.shutdown().await;
    for i in 0..10 {
        publish(
            &ch,
            &name,
            r#"{"workflow": "check"}"#,
            Some(&format!("m{i}")),
        )
        .await;
    }
    // Reconnected on the same engine: every message id exactly once.
    let brokers =
        aiwg_brokers::Brokers::new(aiwg_brokers::BrokersConfig::from_value(config(&name)).unwrap())
            .unwrap();
    let running = brokers.start(engine.clone()).await.unwrap();
    wait_until("ten jobs and five duplicates", || async {
        jobs(&engine).await.len() == 10
            && decisions(&engine, "amqp", Decision::Duplicate).await == 5
    })
    .await;
    assert_eq!(decisions(&engine, "amqp", Decision::Accepted).await, 10);
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

#[tokio::test]
async fn messages_without_message_id_each_run_across_a_consumer_restart() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let (engine, running) = start(config(&name)).await;
    publish(
        &ch,
        &name,
        r#"{"workflow": "check", "guidance": "a"}"#,
        None,
    )
    .await;
    wait_until("the first job", || async { jobs(&engine).await.len() == 1 }).await;
    // The consumer's channel goes away and comes back: its delivery tags count from 1 again.
    running.shutdown().await;
    let again = || {
        aiwg_brokers::Brokers::new(aiwg_brokers::BrokersConfig::from_value(config(&name)).unwrap())
            .unwrap()
            .start(engine.clone())
    };
    let running = again().await.unwrap();
    // Another message (it had the first one's key, `tag:1`: refused as a conflict).
    publish(
        &ch,
        &name,
        r#"{"workflow": "check", "guidance": "b"}"#,
        None,
    )
    .await;
    wait_until("the second job", || async {
        jobs(&engine).await.len() == 2
    })
    .await;
    running.shutdown().await;
    let running = again().await.unwrap();
    // The same body again, a new message (it was taken for the first one, silently).
    publish(
        &ch,
        &name,
        r#"{"workflow": "check", "guidance": "a"}"#,
        None,
    )
    .await;
    wait_until("the third job", || async { jobs(&engine).await.len() == 3 }).await;
    assert_eq!(decisions(&engine, "amqp", Decision::Accepted).await, 3);
    assert_eq!(decisions(&engine, "amqp", Decision::Refused).await, 0);
    assert_eq!(decisions(&engine, "amqp", Decision::Duplicate).await, 0);
    for j in jobs(&engine).await {
        assert_eq!(j.trigger.delivery_id, None, "{:?}", j.trigger);
        assert_eq!(j.idempotency_key, None);
    }
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

#[tokio::test]
async fn a_dead_letter_exchange_must_exist_and_refused_messages_go_to_it() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let exchange = format!("{name}.dlx");
    let mut cfg = config(&name);
    cfg["amqp"]["dead_letter_exchange"] = json!(exchange);
    // Missing: the start fails naming the key (the first refusal would have closed the
    // channel, and the message come back first, forever).
    let brokers =
        aiwg_brokers::Brokers::new(aiwg_brokers::BrokersConfig::from_value(cfg.clone()).unwrap())
            .unwrap();
    let engine = aiwg_core::Engine::builder()
        .executor(
            "x",
            Arc::new(aiwg_core::test_util::ScriptedExecutor::succeeding("ok")),
        )
        .workflow(
            aiwg_core::Workflow::new("check").step(aiwg_core::Step::prompt("run", "x", "check")),
        )
        .build()
        .unwrap();
    let err = brokers.start(engine).await.unwrap_err();
    assert!(
        matches!(err, aiwg_brokers::BrokerError::Setup { broker: "amqp", .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("brokers.amqp.dead_letter_exchange"),
        "{err}"
    );
    // Declared (and a queue bound to it): refused messages are published there.
    ch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let dead = format!("{name}.dead");
    ch.queue_declare(
        dead.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        dead.as_str().into(),
        exchange.as_str().into(),
        dead.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (engine, running) = start(cfg).await;
    publish(&ch, &name, "not json", Some("bad-x")).await;
    let letters = Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("the dead letter on the exchange's queue", || {
        let (ch, dead, letters) = (ch.clone(), dead.clone(), letters.clone());
        async move {
            let got = drain(&ch, &dead).await;
            let mut letters = letters.lock().unwrap();
            letters.extend(got);
            letters.len() == 1
        }
    })
    .await;
    assert_eq!(decisions(&engine, "amqp", Decision::Refused).await, 1);
    running.shutdown().await;
    clean_up(&ch, &name).await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn a_full_queue_requeues_the_message_until_its_job_is_stored() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let (engine, running) = start_tight(config(&name)).await;
    for i in 0..3 {
        publish(
            &ch,
            &name,
            r#"{"workflow": "check"}"#,
            Some(&format!("q{i}")),
        )
        .await;
    }
    full_queue_redelivers(&engine, "amqp").await;
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

/// A loopback proxy to RabbitMQ whose `stall`th connection (counting from 0) is accepted and then
/// never answered; the others are passed through. Answers its address and how many connections
/// it took.
async fn stalling_proxy(stall: usize) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut client, _)) = listener.accept().await {
            if count.fetch_add(1, Ordering::SeqCst) == stall {
                held.push(client);
                continue;
            }
            tokio::spawn(async move {
                let mut server = tokio::net::TcpStream::connect("127.0.0.1:5672")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            });
        }
    });
    (format!("amqp://guest:guest@{addr}/%2f"), taken)
}

#[tokio::test]
async fn a_server_that_stops_answering_is_given_up_and_connected_to_again() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    // The start's check goes through (connection 0); the consumer's first connection is
    // accepted and never answered (connection 1): it is given up and made again.
    let (url, taken) = stalling_proxy(1).await;
    let mut cfg = config(&name);
    cfg["amqp"]["url"] = json!(url);
    cfg["amqp"]
        .as_object_mut()
        .unwrap()
        .remove("events_exchange");
    let (engine, running) = start(cfg).await;
    publish(&ch, &name, r#"{"workflow": "check"}"#, Some("s-1")).await;
    wait_until(
        "the job of the message, once the consumer connected again",
        || async { jobs(&engine).await.len() == 1 },
    )
    .await;
    assert!(
        taken.load(Ordering::SeqCst) >= 3,
        "the consumer did not connect again after the stalled connection"
    );
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn an_unreachable_broker_fails_the_start_and_stops_the_others() {
    if !reachable("nats", 4222) {
        return;
    }
    let name = unique();
    let port = free_port();
    let config = json!({
        "nats": {"url": "nats://127.0.0.1:4222", "stream": format!("AIWG_{name}"),
            "trigger_subject": format!("{name}.trigger"), "events_subject": format!("{name}.events"),
            "dead_letter_subject": format!("{name}.dead")},
        "amqp": {"url": format!("amqp://guest:guest@127.0.0.1:{port}/%2f"), "queue": "q"},
    });
    let brokers =
        aiwg_brokers::Brokers::new(aiwg_brokers::BrokersConfig::from_value(config).unwrap())
            .unwrap();
    let engine = aiwg_core::Engine::builder()
        .executor(
            "x",
            std::sync::Arc::new(aiwg_core::test_util::ScriptedExecutor::succeeding("ok")),
        )
        .workflow(
            aiwg_core::Workflow::new("check").step(aiwg_core::Step::prompt("run", "x", "check")),
        )
        .build()
        .unwrap();
    let err = brokers.start(engine.clone()).await.unwrap_err();
    assert!(
        matches!(err, aiwg_brokers::BrokerError::Setup { broker: "amqp", .. }),
        "{err:?}"
    );
    // The NATS consumer started first is stopped: a trigger published now starts nothing.
    let js =
        async_nats::jetstream::new(async_nats::connect("nats://127.0.0.1:4222").await.unwrap());
    js.publish(format!("{name}.trigger"), r#"{"workflow": "check"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut stream = js.get_stream(format!("AIWG_{name}")).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("aiwg").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_pending, 1, "nobody consumes the trigger");
    assert!(jobs(&engine).await.is_empty());
    let _ = stream.info().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

#[tokio::test]
async fn a_message_larger_than_max_message_bytes_is_dead_lettered_unparsed() {
    if !reachable("rabbitmq", 5672) {
        return;
    }
    let name = format!("aiwg-test.{}", unique());
    let (_conn, ch) = channel().await;
    let mut cfg = config(&name);
    cfg["amqp"]["max_message_bytes"] = json!(100_000);
    let (engine, running) = start(cfg).await;
    let big = json!({"workflow": "check", "guidance": "g".repeat(200_000 - 34)}).to_string();
    assert_eq!(big.len(), 200_000);
    publish(&ch, &name, &big, Some("big-1")).await;
    publish(&ch, &name, r#"{"workflow": "check"}"#, Some("small-1")).await;
    let dead = format!("{name}.dead");
    let letters = Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("the dead letter", || {
        let (ch, dead, letters) = (ch.clone(), dead.clone(), letters.clone());
        async move {
            let got = drain(&ch, &dead).await;
            let mut letters = letters.lock().unwrap();
            letters.extend(got);
            letters.len() == 1
        }
    })
    .await;
    wait_until("the small trigger's job", || async {
        jobs(&engine).await.len() == 1
    })
    .await;
    let letter = letters.lock().unwrap().remove(0);
    let problem = dead_letter_problem(&letter);
    assert_eq!(problem["status"], 413, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("200000") && detail.contains("100000"),
        "{detail}"
    );
    // The first 64 KiB of the body, marked as cut.
    assert_eq!(letter.delivery.data, &big.as_bytes()[..64 * 1024]);
    assert_eq!(
        header(&letter, "aiwg-body-truncated").as_deref(),
        Some("true")
    );
    assert_eq!(decisions(&engine, "amqp", Decision::Refused).await, 1);
    running.shutdown().await;
    clean_up(&ch, &name).await;
}

/// The header `name` of a dead letter, as text.
fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        lapin::types::AMQPValue::Boolean(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// The problem document of a dead letter (its header `aiwg-problem`).
fn dead_letter_problem(m: &lapin::message::BasicGetMessage) -> Value {
    let doc = header(m, "aiwg-problem")
        .unwrap_or_else(|| panic!("a dead letter without aiwg-problem: {m:?}"));
    serde_json::from_str(&doc).unwrap()
}
