//! Test support: [`FakeAnthropic`], a scripted Anthropic Messages API server on loopback that
//! the real `claude` and `opencode` programs can use as their model.
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
