//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{
    Engine, Job, JobEvent, JobObserver, Parameter, ProjectPolicy, Step, TriggerInfo, Workflow,
};
use aiwg_webhook::{HookReply, Hooks, MemoryDeliveryStore, TriggersConfig};
use hmac::{Hmac, Mac};
use http::HeaderMap;

/// The fixed "now" of the tests (Unix seconds).
pub const NOW: i64 = 1_700_000_000;

pub fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

pub fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    h
}

/// Platform hooks from a `triggers:` YAML at [`NOW`]. Each call of [`TestHooks::handle`]
/// submits to the engine it is given; the delivery store is shared by every call.
pub fn hooks(yaml: &str) -> TestHooks {
    hooks_at(yaml, NOW)
}

/// Like [`hooks`] with another clock.
pub fn hooks_at(yaml: &str, now: i64) -> TestHooks {
    TestHooks {
        config: serde_norway::from_str(yaml).expect("config"),
        now,
        store: Arc::new(MemoryDeliveryStore::new()),
    }
}

/// The same configuration and clock with an empty delivery store.
pub fn hooks_clone_fresh(h: &TestHooks) -> TestHooks {
    TestHooks {
        store: Arc::new(MemoryDeliveryStore::new()),
        ..h.clone()
    }
}

/// A `triggers:` configuration, a clock and a delivery store.
#[derive(Clone)]
pub struct TestHooks {
    pub config: TriggersConfig,
    pub now: i64,
    pub store: Arc<MemoryDeliveryStore>,
}

impl TestHooks {
    /// The real [`Hooks`] over `engine`, sharing this delivery store.
    pub fn build(&self, engine: &TestEngine) -> Hooks {
        let now = self.now;
        Hooks::builder(self.config.clone(), engine.engine.clone())
            .clock(move || now)
            .delivery_store(self.store.clone())
            .build()
            .expect("builds")
    }

    /// Verification and parsing only, through the real [`Hooks`].
    pub fn verify_and_parse(
        &self,
        platform: aiwg_webhook::Platform,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<aiwg_webhook::InboundEvent, aiwg_webhook::HookOutcome> {
        self.build(&engine())
            .verify_and_parse(platform, headers, body)
    }

    /// One delivery through the real [`Hooks`], submitting to `engine`.
    pub async fn handle(
        &self,
        platform: &str,
        headers: &HeaderMap,
        body: &[u8],
        engine: &TestEngine,
    ) -> HookReply {
        self.build(engine).handle(platform, headers, body).await
    }
}

/// What a submitted job asked for, as the tests check it.
#[derive(Clone, Debug)]
pub struct Req {
    pub workflow: String,
    pub params: BTreeMap<String, String>,
    pub guidance: Option<String>,
    pub trigger: TriggerInfo,
    /// The project the mapping resolved, relative to the test root (`octo/app`).
    pub project: Option<String>,
    pub idempotency_key: Option<String>,
    pub reply_credentials: aiwg_core::ReplyCredentials,
}

/// The jobs an engine accepted, in order.
pub type Seen = Arc<Mutex<Vec<Req>>>;

/// Holds each submission inside `Engine::submit` until released (for concurrency tests).
pub struct Gate {
    pub calls: AtomicUsize,
    pub entered: tokio::sync::Notify,
    pub release: tokio::sync::Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        }
    }
}

struct JobCapture {
    seen: Seen,
    count: Arc<AtomicUsize>,
    root: std::path::PathBuf,
    gate: Option<Arc<Gate>>,
}

#[async_trait::async_trait]
impl JobObserver for JobCapture {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        if event.seq != 1 {
            return;
        }
        let project = std::path::Path::new(&*job.project_path)
            .strip_prefix(&self.root)
            .ok()
            .map(|p| p.display().to_string());
        self.count.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().expect("lock").push(Req {
            workflow: job.workflow.to_string(),
            params: std::collections::BTreeMap::clone(&job.params),
            guidance: job.guidance.clone(),
            trigger: aiwg_core::TriggerInfo::clone(&job.trigger),
            project,
            idempotency_key: job.idempotency_key.clone(),
            reply_credentials: job.reply_credentials.clone(),
        });
        if let Some(gate) = &self.gate {
            gate.calls.fetch_add(1, Ordering::SeqCst);
            gate.entered.notify_one();
            let _permit = gate.release.acquire().await.expect("gate");
        }
    }
}

