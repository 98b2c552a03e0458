//! [`OpenCode`]: a client for `opencode serve`, and [`OpenCodeServer`], a supervised local one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError,
    Health, Usage,
};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::process::{self, Identity, Input, ProcessOptions, Tree};
use crate::{AgentError, ConfigError};

/// The environment variable naming the `opencode` binary for [`OpenCodeServer`].
pub const OPENCODE_PATH_ENV: &str = "AIWG_OPENCODE_PATH";

const BODY_LIMIT: usize = 2000;

/// Runs prompts as sessions of an `opencode serve` server.
///
/// A run subscribes to the server's event stream (`GET /event`), creates a session in the job's
/// project directory (or reuses `resume_session`), sends the prompt with
/// `POST /session/{id}/prompt_async` and follows the events of that session: text parts become
/// [`AgentEvent::Text`], tool parts [`AgentEvent::ToolUse`] and [`AgentEvent::ToolResult`],
/// `step-finish` parts [`AgentEvent::Usage`]; `session.idle` ends the run, `session.error` fails
/// it. Cancel, the request's timeout and the idle watchdog abort the session
/// (`POST /session/{id}/abort`) and wait until the server reports it idle. An HTTP error status
/// is an [`ExecutorError::Http`] with the start of the body.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use aiwg_agents::OpenCode;
/// use aiwg_core::{AgentRequest, EventSink, Executor};
/// use tokio_util::sync::CancellationToken;
///
/// let oc = OpenCode::builder("http://127.0.0.1:4096").password("s3cret").build()?;
/// let res = oc
///     .execute(AgentRequest::new("Summarise the README", "/srv/app"), EventSink::discard(), CancellationToken::new())
///     .await?;
/// println!("{} (session {:?})", res.output, res.session_id);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct OpenCode {
    base: String,
    username: String,
    password: Option<String>,
    model: Option<(String, String)>,
    agent: Option<String>,
    idle_timeout: Option<Duration>,
    abort_wait: Duration,
    client: reqwest::Client,
    /// A supervised server this client owns: it runs as long as a clone of the client does,
    /// and is replaced when it died.
    server: Option<Arc<Supervisor>>,
    /// The process that listens at `base`: nothing is sent once it is gone.
    listener: Option<Identity>,
}

