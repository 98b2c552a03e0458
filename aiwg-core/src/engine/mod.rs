//! The [`Engine`]: validates requests, stores jobs, schedules them onto a worker pool, runs their
//! steps on executors, records every event, and publishes it to subscribers and observers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::Stream;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::event::JobEvent;
use crate::executor::ExecutorRegistry;
use crate::fast_hash::{FastMap, FastSet};
use crate::job::{Job, JobId, JobStatus, Progress};
use crate::policy::{PolicyError, ProjectPolicy};
use crate::request::JobRequest;
use crate::store::{
    ApprovalOutcome, CancelOutcome, ClusterListener, Created, JobPage, JobQuery, JobStore,
    MemoryStore, NewJob, QueueCounts, StoreError,
};
use crate::workflow::{ParamError, WorkflowCatalog, WorkflowError};

mod admitted;
mod announce;
mod feed;
mod gather;
mod projects;
mod scheduler;
mod subscribe;
mod triggers;
mod worker;

pub use feed::{
    BadCursor, FeedCursor, FeedItem, ResetReason, DEFAULT_FEED_BYTES, DEFAULT_FEED_EVENTS,
};

/// The longest idempotency key the engine accepts (the HTTP API takes 255 characters from a
/// client and prefixes them with the API key's name).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;

/// The longest guidance accepted (64 KiB).
pub const MAX_GUIDANCE_BYTES: usize = 64 * 1024;

/// What [`Engine::submission`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Submission {
    /// The job.
    pub job: Job,
    /// `true` when this call created it; `false` when its idempotency key found it.
    pub created: bool,
}

/// Why a job was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// No workflow by that name.
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    /// Parameters do not fit the workflow.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The project path was refused.
    #[error(transparent)]
    Project(#[from] PolicyError),
    /// Something else about the request is wrong.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The idempotency key was used with a different request.
    #[error("idempotency key already used for job {existing} with a different request")]
    IdempotencyConflict {
        /// The job that key created.
        existing: JobId,
    },
    /// The queue is full; try again later.
    #[error("the queue is full ({capacity} jobs)")]
    QueueFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl SubmitError {
    /// Whether asking again later may succeed (a full queue, a shutdown, a store failure), as
    /// opposed to a refusal of the request itself. Platform hooks answer transient refusals
    /// with 503 so the platform redelivers, and remember nothing about them.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::QueueFull { .. } | Self::ShuttingDown | Self::Store(_)
        )
    }
}

/// Why an engine call other than submit failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No job with that id.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The job had already finished.
    #[error("job {id} already finished with status {status}")]
    AlreadyFinished {
        /// The job.
        id: JobId,
        /// Its final status.
        status: JobStatus,
    },
    /// Waiting for the job took longer than allowed.
    #[error("timed out waiting for job {0}")]
    WaitTimeout(JobId),
    /// An approval or a rejection for a job that is not `awaiting_approval` (never paused,
    /// already decided, or finished).
    #[error("job {id} is not awaiting approval (status {status})")]
    NotAwaitingApproval {
        /// The job.
        id: JobId,
        /// Its status now.
        status: JobStatus,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why an engine could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A workflow is invalid or names an unknown agent.
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    /// A setting is out of range.
    #[error("invalid engine setting `{key}`: {reason}")]
    Setting {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `build` was called outside a tokio runtime.
    #[error("Engine::build must be called inside a tokio runtime")]
    NoRuntime,
}

/// Something that wants to hear about a job's changes after they are stored (the outbound
/// webhook dispatcher is one): every change of its status, and every step that finished well,
/// with the job as that step's end left it. (Steps' starts and agents' output are not passed to
/// observers; subscribers get every event, see [`Engine::subscribe`].) Called in order per job;
/// a slow observer slows that job's worker.
#[async_trait]
pub trait JobObserver: Send + Sync + 'static {
    /// Called with the job as it was right after the event.
    async fn on_event(&self, job: &Job, event: &JobEvent);
}

/// Retry backoff: `base * 2^(attempt-1)`, capped at `max`, with ±20 % jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before attempt `attempt + 1` after attempt `attempt` failed.
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let factor = 0.8 + rand::random::<f64>() * 0.4;
        raw.mul_f64(factor)
    }
}

/// Engine settings (see [`EngineBuilder`] for defaults).
#[derive(Clone, Debug)]
struct Settings {
    workers: usize,
    queue_capacity: usize,
    per_project_concurrency: Option<usize>,
    default_timeout: Duration,
    default_max_attempts: u32,
    lease_ttl: Duration,
    poll_interval: Duration,
    backoff: Backoff,
    instance: String,
    max_output_bytes: usize,
    max_line_bytes: usize,
    feed_events: usize,
    feed_bytes: usize,
    approval_timeout: Duration,
    run_schedules: bool,
}

/// How long a job waits for an approval by default: 24 hours.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The default output budget of a job: 16 MiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// The default longest line (text, log line, tool result) kept of agent output: 64 KiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// Queue figures for the status endpoint.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
pub struct QueueStats {
    /// Jobs waiting (store-wide).
    pub queued: usize,
    /// Jobs running (store-wide).
    pub running: usize,
    /// Workers of this instance.
    pub workers: usize,
    /// Workers of this instance running a job now.
    pub busy: usize,
}

/// Why a running job's token was cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    /// A cancel, with the message the job's error carries.
    User(&'static str),
    Shutdown,
    LeaseLost,
}

struct RunningJob {
    token: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
    done: CancellationToken,
}

