//! Redis Streams against the real Redis on 127.0.0.1:6379 (and a private `redis-server` that
//! is restarted mid-stream).
#![cfg(feature = "redis")]

mod common;

use std::collections::BTreeSet;

use aiwg_core::audit::Decision;
use common::*;
use redis::streams::StreamRangeReply;
use redis::AsyncCommands;
use serde_json::{json, Value};

async fn con(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every entry of `stream` as (field → text) maps.
async fn entries(url: &str, stream: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut c = con(url).await;
    let r: StreamRangeReply = c.xrange_all(stream).await.unwrap();
    r.ids
        .into_iter()
        .map(|id| {
            id.map
                .keys()
                .map(|k| (k.clone(), id.get::<String>(k).unwrap_or_default()))
                .collect()
        })
        .collect()
}

fn config(url: &str, name: &str) -> Value {
    json!({"redis": {"url": url, "stream": format!("{name}:trigger"), "group": "aiwg",
        "events_stream": format!("{name}:events"), "dead_letter_stream": format!("{name}:dead"),
        "retry_delay": "200ms"}})
}

/// The job ids whose `job.completed` event is in the events stream.
async fn completed(url: &str, name: &str) -> BTreeSet<String> {
    entries(url, &format!("{name}:events"))
        .await
        .into_iter()
        .filter(|e| e.get("type").map(String::as_str) == Some("job.completed"))
        .map(|e| {
            let body: Value = serde_json::from_str(&e["body"]).unwrap();
            assert_eq!(body["type"], "job.completed");
            body["data"]["job_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_trigger_runs_a_job_redelivery_starts_nothing_and_bad_entries_are_dead_lettered() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let (engine, running) = start(config(url, &name)).await;
    let mut c = con(url).await;
    let trigger = format!("{name}:trigger");
    let id: String = c
        .xadd(
            &trigger,
            "*",
            &[("body", r#"{"workflow": "check", "guidance": "hi"}"#)],
        )
        .await
        .unwrap();
    // The job runs and its events arrive on the events stream.
    wait_until("job.completed on the events stream", || async {
        completed(url, &name).await.len() == 1
    })
    .await;
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].trigger.source, "redis");
    assert_eq!(all[0].trigger.delivery_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        completed(url, &name).await,
        BTreeSet::from([all[0].id.to_string()])
    );
    let types: Vec<String> = entries(url, &format!("{name}:events"))
        .await
        .into_iter()
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(
        types.first().map(String::as_str),
        Some("job.queued"),
        "{types:?}"
    );

    // Redelivery: the group reads the stream from the start again.
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(&trigger)
        .arg("aiwg")
        .arg("0")
        .query_async(&mut c)
        .await
        .unwrap();
    wait_until("the redelivered entry", || async {
        decisions(&engine, "redis", Decision::Duplicate).await == 1
    })
    .await;
    assert_eq!(jobs(&engine).await.len(), 1, "a redelivery started a job");

    // Malformed and refused entries: acknowledged, answered with the API's problem document.
    let _: String = c
        .xadd(&trigger, "*", &[("body", "not json")])
        .await
        .unwrap();
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "nope"}"#)])
        .await
        .unwrap();
    let dead = format!("{name}:dead");
    wait_until("two dead letters", || async {
        entries(url, &dead).await.len() == 2
    })
    .await;
    let letters = entries(url, &dead).await;
    let first: Value = serde_json::from_str(&letters[0]["problem"]).unwrap();
    assert_eq!(first["status"], 400);
    assert!(
        first["type"].as_str().unwrap().ends_with("invalid-body"),
        "{first}"
    );
    assert_eq!(letters[0]["body"], "not json");
    let second: Value = serde_json::from_str(&letters[1]["problem"]).unwrap();
    assert_eq!(second["status"], 404, "{second}");
    // Nothing is left pending (they are not retried forever), no job started.
    let (pending, ..): (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&trigger)
        .arg("aiwg")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending, 0);
    assert_eq!(jobs(&engine).await.len(), 1);
    assert_eq!(decisions(&engine, "redis", Decision::Refused).await, 2);
    running.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_triggers_starts_a_job_each_and_dead_letters_the_bad_ones() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = unique();
    let (engine, running) = start(config(url, &name)).await;
    let trigger = format!("{name}:trigger");
    let mut c = con(url).await;
    // One pipeline: the consumer reads them 16 at a time.
    let burst = trigger_burst();
    let mut pipe = redis::pipe();
    for (_, body, _) in &burst {
        pipe.xadd(&trigger, "*", &[("body", body.as_str())])
            .ignore();
    }
    let () = pipe.query_async(&mut c).await.unwrap();
    assert_each_trigger_once(&engine, "redis", None).await;
    let bad = burst.iter().filter(|m| !m.2).count();
    wait_until("a dead letter a malformed message", || async {
        entries(url, &format!("{name}:dead")).await.len() == bad
    })
    .await;
    let (pending, ..): (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(&trigger)
        .arg("aiwg")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pending, 0, "every entry acknowledged");
    running.shutdown().await;
    let _: () = c
        .del(&[trigger, format!("{name}:events"), format!("{name}:dead")])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_burst_of_events_arrives_whole_each_jobs_in_order() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = unique();
    let (engine, running) = start(config(url, &name)).await;
    let ids = burst(&engine).await;
    let stream = format!("{name}:events");
    let events = || async {
        entries(url, &stream)
            .await
            .into_iter()
            .map(|e| {
                let body: Value = serde_json::from_str(&e["body"]).unwrap();
                assert_eq!(body["type"], e["type"].as_str());
                assert_eq!(body["data"]["job_id"], e["job_id"].as_str());
                (e["job_id"].clone(), e["type"].clone())
            })
            .collect::<Vec<_>>()
    };
    every_event_once_in_order(events, &ids).await;
    running.shutdown().await;
    let mut c = con(url).await;
    let _: () = c
        .del(&[stream, format!("{name}:trigger"), format!("{name}:dead")])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_redis_restart_mid_stream_loses_nothing() {
    let Ok(bin) = which("redis-server") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is not installed");
        }
        eprintln!("skipping: redis-server is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spawn = || {
        Child(
            std::process::Command::new(&bin)
                .args([
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                ])
                .arg(dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let url = format!("redis://127.0.0.1:{port}");
    let mut server = spawn();
    wait_until("the private redis", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let name = unique();
    let (engine, running) = start(config(&url, &name)).await;
    let trigger = format!("{name}:trigger");
    let publish = |n: usize| {
        let url = url.clone();
        let trigger = trigger.clone();
        async move {
            let mut c = con(&url).await;
            for i in 0..n {
                let body = json!({"workflow": "check", "guidance": format!("n{i}")}).to_string();
                let _: String = c.xadd(&trigger, "*", &[("body", body)]).await.unwrap();
            }
        }
    };
    publish(5).await;
    wait_until("the first five jobs", || async {
        jobs(&engine).await.len() == 5
    })
    .await;
    // Restart the broker while aiwg is connected (the AOF keeps the streams).
    drop(server);
    server = spawn();
    wait_until("the restarted redis", || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    publish(5).await;
    wait_until("ten completed jobs on the events stream", || async {
        completed(&url, &name).await.len() == 10
    })
    .await;
    let all = jobs(&engine).await;
    assert_eq!(all.len(), 10, "every entry exactly once");
    assert_eq!(decisions(&engine, "redis", Decision::Accepted).await, 10);
    let ids: BTreeSet<String> = all.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(completed(&url, &name).await, ids);
    running.shutdown().await;
    drop(server);
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .or_else(|| {
            Some(std::path::PathBuf::from(format!("/usr/bin/{name}"))).filter(|p| p.is_file())
        })
        .ok_or(())
}

#[tokio::test]
async fn a_full_queue_leaves_the_entry_pending_until_its_job_is_stored() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let (engine, running) = start_tight(config(url, &name)).await;
    let mut c = con(url).await;
    for _ in 0..3 {
        let _: String = c
            .xadd(
                format!("{name}:trigger"),
                "*",
                &[("body", r#"{"workflow": "check"}"#)],
            )
            .await
            .unwrap();
    }
    full_queue_redelivers(&engine, "redis").await;
    running.shutdown().await;
}

/// A private `redis-server` on a free port (nothing else talks to it: its statistics are
/// ours), in `dir`, once it answers; `None` (with a note, or a panic under CI) when not installed.
async fn private_redis(dir: &std::path::Path) -> Option<(Child, String)> {
    let Ok(bin) = which("redis-server") else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is not installed");
        }
        eprintln!("skipping: redis-server is not installed");
        return None;
    };
    let port = free_port();
    let child = Child(
        std::process::Command::new(&bin)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("redis://127.0.0.1:{port}");
    wait_until("the private redis", || async {
        redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .is_ok()
    })
    .await;
    Some((child, url))
}

/// A number in the server's `INFO` on `c`: `field:N`, or the first `k=N` of `field:k=N,…`
/// (`errorstat_WRONGTYPE:count=3`, `cmdstat_xreadgroup:calls=5,…`); 0 when absent.
async fn info_number(c: &mut redis::aio::MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| {
            let v = v.split(',').next()?;
            v.split_once('=').map_or(v, |(_, n)| n).trim().parse().ok()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn an_event_the_server_refuses_for_good_is_dropped_not_retried_before_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = private_redis(dir.path()).await else {
        return;
    };
    let name = unique();
    let events = format!("{name}:events");
    let mut c = con(&url).await;
    // The events key is not a stream: every XADD answers WRONGTYPE.
    let _: () = c.set(&events, "not a stream").await.unwrap();
    let (engine, running) = start(config(&url, &name)).await;
    let trigger = format!("{name}:trigger");
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    wait_until("the first job's four events refused", || {
        let mut c = c.clone();
        async move { info_number(&mut c, "errorstats", "errorstat_WRONGTYPE").await >= 4 }
    })
    .await;
    let first = jobs(&engine).await[0].id.to_string();
    // The key made right: the next job's events arrive, and nothing of the first one's.
    let _: () = c.del(&events).await.unwrap();
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    wait_until("a job.completed", || async {
        !completed(&url, &name).await.is_empty()
    })
    .await;
    let all = entries(&url, &events).await;
    assert!(
        all.iter().all(|e| !e["body"].contains(&first)),
        "a refused event was retried until the key changed: {:?}",
        all.iter().map(|e| &e["type"]).collect::<Vec<_>>()
    );
    assert_eq!(all.first().map(|e| e["type"].as_str()), Some("job.queued"));
    running.shutdown().await;
}

#[tokio::test]
async fn an_idle_consumer_keeps_its_connections() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, url)) = private_redis(dir.path()).await else {
        return;
    };
    // One connection of the test's own for every question.
    let c = con(&url).await;
    let number = |section: &'static str, field: &'static str| {
        let mut c = c.clone();
        async move { info_number(&mut c, section, field).await }
    };
    let name = unique();
    let (_engine, running) = start(config(&url, &name)).await;
    wait_until("the consumer reading", || async {
        number("commandstats", "cmdstat_xreadgroup").await >= 1
    })
    .await;
    let connections = number("stats", "total_connections_received").await;
    let reads = number("commandstats", "cmdstat_xreadgroup").await;
    // Idle: three more reads, each blocking for its full second at the server.
    wait_until("three idle reads", || async {
        number("commandstats", "cmdstat_xreadgroup").await >= reads + 3
    })
    .await;
    assert_eq!(
        number("stats", "total_connections_received").await,
        connections,
        "the idle consumer connected again"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_dead_letter_the_server_refuses_is_tried_again_after_a_growing_pause() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let mut c = con(url).await;
    // The dead-letter stream is a plain string: every XADD to it answers WRONGTYPE.
    let dead = format!("{name}:dead");
    let _: () = c.set(&dead, "not a stream").await.unwrap();
    let (engine, running) = start(config(url, &name)).await;
    let _: String = c
        .xadd(format!("{name}:trigger"), "*", &[("body", "not json")])
        .await
        .unwrap();
    wait_until("the first refusal", || async {
        decisions(&engine, "redis", Decision::Refused).await >= 1
    })
    .await;
    let first = std::time::Instant::now();
    // The entry stays pending and comes again, after 200 ms, 400 ms, 800 ms …, not at once.
    wait_until("the fourth refusal", || async {
        decisions(&engine, "redis", Decision::Refused).await >= 4
    })
    .await;
    let took = first.elapsed();
    assert!(
        took >= std::time::Duration::from_secs(1),
        "four refusals of one entry in {took:?}"
    );
    // Once the stream can be written, the entry is dead-lettered and acknowledged.
    let _: () = c.del(&dead).await.unwrap();
    wait_until("the dead letter", || async {
        entries(url, &dead).await.len() == 1
    })
    .await;
    assert!(jobs(&engine).await.is_empty());
    running.shutdown().await;
    let _: () = c.del(&[&dead, &format!("{name}:trigger")]).await.unwrap();
}

#[tokio::test]
async fn events_of_jobs_finishing_after_consuming_stopped_are_published_at_shutdown() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let brokers = aiwg_brokers::Brokers::new(
        aiwg_brokers::BrokersConfig::from_value(config(url, &name)).unwrap(),
    )
    .unwrap();
    // A job that takes a moment: it is still running when the server begins to stop.
    let agent = aiwg_core::test_util::ScriptedExecutor::succeeding("ok")
        .delay(std::time::Duration::from_millis(500));
    let engine = aiwg_core::Engine::builder()
        .executor("x", std::sync::Arc::new(agent))
        .workflow(
            aiwg_core::Workflow::new("check").step(aiwg_core::Step::prompt("run", "x", "check")),
        )
        .observer(brokers.observer())
        .build()
        .unwrap();
    let mut running = brokers.start(engine.clone()).await.unwrap();
    let mut c = con(url).await;
    let trigger = format!("{name}:trigger");
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    wait_until("the job running", || async {
        jobs(&engine).await.first().map(|j| j.status) == Some(aiwg_core::JobStatus::Running)
    })
    .await;
    // The server stops: no trigger taken any more …
    running.stop_consuming().await;
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    // … the running job finishes within the engine's grace …
    engine.shutdown(std::time::Duration::from_secs(30)).await;
    let job = jobs(&engine).await.remove(0);
    assert_eq!(job.status, aiwg_core::JobStatus::Completed);
    // … and its last events are published before the brokers end.
    running
        .shutdown_within(std::time::Duration::from_secs(30))
        .await;
    assert_eq!(
        completed(url, &name).await,
        BTreeSet::from([job.id.to_string()]),
        "job.completed of a job that finished during the shutdown was lost"
    );
    assert_eq!(
        jobs(&engine).await.len(),
        1,
        "a trigger was taken after stop_consuming"
    );
    let _: () = c.del(&[&trigger, &format!("{name}:events")]).await.unwrap();
}

#[tokio::test]
async fn publishing_what_is_left_at_shutdown_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let Some((server, url)) = private_redis(dir.path()).await else {
        return;
    };
    let name = unique();
    let (engine, running) = start(config(&url, &name)).await;
    // The broker goes away; a job's events wait for it.
    drop(server);
    let job = engine
        .submission(aiwg_core::JobRequest::new("check"))
        .await
        .unwrap()
        .job;
    wait_until("the job done", || async {
        engine.get(job.id).await.unwrap().status == aiwg_core::JobStatus::Completed
    })
    .await;
    let started = std::time::Instant::now();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        running.shutdown_within(std::time::Duration::from_millis(500)),
    )
    .await
    .expect("the shutdown waited for a broker that is gone");
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
}

#[tokio::test]
async fn an_entry_larger_than_max_message_bytes_is_dead_lettered_unparsed_with_a_prefix() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let mut cfg = config(url, &name);
    cfg["redis"]["max_message_bytes"] = json!(100_000);
    let (engine, running) = start(cfg).await;
    let mut c = con(url).await;
    let trigger = format!("{name}:trigger");
    // A valid trigger, 200 000 bytes long.
    let big = json!({"workflow": "check", "guidance": "g".repeat(200_000 - 34)}).to_string();
    assert_eq!(big.len(), 200_000);
    let _: String = c.xadd(&trigger, "*", &[("body", &big)]).await.unwrap();
    // One within the limit after it still runs.
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    let dead = format!("{name}:dead");
    wait_until("the dead letter", || async {
        entries(url, &dead).await.len() == 1
    })
    .await;
    wait_until("the small trigger's job", || async {
        jobs(&engine).await.len() == 1
    })
    .await;
    let letter = entries(url, &dead).await.remove(0);
    let problem: Value = serde_json::from_str(&letter["problem"]).unwrap();
    assert_eq!(problem["status"], 413, "{problem}");
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("payload-too-large"),
        "{problem}"
    );
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("200000") && detail.contains("100000"),
        "{detail}"
    );
    // A bounded prefix of the body, marked as cut.
    assert_eq!(letter["body"].len(), 64 * 1024);
    assert!(big.starts_with(&letter["body"]));
    assert_eq!(letter["body_truncated"], "true");
    assert_eq!(decisions(&engine, "redis", Decision::Refused).await, 1);
    running.shutdown().await;
    let _: () = c
        .del(&[&dead, &trigger, &format!("{name}:events")])
        .await
        .unwrap();
}

