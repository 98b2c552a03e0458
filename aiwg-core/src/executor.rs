//! The [`Executor`] trait every agent backend implements, the request it receives, the events it
//! streams and the result it returns, and the [`ExecutorRegistry`] that names executors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::job::JobId;
pub use crate::job::Usage;

mod queue;
pub(crate) use queue::StepEvents;

/// The longest timeout a request may carry (30 days): beyond it deadlines overflow on some
/// platforms and the value is almost certainly a unit mistake.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which output stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Something an agent did, streamed while it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentEvent {
    /// The agent started a session.
    Init {
        /// The session id, when the agent has sessions.
        session_id: Option<String>,
        /// The model in use.
        model: Option<String>,
        /// The tools it may use.
        tools: Vec<String>,
    },
    /// Text the agent wrote.
    Text {
        /// The text.
        text: String,
    },
    /// The agent called a tool.
    ToolUse {
        /// The call's id.
        id: Option<String>,
        /// The tool's name.
        name: String,
        /// The tool's input.
        input: serde_json::Value,
    },
    /// A tool answered.
    ToolResult {
        /// The call this answers.
        tool_use_id: Option<String>,
        /// What the tool returned (text, or the JSON the agent gave).
        content: serde_json::Value,
        /// Whether the tool failed.
        is_error: bool,
    },
    /// Cost and token usage so far (or final).
    Usage {
        /// Cost in US dollars.
        cost_usd: Option<f64>,
        /// Tokens.
        usage: Usage,
    },
    /// A line of process output that is not structured.
    Log {
        /// Where it came from.
        stream: LogStream,
        /// The line, without its newline.
        line: String,
    },
    /// Output the executor did not recognise, kept as is.
    Raw {
        /// The JSON value (or a string for a line that was not JSON).
        value: serde_json::Value,
    },
}

/// Where an executor sends its [`AgentEvent`]s. Cheap to clone; sending never blocks and never
/// fails (events sent after the receiver is gone are dropped).
///
/// A sink made by [`EventSink::bounded`] also bounds what a run can make the server hold: a
/// text, a log line, a tool input or a tool result longer than the line cap is cut (with a
/// marker saying how much was left out), and once the output budget is spent further output is
/// dropped at the source and [`truncated`](Self::truncated) turns true. Events without output
/// (`Init`, `Usage`) always pass.
///
/// ```
/// use aiwg_core::{AgentEvent, EventSink, LogStream};
///
/// let (sink, mut rx) = EventSink::bounded(1_000, 100);
/// sink.emit(AgentEvent::Log { stream: LogStream::Stdout, line: "x".repeat(500) });
/// let AgentEvent::Log { line, .. } = rx.try_recv().unwrap() else { panic!() };
/// assert!(line.len() < 200 && line.ends_with("[400 more bytes cut]"), "{line}");
/// for _ in 0..100 {
///     sink.emit(AgentEvent::Text { text: "y".into() });
/// }
/// assert!(sink.truncated());
/// ```
#[derive(Clone)]
pub struct EventSink {
    tx: Option<Tx>,
    limits: Option<Arc<SinkLimits>>,
}

/// Where a sink's events go.
#[derive(Clone)]
enum Tx {
    /// A channel whose receiver the sink's maker holds ([`EventSink::channel`], `bounded`).
    Channel(mpsc::UnboundedSender<AgentEvent>),
    /// The engine's step queue ([`EventSink::queued`]).
    Queue(Arc<queue::Shared>),
}

/// The bounds of a [`EventSink::bounded`] sink, shared by its clones.
struct SinkLimits {
    budget: usize,
    max_line: usize,
    used: AtomicUsize,
    truncated: AtomicBool,
}

/// What one event costs against the budget besides its text: its share of the queue and the
/// stored history (an enum, a sequence number, a time stamp).
const EVENT_OVERHEAD: usize = 128;

