//! Test support: [`FakeAnthropic`], a scripted Anthropic Messages API server on loopback that
//! the real `claude` and `opencode` programs can use as their model, and [`FakeResponses`], a
//! scripted OpenAI Responses API server for the real `codex`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use aiwg_agents::testing::{FakeAnthropic, Reply};
//! use serde_json::json;
//!
//! // First turn: write a file with the Write tool; second turn (after the tool result): text.
//! let fake = FakeAnthropic::start([
//!     Reply::tool_use("Write", json!({"file_path": "/tmp/p/hello.txt", "content": "hi\n"})),
//!     Reply::text("I wrote the file."),
//! ])
//! .await?;
//! // Point claude at it: ANTHROPIC_BASE_URL and friends, HOME in a fresh folder.
//! for (k, v) in fake.claude_env(std::path::Path::new("/tmp/home")) {
//!     println!("{k}={v}");
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// One scripted answer of the fake model.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Reply {
    /// A text answer (`stop_reason: end_turn`).
    Text(String),
    /// A `tool_use` block (`stop_reason: tool_use`): the client runs the tool and calls again.
    ToolUse {
        /// The tool (`Write`, `Bash`, `write`, `bash`, …).
        name: String,
        /// Its input.
        input: Value,
    },
    /// An HTTP error with an Anthropic-style error body.
    Error {
        /// The status code.
        status: u16,
        /// The error type (`invalid_request_error`, `overloaded_error`, …).
        kind: String,
        /// The message.
        message: String,
    },
    /// Starts streaming and never finishes (a `ping` every second) until the client goes away
    /// or the server is dropped.
    Hang,
}

impl Reply {
    /// A text answer.
    #[must_use]
    pub fn text(t: impl Into<String>) -> Self {
        Reply::Text(t.into())
    }

    /// A tool call.
    #[must_use]
    pub fn tool_use(name: impl Into<String>, input: Value) -> Self {
        Reply::ToolUse {
            name: name.into(),
            input,
        }
    }

    /// An error status with a message.
    #[must_use]
    pub fn error(status: u16, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Reply::Error {
            status,
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// A request the fake server received.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RecordedRequest {
    /// `HEAD`, `POST`, …
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
    /// Whether it was a conversation turn (a `/v1/messages` call offering tools), which takes
    /// the next scripted reply; other calls (title generation, token counting) get canned
    /// answers.
    pub scripted: bool,
    /// The `Authorization` header, if any (recorded by [`FakeResponses`]).
    pub authorization: Option<String>,
}

struct Inner {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<RecordedRequest>>,
    changed: tokio::sync::Notify,
    stop: CancellationToken,
}

/// A scripted fake of the Anthropic Messages API on `127.0.0.1` (a free port).
///
/// It answers `HEAD`/`GET` with 200, `POST /v1/messages/count_tokens` with a token count, and
/// `POST /v1/messages` with the next scripted [`Reply`] for conversation turns (requests that
/// offer tools), streamed as server-sent events (`message_start`, `content_block_start`,
/// `content_block_delta`, `content_block_stop`, `message_delta`, `message_stop`) or as one JSON
/// message when the request does not ask for a stream. Requests without tools (such as title
/// generation) get a short text and do not consume the script. When the script is exhausted it
/// answers `done`. Every request is recorded.
pub struct FakeAnthropic {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeAnthropic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAnthropic")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.task.abort();
    }
}

impl FakeAnthropic {
    /// Starts the server with a script of replies, one per conversation turn.
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            script: Mutex::new(script.into_iter().collect()),
            requests: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            stop: CancellationToken::new(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stop = inner.stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends replies to the script.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(replies);
    }

