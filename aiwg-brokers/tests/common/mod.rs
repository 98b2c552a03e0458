//! Helpers shared by the broker tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use aiwg_brokers::{Brokers, BrokersConfig, RunningBrokers};
use aiwg_core::audit::{AuditQuery, Decision};
use aiwg_core::store::JobQuery;
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, Job, Step, Workflow};

pub const LIMIT: Duration = Duration::from_secs(60);

/// Whether a broker listens on 127.0.0.1:`port`. Missing: false with a note, or a panic under CI.
pub fn reachable(name: &str, port: u16) -> bool {
    let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{name} is not running on 127.0.0.1:{port}; run scripts/ensure-brokers.sh");
        }
        eprintln!(
            "skipping: {name} is not running on 127.0.0.1:{port} (scripts/ensure-brokers.sh)"
        );
    }
    ok
}

/// A name no other test run uses.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t{}x{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An engine with a workflow `check` (one step that succeeds), observed by the brokers, and the
/// brokers started on it.
pub async fn start(config: serde_json::Value) -> (Engine, RunningBrokers) {
    start_on(config, 2, None).await
}

/// Like [`start`], with a second workflow `big` whose one step answers `big` bytes.
pub async fn start_with_big(config: serde_json::Value, big: usize) -> (Engine, RunningBrokers) {
    start_on(config, 1, Some(big)).await
}

async fn start_on(
    config: serde_json::Value,
    workers: usize,
    big: Option<usize>,
) -> (Engine, RunningBrokers) {
    let brokers = Brokers::new(BrokersConfig::from_value(config).unwrap()).unwrap();
    let mut builder = Engine::builder()
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")));
    if let Some(big) = big {
        builder = builder
            .executor(
                "big",
                Arc::new(ScriptedExecutor::succeeding("y".repeat(big))),
            )
            .workflow(Workflow::new("big").step(Step::prompt("run", "big", "big")));
    }
    let engine = builder
        .observer(brokers.observer())
        .workers(workers)
        .build()
        .unwrap();
    let running = brokers.start(engine.clone()).await.unwrap();
    (engine, running)
}

pub async fn jobs(engine: &Engine) -> Vec<Job> {
    let mut q = JobQuery::default();
    q.limit = Some(500);
    engine.list(&q).await.unwrap().jobs
}

/// How many trigger attempts from `source` ended with `decision`.
pub async fn decisions(engine: &Engine, source: &str, decision: Decision) -> usize {
    let mut q = AuditQuery::default();
    q.source = Some(source.to_owned());
    q.decision = Some(decision);
    q.limit = Some(500);
    engine.audit().store().list(&q).await.unwrap().entries.len()
}

/// Polls `cond` until it holds; panics naming `what` after [`LIMIT`].
pub async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    tokio::time::timeout(LIMIT, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Like [`start`], with one worker, room for one queued job and an agent that never finishes:
/// the third trigger finds the queue full.
pub async fn start_tight(config: serde_json::Value) -> (Engine, RunningBrokers) {
    let brokers = Brokers::new(BrokersConfig::from_value(config).unwrap()).unwrap();
    let engine = Engine::builder()
        .executor("x", Arc::new(ScriptedExecutor::hanging()))
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
        .observer(brokers.observer())
        .workers(1)
        .queue_capacity(1)
        .build()
        .unwrap();
    let running = brokers.start(engine.clone()).await.unwrap();
    (engine, running)
}

/// After three triggers were published to a [`start_tight`] engine: a full queue refuses one
/// for now, the broker brings it again, and once jobs are cancelled (room in the queue) all three
/// are stored, each exactly once.
pub async fn full_queue_redelivers(engine: &Engine, source: &str) {
    wait_until("a trigger refused for now", || async {
        decisions(engine, source, Decision::Refused).await >= 1
    })
    .await;
    assert!(jobs(engine).await.len() < 3);
    wait_until("all three jobs stored", || async {
        for j in jobs(engine).await {
            let _ = engine.cancel(j.id).await;
        }
        jobs(engine).await.len() == 3
    })
    .await;
    for j in jobs(engine).await {
        let _ = engine.cancel(j.id).await;
    }
    assert_eq!(decisions(engine, source, Decision::Accepted).await, 3);
    assert_eq!(jobs(engine).await.len(), 3);
}

/// How many jobs [`burst`] runs at once: enough that their events wait for the broker together.
pub const BURST: usize = 300;

/// Submits [`BURST`] jobs of `check` at once and waits for every one to finish; their ids.
pub async fn burst(engine: &Engine) -> Vec<String> {
    let submitted = futures_util::future::join_all(
        (0..BURST).map(|_| engine.submission(aiwg_core::JobRequest::new("check"))),
    )
    .await;
    let ids: Vec<_> = submitted.into_iter().map(|s| s.unwrap().job.id).collect();
    for id in &ids {
        let job = engine.wait(*id, LIMIT).await.unwrap();
        assert!(job.is_terminal(), "job {id} did not finish");
    }
    ids.iter().map(ToString::to_string).collect()
}

/// Waits until `events` (what the broker holds, as for [`assert_every_event_once_in_order`])
/// has a `job.completed` of each job of `ids`, then asserts it holds every event once, in order.
pub async fn every_event_once_in_order<F, Fut>(events: F, ids: &[String])
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, String)>>,
{
    wait_until("a job.completed of every job on the broker", || async {
        let completed = events().await;
        completed
            .iter()
            .filter(|(_, k)| k == "job.completed")
            .count()
            == ids.len()
    })
    .await;
    assert_every_event_once_in_order(&events().await, ids);
}