impl EventSink {
    /// A sink and the receiver that gets its events, without bounds.
    #[must_use]
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<AgentEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx: Some(Tx::Channel(tx)),
                limits: None,
            },
            rx,
        )
    }

    /// A sink that cuts any text longer than `max_line` bytes and drops output once `budget`
    /// bytes (texts plus a fixed cost per event) were sent.
    #[must_use]
    pub fn bounded(budget: usize, max_line: usize) -> (Self, mpsc::UnboundedReceiver<AgentEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self::limited(Tx::Channel(tx), budget, max_line), rx)
    }

    /// [`bounded`](Self::bounded), received through the engine's step queue, which allocates
    /// no room for events before one is emitted (see [`StepEvents`]).
    pub(crate) fn queued(budget: usize, max_line: usize) -> (Self, StepEvents) {
        let (shared, rx) = StepEvents::new();
        (Self::limited(Tx::Queue(shared), budget, max_line), rx)
    }

    fn limited(tx: Tx, budget: usize, max_line: usize) -> Self {
        Self {
            tx: Some(tx),
            limits: Some(Arc::new(SinkLimits {
                budget,
                max_line: max_line.max(64),
                used: AtomicUsize::new(0),
                truncated: AtomicBool::new(false),
            })),
        }
    }

    /// A sink that drops everything (for tests and one-off calls).
    #[must_use]
    pub fn discard() -> Self {
        Self {
            tx: None,
            limits: None,
        }
    }

    /// Sends one event (cut to the line cap, or dropped past the budget).
    pub fn emit(&self, mut event: AgentEvent) {
        let Some(tx) = &self.tx else { return };
        if let Some(l) = &self.limits {
            let size = cut(&mut event, l.max_line);
            if size > 0 {
                let used = l.used.fetch_add(size + EVENT_OVERHEAD, Ordering::Relaxed);
                if used + size + EVENT_OVERHEAD > l.budget {
                    l.truncated.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
        match tx {
            Tx::Channel(tx) => {
                let _ = tx.send(event);
            }
            Tx::Queue(queue) => queue.push(event),
        }
    }

    /// Whether output was dropped because the budget was spent.
    #[must_use]
    pub fn truncated(&self) -> bool {
        self.limits
            .as_ref()
            .is_some_and(|l| l.truncated.load(Ordering::Relaxed))
    }

    /// How many bytes of output were sent or dropped (0 for unbounded sinks).
    #[must_use]
    pub fn output_bytes(&self) -> usize {
        self.limits
            .as_ref()
            .map_or(0, |l| l.used.load(Ordering::Relaxed))
    }
}

/// Cuts the event's text to `max` bytes (at a character boundary, with a marker) and returns
/// the size of its output (0 for events without output).
fn cut(event: &mut AgentEvent, max: usize) -> usize {
    fn text(s: &mut String, max: usize) -> usize {
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            let left = s.len() - end;
            s.truncate(end);
            s.push_str(&format!("… [{left} more bytes cut]"));
        }
        s.len()
    }
    fn value(v: &mut serde_json::Value, max: usize) -> usize {
        match v {
            serde_json::Value::String(s) => text(s, max),
            serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
                8
            }
            other => {
                let len = crate::util::json_len(other);
                if len > max {
                    *other = serde_json::Value::String(format!("[{len} bytes of JSON cut]"));
                    32
                } else {
                    len
                }
            }
        }
    }
    match event {
        AgentEvent::Text { text: t } => text(t, max),
        AgentEvent::Log { line, .. } => text(line, max),
        AgentEvent::ToolUse { input, name, .. } => value(input, max) + name.len(),
        AgentEvent::ToolResult { content, .. } => value(content, max),
        AgentEvent::Raw { value: v } => value(v, max),
        AgentEvent::Init { .. } | AgentEvent::Usage { .. } => 0,
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink")
            .field(
                "connected",
                &self.tx.as_ref().is_some_and(|t| match t {
                    Tx::Channel(tx) => !tx.is_closed(),
                    Tx::Queue(queue) => !queue.is_closed(),
                }),
            )
            .finish()
    }
}

/// Why an [`AgentRequest`] is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Neither a prompt nor a command was given.
    #[error("the request has an empty prompt")]
    EmptyPrompt,
    /// A command request whose argument vector is empty.
    #[error("the request has an empty command")]
    EmptyCommand,
    /// A timeout of zero.
    #[error("the request's timeout is zero")]
    ZeroTimeout,
    /// A timeout past [`MAX_TIMEOUT`].
    #[error("the request's timeout of {0:?} exceeds the maximum of 30 days")]
    TimeoutTooLarge(Duration),
    /// A parameter an executor cannot use as it is (missing, or a value that would start an
    /// argument with `-`): the same request would be refused again, so it is not retried.
    /// `reason` names the parameter, never its value.
    #[error("{reason}")]
    Param {
        /// The parameter's name.
        name: String,
        /// Why it is refused.
        reason: String,
    },
}