    /// Every request so far.
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The conversation turns so far (the requests that consumed the script).
    #[must_use]
    pub fn turns(&self) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.scripted).collect()
    }

    /// Waits until at least `n` conversation turns arrived; false after `timeout`.
    pub async fn wait_for_turns(&self, n: usize, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.changed.notified();
                if self.turns().len() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// The environment that points the Claude Code CLI at this server, with `HOME` at `home`.
    #[must_use]
    pub fn claude_env(&self, home: &Path) -> Vec<(String, String)> {
        vec![
            ("ANTHROPIC_BASE_URL".into(), self.url()),
            ("ANTHROPIC_API_KEY".into(), "test".into()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
            ("DISABLE_AUTOUPDATER".into(), "1".into()),
            ("HOME".into(), home.to_string_lossy().into_owned()),
        ]
    }

    /// An `opencode.json` that makes `opencode` use this server as its Anthropic provider.
    #[must_use]
    pub fn opencode_config(&self) -> Value {
        json!({
            "$schema": "https://opencode.ai/config.json",
            "model": "anthropic/claude-sonnet-4-5",
            "provider": {"anthropic": {"options": {"baseURL": format!("{}/v1", self.url()), "apiKey": "test"}}},
            "autoupdate": false,
            "share": "disabled",
        })
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let is_messages = method == Method::POST && uri.path() == "/v1/messages";
    let scripted = is_messages
        && json
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
    let reply = if scripted {
        inner
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or_else(|| Reply::text("done"))
    } else {
        Reply::text("Fake title")
    };
    let stream = json.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_owned();
    inner
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(RecordedRequest {
            method: method.to_string(),
            path,
            body: json,
            scripted,
            authorization: None,
        });
    inner.changed.notify_waiters();

    if method != Method::POST {
        return StatusCode::OK.into_response();
    }
    if uri.path() == "/v1/messages/count_tokens" {
        return axum::Json(json!({"input_tokens": 10})).into_response();
    }
    if !is_messages {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    if let Reply::Error {
        status,
        kind,
        message,
    } = &reply
    {
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, axum::Json(body)).into_response();
    }
    if !stream {
        return axum::Json(whole_message(&reply, &model)).into_response();
    }
    sse_response(reply, model, inner.stop.clone())
}

fn message_start(model: &str) -> Value {
    json!({"type": "message_start", "message": {
        "id": format!("msg_fake_{}", std::process::id()), "type": "message", "role": "assistant",
        "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 1}}})
}

fn whole_message(reply: &Reply, model: &str) -> Value {
    let (content, stop) = match reply {
        Reply::ToolUse { name, input } => (
            json!([{"type": "tool_use", "id": "toolu_fake_1", "name": name, "input": input}]),
            "tool_use",
        ),
        Reply::Text(t) => (json!([{"type": "text", "text": t}]), "end_turn"),
        _ => (json!([{"type": "text", "text": ""}]), "end_turn"),
    };
    json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": 10, "output_tokens": 5}})
}

fn sse(event: &Value) -> Bytes {
    let name = event["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {name}\ndata: {event}\n\n"))
}

fn sse_response(reply: Reply, model: String, stop: CancellationToken) -> Response {
    let mut events = vec![message_start(&model)];
    let finish = |events: &mut Vec<Value>, stop_reason: &str| {
        events.push(json!({"type": "content_block_stop", "index": 0}));
        events.push(json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": 5}}));
        events.push(json!({"type": "message_stop"}));
    };
    let hang = matches!(reply, Reply::Hang);
    match reply {
        Reply::Text(t) => {
            events.push(json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}));
            events.push(json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": t}}));
            finish(&mut events, "end_turn");
        }
        Reply::ToolUse { name, input } => {
            // Unique per call, as the real API's ids are.
            let id = format!(
                "toolu_fake_{}",
                NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            events.push(json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}));
            events.push(json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": input.to_string()}}));
            finish(&mut events, "tool_use");
        }
        Reply::Hang => {
            events.push(json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}));
        }
        Reply::Error { .. } => {}
    }
    let head = futures_util::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(sse(&e)))
            .collect::<Vec<_>>(),
    );
    let body = if hang {
        let pings = futures_util::stream::unfold(stop, |stop| async move {
            tokio::select! {
                () = stop.cancelled() => None,
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    Some((Ok::<_, Infallible>(sse(&json!({"type": "ping"}))), stop))
                }
            }
        });
        Body::from_stream(futures_util::StreamExt::chain(head, pings))
    } else {
        Body::from_stream(head)
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One scripted answer of [`FakeResponses`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ResponsesReply {
    /// An assistant `message` with one `output_text` part, streamed as a text delta.
    Text(String),
    /// A `function_call` item: the Codex CLI runs the tool and calls again with a
    /// `function_call_output` in its input.
    FunctionCall {
        /// The tool (`exec_command` runs a shell command in the Codex CLI 0.169).
        name: String,
        /// Its arguments (sent as a JSON string, as the real API does).
        arguments: Value,
    },
    /// An HTTP error with an OpenAI-style error body.
    Error {
        /// The status code.
        status: u16,
        /// The message.
        message: String,
    },
    /// Starts streaming (`response.created`, an empty message item) and never finishes until
    /// the client goes away or the server is dropped.
    Hang,
}

impl ResponsesReply {
    /// A text answer.
    #[must_use]
    pub fn text(t: impl Into<String>) -> Self {
        ResponsesReply::Text(t.into())
    }

    /// A call of the Codex CLI's `exec_command` tool running `cmd` in a shell (no login shell,
    /// plain pipes, waiting up to 30 s for it before answering the model).
    #[must_use]
    pub fn command(cmd: impl Into<String>) -> Self {
        ResponsesReply::FunctionCall {
            name: "exec_command".into(),
            arguments: json!({"cmd": cmd.into(), "login": false, "yield_time_ms": 30000}),
        }
    }

    /// Any function call.
    #[must_use]
    pub fn function_call(name: impl Into<String>, arguments: Value) -> Self {
        ResponsesReply::FunctionCall {
            name: name.into(),
            arguments,
        }
    }

    /// An error status with a message.
    #[must_use]
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        ResponsesReply::Error {
            status,
            message: message.into(),
        }
    }
}

struct ResponsesInner {
    script: Mutex<VecDeque<ResponsesReply>>,
    requests: Mutex<Vec<RecordedRequest>>,
    changed: tokio::sync::Notify,
    stop: CancellationToken,
}

/// A scripted fake of the OpenAI Responses API on `127.0.0.1` (a free port), for the real
/// Codex CLI (`codex exec`).
///
/// Every `POST /v1/responses` takes the next scripted [`ResponsesReply`] and answers it as
/// server-sent events: `response.created`, `response.output_item.added`,
/// `response.output_text.delta` (text), `response.output_item.done` and `response.completed`
/// with `usage` (10 input tokens of which 2 cached, 5 output tokens). When the script is
/// exhausted it answers `done`. Other paths answer 404. Every request is recorded.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use aiwg_agents::testing::{FakeResponses, ResponsesReply};
///
/// // First turn: run a command; second turn (after its output): text.
/// let fake = FakeResponses::start([
///     ResponsesReply::command("echo hi > hello.txt"),
///     ResponsesReply::text("I wrote the file."),
/// ])
/// .await?;
/// // Point codex at it: a config.toml in a CODEX_HOME of the test's own.
/// std::fs::write("/srv/test/codex-home/config.toml", fake.codex_config_toml())?;
/// # Ok(()) }
/// ```
pub struct FakeResponses {
    addr: SocketAddr,
    inner: Arc<ResponsesInner>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeResponses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeResponses")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FakeResponses {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.task.abort();
    }
}