/// Asserts that the broker holds every event of the jobs `ids` once, each job's in its order
/// (the same as the first job's: `job.queued` … `job.completed`). `events`: (job id, event
/// type) in the order the broker stored them.
pub fn assert_every_event_once_in_order(events: &[(String, String)], ids: &[String]) {
    let mut by_job: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for (job, kind) in events {
        by_job.entry(job).or_default().push(kind);
    }
    let first = by_job.get(ids[0].as_str()).expect("the first job's events");
    assert_eq!(first.first(), Some(&"job.queued"), "{first:?}");
    assert_eq!(first.last(), Some(&"job.completed"), "{first:?}");
    for id in ids {
        assert_eq!(
            by_job.get(id.as_str()),
            Some(first),
            "the events of job {id}"
        );
    }
    assert_eq!(events.len(), ids.len() * first.len(), "no other event");
}

/// How many trigger messages [`trigger_burst`] makes.
pub const TRIGGERS: usize = 160;

/// A burst of trigger messages, published together so that the consumer takes them together:
/// (message id, body, whether it is a valid trigger); one in eight is malformed.
pub fn trigger_burst() -> Vec<(String, String, bool)> {
    (0..TRIGGERS)
        .map(|i| {
            let good = i % 8 != 5;
            let body = if good {
                r#"{"workflow": "check"}"#.to_owned()
            } else {
                format!("not json {i}")
            };
            (format!("m{i}"), body, good)
        })
        .collect()
}

/// After a [`trigger_burst`] from `source`: waits until every message was decided, then asserts
/// that each valid one started one job of its own (its delivery id among `ids`, when the broker
/// carries the message's id) and each malformed one was refused.
pub async fn assert_each_trigger_once(engine: &Engine, source: &str, ids: Option<&[String]>) {
    let good = trigger_burst().iter().filter(|(_, _, g)| *g).count();
    let bad = TRIGGERS - good;
    wait_until("every message of the burst decided", || async {
        decisions(engine, source, Decision::Accepted).await == good
            && decisions(engine, source, Decision::Refused).await == bad
    })
    .await;
    let all = jobs(engine).await;
    assert_eq!(all.len(), good, "one job a valid message");
    let delivered: std::collections::BTreeSet<String> = all
        .iter()
        .map(|j| j.trigger.delivery_id.clone().expect("a delivery id"))
        .collect();
    assert_eq!(delivered.len(), good, "each job a message of its own");
    if let Some(ids) = ids {
        let valid: std::collections::BTreeSet<String> = trigger_burst()
            .into_iter()
            .filter(|(_, _, g)| *g)
            .map(|(id, _, _)| id)
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(delivered, valid);
    }
    assert_eq!(decisions(engine, source, Decision::Duplicate).await, 0);
}