/// One agent run: a step of a job.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AgentRequest {
    /// The job this run belongs to.
    pub job_id: JobId,
    /// The step's name.
    pub step: String,
    /// The rendered prompt (empty for command steps).
    pub prompt: String,
    /// For command executors: the rendered argument vector, each element one argument.
    pub command: Option<Vec<String>>,
    /// The job's project directory (canonical, inside the configured root).
    pub project_path: PathBuf,
    /// How long the run may take. The engine enforces it too, by cancelling.
    pub timeout: Duration,
    /// A session to continue (the previous step's, for `resume: true`).
    pub resume_session: Option<String>,
    /// The job's parameters (for executors that want them, e.g. as environment).
    pub params: BTreeMap<String, String>,
    /// What is left of the job's spending cap, in US dollars: an executor that can stop
    /// itself at a cost (claude-code's `--max-budget-usd`) should.
    pub max_budget_usd: Option<f64>,
    /// The JSON Schema the answer must satisfy (the step's `output_schema`): an executor that
    /// can enforce it (claude-code's `--json-schema`) should, and return the parsed answer as
    /// [`AgentResult::structured`]. The engine validates the answer either way.
    pub output_schema: Option<serde_json::Value>,
}

impl AgentRequest {
    /// A prompt run in `project_path` with a 5 minute timeout.
    #[must_use]
    pub fn new(prompt: impl Into<String>, project_path: impl Into<PathBuf>) -> Self {
        Self::of_step(
            JobId::new(),
            "main".to_owned(),
            prompt.into(),
            None,
            project_path.into(),
        )
    }

    /// A run of `step` of job `job_id` (the engine's: it knows both, so it makes no id and no
    /// step name only to replace them).
    pub(crate) fn of_step(
        job_id: JobId,
        step: String,
        prompt: String,
        command: Option<Vec<String>>,
        project_path: PathBuf,
    ) -> Self {
        Self {
            job_id,
            step,
            prompt,
            command,
            project_path,
            timeout: Duration::from_secs(300),
            resume_session: None,
            params: BTreeMap::new(),
            max_budget_usd: None,
            output_schema: None,
        }
    }

    /// A command run (argument vector) in `project_path`.
    #[must_use]
    pub fn command(argv: Vec<String>, project_path: impl Into<PathBuf>) -> Self {
        let mut req = Self::new(String::new(), project_path);
        req.command = Some(argv);
        req
    }

    /// Sets the timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Continues `session`.
    #[must_use]
    pub fn with_resume(mut self, session: impl Into<String>) -> Self {
        self.resume_session = Some(session.into());
        self
    }

    /// Sets the job and step this run belongs to.
    #[must_use]
    pub fn with_step(mut self, job_id: JobId, step: impl Into<String>) -> Self {
        self.job_id = job_id;
        self.step = step.into();
        self
    }

    /// Sets the parameters.
    #[must_use]
    pub fn with_params(mut self, params: BTreeMap<String, String>) -> Self {
        self.params = params;
        self
    }

    /// Checks the request: a prompt (or a non-empty command) and a timeout in `(0, 30 days]`.
    pub fn validate(&self) -> Result<(), RequestError> {
        match &self.command {
            Some(argv) if argv.is_empty() || argv[0].is_empty() => {
                return Err(RequestError::EmptyCommand)
            }
            Some(_) => {}
            None if self.prompt.trim().is_empty() => return Err(RequestError::EmptyPrompt),
            None => {}
        }
        if self.timeout.is_zero() {
            return Err(RequestError::ZeroTimeout);
        }
        if self.timeout > MAX_TIMEOUT {
            return Err(RequestError::TimeoutTooLarge(self.timeout));
        }
        Ok(())
    }
}