impl std::fmt::Debug for OpenCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCode")
            .field("url", &self.base)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("agent", &self.agent)
            .field("idle_timeout", &self.idle_timeout)
            .field("supervised", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds an [`OpenCode`] client.
#[derive(Clone)]
#[must_use]
pub struct OpenCodeBuilder {
    url: String,
    username: String,
    password: Option<String>,
    model: Option<String>,
    agent: Option<String>,
    idle_timeout: Option<Duration>,
    abort_wait: Duration,
    connect_timeout: Duration,
    server: Option<Arc<Supervisor>>,
    listener: Option<Identity>,
}

impl std::fmt::Debug for OpenCodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeBuilder")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl OpenCode {
    /// A builder for the server at `url` (e.g. `http://127.0.0.1:4096`).
    pub fn builder(url: impl Into<String>) -> OpenCodeBuilder {
        OpenCodeBuilder {
            url: url.into(),
            username: "opencode".into(),
            password: None,
            model: None,
            agent: None,
            idle_timeout: None,
            abort_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            server: None,
            listener: None,
        }
    }

    /// The server's base URL (for a client that owns its server,
    /// [`OpenCodeServer::into_client`], the address the server had when the client was built;
    /// a server started again after it died listens elsewhere).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The process id of the server this client owns ([`OpenCodeServer::into_client`]): the
    /// one running now, or the last one started. `None` for a client of a server it does not
    /// own.
    #[must_use]
    pub fn server_pid(&self) -> Option<u32> {
        let sup = self.server.as_ref()?;
        sup.now.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// This client, aimed at the supervised server it owns, which is started again first if it
    /// died (a client of a server it does not own: itself).
    async fn current(&self) -> Result<std::borrow::Cow<'_, OpenCode>, ExecutorError> {
        let Some(sup) = &self.server else {
            return Ok(std::borrow::Cow::Borrowed(self));
        };
        // In a task of its own: a caller that gives up (a cancel, a health check's timeout)
        // does not stop a new server half-way through its start, and the next caller finds it.
        let (url, listener) = match tokio::spawn(Arc::clone(sup).ensure()).await {
            Ok(r) => r?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down.
            Err(_) => return Err(ExecutorError::Cancelled),
        };
        let mut oc = self.clone();
        oc.base = url;
        oc.listener = listener;
        Ok(std::borrow::Cow::Owned(oc))
    }

    fn req(&self, method: reqwest::Method, path: &str, dir: &Path) -> reqwest::RequestBuilder {
        let mut r = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .query(&[("directory", dir.to_string_lossy().as_ref())]);
        if let Some(p) = &self.password {
            r = r.basic_auth(&self.username, Some(p));
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, ExecutorError> {
        // The server we started is gone: whatever listens at its port now is not ours, and
        // must not get the password.
        if self.listener.is_some_and(|l| !l.alive()) {
            return Err(ExecutorError::Spawn(aiwg_core::BackendError::from(
                "the supervised opencode server is no longer running",
            )));
        }
        let resp = r.send().await.map_err(|source| AgentError::Connect {
            url: self.base.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let mut body = resp.text().await.unwrap_or_default();
        if body.len() > BODY_LIMIT {
            let mut cut = BODY_LIMIT;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        Err(ExecutorError::Http { status, body })
    }

    async fn json(&self, r: reqwest::RequestBuilder) -> Result<Value, ExecutorError> {
        let resp = self.send(r).await?;
        let bytes = resp.bytes().await.map_err(|source| AgentError::Read {
            url: self.base.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|source| {
            AgentError::Json {
                what: "opencode's answer",
                source,
            }
            .into()
        })
    }

    async fn abort(&self, session: &str, dir: &Path) {
        let r = self.req(
            reqwest::Method::POST,
            &format!("/session/{session}/abort"),
            dir,
        );
        if let Err(e) = self.send(r).await {
            tracing::warn!(session, error = %e, "aborting an opencode session failed");
        }
    }

    /// Stops the remote run of `session` and waits until the server says it is idle (each call
    /// bounded by the same wait: a server that never answers does not hold the job).
    async fn stop_session<S, E>(
        &self,
        session: &str,
        dir: &Path,
        sse: &mut Sse<S>,
        st: &mut RunState,
    ) where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    {
        let until = aiwg_core::util::deadline(Instant::now(), self.abort_wait);
        let _ = tokio::time::timeout_at(until, self.abort(session, dir)).await;
        let mut idle = !tokio::time::timeout_at(until, self.is_busy(session, dir))
            .await
            .unwrap_or(false);
        while !idle {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                data = sse.next() => {
                    let Some(data) = data else { break };
                    if let Ok(ev) = serde_json::from_str::<Value>(&data) {
                        if let (true, Step::Idle) = st.handle(&ev, session, &EventSink::discard()) {
                            idle = true;
                        }
                    }
                }
            }
        }
        if !idle {
            idle = !tokio::time::timeout(Duration::from_secs(1), self.is_busy(session, dir))
                .await
                .unwrap_or(true);
        }
        if !idle {
            tracing::warn!(session = %session, "an aborted opencode session did not become idle");
        }
    }

    /// Whether the server reports `session` busy (`GET /session/status`).
    async fn is_busy(&self, session: &str, dir: &Path) -> bool {
        let r = self.req(reqwest::Method::GET, "/session/status", dir);
        match self.json(r).await {
            Ok(v) => v
                .get(session)
                .and_then(|s| s.get("type"))
                .and_then(Value::as_str)
                .is_some_and(|t| t != "idle"),
            Err(_) => false,
        }
    }
}

impl OpenCodeBuilder {
    /// The basic-auth password (`OPENCODE_SERVER_PASSWORD` on the server).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into()).filter(|p: &String| !p.is_empty());
        self
    }

    /// The basic-auth user name (default `opencode`).
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = username.into();
        self
    }

    /// The model as `provider/model` (e.g. `anthropic/claude-sonnet-4-5`); the server's default
    /// otherwise.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The OpenCode agent (e.g. `build`, `plan`).
    pub fn agent(mut self, agent: impl Into<String>) -> Self {
        self.agent = Some(agent.into());
        self
    }

    /// Aborts a run whose session showed no activity for `idle`.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// How long to wait for the session to go idle after an abort.
    pub fn abort_wait(mut self, wait: Duration) -> Self {
        self.abort_wait = wait;
        self
    }

    /// The connect timeout of HTTP calls.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<OpenCode, ConfigError> {
        let base = self.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ConfigError::new(
                "url",
                "must be an http:// or https:// URL",
            ));
        }
        if base.contains('@') {
            return Err(ConfigError::new(
                "url",
                "put credentials in `password`, not in the URL",
            ));
        }
        let model = match self.model {
            None => None,
            Some(m) => match m.split_once('/') {
                Some((p, id)) if !p.is_empty() && !id.is_empty() => {
                    Some((p.to_owned(), id.to_owned()))
                }
                _ => return Err(ConfigError::new("model", "must be `provider/model`")),
            },
        };
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("idle_timeout", "must be more than zero"));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::new("url", "cannot build an HTTP client").with_source(e))?;
        Ok(OpenCode {
            base,
            username: self.username,
            password: self.password,
            model,
            agent: self.agent,
            idle_timeout: self.idle_timeout,
            abort_wait: self.abort_wait,
            client,
            server: self.server,
            listener: self.listener,
        })
    }
}