impl FakeResponses {
    /// Starts the server with a script of replies, one per model request.
    pub async fn start(script: impl IntoIterator<Item = ResponsesReply>) -> std::io::Result<Self> {
        let inner = Arc::new(ResponsesInner {
            script: Mutex::new(script.into_iter().collect()),
            requests: Mutex::new(Vec::new()),
            changed: tokio::sync::Notify::new(),
            stop: CancellationToken::new(),
        });
        let app = axum::Router::new()
            .fallback(handle_responses)
            .layer(DefaultBodyLimit::disable())
            .with_state(Arc::clone(&inner));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let stop = inner.stop.clone();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self { addr, inner, task })
    }

    /// `http://127.0.0.1:<port>/v1`, the provider's `base_url`.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Appends replies to the script.
    pub fn push(&self, replies: impl IntoIterator<Item = ResponsesReply>) {
        self.inner
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(replies);
    }

    /// The model requests so far.
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `n` model requests arrived; false after `timeout`.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.changed.notified();
                if self.requests().len() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// A `config.toml` for `CODEX_HOME` that makes the Codex CLI use this server (model
    /// `gpt-5`, provider `stub` with `wire_api = "responses"`, no retries, no API key, no
    /// update check, no analytics).
    #[must_use]
    pub fn codex_config_toml(&self) -> String {
        format!(
            r#"model = "gpt-5"
model_provider = "stub"
check_for_update_on_startup = false

[analytics]
enabled = false

[model_providers.stub]
name = "stub"
base_url = "{}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
"#,
            self.base_url()
        )
    }
}