/// What an agent run produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AgentResult {
    /// The final text (or the command's standard output).
    pub output: String,
    /// The session the run ended in.
    pub session_id: Option<String>,
    /// Cost in US dollars.
    pub cost_usd: Option<f64>,
    /// Tokens used.
    pub usage: Option<Usage>,
    /// The process exit code, for process-based agents.
    pub exit_code: Option<i32>,
    /// Agent turns.
    pub num_turns: Option<u32>,
    /// The answer as JSON, when the agent produced structured output (see
    /// [`AgentRequest::output_schema`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<serde_json::Value>,
}

impl AgentResult {
    /// A result with `output` and nothing else.
    #[must_use]
    pub fn text(output: impl Into<String>) -> Self {
        Self {
            output: output.into(),
            ..Self::default()
        }
    }

    /// Sets the session id.
    #[must_use]
    pub fn with_session(mut self, session: impl Into<String>) -> Self {
        self.session_id = Some(session.into());
        self
    }

    /// Sets cost and usage.
    #[must_use]
    pub fn with_cost(mut self, cost_usd: f64, usage: Usage) -> Self {
        self.cost_usd = Some(cost_usd);
        self.usage = Some(usage);
        self
    }

    /// Sets the exit code.
    #[must_use]
    pub fn with_exit_code(mut self, code: i32) -> Self {
        self.exit_code = Some(code);
        self
    }

    /// Sets the number of turns.
    #[must_use]
    pub fn with_turns(mut self, turns: u32) -> Self {
        self.num_turns = Some(turns);
        self
    }
}

/// Why an agent run did not produce a result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// The request was not valid.
    #[error("invalid agent request: {0}")]
    InvalidRequest(#[from] RequestError),
    /// The cancellation token fired and the run was stopped.
    #[error("the agent run was cancelled")]
    Cancelled,
    /// The executor's own deadline passed (the engine's timeouts arrive as cancellation).
    #[error("the agent run timed out after {0:?}")]
    TimedOut(Duration),
    /// No output for longer than the idle limit; the run was killed.
    #[error("the agent produced no output for {0:?} and was stopped")]
    Idle(Duration),
    /// The agent could not be started (binary missing, server unreachable, …); the cause is
    /// its source.
    #[error("could not start the agent: {0}")]
    Spawn(#[source] crate::BackendError),
    /// The agent ran and reported failure.
    #[error("the agent failed: {message}")]
    Failed {
        /// What went wrong (for processes, with the tail of stderr).
        message: String,
        /// The exit code, if a process exited.
        exit_code: Option<i32>,
    },
    /// An HTTP agent answered with an error status.
    #[error("the agent server answered {status}: {body}")]
    Http {
        /// The status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The agent spoke something the executor did not understand; the cause is its source.
    #[error("agent protocol error: {0}")]
    Protocol(#[source] crate::BackendError),
    /// The executor is not available (e.g. every pool member's circuit is open).
    #[error("the agent is unavailable: {0}")]
    Unavailable(String),
    /// The agent stopped at one of its limits before it finished; `partial` is what it had
    /// produced (text so far, session id, cost), so the work is not lost and the session can
    /// be resumed.
    #[error("the agent stopped at its {limit} limit")]
    Limit {
        /// Which limit.
        limit: AgentLimit,
        /// What the run produced up to then.
        partial: Box<AgentResult>,
    },
}

/// A limit an agent stops itself at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentLimit {
    /// Its maximum number of turns.
    Turns,
    /// Its spending cap.
    Budget,
}

impl fmt::Display for AgentLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentLimit::Turns => "turn",
            AgentLimit::Budget => "budget",
        })
    }
}

impl ExecutorError {
    /// A failure with a message and no exit code.
    #[must_use]
    pub fn failed(message: impl Into<String>) -> Self {
        ExecutorError::Failed {
            message: message.into(),
            exit_code: None,
        }
    }

    /// A stable machine-readable kind, used as the job error kind.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ExecutorError::InvalidRequest(_) => "invalid_request",
            ExecutorError::Cancelled => "cancelled",
            ExecutorError::TimedOut(_) => "timed_out",
            ExecutorError::Idle(_) => "idle",
            ExecutorError::Spawn(_) => "spawn_failed",
            ExecutorError::Failed { .. } => "agent_failed",
            ExecutorError::Http { .. } => "http_error",
            ExecutorError::Protocol(_) => "protocol_error",
            ExecutorError::Unavailable(_) => "unavailable",
            ExecutorError::Limit {
                limit: AgentLimit::Turns,
                ..
            } => "max_turns",
            ExecutorError::Limit {
                limit: AgentLimit::Budget,
                ..
            } => "budget_exceeded",
        }
    }

    /// Whether another attempt might succeed (invalid requests never do).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ExecutorError::InvalidRequest(_)
                | ExecutorError::Cancelled
                | ExecutorError::Limit { .. }
        )
    }
}

