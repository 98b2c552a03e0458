//! NATS JetStream against the real server on 127.0.0.1:4222 (and a private `nats-server` that
//! is restarted mid-stream).
#![cfg(feature = "nats")]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use aiwg_core::audit::Decision;
use async_nats::jetstream::{self, consumer::pull};
use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn config(url: &str, name: &str) -> Value {
    json!({"nats": {"url": url, "stream": format!("AIWG_{name}"), "consumer": "aiwg",
        "trigger_subject": format!("{name}.trigger"), "events_subject": format!("{name}.events"),
        "dead_letter_subject": format!("{name}.dead"), "retry_delay": "200ms"}})
}

/// Every message stored on `subject` of the stream (read by an ephemeral consumer).
async fn stored(js: &jetstream::Context, name: &str, subject: &str) -> Vec<async_nats::Message> {
    let stream = js.get_stream(format!("AIWG_{name}")).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let pending = consumer.cached_info().num_pending as usize;
    if pending == 0 {
        return Vec::new();
    }
    let mut batch = consumer
        .fetch()
        .max_messages(pending)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.unwrap().message);
        if out.len() == pending {
            break;
        }
    }
    out
}

async fn completed(js: &jetstream::Context, name: &str) -> BTreeSet<String> {
    stored(js, name, &format!("{name}.events"))
        .await
        .into_iter()
        .filter_map(|m| {
            let body: Value = serde_json::from_slice(&m.payload).unwrap();
            let t = m
                .headers
                .as_ref()?
                .get("Aiwg-Event-Type")?
                .as_str()
                .to_owned();
            assert_eq!(body["type"], t.as_str());
            (t == "job.completed").then(|| body["data"]["job_id"].as_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_trigger_runs_a_job_redelivery_starts_nothing_and_bad_messages_are_dead_lettered() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let (engine, running) = start(config(url, &name)).await;
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client);
    js.publish(format!("{name}.trigger"), r#"{"workflow": "check"}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until("job.completed on the events subject", || async {
        completed(&js, &name).await.len() == 1
    })
    .await;
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].trigger.source, "nats");
    assert_eq!(all[0].trigger.delivery_id.as_deref(), Some("seq:1"));
    assert_eq!(
        completed(&js, &name).await,
        BTreeSet::from([all[0].id.to_string()])
    );

    // Redelivery: the durable consumer is deleted, aiwg makes it again and gets every
    // message of the stream once more.
    js.get_stream(format!("AIWG_{name}"))
        .await
        .unwrap()
        .delete_consumer("aiwg")
        .await
        .unwrap();
    wait_until("the redelivered message", || async {
        decisions(&engine, "nats", Decision::Duplicate).await >= 1
    })
    .await;
    assert_eq!(jobs(&engine).await.len(), 1, "a redelivery started a job");

    // Malformed and refused messages: acknowledged, answered with the problem document.
    for body in ["not json", r#"{"workflow": "nope"}"#] {
        js.publish(format!("{name}.trigger"), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = format!("{name}.dead");
    wait_until("two dead letters", || async {
        stored(&js, &name, &dead).await.len() == 2
    })
    .await;
    let letters = stored(&js, &name, &dead).await;
    // Each keeps the message's own body, the problem document in a header.
    let first = dead_letter_problem(&letters[0]);
    assert_eq!(first["status"], 400);
    assert!(
        first["type"].as_str().unwrap().ends_with("invalid-body"),
        "{first}"
    );
    assert_eq!(&letters[0].payload[..], b"not json");
    let second = dead_letter_problem(&letters[1]);
    assert_eq!(second["status"], 404, "{second}");
    assert_eq!(&letters[1].payload[..], br#"{"workflow": "nope"}"#);
    let header = |m: &async_nats::Message, h: &str| {
        m.headers
            .as_ref()
            .and_then(|hs| hs.get(h))
            .map(|v| v.as_str().to_owned())
    };
    assert_eq!(
        header(&letters[1], "Aiwg-Subject").as_deref(),
        Some(format!("{name}.trigger").as_str())
    );
    assert!(header(&letters[1], "Aiwg-Message-Id").is_some());
    assert_eq!(header(&letters[1], "Aiwg-Body-Truncated"), None);
    all_acknowledged(&js, &name).await;
    assert_eq!(jobs(&engine).await.len(), 1);
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

/// Waits until aiwg's consumer of the test's stream has every message acknowledged.
async fn all_acknowledged(js: &jetstream::Context, name: &str) {
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(format!("AIWG_{name}"))
        .await
        .unwrap()
        .get_consumer("aiwg")
        .await
        .unwrap();
    wait_until("every message acknowledged", || {
        let mut c = consumer.clone();
        async move {
            let info = c.info().await.unwrap();
            info.num_ack_pending == 0 && info.num_pending == 0
        }
    })
    .await;
}

/// The `nats-server` program; `None` (with a note, or a panic under CI) when not installed.
fn nats_server() -> Option<&'static str> {
    let bin = [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file());
    if bin.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("nats-server is not installed");
        }
        eprintln!("skipping: nats-server is not installed");
    }
    bin
}