/// The largest event (or line of one) read from the server: past it the stream is treated as
/// ended, so a server cannot make the client hold an unbounded line.
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// Server-sent events: `data:` lines joined, dispatched on a blank line.
struct Sse<S> {
    stream: S,
    buf: Vec<u8>,
    /// Where the line being read starts in `buf`: what is before it was read. It is removed
    /// once a chunk's lines are read, not line by line (which moved the rest of the chunk for
    /// every line: a burst of events in one chunk cost its size times its lines).
    start: usize,
    /// How much of `buf` is known to hold no newline (each chunk is searched once).
    scanned: usize,
    data: String,
}

impl<S, E> Sse<S>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            data: String::new(),
        }
    }

    /// The next event's data, or `None` when the stream ends (or sends a line or an event past
    /// [`MAX_EVENT_BYTES`]).
    async fn next(&mut self) -> Option<String> {
        loop {
            while let Some(at) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
                let end = self.scanned + at;
                let mut line = &self.buf[self.start..end];
                self.start = end + 1;
                self.scanned = self.start;
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                let line = String::from_utf8_lossy(line);
                if line.is_empty() {
                    if !self.data.is_empty() {
                        return Some(std::mem::take(&mut self.data));
                    }
                } else if let Some(d) = line.strip_prefix("data:") {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            self.buf.drain(..self.start);
            self.start = 0;
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_EVENT_BYTES || self.data.len() > MAX_EVENT_BYTES {
                return None;
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// What the event stream told about the run so far.
#[derive(Default)]
struct RunState {
    roles: HashMap<String, String>,
    /// Assistant messages in order, each with its text parts in order.
    texts: Vec<(String, Vec<(String, String)>)>,
    emitted_text: HashSet<String>,
    tools_started: HashSet<String>,
    tools_done: HashSet<String>,
    cost: f64,
    usage: Usage,
    saw_cost: bool,
    busy: bool,
}

enum Step {
    Continue,
    Idle,
    Error(String),
}

fn session_of(props: &Value) -> Option<&str> {
    props
        .get("sessionID")
        .or_else(|| props.get("part").and_then(|p| p.get("sessionID")))
        .or_else(|| props.get("info").and_then(|p| p.get("sessionID")))
        .and_then(Value::as_str)
}

impl RunState {
    fn handle(&mut self, ev: &Value, session: &str, events: &EventSink) -> (bool, Step) {
        let kind = ev.get("type").and_then(Value::as_str).unwrap_or("");
        let props = ev.get("properties").unwrap_or(&Value::Null);
        if session_of(props) != Some(session) {
            return (false, Step::Continue);
        }
        match kind {
            "message.updated" => {
                let info = &props["info"];
                if let (Some(id), Some(role)) = (info["id"].as_str(), info["role"].as_str()) {
                    self.roles.insert(id.to_owned(), role.to_owned());
                }
            }
            "message.part.updated" => self.part(&props["part"], events),
            "session.status" => match props["status"]["type"].as_str() {
                Some("busy" | "retry") => self.busy = true,
                Some("idle") if self.busy => return (true, Step::Idle),
                _ => {}
            },
            "session.idle" => return (true, Step::Idle),
            "session.error" => {
                let err = &props["error"];
                let name = err["name"].as_str().unwrap_or("error");
                let msg = err["data"]["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| err.to_string());
                return (true, Step::Error(format!("{name}: {msg}")));
            }
            _ => {}
        }
        (true, Step::Continue)
    }

    fn part(&mut self, part: &Value, events: &EventSink) {
        let id = part["id"].as_str().unwrap_or_default().to_owned();
        let msg = part["messageID"].as_str().unwrap_or_default().to_owned();
        let assistant = self.roles.get(&msg).is_some_and(|r| r == "assistant");
        match part["type"].as_str() {
            Some("text") if assistant => {
                let text = part["text"].as_str().unwrap_or_default().to_owned();
                let done = part["time"].get("end").is_some();
                if done && !self.emitted_text.contains(&id) && !text.is_empty() {
                    self.emitted_text.insert(id.clone());
                    events.emit(AgentEvent::Text { text: text.clone() });
                }
                let entry = match self.texts.iter_mut().find(|(m, _)| *m == msg) {
                    Some(e) => e,
                    None => {
                        self.texts.push((msg.clone(), Vec::new()));
                        self.texts.last_mut().expect("just pushed")
                    }
                };
                match entry.1.iter_mut().find(|(p, _)| *p == id) {
                    Some(p) => p.1 = text,
                    None => entry.1.push((id, text)),
                }
            }
            Some("tool") => {
                let state = &part["state"];
                let status = state["status"].as_str().unwrap_or("");
                let call = part["callID"].as_str().map(str::to_owned);
                if matches!(status, "running" | "completed" | "error")
                    && self.tools_started.insert(id.clone())
                {
                    events.emit(AgentEvent::ToolUse {
                        id: call.clone(),
                        name: part["tool"].as_str().unwrap_or_default().to_owned(),
                        input: state.get("input").cloned().unwrap_or(Value::Null),
                    });
                }
                if matches!(status, "completed" | "error") && self.tools_done.insert(id) {
                    let is_error = status == "error";
                    let content = if is_error {
                        state.get("error").cloned()
                    } else {
                        state.get("output").cloned()
                    };
                    events.emit(AgentEvent::ToolResult {
                        tool_use_id: call,
                        content: content.unwrap_or(Value::Null),
                        is_error,
                    });
                }
            }
            Some("step-finish") => {
                let t = &part["tokens"];
                let mut u = Usage::new(
                    t["input"].as_u64().unwrap_or(0),
                    t["output"].as_u64().unwrap_or(0),
                );
                u.cache_read_input_tokens = t["cache"]["read"].as_u64().unwrap_or(0);
                u.cache_creation_input_tokens = t["cache"]["write"].as_u64().unwrap_or(0);
                let cost = part["cost"].as_f64();
                if let Some(c) = cost {
                    self.cost += c;
                    self.saw_cost = true;
                }
                self.usage = self.usage.add(u);
                events.emit(AgentEvent::Usage {
                    cost_usd: cost,
                    usage: u,
                });
            }
            _ => {}
        }
    }

    fn output(&self) -> String {
        self.texts
            .last()
            .map(|(_, parts)| {
                parts
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

impl OpenCode {
    /// One run on the server at `self.base`.
    async fn run(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        let dir = request.project_path.as_path();
        // At most `MAX_TIMEOUT` from now: `validate` refuses longer.
        let deadline = aiwg_core::util::deadline(Instant::now(), request.timeout);
        // The calls before the run are raced against the cancel and the timeout too: a server
        // that accepts connections and never answers would otherwise hold the job forever.
        let limit = (&cancel, deadline, request.timeout);
        // Subscribe first so that nothing the session does is missed.
        let stream = bounded(
            limit,
            self.send(
                self.req(reqwest::Method::GET, "/event", dir)
                    .header("accept", "text/event-stream"),
            ),
        )
        .await?;
        let mut sse = Sse::new(stream.bytes_stream());
        let session = match &request.resume_session {
            Some(s) => {
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(ExecutorError::Spawn(aiwg_core::BackendError::from(
                        "the session to resume is not a valid opencode session id",
                    )));
                }
                s.clone()
            }
            None => {
                let created = bounded(
                    limit,
                    self.json(
                        self.req(reqwest::Method::POST, "/session", dir)
                            .json(&json!({})),
                    ),
                )
                .await?;
                created["id"]
                    .as_str()
                    .ok_or_else(|| {
                        ExecutorError::Protocol(aiwg_core::BackendError::from(
                            "opencode created a session without an id",
                        ))
                    })?
                    .to_owned()
            }
        };
        let mut body = json!({"parts": [{"type": "text", "text": request.prompt}]});
        if let Some((provider, model)) = &self.model {
            body["model"] = json!({"providerID": provider, "modelID": model});
        }
        if let Some(agent) = &self.agent {
            body["agent"] = json!(agent);
        }
        let prompted = bounded(
            limit,
            self.send(
                self.req(
                    reqwest::Method::POST,
                    &format!("/session/{session}/prompt_async"),
                    dir,
                )
                .json(&body),
            ),
        )
        .await;
        let mut st = RunState::default();
        match prompted {
            Ok(_) => {}
            // Cancelled or out of time while the prompt was on its way: the run may have
            // started, so it is stopped like any other.
            Err(e @ (ExecutorError::Cancelled | ExecutorError::TimedOut(_))) => {
                self.stop_session(&session, dir, &mut sse, &mut st).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
        let mut idle_deadline = self
            .idle_timeout
            .map(|d| aiwg_core::util::deadline(Instant::now(), d));
        let stop = loop {
            let idle_sleep = async {
                match idle_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => break ExecutorError::Cancelled,
                () = tokio::time::sleep_until(deadline) => break ExecutorError::TimedOut(request.timeout),
                () = idle_sleep => break ExecutorError::Idle(self.idle_timeout.unwrap_or_default()),
                data = sse.next() => {
                    let Some(data) = data else {
                        break ExecutorError::Protocol(aiwg_core::BackendError::from("opencode's event stream ended during the run"));
                    };
                    let Ok(ev) = serde_json::from_str::<Value>(&data) else { continue };
                    let (ours, step) = st.handle(&ev, &session, &events);
                    if ours {
                        idle_deadline = self.idle_timeout.map(|d| aiwg_core::util::deadline(Instant::now(), d));
                    }
                    match step {
                        Step::Continue => {}
                        Step::Idle => {
                            let mut out = AgentResult::text(st.output()).with_session(session.clone());
                            if st.saw_cost {
                                out = out.with_cost(st.cost, st.usage);
                            } else if st.usage != Usage::default() {
                                out.usage = Some(st.usage);
                            }
                            return Ok(out);
                        }
                        Step::Error(message) => {
                            return Err(ExecutorError::Failed { message, exit_code: None });
                        }
                    }
                }
            }
        };
        self.stop_session(&session, dir, &mut sse, &mut st).await;
        Err(stop)
    }
}

#[async_trait]
impl Executor for OpenCode {
    /// Runs the prompt; a supervised server that died since the last run
    /// ([`OpenCodeServer::into_client`]) is started again first.
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let deadline = aiwg_core::util::deadline(Instant::now(), request.timeout);
        let limit = (&cancel, deadline, request.timeout);
        let oc = bounded(limit, self.current()).await?;
        oc.run(request, events, cancel).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, true)
    }

    fn kind(&self) -> &'static str {
        "opencode"
    }

    /// Asks the server (`GET /path`); a supervised server that died is started again first, so
    /// that a pool's health checks bring it back.
    async fn health(&self) -> Health {
        let oc = match self.current().await {
            Ok(oc) => oc,
            Err(e) => return Health::unhealthy(e.to_string()),
        };
        let mut r = oc.client.get(format!("{}/path", oc.base));
        if let Some(p) = &oc.password {
            r = r.basic_auth(&oc.username, Some(p));
        }
        match tokio::time::timeout(Duration::from_secs(5), oc.send(r)).await {
            Ok(Ok(_)) => Health::healthy(),
            Ok(Err(e)) => Health::unhealthy(e.to_string()),
            Err(_) => Health::unhealthy("opencode did not answer within 5 s"),
        }
    }
}

/// `call`, unless `cancel` fires or `deadline` passes first (the request's `timeout`).
async fn bounded<T>(
    (cancel, deadline, timeout): (&CancellationToken, Instant, Duration),
    call: impl std::future::Future<Output = Result<T, ExecutorError>>,
) -> Result<T, ExecutorError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ExecutorError::Cancelled),
        () = tokio::time::sleep_until(deadline) => Err(ExecutorError::TimedOut(timeout)),
        r = call => r,
    }
}

/// A local `opencode serve` started and supervised by aiwg: own process group, scrubbed
/// environment and the rest of its [`ProcessOptions`] (a sandbox among them), readiness check,
/// killed (`SIGKILL`: it ignores `SIGTERM`) on
/// [`shutdown`](OpenCodeServer::shutdown) or drop.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use aiwg_agents::OpenCodeServer;
///
/// let server = OpenCodeServer::builder("/srv/app").password("s3cret").start().await?;
/// let client = server.client().build()?;
/// // … register `client` as an executor …
/// server.shutdown().await;
/// # Ok(()) }
/// ```
pub struct OpenCodeServer {
    url: String,
    password: Option<String>,
    child: tokio::process::Child,
    /// The child when it started: requests carrying the password are only sent while it runs.
    identity: Option<Identity>,
    tree: Tree,
    _run_dir: Option<tempfile::TempDir>,
    /// How it was started, to start it again.
    spec: OpenCodeServerBuilder,
}

/// The supervised server a client owns ([`OpenCodeServer::into_client`]): kept running, and
/// started again (as the first one was) when its process is found gone.
struct Supervisor {
    spec: OpenCodeServerBuilder,
    slot: tokio::sync::Mutex<Option<OpenCodeServer>>,
    /// The URL and pid of the last server started (for [`OpenCode::server_pid`]).
    now: std::sync::Mutex<(String, Option<u32>)>,
}

impl Supervisor {
    fn new(server: OpenCodeServer) -> Self {
        Self {
            spec: server.spec.clone(),
            now: std::sync::Mutex::new((server.url.clone(), server.pid())),
            slot: tokio::sync::Mutex::new(Some(server)),
        }
    }

    /// The URL and process of a running server: the current one while its process runs, else
    /// a new one, started the way the first was (its port chosen the same way). The dead one's
    /// leftovers are killed first.
    async fn ensure(self: Arc<Self>) -> Result<(String, Option<Identity>), ExecutorError> {
        let mut slot = self.slot.lock().await;
        if let Some(server) = slot.as_mut() {
            // (A multi-threaded process killed shows as a zombie before it can be waited for:
            // gone all the same.)
            let exited = match server.child.try_wait() {
                Ok(None) => server.identity.is_some_and(|i| !i.alive()),
                Ok(Some(_)) => {
                    server.tree.reaped();
                    true
                }
                Err(e) => {
                    tracing::warn!(target: "aiwg_agents::opencode", error = %e, "waiting for the supervised opencode server failed");
                    true
                }
            };
            if !exited {
                return Ok((server.url.clone(), server.identity));
            }
            tracing::warn!(
                target: "aiwg_agents::opencode",
                url = %server.url,
                "the supervised opencode server exited; starting a new one"
            );
            if let Some(dead) = slot.take() {
                dead.shutdown().await;
            }
        }
        // (An empty slot: the last start failed; this one tries again.)
        let server = self.spec.clone().start().await?;
        let out = (server.url.clone(), server.identity);
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = (server.url.clone(), server.pid());
        *slot = Some(server);
        Ok(out)
    }
}

impl Drop for OpenCodeServer {
    fn drop(&mut self) {
        // Before the fields go (the child is killed when dropped): the server's tools run in
        // process groups of their own, and once the server is dead they belong to init, out of
        // reach of the tree's scan. (After `shutdown` the tree is finished: nothing to do.)
        self.tree.kill_now();
    }
}

impl std::fmt::Debug for OpenCodeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeServer")
            .field("url", &self.url)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// Builds and starts an [`OpenCodeServer`].
#[derive(Clone)]
#[must_use]
pub struct OpenCodeServerBuilder {
    binary: Option<PathBuf>,
    dir: PathBuf,
    port: u16,
    password: Option<String>,
    startup_timeout: Duration,
    process: ProcessOptions,
}

impl std::fmt::Debug for OpenCodeServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeServerBuilder")
            .field("binary", &self.binary)
            .field("dir", &self.dir)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("startup_timeout", &self.startup_timeout)
            .field("process", &self.process)
            .finish()
    }
}

impl OpenCodeServer {
    /// A builder for a server whose working directory is `dir` (where `opencode.json` is read).
    pub fn builder(dir: impl Into<PathBuf>) -> OpenCodeServerBuilder {
        OpenCodeServerBuilder {
            binary: None,
            dir: dir.into(),
            port: 0,
            password: None,
            startup_timeout: Duration::from_secs(60),
            process: ProcessOptions::default(),
        }
    }

    /// The server's base URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// A client builder for this server (URL and password filled in). The client sends
    /// nothing once this server's process is gone (its port may then be anyone's): its runs and
    /// health checks fail instead.
    pub fn client(&self) -> OpenCodeBuilder {
        let mut b = OpenCode::builder(self.url.clone());
        b.listener = self.identity;
        match &self.password {
            Some(p) => b.password(p.clone()),
            None => b,
        }
    }

    /// A client builder for this server that owns it: the server keeps running as long as the
    /// client built from it (or a clone) lives, and is killed with the last one. When its
    /// process is found gone (a crash, a kill) before a run or a health check, a new server is
    /// started the way this one was (its port chosen the same way) and used from then on;
    /// nothing, the password least of all, is sent to a port whose server process is gone.
    pub fn into_client(self) -> OpenCodeBuilder {
        let mut b = self.client();
        b.server = Some(Arc::new(Supervisor::new(self)));
        b
    }

    /// Kills the server and everything it started, and waits until they are gone.
    pub async fn shutdown(mut self) {
        process::terminate(&mut self.child, &mut self.tree, Duration::ZERO).await;
    }
}

impl OpenCodeServerBuilder {
    /// The `opencode` binary (default: `AIWG_OPENCODE_PATH`, else `opencode` on the `PATH`).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The port (default 0: the server picks one and reports it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Requires basic auth with this password (`OPENCODE_SERVER_PASSWORD`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// How long to wait for the server to answer.
    pub fn startup_timeout(mut self, t: Duration) -> Self {
        self.startup_timeout = t;
        self
    }

    /// Environment, limits and sandbox of the server's process (its idle watchdog is unused).
    /// In a sandbox, the server's working directory is the writable project directory.
    pub fn process(mut self, options: ProcessOptions) -> Self {
        self.process = options;
        self
    }

    /// Starts the server and waits until it answers (asked only while the process started
    /// runs: once it is gone its port may be anyone's).
    pub async fn start(self) -> Result<OpenCodeServer, AgentError> {
        let spec = self.clone();
        let binary = self
            .binary
            .or_else(|| std::env::var_os(OPENCODE_PATH_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("opencode"));
        let mut sup = self.process.check()?;
        if let Some(p) = &self.password {
            sup.set_env("OPENCODE_SERVER_PASSWORD", p.clone());
        }
        let args = vec![
            "serve".to_owned(),
            "--port".to_owned(),
            self.port.to_string(),
            "--hostname".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let spawned = process::spawn(&binary, &args, &self.dir, &sup, Input::Null)?;
        let mut child = spawned.child;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let identity = child.id().and_then(Identity::of);
        let mut server = OpenCodeServer {
            url: String::new(),
            password: self.password,
            child,
            identity,
            tree: spawned.tree,
            _run_dir: spawned.run_dir,
            spec,
        };
        let until = aiwg_core::util::deadline(Instant::now(), self.startup_timeout);
        let (url_tx, mut url_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        // Keep reading both pipes for the server's whole life so that it never blocks on them:
        // in bounded pieces, and past bytes that are not UTF-8 (a `lines()` reader held a line
        // without end whole, and stopped reading at the first invalid byte).
        if let Some(out) = stdout {
            let tx = url_tx.clone();
            tokio::spawn(async move {
                let mut lines = process::LineReader::new(Some(out));
                while let Some(l) = lines.next().await {
                    if let Some(pos) = l.find("http://") {
                        let _ = tx.send(l[pos..].trim().to_owned());
                    }
                    tracing::debug!(target: "aiwg_agents::opencode", "{l}");
                }
            });
        }
        if let Some(err) = stderr {
            tokio::spawn(async move {
                let mut lines = process::LineReader::new(Some(err));
                while let Some(l) = lines.next().await {
                    tracing::debug!(target: "aiwg_agents::opencode", "{l}");
                }
            });
        }
        drop(url_tx);
        let url = match tokio::time::timeout_at(until, url_rx.recv()).await {
            Ok(Some(u)) => u.trim_end_matches('/').to_owned(),
            Ok(None) => {
                let code = server.child.try_wait().ok().flatten();
                server.shutdown().await;
                return Err(AgentError::Server(format!(
                    "opencode serve ended before it listened ({code:?})"
                )));
            }
            Err(_) => {
                server.shutdown().await;
                return Err(AgentError::Server(
                    "opencode serve did not report its address in time".into(),
                ));
            }
        };
        server.url = url;
        // Ready when an API call answers, asked while our process runs (each call checks it).
        let client = match server.client().build() {
            Ok(c) => c,
            Err(e) => {
                server.shutdown().await;
                return Err(e.into());
            }
        };
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                server.tree.reaped();
                server.shutdown().await;
                return Err(AgentError::Server(format!(
                    "opencode serve exited before it was ready ({status})"
                )));
            }
            if client.health().await.healthy {
                return Ok(server);
            }
            if Instant::now() >= until {
                server.shutdown().await;
                return Err(AgentError::Server(
                    "opencode serve did not become ready in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: Vec<Vec<u8>>,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, ()>> + Unpin {
        futures_util::stream::iter(parts.into_iter().map(|p| Ok(bytes::Bytes::from(p))))
    }

    /// Events split across chunks are joined; a line that never ends is not held past the
    /// bound: the stream ends instead.
    #[tokio::test]
    async fn events_are_read_across_chunks_and_an_endless_line_ends_the_stream() {
        let mut sse = Sse::new(chunks(vec![
            b"data: {\"a\":".to_vec(),
            b"1}\r\n\ndata: x\ndata: y\n\n".to_vec(),
        ]));
        assert_eq!(sse.next().await.as_deref(), Some("{\"a\":1}"));
        assert_eq!(sse.next().await.as_deref(), Some("x\ny"));
        assert_eq!(sse.next().await, None);

        // Many events in one chunk, each read once, in order; an event's lines can end a chunk
        // and its blank line start the next.
        let burst: Vec<u8> = (0..500)
            .flat_map(|i| format!("data: {i}\n\n").into_bytes())
            .chain(b"data: last\n".iter().copied())
            .collect();
        let mut sse = Sse::new(chunks(vec![burst, b"\n".to_vec()]));
        for i in 0..500 {
            assert_eq!(sse.next().await, Some(i.to_string()));
        }
        assert_eq!(sse.next().await.as_deref(), Some("last"));
        assert_eq!(sse.next().await, None);

        let piece = vec![b'x'; 64 * 1024];
        let endless = std::iter::once(b"data: ".to_vec())
            .chain(std::iter::repeat_n(
                piece,
                MAX_EVENT_BYTES / (64 * 1024) + 2,
            ))
            .chain(std::iter::once(b"\n\n".to_vec()))
            .collect();
        let mut sse = Sse::new(chunks(endless));
        assert_eq!(sse.next().await, None);
        assert!(sse.buf.len() <= MAX_EVENT_BYTES + 64 * 1024);
    }
}