/// A real engine with the workflows `review`, `fix` and `deploy`, every repository mapped to
/// a directory of a temporary root, and a capture of what it accepted. When it expects a
/// number of jobs, it checks it when dropped.
pub struct TestEngine {
    pub engine: Engine,
    pub seen: Seen,
    count: Arc<AtomicUsize>,
    expect: Option<usize>,
    _root: tempfile::TempDir,
}

impl Drop for TestEngine {
    fn drop(&mut self) {
        if let Some(n) = self.expect {
            if !std::thread::panicking() {
                assert_eq!(self.count.load(Ordering::SeqCst), n, "jobs submitted");
            }
        }
    }
}

fn engine_with(expect: Option<usize>, gate: Option<Arc<Gate>>) -> TestEngine {
    let root = tempfile::tempdir().expect("root");
    for repo in [
        "octo/app",
        "group/sub/app",
        "other/repo",
        "org/repo",
        "team/repo",
        "workspace/repo",
    ] {
        std::fs::create_dir_all(root.path().join(repo)).expect("repo dir");
    }
    let canonical = root.path().canonicalize().expect("canonical root");
    let seen: Seen = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let p = |name: &str| Parameter::new(name).with_default("");
    let engine = Engine::builder()
        .executor("agent", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(
            Workflow::new("review")
                .describe("Review a pull request")
                .param(Parameter::new("depth").with_default("1"))
                .param(p("focus"))
                .param(p("level"))
                .param(p("n"))
                .param(p("s"))
                .step(Step::prompt("review", "agent", "{{guidance}}")),
        )
        .workflow(
            Workflow::new("fix")
                .describe("Fix an issue")
                .param(p("x"))
                .param(p("level"))
                .step(Step::prompt("fix", "agent", "{{guidance}}")),
        )
        .workflow(
            Workflow::new("deploy")
                .describe("Deploy")
                .step(Step::prompt("deploy", "agent", "{{guidance}}")),
        )
        .policy(
            ProjectPolicy::builder()
                .root(&canonical)
                .map("^(.+)$", "$1")
                .build()
                .expect("policy"),
        )
        .observer(Arc::new(JobCapture {
            seen: Arc::clone(&seen),
            count: Arc::clone(&count),
            root: canonical,
            gate,
        }))
        .build()
        .expect("engine");
    TestEngine {
        engine,
        seen,
        count,
        expect,
        _root: root,
    }
}

/// An engine that must accept no job.
pub fn never() -> TestEngine {
    engine_with(Some(0), None)
}

/// An engine expecting exactly `times` jobs; captures them.
pub fn capturing(times: usize) -> (TestEngine, Seen) {
    let e = engine_with(Some(times), None);
    let seen = Arc::clone(&e.seen);
    (e, seen)
}

/// An engine that accepts anything (no count checked).
pub fn engine() -> TestEngine {
    engine_with(None, None)
}

/// An engine whose submissions wait at `gate` until released.
pub fn gated(gate: Arc<Gate>) -> TestEngine {
    engine_with(None, Some(gate))
}

/// An engine that refuses everything as transient (it is shutting down: 503).
pub async fn busy() -> TestEngine {
    let e = engine_with(Some(0), None);
    e.engine.shutdown(std::time::Duration::ZERO).await;
    e
}

/// The workflows of [`engine`], as `help` lists them.
pub fn workflows() -> Vec<(String, String)> {
    vec![
        ("deploy".into(), "Deploy".into()),
        ("fix".into(), "Fix an issue".into()),
        ("review".into(), "Review a pull request".into()),
    ]
}