#[tokio::test]
async fn a_nats_restart_mid_stream_loses_nothing() {
    let Some(bin) = nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spawn = || {
        Child(
            std::process::Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = spawn();
    wait_until("the private nats-server", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let name = unique();
    let (engine, running) = start(config(&url, &name)).await;
    let publish = |n: usize, from: usize| {
        let url = url.clone();
        let subject = format!("{name}.trigger");
        async move {
            let js = jetstream::new(async_nats::connect(url).await.unwrap());
            for i in from..from + n {
                let body = json!({"workflow": "check", "guidance": format!("n{i}")}).to_string();
                js.publish(subject.clone(), body.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    publish(5, 0).await;
    wait_until("the first five jobs", || async {
        jobs(&engine).await.len() == 5
    })
    .await;
    drop(server);
    server = spawn();
    wait_until("the restarted nats-server", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    // JetStream may need a moment after the port opens; the publisher retries.
    wait_until("the stream back", || {
        let url = url.clone();
        let name = name.clone();
        async move {
            let Ok(c) = async_nats::connect(url).await else {
                return false;
            };
            jetstream::new(c)
                .get_stream(format!("AIWG_{name}"))
                .await
                .is_ok()
        }
    })
    .await;
    publish(5, 5).await;
    let js = jetstream::new(async_nats::connect(url.clone()).await.unwrap());
    wait_until("ten completed jobs on the events subject", || async {
        completed(&js, &name).await.len() == 10
    })
    .await;
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 10, "every message exactly once");
    assert_eq!(decisions(&engine, "nats", Decision::Accepted).await, 10);
    let ids: BTreeSet<String> = all.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(completed(&js, &name).await, ids);
    running.shutdown().await;
    drop(server);
}

#[tokio::test]
async fn a_full_queue_naks_the_message_until_its_job_is_stored() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let (engine, running) = start_tight(config(url, &name)).await;
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    for _ in 0..3 {
        js.publish(format!("{name}.trigger"), r#"{"workflow": "check"}"#.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    full_queue_redelivers(&engine, "nats").await;
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

/// The `data` of the events of `job_id` on the events subject, by event type.
async fn events_of(js: &jetstream::Context, name: &str, job_id: &str) -> Vec<(String, Value)> {
    stored(js, name, &format!("{name}.events"))
        .await
        .into_iter()
        .filter_map(|m| {
            let body: Value = serde_json::from_slice(&m.payload).unwrap();
            (body["data"]["job_id"] == job_id).then(|| {
                (
                    body["type"].as_str().unwrap().to_owned(),
                    body["data"].clone(),
                )
            })
        })
        .collect()
}

#[tokio::test]
async fn a_burst_of_triggers_starts_a_job_each_and_dead_letters_the_bad_ones() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let (engine, running) = start(config(url, &name)).await;
    let client = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(client.clone());
    // Sent without waiting for each ack: they reach the consumer together.
    let burst = trigger_burst();
    for (id, body, _) in &burst {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        client
            .publish_with_headers(format!("{name}.trigger"), headers, body.clone().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let ids: Vec<String> = burst.iter().map(|(id, _, _)| id.clone()).collect();
    assert_each_trigger_once(&engine, "nats", Some(&ids)).await;
    let dead = format!("{name}.dead");
    wait_until("a dead letter a malformed message", || async {
        stored(&js, &name, &dead).await.len() == burst.iter().filter(|m| !m.2).count()
    })
    .await;
    all_acknowledged(&js, &name).await;
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

#[tokio::test]
async fn a_burst_of_events_arrives_whole_each_jobs_in_order() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let (engine, running) = start(config(url, &name)).await;
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let ids = burst(&engine).await;
    let subject = format!("{name}.events");
    let events = || async {
        stored(&js, &name, &subject)
            .await
            .into_iter()
            .map(|m| {
                let body: Value = serde_json::from_slice(&m.payload).unwrap();
                let kind = m.headers.as_ref().unwrap().get("Aiwg-Event-Type").unwrap();
                assert_eq!(body["type"], kind.as_str());
                let job = body["data"]["job_id"].as_str().unwrap().to_owned();
                (job, kind.as_str().to_owned())
            })
            .collect::<Vec<_>>()
    };
    every_event_once_in_order(events, &ids).await;
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

#[tokio::test]
async fn events_larger_than_the_server_takes_are_cut_or_dropped_and_never_hold_back_the_next() {
    let Some(bin) = nats_server() else {
        return;
    };
    // A private server taking at most 16 KiB per message.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{port}\"\nmax_payload: 16384\njetstream {{ store_dir: {:?} }}\n",
            dir.path().join("js")
        ),
    )
    .unwrap();
    let _server = Child(
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the private nats-server", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let url = format!("nats://127.0.0.1:{port}");
    let name = unique();
    // `big` answers 60 KB: its job.completed (the answer twice) is far above 16 KiB.
    let (engine, running) = start_with_big(config(&url, &name), 60_000).await;
    let js = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
    let trigger = |body: &'static str, id: String| {
        let js = js.clone();
        let subject = format!("{name}.trigger");
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            js.publish_with_headers(subject, headers, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    // 1. A job whose job.completed is too large: cut to fit.
    trigger(r#"{"workflow": "big"}"#, "big-1".into()).await;
    // 2. A job whose every event is too large even cut: its message id (16 150 bytes: the
    //    trigger fits in 16 KiB, not an event with its other fields) is in every event's
    //    `trigger`, which is never cut. Refused by the client's check; dropped.
    trigger(r#"{"workflow": "check"}"#, "i".repeat(16_150)).await;
    // 3. A plain job after both: its events arrive.
    trigger(r#"{"workflow": "check"}"#, "plain-3".into()).await;
    wait_until("three jobs", || async { jobs(&engine).await.len() == 3 }).await;
    let mut all = jobs(&engine).await;
    all.sort_by_key(|j| j.created_at);
    let ids: Vec<String> = all.iter().map(|j| j.id.to_string()).collect();
    wait_until("the last job's job.completed", || async {
        events_of(&js, &name, &ids[2])
            .await
            .iter()
            .any(|(t, _)| t == "job.completed")
    })
    .await;
    let big = events_of(&js, &name, &ids[0]).await;
    let (_, data) = big
        .iter()
        .find(|(t, _)| t == "job.completed")
        .expect("the big job's job.completed, cut");
    assert_eq!(data["truncated"], true, "{data}");
    assert_eq!(data["status"], "completed");
    assert!(
        events_of(&js, &name, &ids[1]).await.is_empty(),
        "events larger than max_payload were published"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_message_larger_than_max_message_bytes_is_dead_lettered_unparsed() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let mut cfg = config(url, &name);
    cfg["nats"]["max_message_bytes"] = json!(100_000);
    let (engine, running) = start(cfg).await;
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    let big = json!({"workflow": "check", "guidance": "g".repeat(200_000 - 34)}).to_string();
    assert_eq!(big.len(), 200_000);
    for body in [big.clone(), r#"{"workflow": "check"}"#.to_owned()] {
        js.publish(format!("{name}.trigger"), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dead = format!("{name}.dead");
    wait_until("the dead letter", || async {
        stored(&js, &name, &dead).await.len() == 1
    })
    .await;
    wait_until("the small trigger's job", || async {
        jobs(&engine).await.len() == 1
    })
    .await;
    let letter = stored(&js, &name, &dead).await.remove(0);
    let problem = dead_letter_problem(&letter);
    assert_eq!(problem["status"], 413, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("200000") && detail.contains("100000"),
        "{detail}"
    );
    // The first 64 KiB of the body, marked as cut.
    assert_eq!(&letter.payload[..], &big.as_bytes()[..64 * 1024]);
    assert_eq!(
        letter
            .headers
            .as_ref()
            .and_then(|h| h.get("Aiwg-Body-Truncated"))
            .map(|v| v.as_str()),
        Some("true")
    );
    assert_eq!(decisions(&engine, "nats", Decision::Refused).await, 1);
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}

/// The problem document of a dead letter (its header `Aiwg-Problem`).
fn dead_letter_problem(m: &async_nats::Message) -> Value {
    let doc = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Aiwg-Problem"))
        .unwrap_or_else(|| panic!("a dead letter without Aiwg-Problem: {m:?}"));
    serde_json::from_str(doc.as_str()).unwrap()
}

#[tokio::test]
async fn an_existing_stream_and_consumer_are_brought_to_the_configuration_without_replaying() {
    if !reachable("nats", 4222) {
        return;
    }
    let url = "nats://127.0.0.1:4222";
    let name = unique();
    let js = jetstream::new(async_nats::connect(url).await.unwrap());
    // A stream made by someone else: the trigger subject only, no limits, one old trigger.
    js.create_stream(jetstream::stream::Config {
        name: format!("AIWG_{name}"),
        subjects: vec![format!("{name}.trigger")],
        ..Default::default()
    })
    .await
    .unwrap();
    let trigger = |guidance: &'static str| {
        let js = js.clone();
        let subject = format!("{name}.trigger");
        async move {
            let body = json!({"workflow": "check", "guidance": guidance}).to_string();
            js.publish(subject, body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    trigger("old").await;
    let (engine, running) = start(config(url, &name)).await;
    // Bounded and given every subject.
    let info = js
        .get_stream(format!("AIWG_{name}"))
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert_eq!(info.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(info.max_bytes, 1 << 30);
    assert!(
        info.subjects.contains(&format!("{name}.events"))
            && info.subjects.contains(&format!("{name}.dead")),
        "{:?}",
        info.subjects
    );
    // The new durable consumer starts at new messages: the old trigger is not replayed.
    trigger("new").await;
    wait_until("the new trigger's job", || async {
        jobs(&engine).await.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 1, "the stream's history was replayed");
    assert_eq!(all[0].guidance.as_deref(), Some("new"));
    running.shutdown().await;

    // Configured otherwise: the stream and the consumer follow.
    let mut cfg = config(url, &name);
    cfg["nats"]["max_age"] = json!("1h");
    cfg["nats"]["max_bytes"] = json!(10_000_000);
    cfg["nats"]["ack_wait"] = json!("45s");
    let (engine, running) = start(cfg).await;
    let stream = js.get_stream(format!("AIWG_{name}")).await.unwrap();
    assert_eq!(
        stream.cached_info().config.max_age,
        Duration::from_secs(3600)
    );
    assert_eq!(stream.cached_info().config.max_bytes, 10_000_000);
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer("aiwg").await.unwrap();
    assert_eq!(
        consumer.cached_info().config.ack_wait,
        Duration::from_secs(45)
    );
    trigger("again").await;
    wait_until("a job after the update", || async {
        jobs(&engine).await.len() == 1
    })
    .await;
    running.shutdown().await;
    let _ = js.delete_stream(format!("AIWG_{name}")).await;
}