/// What an executor can do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Capabilities {
    /// It can continue a previous session (`resume: true` steps).
    pub resume: bool,
    /// It streams events while it runs.
    pub streaming: bool,
    /// It reports cost and usage.
    pub cost: bool,
}

impl Capabilities {
    /// Capabilities with the three flags.
    #[must_use]
    pub fn new(resume: bool, streaming: bool, cost: bool) -> Self {
        Self {
            resume,
            streaming,
            cost,
        }
    }
}

/// A circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// One probe call is allowed.
    HalfOpen,
}

/// One member of a composite executor (a pool) as health reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct BackendHealth {
    /// The member's name.
    pub name: String,
    /// Whether its last health check passed.
    pub healthy: bool,
    /// Its circuit breaker.
    pub circuit: CircuitState,
}

impl BackendHealth {
    /// A member's health.
    #[must_use]
    pub fn new(name: impl Into<String>, healthy: bool, circuit: CircuitState) -> Self {
        Self {
            name: name.into(),
            healthy,
            circuit,
        }
    }
}

/// The answer to a health check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct Health {
    /// Whether the executor can take work.
    pub healthy: bool,
    /// Why not, or anything worth saying.
    pub detail: Option<String>,
    /// The overall circuit state, for executors with a breaker.
    pub circuit: Option<CircuitState>,
    /// Members, for composite executors.
    pub backends: Vec<BackendHealth>,
}

impl Health {
    /// Healthy, nothing to add.
    #[must_use]
    pub fn healthy() -> Self {
        Self {
            healthy: true,
            detail: None,
            circuit: None,
            backends: Vec::new(),
        }
    }

    /// Unhealthy because of `detail`.
    #[must_use]
    pub fn unhealthy(detail: impl Into<String>) -> Self {
        Self {
            healthy: false,
            detail: Some(detail.into()),
            circuit: None,
            backends: Vec::new(),
        }
    }

    /// Adds a circuit state and members.
    #[must_use]
    pub fn with_backends(mut self, circuit: CircuitState, backends: Vec<BackendHealth>) -> Self {
        self.circuit = Some(circuit);
        self.backends = backends;
        self
    }
}

/// An agent backend.
///
/// `execute` runs one step. It streams what the agent does into `events`, and it must return
/// promptly once `cancel` fires, after everything it started (processes, remote sessions) is
/// stopped: the engine relies on that to report a cancel or a timeout only when nothing is left
/// running. Timeouts reach executors as cancellation; `request.timeout` is informative.
///
/// With the `test-util` feature, `MockExecutor` (generated by mockall) implements this trait.
#[cfg_attr(any(test, feature = "test-util"), mockall::automock)]
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs one agent request to its end.
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError>;

    /// What this executor supports.
    fn capabilities(&self) -> Capabilities;

    /// A short name of the backend kind (`claude-code`, `opencode`, `command`, `pool`, …).
    fn kind(&self) -> &'static str;

    /// Whether the backend can take work now.
    async fn health(&self) -> Health;
}

/// Registered executors, in order, each with its name as the jobs' events share it.
type Entries = Vec<(Arc<str>, Arc<dyn Executor>)>;

/// The entry called `name`, or the default (the first registered) for `None`.
fn find<'a>(all: &'a Entries, name: Option<&str>) -> Option<&'a (Arc<str>, Arc<dyn Executor>)> {
    match name {
        Some(name) => all.iter().find(|(n, _)| **n == *name),
        None => all.first(),
    }
}

/// Executors by name. Thread-safe and cheap to clone; the first registered is the default.
#[derive(Clone, Default)]
pub struct ExecutorRegistry {
    inner: Arc<RwLock<Entries>>,
}