async fn handle_responses(
    State(inner): State<Arc<ResponsesInner>>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    if !(method == Method::POST && uri.path() == "/v1/responses") {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = inner
        .script
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop_front()
        .unwrap_or_else(|| ResponsesReply::text("done"));
    inner
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            body: json,
            scripted: true,
            authorization: headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
    inner.changed.notify_waiters();
    if let ResponsesReply::Error { status, message } = &reply {
        let body =
            json!({"error": {"type": "invalid_request_error", "message": message, "code": null}});
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, axum::Json(body)).into_response();
    }
    let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("resp_fake_{n}");
    let mut events = vec![json!({"type": "response.created", "sequence_number": 0,
        "response": {"id": id, "object": "response", "status": "in_progress", "output": []}})];
    let hang = matches!(reply, ResponsesReply::Hang);
    let item = match reply {
        ResponsesReply::Text(text) => {
            let msg_id = format!("msg_fake_{n}");
            events.push(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": msg_id, "role": "assistant", "status": "in_progress", "content": []}}));
            events.push(
                json!({"type": "response.output_text.delta", "item_id": msg_id,
                "output_index": 0, "content_index": 0, "delta": text}),
            );
            Some(
                json!({"type": "message", "id": msg_id, "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}),
            )
        }
        ResponsesReply::FunctionCall { name, arguments } => {
            let item = json!({"type": "function_call", "id": format!("fc_fake_{n}"),
                "call_id": format!("call_fake_{n}"), "name": name,
                "arguments": arguments.to_string(), "status": "completed"});
            events.push(
                json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
            );
            Some(item)
        }
        ResponsesReply::Hang => {
            events.push(json!({"type": "response.output_item.added", "output_index": 0,
                "item": {"type": "message", "id": format!("msg_fake_{n}"), "role": "assistant", "content": []}}));
            None
        }
        ResponsesReply::Error { .. } => None,
    };
    if let Some(item) = item {
        events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
        events.push(json!({"type": "response.completed", "response": {"id": id, "object": "response",
            "status": "completed", "output": [item],
            "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 2},
                "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}}}));
    }
    let head = futures_util::stream::iter(
        events
            .into_iter()
            .map(|e| Ok::<_, Infallible>(sse(&e)))
            .collect::<Vec<_>>(),
    );
    let body = if hang {
        let stop = inner.stop.clone();
        let forever = futures_util::stream::unfold(stop, |stop| async move {
            stop.cancelled().await;
            None::<(Result<Bytes, Infallible>, CancellationToken)>
        });
        Body::from_stream(futures_util::StreamExt::chain(head, forever))
    } else {
        Body::from_stream(head)
    };
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