/// The counters of this test binary (a global recorder, installed once).
fn global_metrics() -> &'static aiwg_core::test_util::MetricsCapture {
    static CAPTURE: std::sync::OnceLock<&'static aiwg_core::test_util::MetricsCapture> =
        std::sync::OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static _ = Box::leak(Box::default());
        metrics::set_global_recorder(capture).expect("no other recorder in this binary");
        capture
    })
}

#[tokio::test]
async fn a_refused_xautoclaim_is_counted_and_backed_off_while_reading_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_server, admin_url)) = private_redis(dir.path()).await else {
        return;
    };
    let counters = global_metrics();
    let mut admin = con(&admin_url).await;
    // A user that may do everything but XAUTOCLAIM.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("aiwg")
        .arg("on")
        .arg(">s3cret-pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-xautoclaim")
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = admin_url.replace("redis://", "redis://aiwg:s3cret-pw@");
    let name = unique();
    let mut cfg = config(&url, &name);
    // Claims every 50 ms when they succeed.
    cfg["redis"]["claim_idle"] = json!("100ms");
    let (engine, running) = start(cfg).await;
    let _: String = admin
        .xadd(
            format!("{name}:trigger"),
            "*",
            &[("body", r#"{"workflow": "check"}"#)],
        )
        .await
        .unwrap();
    // Reading goes on without claims.
    wait_until("the job", || async { jobs(&engine).await.len() == 1 }).await;
    let key = "aiwg_broker_errors_total{broker=redis,operation=xautoclaim}";
    wait_until("the refused XAUTOCLAIM counted", || async {
        counters.get(key) >= 1
    })
    .await;
    let refused = info_number(&mut admin, "errorstats", "errorstat_NOPERM").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let more = info_number(&mut admin, "errorstats", "errorstat_NOPERM").await - refused;
    // Backed off (200 ms, 400 ms, 800 ms, 1.6 s …), not every 50 ms (60 in 3 s).
    assert!(more <= 6, "{more} refused XAUTOCLAIMs in 3 s");
    assert!(
        counters.get(key) >= refused,
        "{} < {refused}",
        counters.get(key)
    );
    running.shutdown().await;
}

#[tokio::test]
async fn a_consumer_group_lost_while_consuming_is_made_again_without_skipping_entries() {
    if !reachable("redis", 6379) {
        return;
    }
    let url = "redis://127.0.0.1:6379";
    let name = format!("aiwg-test:{}", unique());
    let (engine, running) = start(config(url, &name)).await;
    let mut c = con(url).await;
    let trigger = format!("{name}:trigger");
    let _: String = c
        .xadd(&trigger, "*", &[("body", r#"{"workflow": "check"}"#)])
        .await
        .unwrap();
    wait_until("the first job", || async { jobs(&engine).await.len() == 1 }).await;
    // The group is destroyed and an entry added while it is gone (at once: no chance for the
    // consumer to make it again in between).
    let (_, added): (i64, String) = redis::pipe()
        .atomic()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(&trigger)
        .arg("aiwg")
        .cmd("XADD")
        .arg(&trigger)
        .arg("*")
        .arg("body")
        .arg(r#"{"workflow": "check", "guidance": "while the group was gone"}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    wait_until(
        "the job of the entry added while the group was gone",
        || async { jobs(&engine).await.len() == 2 },
    )
    .await;
    let all = jobs(&engine).await;
    assert!(
        all.iter()
            .any(|j| j.trigger.delivery_id.as_deref() == Some(added.as_str())),
        "{all:?}"
    );
    // The first entry came again and found its job.
    wait_until("the first entry seen again", || async {
        decisions(&engine, "redis", Decision::Duplicate).await == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(jobs(&engine).await.len(), 2, "an entry ran twice");
    assert_eq!(decisions(&engine, "redis", Decision::Accepted).await, 2);
    running.shutdown().await;
    let _: () = c.del(&[&trigger, &format!("{name}:events")]).await.unwrap();
}