impl ExecutorRegistry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `name`.
    pub fn register(&self, name: impl Into<String>, executor: Arc<dyn Executor>) {
        let name: String = name.into();
        let mut all = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = all.iter_mut().find(|(n, _)| **n == *name) {
            slot.1 = executor;
        } else {
            all.push((Arc::from(name), executor));
        }
    }

    /// The executor called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<dyn Executor>> {
        let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
        find(&all, Some(name)).map(|(_, e)| Arc::clone(e))
    }

    /// The executor called `name` (the default, the first registered, for `None`) with its
    /// name as the registry holds it, shared by the events of the steps it runs.
    pub(crate) fn named(&self, name: Option<&str>) -> Option<(Arc<str>, Arc<dyn Executor>)> {
        let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
        find(&all, name).map(|(n, e)| (Arc::clone(n), Arc::clone(e)))
    }

    /// The first registered executor and its name.
    #[must_use]
    pub fn default_executor(&self) -> Option<(String, Arc<dyn Executor>)> {
        self.named(None).map(|(n, e)| (n.to_string(), e))
    }

    /// The names, in registration order.
    #[must_use]
    pub fn names(&self) -> Vec<String> {
        let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
        all.iter().map(|(n, _)| n.to_string()).collect()
    }

    /// Every (name, executor) pair, in registration order.
    #[must_use]
    pub fn entries(&self) -> Vec<(String, Arc<dyn Executor>)> {
        let all = self.inner.read().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .map(|(n, e)| (n.to_string(), Arc::clone(e)))
            .collect()
    }
}

impl fmt::Debug for ExecutorRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecutorRegistry")
            .field("names", &self.names())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tool's input is measured by its JSON text's length without making the text: the same
    /// length as the text, escapes and non-ASCII included.
    #[test]
    fn a_json_value_is_measured_as_its_text() {
        let values = [
            serde_json::json!({"path": "src/main.rs", "content": "fn main() {}\n\t\"q\""}),
            serde_json::json!(["ünïcödé", 1.5, null, true, {"nested": [1, 2, {"a": "\u{1}"}]}]),
            serde_json::json!({}),
        ];
        for v in values {
            assert_eq!(crate::util::json_len(&v), v.to_string().len(), "{v}");
        }
    }

    #[test]
    fn request_validation_errors_are_distinct() {
        let ok = AgentRequest::new("hi", "/tmp");
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            AgentRequest::new("  ", "/tmp").validate(),
            Err(RequestError::EmptyPrompt)
        );
        assert_eq!(
            ok.clone().with_timeout(Duration::ZERO).validate(),
            Err(RequestError::ZeroTimeout)
        );
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(
            ok.with_timeout(huge).validate(),
            Err(RequestError::TimeoutTooLarge(huge))
        );
        assert_eq!(
            AgentRequest::command(vec![], "/tmp").validate(),
            Err(RequestError::EmptyCommand)
        );
        assert_eq!(
            AgentRequest::command(vec!["ls".into()], "/tmp").validate(),
            Ok(())
        );
    }

    #[test]
    fn registry_first_is_default_and_replace_keeps_order() {
        let reg = ExecutorRegistry::new();
        assert!(reg.default_executor().is_none());
        let a: Arc<dyn Executor> = Arc::new(MockExecutor::new());
        let b: Arc<dyn Executor> = Arc::new(MockExecutor::new());
        reg.register("a", Arc::clone(&a));
        reg.register("b", b);
        reg.register("a", Arc::new(MockExecutor::new()));
        assert_eq!(reg.names(), ["a", "b"]);
        assert_eq!(reg.default_executor().unwrap().0, "a");
        assert!(reg.get("c").is_none());
        assert!(!Arc::ptr_eq(&reg.get("a").unwrap(), &a));
    }

    #[test]
    fn usage_adds_saturating() {
        let u = Usage::new(u64::MAX, 1).add(Usage::new(1, 2));
        assert_eq!(u.input_tokens, u64::MAX);
        assert_eq!(u.output_tokens, 3);
    }

    #[test]
    fn agent_events_serialise_with_a_type_tag() {
        let v = serde_json::to_value(AgentEvent::Text { text: "x".into() }).unwrap();
        assert_eq!(v, serde_json::json!({"type": "text", "text": "x"}));
    }
}