pub(crate) struct Inner {
    store: Arc<dyn JobStore>,
    workspaces: Option<Arc<crate::workspace::Workspaces>>,
    audit: crate::audit::AuditLog,
    catalog: WorkflowCatalog,
    registry: ExecutorRegistry,
    policy: ProjectPolicy,
    settings: Settings,
    /// Every job's events, for [`Engine::subscribe_all`] (written to only while it has
    /// receivers).
    bus: broadcast::Sender<JobEvent>,
    /// Each followed job's own live channel ([`Engine::subscribe`]).
    channels: subscribe::JobChannels,
    /// Every event in order, resumable ([`Engine::feed`]).
    feed: feed::Feed,
    wake: Notify,
    /// Jobs a worker claimed for other idle workers (see `worker::run`); each is counted in
    /// `busy` from its claim.
    handoff: Mutex<std::collections::VecDeque<worker::Handed>>,
    /// Held by the one worker claiming at a time, with how long the claims take (see
    /// `gather`).
    claiming: tokio::sync::Mutex<gather::ClaimTimes>,
    /// How the claiming worker hears of the jobs of the last claim ending while it waits for
    /// them before it claims (see `gather`).
    gather: gather::Gather,
    running: Mutex<FastMap<JobId, RunningJob>>,
    /// How many of the jobs running here are in each project (under a per-project limit).
    local_projects: projects::LocalProjects,
    /// The projects the policy admitted lately (see `admitted`).
    admitted: admitted::AdmittedProjects,
    /// The triggers that jobs have in common (see `triggers`).
    triggers: triggers::SharedTriggers,
    /// Cancels asked for jobs that were claimed but not yet registered in `running` (locked
    /// after `running`): the worker honours them as it registers the job.
    pending_cancels: Mutex<FastSet<JobId>>,
    /// Jobs submitted here whose `queued` event is not published yet (see `announce`).
    unannounced: announce::Unannounced,
    observers: Vec<Arc<dyn JobObserver>>,
    stop_claiming: CancellationToken,
    tracker: TaskTracker,
    busy: AtomicUsize,
    /// Places for outcomes on their way while their workers run the next jobs (as many as
    /// workers; see `worker::Settle`).
    settling: Arc<tokio::sync::Semaphore>,
    /// Jobs queued here that this instance told the others it would claim itself (an idle
    /// worker was free for each; see [`ClusterListener::promise_claim`]); a claim that returns
    /// takes its jobs off, one that finds nothing clears it.
    promised: AtomicUsize,
    started: Instant,
    durations: Mutex<HashMap<String, (u64, f64)>>,
}

impl Inner {
    /// Hands a stored event to live subscribers: its job's streams, the feed and (when anyone
    /// listens) [`Engine::subscribe_all`]. The event is shared, never copied per subscriber.
    fn broadcast(&self, event: &Arc<JobEvent>) {
        self.channels.publish(event);
        self.feed.push(Arc::clone(event));
        if self.bus.receiver_count() > 0 {
            let _ = self.bus.send(JobEvent::clone(event));
        }
    }
}

impl ClusterListener for Inner {
    fn wake(&self) {
        // One worker: it claims for every idle worker and wakes one per job it hands over
        // (waking them all would make all but one claim nothing).
        self.wake.notify_one();
    }

    fn remote_event(&self, event: JobEvent) {
        self.broadcast(&Arc::new(event));
    }

    fn promise_claim(&self, project: &str) -> bool {
        if self.stop_claiming.is_cancelled() {
            return false;
        }
        // No claim can take it before a job running here in its project ends, and that end
        // wakes a worker here (see `projects`). Nothing is promised: no worker is woken now.
        if self.local_projects.full(project) {
            return true;
        }
        let workers = self.settings.workers;
        let busy = self.busy.load(Ordering::Relaxed);
        self.promised
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |promised| {
                (busy + promised < workers).then_some(promised + 1)
            })
            .is_ok()
    }

    fn limits_claims_per_project(&self) -> bool {
        self.settings.per_project_concurrency.is_some()
    }

    fn remote_cancel(&self, id: JobId) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get(&id) {
            r.reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(StopReason::User("cancelled by request"));
            r.token.cancel();
        }
    }
}

/// The job engine. A cheap-to-clone handle: clone it into every handler.
///
/// ```
/// use std::sync::Arc;
/// use aiwg_core::{Engine, JobRequest, Workflow, Step};
/// use aiwg_core::test_util::ScriptedExecutor;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let engine = Engine::builder()
///     .executor("echo", Arc::new(ScriptedExecutor::succeeding("done")))
///     .workflow(Workflow::new("hello").step(Step::prompt("say", "echo", "Say {{guidance}}")))
///     .build()
///     .unwrap();
/// let job = engine.submit(JobRequest::new("hello").guidance("hi")).await.unwrap();
/// let done = engine.wait(job.id, std::time::Duration::from_secs(5)).await.unwrap();
/// assert_eq!(done.result.unwrap().summary, "done");
/// engine.shutdown(std::time::Duration::from_secs(1)).await;
/// # }
/// ```
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("workflows", &self.inner.catalog.len())
            .field("executors", &self.inner.registry.names())
            .field("workers", &self.inner.settings.workers)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Engine`].
#[must_use]
pub struct EngineBuilder {
    store: Option<Arc<dyn JobStore>>,
    registry: ExecutorRegistry,
    workflows: Vec<crate::workflow::Workflow>,
    policy: Option<ProjectPolicy>,
    observers: Vec<Arc<dyn JobObserver>>,
    audit: Option<crate::audit::AuditLog>,
    workspace: Option<crate::workspace::WorkspaceSettings>,
    settings: Settings,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            store: None,
            registry: ExecutorRegistry::new(),
            workflows: Vec::new(),
            policy: None,
            observers: Vec::new(),
            audit: None,
            workspace: None,
            settings: Settings {
                workers: 4,
                queue_capacity: 1000,
                per_project_concurrency: None,
                default_timeout: Duration::from_secs(300),
                default_max_attempts: 1,
                lease_ttl: Duration::from_secs(30),
                poll_interval: Duration::from_millis(250),
                max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
                max_line_bytes: DEFAULT_MAX_LINE_BYTES,
                feed_events: DEFAULT_FEED_EVENTS,
                feed_bytes: DEFAULT_FEED_BYTES,
                approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
                run_schedules: true,
                backoff: Backoff {
                    base: Duration::from_secs(2),
                    max: Duration::from_secs(300),
                },
                instance: format!("aiwg-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
            },
        }
    }
}

impl EngineBuilder {
    /// Where trigger decisions are recorded (default: an [`AuditLog`](crate::audit::AuditLog)
    /// over a fresh [`MemoryAuditStore`](crate::audit::MemoryAuditStore)).
    pub fn audit(mut self, audit: crate::audit::AuditLog) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Runs jobs about pull requests in a git worktree at the request's head (see
    /// [`crate::workspace`]); default: every job runs in its project directory.
    pub fn workspace(mut self, settings: crate::workspace::WorkspaceSettings) -> Self {
        self.workspace = Some(settings);
        self
    }

    /// The store (default: a fresh [`MemoryStore`]).
    pub fn store(mut self, store: Arc<dyn JobStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Registers an executor; the first one is the default for steps that name no agent.
    pub fn executor(self, name: impl Into<String>, executor: Arc<dyn crate::Executor>) -> Self {
        self.registry.register(name, executor);
        self
    }

    /// Uses an existing registry (replacing executors added so far).
    pub fn registry(mut self, registry: ExecutorRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// Adds a workflow.
    pub fn workflow(mut self, workflow: crate::workflow::Workflow) -> Self {
        self.workflows.push(workflow);
        self
    }

    /// Adds workflows.
    pub fn workflows(mut self, w: impl IntoIterator<Item = crate::workflow::Workflow>) -> Self {
        self.workflows.extend(w);
        self
    }

    /// The project policy (default: the current directory as the only root).
    pub fn policy(mut self, policy: ProjectPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Adds an observer of every job event.
    pub fn observer(mut self, observer: Arc<dyn JobObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Number of workers (default 4): how many jobs' steps run at once on this instance. A
    /// worker is free once its job's work has ended; where the store's write of the outcome
    /// takes a round trip (PostgreSQL), the outcome goes on without it, at most this many
    /// outcomes on their way at once, and the job counts as running (in its project, for a
    /// claim) until its outcome is written.
    pub fn workers(mut self, n: usize) -> Self {
        self.settings.workers = n;
        self
    }

    /// Maximum number of queued jobs (default 1000).
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.settings.queue_capacity = n;
        self
    }

    /// Maximum jobs running at once in one project (default unlimited).
    pub fn per_project_concurrency(mut self, n: usize) -> Self {
        self.settings.per_project_concurrency = Some(n);
        self
    }

    /// Timeout of workflows that set none (default 5 minutes).
    pub fn default_timeout(mut self, t: Duration) -> Self {
        self.settings.default_timeout = t;
        self
    }

    /// Attempts of workflows that set none (default 1).
    pub fn default_max_attempts(mut self, n: u32) -> Self {
        self.settings.default_max_attempts = n;
        self
    }

    /// Lease duration; heartbeats run at a third of it (default 30 s).
    pub fn lease_ttl(mut self, t: Duration) -> Self {
        self.settings.lease_ttl = t;
        self
    }

    /// How much agent output one job may produce, in bytes (texts plus a small fixed cost per
    /// event; default [`DEFAULT_MAX_OUTPUT_BYTES`]). Past it further output is dropped where it
    /// is produced and one `output_truncated` event is recorded: a flooding agent cannot grow
    /// the server's memory or the job's stored history without bound.
    pub fn max_output_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_output_bytes = bytes;
        self
    }

    /// The longest text, log line or tool result kept of agent output (default
    /// [`DEFAULT_MAX_LINE_BYTES`]); longer ones are cut with a marker.
    pub fn max_line_bytes(mut self, bytes: usize) -> Self {
        self.settings.max_line_bytes = bytes;
        self
    }

    /// How much of the [feed](Engine::feed) is kept for subscribers that reconnect: at most
    /// `events` events and about `bytes` bytes of their JSON (defaults
    /// [`DEFAULT_FEED_EVENTS`], [`DEFAULT_FEED_BYTES`]). A subscriber whose cursor is older
    /// than what is kept gets a [`FeedItem::Reset`].
    pub fn feed_capacity(mut self, events: usize, bytes: usize) -> Self {
        self.settings.feed_events = events;
        self.settings.feed_bytes = bytes;
        self
    }

    /// How long a job waits for an approval when its workflow does not say
    /// (`approval_timeout`; default [`DEFAULT_APPROVAL_TIMEOUT`], 24 hours).
    pub fn approval_timeout(mut self, t: Duration) -> Self {
        self.settings.approval_timeout = t;
        self
    }

    /// Whether this engine starts the jobs of workflows' `schedules` (default `true`). Turn it
    /// off on instances that should only run jobs; with several instances on one store, every
    /// instance may keep it on: each tick still starts one job.
    pub fn run_schedules(mut self, on: bool) -> Self {
        self.settings.run_schedules = on;
        self
    }

    /// How often idle workers look for work they were not woken for, and expired leases and
    /// approvals are swept (default 250 ms).
    pub fn poll_interval(mut self, t: Duration) -> Self {
        self.settings.poll_interval = t;
        self
    }

    /// Retry backoff (default 2 s doubling up to 5 min, ±20 % jitter).
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.backoff = Backoff { base, max };
        self
    }

    /// This instance's name in leases (default `aiwg-<random>`).
    pub fn instance_name(mut self, name: impl Into<String>) -> Self {
        self.settings.instance = name.into();
        self
    }

    /// Validates everything and starts the workers on the current tokio runtime.
    pub fn build(self) -> Result<Engine, BuildError> {
        let s = &self.settings;
        let setting = |key: &'static str, reason: &str| BuildError::Setting {
            key,
            reason: reason.to_owned(),
        };
        if s.workers == 0 {
            return Err(setting("workers", "must be at least 1"));
        }
        if s.queue_capacity == 0 {
            return Err(setting("queue_capacity", "must be at least 1"));
        }
        if s.per_project_concurrency == Some(0) {
            return Err(setting("per_project_concurrency", "must be at least 1"));
        }
        if s.default_timeout.is_zero() || s.default_timeout > crate::executor::MAX_TIMEOUT {
            return Err(setting(
                "default_timeout",
                "must be between 1 ms and 30 days",
            ));
        }
        if s.lease_ttl < Duration::from_millis(30) {
            return Err(setting("lease_ttl", "must be at least 30 ms"));
        }
        if s.default_max_attempts == 0 {
            return Err(setting("default_max_attempts", "must be at least 1"));
        }
        if s.approval_timeout.is_zero() {
            return Err(setting("approval_timeout", "must be greater than zero"));
        }
        let catalog = WorkflowCatalog::new(self.workflows)?;
        if self.workspace.is_none() {
            if let Some(wf) = catalog
                .iter()
                .find(|w| w.workspace == Some(crate::workflow::WorkspaceMode::Worktree))
            {
                return Err(BuildError::Setting {
                    key: "workspace",
                    reason: format!(
                        "workflow `{}` asks for a worktree but no workspace cache is configured (projects.workspace)",
                        wf.name
                    ),
                });
            }
        }
        let default_agent = self.registry.default_executor().map(|(n, _)| n);
        for wf in catalog.iter() {
            for step in &wf.steps {
                let agent = step.agent.clone().or_else(|| default_agent.clone());
                let known = agent
                    .as_deref()
                    .is_some_and(|a| self.registry.get(a).is_some());
                if !known {
                    return Err(WorkflowError::UnknownAgent {
                        workflow: wf.name.clone(),
                        step: step.name.clone(),
                        agent: agent.unwrap_or_else(|| "(default)".into()),
                    }
                    .into());
                }
            }
        }
        let policy = match self.policy {
            Some(p) => p,
            None => ProjectPolicy::builder()
                .root(".")
                .build()
                .map_err(|e| setting("projects.root", &e.to_string()))?,
        };
        if self.settings.run_schedules {
            // A schedule's project is resolved as a submit's would be; one outside the roots,
            // forbidden, missing or unmapped would fail at every tick, long after the start.
            for wf in catalog.iter() {
                for (i, schedule) in wf.schedules.iter().enumerate() {
                    policy
                        .resolve(
                            schedule.project_path.as_deref(),
                            schedule.project.as_deref(),
                        )
                        .map_err(|e| WorkflowError::Invalid {
                            workflow: wf.name.clone(),
                            reason: format!("schedule {}: {e}", i + 1),
                        })?;
                }
            }
        }
        let handle = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let (bus, _) = broadcast::channel(4096);
        let feed = feed::Feed::new(self.settings.feed_events, self.settings.feed_bytes);
        let local_projects = projects::LocalProjects::new(self.settings.per_project_concurrency);
        let workers = self.settings.workers;
        let engine = Engine {
            inner: Arc::new(Inner {
                store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
                catalog,
                registry: self.registry,
                policy,
                settings: self.settings,
                bus,
                channels: subscribe::JobChannels::new(),
                feed,
                wake: Notify::new(),
                handoff: Mutex::default(),
                claiming: tokio::sync::Mutex::default(),
                gather: gather::Gather::default(),
                running: Mutex::default(),
                local_projects,
                admitted: admitted::AdmittedProjects::default(),
                triggers: triggers::SharedTriggers::default(),
                pending_cancels: Mutex::default(),
                unannounced: announce::Unannounced::default(),
                observers: self.observers,
                audit: self.audit.unwrap_or_default(),
                workspaces: self
                    .workspace
                    .map(|w| Arc::new(crate::workspace::Workspaces::new(w))),
                stop_claiming: CancellationToken::new(),
                tracker: TaskTracker::new(),
                busy: AtomicUsize::new(0),
                settling: Arc::new(tokio::sync::Semaphore::new(workers)),
                promised: AtomicUsize::new(0),
                started: Instant::now(),
                durations: Mutex::new(HashMap::new()),
            }),
        };
        for n in 0..engine.inner.settings.workers {
            let e = engine.clone();
            engine
                .inner
                .tracker
                .spawn_on(async move { worker::run(e, n).await }, &handle);
        }
        if engine.inner.settings.run_schedules {
            for (workflow, index) in scheduler::schedules(&engine.inner.catalog) {
                let e = engine.clone();
                engine.inner.tracker.spawn_on(
                    async move { scheduler::run(e, workflow, index).await },
                    &handle,
                );
            }
        }
        Ok(engine)
    }
}

impl Engine {
    /// A builder with defaults: in-memory store, 4 workers, queue of 1000, 5 minute timeout.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The audit trail of trigger decisions: the HTTP API and the platform hooks record every
    /// trigger attempt here.
    #[must_use]
    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.inner.audit
    }

    /// The workflows.
    #[must_use]
    pub fn catalog(&self) -> &WorkflowCatalog {
        &self.inner.catalog
    }

    /// The executors.
    #[must_use]
    pub fn registry(&self) -> &ExecutorRegistry {
        &self.inner.registry
    }

    /// The project policy.
    #[must_use]
    pub fn policy(&self) -> &ProjectPolicy {
        &self.inner.policy
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.store
    }

    /// How long the engine has been running.
    #[must_use]
    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Validates and queues a job. With an idempotency key that was seen before, returns the job
    /// created then (same request) or [`SubmitError::IdempotencyConflict`] (different request).
    pub async fn submit(&self, request: JobRequest) -> Result<Job, SubmitError> {
        self.submission(request).await.map(|s| s.job)
    }

    /// [`submit`](Self::submit), also telling whether the job is new or was found by its
    /// idempotency key (what the audit trail records as `accepted` or `duplicate`).
    pub async fn submission(&self, request: JobRequest) -> Result<Submission, SubmitError> {
        let new = self.prepare(request)?;
        let _pending = self.inner.unannounced.mark(new.job.id);
        let created = self.inner.store.create(new).await;
        self.created(created).await
    }

    /// Validates and queues several jobs with one store call (PostgreSQL inserts them with one
    /// statement). The answers come in the order of the requests, each what
    /// [`submit`](Self::submit) would have answered for it: a request that is refused does not
    /// stop the others, and past the queue's capacity the rest are refused with
    /// [`SubmitError::QueueFull`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use aiwg_core::{Engine, JobRequest, Workflow, Step};
    /// use aiwg_core::test_util::ScriptedExecutor;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let engine = Engine::builder()
    ///     .executor("echo", Arc::new(ScriptedExecutor::succeeding("done")))
    ///     .workflow(Workflow::new("hello").step(Step::prompt("say", "echo", "hi")))
    ///     .build()
    ///     .unwrap();
    /// let answers = engine
    ///     .submit_many([JobRequest::new("hello"), JobRequest::new("nope"), JobRequest::new("hello")])
    ///     .await;
    /// assert!(answers[0].is_ok() && answers[2].is_ok());
    /// assert!(matches!(answers[1], Err(aiwg_core::SubmitError::UnknownWorkflow(_))));
    /// # }
    /// ```
    pub async fn submit_many(
        &self,
        requests: impl IntoIterator<Item = JobRequest>,
    ) -> Vec<Result<Job, SubmitError>> {
        let mut answers: Vec<Option<Result<Job, SubmitError>>> = Vec::new();
        let mut news = Vec::new();
        let mut slots = Vec::new();
        for request in requests {
            match self.prepare(request) {
                Ok(new) => {
                    slots.push(answers.len());
                    news.push(new);
                    answers.push(None);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        if !news.is_empty() {
            let mut pending: std::collections::VecDeque<_> = news
                .iter()
                .map(|n| self.inner.unannounced.mark(n.job.id))
                .collect();
            let created = self.inner.store.create_many(news).await;
            for (slot, outcome) in slots.iter().zip(created) {
                answers[*slot] = Some(self.created(outcome).await.map(|s| s.job));
                drop(pending.pop_front());
            }
        }
        answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    Err(SubmitError::Store(StoreError::backend(
                        "the store answered for fewer jobs than it was given",
                    )))
                })
            })
            .collect()
    }

    /// What follows the store's answer to a create: publish, resolve the concurrency group,
    /// wake a worker.
    async fn created(
        &self,
        outcome: Result<Created, StoreError>,
    ) -> Result<Submission, SubmitError> {
        match outcome {
            Ok(Created::New(job, event)) => {
                self.publish(&job, event).await;
                let conflict = self
                    .inner
                    .catalog
                    .get(&job.workflow)
                    .and_then(|wf| wf.concurrency.as_ref().map(|c| c.on_conflict));
                if let (Some(group), Some(on_conflict)) = (&job.concurrency_group, conflict) {
                    self.resolve_conflict(&job, group, on_conflict).await;
                }
                // A project that jobs running here fill: the end of one of them wakes a
                // worker, and a claim now would find nothing; during a claim, its answer
                // decides (see `projects`).
                if self.inner.local_projects.submitted(&job.project_path) {
                    self.inner.wake.notify_one();
                }
                Ok(Submission { job, created: true })
            }
            Ok(Created::Existing(job)) => Ok(Submission {
                job,
                created: false,
            }),
            Err(StoreError::IdempotencyConflict { existing }) => {
                Err(SubmitError::IdempotencyConflict { existing })
            }
            Err(StoreError::QueueFull { capacity }) => Err(SubmitError::QueueFull { capacity }),
            Err(e) => Err(SubmitError::Store(e)),
        }
    }

    /// Validates a request and makes the job to store.
    fn prepare(&self, request: JobRequest) -> Result<NewJob, SubmitError> {
        if self.inner.stop_claiming.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let crate::workflow::Named {
            name: workflow,
            workflow: wf,
            steps,
        } = self
            .inner
            .catalog
            .get_named(&request.workflow)
            .ok_or_else(|| SubmitError::UnknownWorkflow(request.workflow.clone()))?;
        let params = wf.resolve_params(&request.params)?;
        if let Some(g) = &request.guidance {
            wf.check_guidance(g).map_err(SubmitError::Invalid)?;
        }
        if let Some(k) = &request.idempotency_key {
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                return Err(SubmitError::Invalid(format!(
                    "the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
                )));
            }
        }
        let project = self.inner.admitted.resolve(
            &self.inner.policy,
            request.project_path.as_deref(),
            request.project.as_deref(),
        )?;
        // Only a request with an idempotency key is ever compared with another.
        let fingerprint = request
            .idempotency_key
            .is_some()
            .then(|| request.fingerprint());
        // Jobs with the same trigger that names only a source and an actor share it; one that
        // says nothing is the API's (see `triggers`).
        let trigger = self.inner.triggers.share(request.trigger);
        let concurrency_group = wf.concurrency.as_ref().and_then(|c| {
            let ctx = crate::workflow::TemplateContext {
                guidance: request.guidance.as_deref(),
                project_path: &project,
                params: &params,
                trigger: &trigger,
                step_outputs: &BTreeMap::new(),
                step_structured: &BTreeMap::new(),
            };
            crate::workflow::render(&c.group, &ctx)
                .ok()
                .map(|g| g.trim().to_owned())
                .filter(|g| !g.is_empty())
        });
        let now = chrono::Utc::now();
        let job = Job {
            id: JobId::new(),
            workflow,
            project_path: project,
            params: crate::job::shared_params(params),
            guidance: request.guidance,
            priority: request.priority.or(wf.priority).unwrap_or(0),
            status: JobStatus::Queued,
            attempt: 0,
            max_attempts: wf
                .max_attempts
                .unwrap_or(self.inner.settings.default_max_attempts),
            timeout: wf.timeout.unwrap_or(self.inner.settings.default_timeout),
            created_at: now,
            started_at: None,
            finished_at: None,
            retry_at: None,
            progress: Progress::pending(steps.iter().cloned()),
            result: None,
            error: None,
            dead_letter: false,
            trigger,
            history: vec![crate::job::StatusChange {
                status: JobStatus::Queued,
                at: now,
                attempt: 0,
                reason: None,
            }],
            cancel_requested: false,
            idempotency_key: request.idempotency_key,
            reply_credentials: request.reply_credentials,
            concurrency_group,
            max_budget_usd: wf.max_budget_usd.or(request.max_budget_usd),
            approvals: Vec::new(),
            resume_after_approval: false,
        };
        let mut new = NewJob::new(job).capacity(self.inner.settings.queue_capacity);
        new.fingerprint = fingerprint;
        Ok(new)
    }

    /// Reads a job.
    pub async fn get(&self, id: JobId) -> Result<Job, EngineError> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or(EngineError::NotFound(id))
    }

    /// Lists jobs, newest first.
    pub async fn list(&self, query: &JobQuery) -> Result<JobPage, EngineError> {
        Ok(self.inner.store.list(query).await?)
    }

    /// Queue figures.
    pub async fn queue_stats(&self) -> Result<QueueStats, EngineError> {
        let QueueCounts { queued, running } = self.inner.store.counts().await?;
        Ok(QueueStats {
            queued,
            running,
            workers: self.inner.settings.workers,
            busy: self.inner.busy.load(Ordering::Relaxed),
        })
    }

    /// Cancels a job. A queued job is cancelled at once; a running one is stopped through its
    /// cancellation token, and this returns once its executor has returned (for a job running
    /// on another instance sharing the store: once that instance reports it, up to `30 s`).
    pub async fn cancel(&self, id: JobId) -> Result<Job, EngineError> {
        self.cancel_because(id, "cancelled by request").await
    }

    /// A new job of `group` arrived: cancel what its `on_conflict` says (in the background: the
    /// new job waits for the group anyway).
    async fn resolve_conflict(&self, new: &Job, group: &str, on_conflict: crate::OnConflict) {
        let statuses: &[JobStatus] = match on_conflict {
            crate::OnConflict::Queue => return,
            crate::OnConflict::ReplaceQueued => &[JobStatus::Queued],
            crate::OnConflict::CancelRunning => &[JobStatus::Queued, JobStatus::Running],
        };
        for status in statuses {
            let query = JobQuery {
                status: Some(*status),
                concurrency_group: Some(group.to_owned()),
                limit: Some(500),
                ..JobQuery::default()
            };
            let Ok(page) = self.inner.store.list(&query).await else {
                continue;
            };
            for old in page
                .jobs
                .into_iter()
                .filter(|j| j.id != new.id && j.id < new.id)
            {
                let engine = self.clone();
                let reason = match status {
                    JobStatus::Queued => "replaced by a newer job of its concurrency group",
                    _ => "cancelled by a newer job of its concurrency group",
                };
                tokio::spawn(async move {
                    let _ = engine.cancel_because(old.id, reason).await;
                });
            }
        }
    }

    async fn cancel_because(&self, id: JobId, reason: &'static str) -> Result<Job, EngineError> {
        match self.inner.store.request_cancel(id, reason).await {
            Ok(CancelOutcome::Cancelled(job, event)) => {
                self.publish(&job, event).await;
                Ok(job)
            }
            Ok(CancelOutcome::AlreadyFinished(job)) => Err(EngineError::AlreadyFinished {
                id,
                status: job.status,
            }),
            Ok(CancelOutcome::Requested(_)) => {
                let local = {
                    let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
                    let local = running.get(&id).map(|r| {
                        r.reason
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(StopReason::User(reason));
                        r.token.cancel();
                        r.done.clone()
                    });
                    if local.is_none() {
                        // Claimed here a moment ago but not registered yet, or running on
                        // another instance: a worker of this one honours it as it registers.
                        self.inner
                            .pending_cancels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id);
                    }
                    local
                };
                match local {
                    Some(done) => done.cancelled().await,
                    None => {
                        let waited = self.wait(id, Duration::from_secs(30)).await;
                        self.inner
                            .pending_cancels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&id);
                        waited?;
                    }
                }
                self.get(id).await
            }
            Err(StoreError::NotFound(_)) => Err(EngineError::NotFound(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Approves the step a job waits for (see [`Step::approval`](crate::Step::approval)): the
    /// job goes back to `queued` and any instance's worker continues it at that step, with
    /// the results of the steps before it. `by` is who approved (a key's name, a login) and
    /// `via` how (`api`, `github`, …); both are recorded in the job's `approvals`.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], or [`EngineError::NotAwaitingApproval`] for a job that is
    /// not waiting (including one approved or rejected a moment ago).
    pub async fn approve(&self, id: JobId, by: &str, via: &str) -> Result<Job, EngineError> {
        self.decide(id, crate::job::ApprovalDecision::new(true, by, via))
            .await
    }

    /// Rejects the step a job waits for: the job ends `cancelled` (error kind `rejected`),
    /// keeping the results of the steps that ran.
    ///
    /// # Errors
    /// As [`approve`](Self::approve).
    pub async fn reject(&self, id: JobId, by: &str, via: &str) -> Result<Job, EngineError> {
        self.decide(id, crate::job::ApprovalDecision::new(false, by, via))
            .await
    }

    async fn decide(
        &self,
        id: JobId,
        decision: crate::job::ApprovalDecision,
    ) -> Result<Job, EngineError> {
        let approved = decision.approved;
        match self.inner.store.decide_approval(id, decision).await {
            Ok(ApprovalOutcome::Decided(job, event)) => {
                metrics::counter!(
                    "aiwg_approval_decisions_total",
                    "workflow" => job.workflow.clone(),
                    "decision" => if approved { "approved" } else { "rejected" }
                )
                .increment(1);
                self.publish(&job, event).await;
                if approved {
                    self.inner.wake.notify_one();
                }
                Ok(job)
            }
            Ok(ApprovalOutcome::NotWaiting(job)) => Err(EngineError::NotAwaitingApproval {
                id,
                status: job.status,
            }),
            Err(StoreError::NotFound(_)) => Err(EngineError::NotFound(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Ends the jobs whose approval expired (done by a worker every poll interval).
    pub(crate) async fn expire_approvals(&self) {
        match self.inner.store.expire_approvals(chrono::Utc::now()).await {
            Ok(expired) => {
                for (job, ev) in expired {
                    metrics::counter!(
                        "aiwg_approval_decisions_total",
                        "workflow" => job.workflow.clone(),
                        "decision" => "timed_out"
                    )
                    .increment(1);
                    self.publish(&job, ev).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring approvals failed"),
        }
    }

    /// Waits until the job reaches a terminal status (or `timeout` passes).
    pub async fn wait(&self, id: JobId, timeout: Duration) -> Result<Job, EngineError> {
        // Registered (and enabled) before the job is read, so an end between the two wakes it.
        let waiter = self.inner.channels.waiter(id);
        let ended = waiter.ended();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let job = self.get(id).await?;
        if job.is_terminal() {
            return Ok(job);
        }
        let waited = tokio::time::timeout(timeout, ended).await;
        let job = self.get(id).await?;
        if waited.is_err() && !job.is_terminal() {
            return Err(EngineError::WaitTimeout(id));
        }
        Ok(job)
    }

    /// One job's events with `seq > after`: history first, then live, ending after the
    /// terminal event.
    pub async fn subscribe(
        &self,
        id: JobId,
        after: u64,
    ) -> Result<Pin<Box<dyn Stream<Item = JobEvent> + Send>>, EngineError> {
        subscribe::job_stream(self.clone(), id, after).await
    }

    /// [`subscribe`](Self::subscribe), each event shared rather than copied: what a server
    /// fanning one job out to many clients should use.
    pub async fn subscribe_shared(
        &self,
        id: JobId,
        after: u64,
    ) -> Result<Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>>, EngineError> {
        subscribe::shared_job_stream(self.clone(), id, after).await
    }

    /// [`subscribe_shared`](Self::subscribe_shared) for a client resuming after `after`:
    /// `None` when the job has ended and none of its events comes after `after` (nothing will
    /// ever follow; an SSE server answers 204 so the client stops reconnecting).
    pub async fn resume_shared(
        &self,
        id: JobId,
        after: u64,
    ) -> Result<Option<Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>>>, EngineError> {
        subscribe::resumed_shared_job_stream(self.clone(), id, after).await
    }

    /// Every job's events, live (no history). A receiver that falls more than 4096 events behind
    /// sees `Lagged` and should re-read from the store.
    #[must_use]
    pub fn subscribe_all(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.bus.subscribe()
    }

    /// Every job's events as one ordered, resumable stream: the events after `after` (or,
    /// without a cursor, from now on), live, until [`shutdown`](Self::shutdown). Events of other
    /// instances sharing the store are included once their notification arrives. Each item
    /// carries its [`FeedCursor`]; pass the last one back to resume without missing anything.
    /// When that is impossible (the cursor is older than what the feed keeps, or belongs to
    /// another process or instance) the stream starts with a [`FeedItem::Reset`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use aiwg_core::engine::FeedItem;
    /// use aiwg_core::test_util::ScriptedExecutor;
    /// use aiwg_core::{Engine, JobRequest, Step, Workflow};
    /// use futures_util::StreamExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let engine = Engine::builder()
    ///     .executor("echo", Arc::new(ScriptedExecutor::succeeding("done")))
    ///     .workflow(Workflow::new("hello").step(Step::prompt("say", "echo", "hi")))
    ///     .build()
    ///     .unwrap();
    /// let mut feed = engine.feed(None);
    /// let job = engine.submit(JobRequest::new("hello")).await.unwrap();
    /// let Some(FeedItem::Event { cursor, event }) = feed.next().await else { panic!() };
    /// assert_eq!((event.job_id, event.seq), (job.id, 1));
    /// // Later, a reconnecting client resumes after the last cursor it saw.
    /// let mut resumed = engine.feed(Some(cursor));
    /// let Some(FeedItem::Event { event, .. }) = resumed.next().await else { panic!() };
    /// assert_eq!((event.job_id, event.seq), (job.id, 2));
    /// # }
    /// ```
    pub fn feed(&self, after: Option<FeedCursor>) -> Pin<Box<dyn Stream<Item = FeedItem> + Send>> {
        feed::subscribe(Arc::clone(&self.inner), after)
    }

    /// The feed's current position: a [`feed`](Self::feed) from it yields what happens next.
    #[must_use]
    pub fn feed_cursor(&self) -> FeedCursor {
        self.inner.feed.cursor()
    }

    /// Publishes an event recorded by another instance sharing the store (used by stores with
    /// cross-instance notification, e.g. PostgreSQL LISTEN/NOTIFY). Local subscribers see it;
    /// observers are not called (the producing instance called its own).
    pub fn publish_remote(&self, event: JobEvent) {
        self.inner.remote_event(event);
    }

    /// Wakes idle workers (e.g. after another instance queued a job).
    pub fn wake(&self) {
        self.inner.wake();
    }

    /// Asks a job running here to stop because another instance received a cancel for it.
    pub fn cancel_local(&self, id: JobId) {
        self.inner.remote_cancel(id);
    }

    /// This engine as the receiving end of a store's cross-instance notifications (for
    /// example `PgStore::listen`). The handle is weak: it does not keep the engine alive, and
    /// the store's listener ends once the engine is gone.
    #[must_use]
    pub fn cluster_listener(&self) -> std::sync::Weak<dyn ClusterListener> {
        let weak: std::sync::Weak<Inner> = Arc::downgrade(&self.inner);
        weak
    }

    /// Stops taking work, lets running jobs finish for up to `grace`, then cancels the rest
    /// (they end `cancelled` with kind `shutdown`) and waits for the workers to exit.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop_claiming.cancel();
        self.inner.tracker.close();
        self.wake();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            {
                let running = self.inner.running.lock().unwrap_or_else(|e| e.into_inner());
                for r in running.values() {
                    r.reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(StopReason::Shutdown);
                    r.token.cancel();
                }
            }
            self.inner.tracker.wait().await;
        }
        // Every job has its last event: feed subscribers read what is left and end.
        self.inner.feed.close();
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.inner.stop_claiming.is_cancelled()
    }

    /// The mean run time of completed jobs of `workflow` on this instance, once one completed.
    #[must_use]
    pub fn estimated_duration(&self, workflow: &str) -> Option<Duration> {
        let d = self
            .inner
            .durations
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.get(workflow)
            .filter(|(n, _)| *n > 0)
            .map(|(n, total)| Duration::from_secs_f64(total / *n as f64))
    }

    pub(crate) async fn publish(&self, job: &Job, event: JobEvent) {
        if event.is_terminal() {
            let secs = match (job.started_at, job.finished_at) {
                (Some(s), Some(f)) => (f - s).to_std().unwrap_or_default().as_secs_f64(),
                _ => 0.0,
            };
            metrics::histogram!(
                "aiwg_job_duration_seconds",
                "workflow" => job.workflow.clone(),
                "status" => job.status.as_str()
            )
            .record(secs);
            if let Some(cost) = job.result.as_ref().and_then(|r| r.cost_usd) {
                // A float counter: Prometheus counters may be fractional; the `metrics` crate
                // only has integer counters, so this is a gauge that only grows.
                metrics::gauge!("aiwg_job_cost_usd_total", "workflow" => job.workflow.clone())
                    .increment(cost);
            }
            if job.status == JobStatus::Completed {
                let mut d = self
                    .inner
                    .durations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                // The workflow's name is copied only for its first completed job.
                match d.get_mut(&*job.workflow) {
                    Some(e) => {
                        e.0 += 1;
                        e.1 += secs;
                    }
                    None => {
                        d.insert(job.workflow.to_string(), (1, secs));
                    }
                }
            }
        }
        let event = Arc::new(event);
        self.inner.broadcast(&event);
        for o in &self.inner.observers {
            o.on_event(job, &event).await;
        }
    }
}
