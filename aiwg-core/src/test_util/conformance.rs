//! The HTTP conformance suite: one set of checks that the HTTP layer passes in process and that
//! every router adapter (axum, actix-web) passes over real HTTP on loopback.
//!
//! An adapter's test implements [`Serve`] — put an [`Api`] on a loopback port under a prefix —
//! and calls [`conformance_suite`]. The suite talks to what it serves through a [`Transport`]:
//! over HTTP for a [`Served::new`] server, or straight to the [`Api`] for [`InProcess`], which
//! runs the same checks against the framework-neutral layer alone (`ApiRequest` in,
//! `ApiResponse` out, SSE read from [`ApiBody::Stream`]), like
//! juniper's `http::tests` run one suite against every integration. The suite builds its own
//! engines with scripted executors, so it needs no agent and no network beyond 127.0.0.1.
//!
//! ```
//! use aiwg_core::test_util::conformance::{conformance_suite, InProcess};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)] async fn main() {
//! # if false {
//! conformance_suite(&InProcess).await;
//! # }
//! # }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Value};

use super::ScriptedExecutor;
use crate::dispatch::Dispatcher;
use crate::engine::FeedCursor;
use crate::http::{
    Access, Api, ApiBody, ApiKey, ApiRequest, RateLimit, Route, Scope, WsClose, WsMessage, ROUTES,
};
use crate::{AgentEvent, Engine, ProjectPolicy, Step, Workflow};

/// A body as it arrives: chunks, in order, as they are flushed.
pub type BodyStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// One request of the suite, relative to the served base (`/jobs?limit=2`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportRequest {
    /// The method.
    pub method: Method,
    /// Path and query, relative to the base (starts with `/`).
    pub path: String,
    /// Headers.
    pub headers: HeaderMap,
    /// The body (empty for none).
    pub body: Bytes,
    /// Send the body in chunks without a `Content-Length`.
    pub chunked: bool,
}

impl TransportRequest {
    /// A request without headers or body.
    #[must_use]
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            chunked: false,
        }
    }

    /// Adds a header (panics on an invalid name or value: this is test code).
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends the body in chunks, without a `Content-Length`.
    #[must_use]
    pub fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
}

/// An answer: status and headers at once, the body as it streams.
#[non_exhaustive]
pub struct TransportResponse {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names; the last value of a repeated header).
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: BodyStream,
}

impl std::fmt::Debug for TransportResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl TransportResponse {
    /// An answer from its parts.
    #[must_use]
    pub fn new(status: u16, headers: BTreeMap<String, String>, body: BodyStream) -> Self {
        Self {
            status,
            headers,
            body,
        }
    }
}

/// How the suite reaches what it tests: send one request, get the status and headers, then the
/// body as a stream (SSE answers never end on their own before the job does).
pub trait Transport: Send + Sync {
    /// Sends `request`.
    fn send(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = TransportResponse> + Send + '_>>;

    /// Opens a WebSocket with `request`'s path and headers (a `GET` upgrade): the connection,
    /// or the HTTP answer that refused the upgrade.
    fn websocket(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WsClient, TransportResponse>> + Send + '_>>;
}

/// A WebSocket connection of the suite, its messages as [`WsMessage`]s whatever the
/// transport (a real client, tokio-tungstenite, over HTTP; the [`WsSession`](crate::http::WsSession)
/// itself in process).
#[derive(Debug)]
pub struct WsClient {
    tx: tokio::sync::mpsc::UnboundedSender<WsMessage>,
    rx: tokio::sync::mpsc::UnboundedReceiver<WsMessage>,
}

impl WsClient {
    /// Sends a message to the server.
    pub fn send(&self, message: WsMessage) {
        let _ = self.tx.send(message);
    }

    /// Sends `{"type": "auth", "token": token}`.
    pub fn auth(&self, token: &str) {
        self.send(WsMessage::Text(
            json!({"type": "auth", "token": token}).to_string(),
        ));
    }

    /// The next message from the server (pings and pongs included), `None` once the
    /// connection is gone (or after 20 s of silence).
    pub async fn next(&mut self) -> Option<WsMessage> {
        tokio::time::timeout(WAIT, self.rx.recv()).await.ok()?
    }

    /// The next text message as JSON, skipping pings and pongs; `Err` with the close frame
    /// (`None` without one) when the connection closes instead.
    pub async fn next_json(&mut self) -> Result<Value, Option<WsClose>> {
        loop {
            match self.next().await {
                Some(WsMessage::Text(t)) => {
                    return Ok(
                        serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
                    )
                }
                Some(WsMessage::Close(c)) => return Err(c),
                None => return Err(None),
                Some(_) => {}
            }
        }
    }

    /// Reads until the server closes, returning every text message as JSON and the close
    /// frame (panics if the connection ends without one).
    pub async fn until_close(&mut self) -> (Vec<Value>, WsClose) {
        let mut out = Vec::new();
        loop {
            match self.next_json().await {
                Ok(v) => out.push(v),
                Err(Some(c)) => return (out, c),
                Err(None) => panic!("the connection ended without a close frame after {out:?}"),
            }
        }
    }
}

/// A pair of channels standing for a socket: what the client sends, what it receives.
fn ws_channels() -> (
    WsClient,
    tokio::sync::mpsc::UnboundedReceiver<WsMessage>,
    tokio::sync::mpsc::UnboundedSender<WsMessage>,
) {
    let (tx, from_client) = tokio::sync::mpsc::unbounded_channel();
    let (to_client, rx) = tokio::sync::mpsc::unbounded_channel();
    (WsClient { tx, rx }, from_client, to_client)
}

fn tungstenite_in(m: tokio_tungstenite::tungstenite::Message) -> Option<WsMessage> {
    use tokio_tungstenite::tungstenite::Message as M;
    Some(match m {
        M::Text(t) => WsMessage::Text(t.as_str().to_owned()),
        M::Binary(b) => WsMessage::Binary(b),
        M::Ping(p) => WsMessage::Ping(p),
        M::Pong(p) => WsMessage::Pong(p),
        M::Close(c) => {
            WsMessage::Close(c.map(|c| WsClose::new(u16::from(c.code), c.reason.as_str())))
        }
        M::Frame(_) => return None,
    })
}

fn tungstenite_out(m: WsMessage) -> tokio_tungstenite::tungstenite::Message {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message as M;
    match m {
        WsMessage::Text(t) => M::text(t),
        WsMessage::Binary(b) => M::Binary(b),
        WsMessage::Ping(p) => M::Ping(p),
        WsMessage::Pong(p) => M::Pong(p),
        WsMessage::Close(c) => M::Close(c.map(|c| CloseFrame {
            code: c.code.into(),
            reason: c.reason.into(),
        })),
    }
}

/// Real HTTP to a server at a base URL (`http://127.0.0.1:<port><prefix>`).
#[derive(Clone, Debug)]
pub struct HttpTransport {
    http: reqwest::Client,
    base: String,
}

impl HttpTransport {
    /// A transport to the server at `base`.
    #[must_use]
    pub fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            base: base.trim_end_matches('/').to_owned(),
        }
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}

impl Transport for HttpTransport {
    fn send(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = TransportResponse> + Send + '_>> {
        Box::pin(async move {
            let url = format!("{}{}", self.base, request.path);
            let mut rb = self
                .http
                .request(request.method, url)
                .headers(request.headers);
            if request.chunked {
                let chunks: Vec<Result<Bytes, std::io::Error>> = request
                    .body
                    .chunks(512)
                    .map(|c| Ok(Bytes::copy_from_slice(c)))
                    .collect();
                rb = rb.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    chunks,
                )));
            } else if !request.body.is_empty() {
                rb = rb.body(request.body);
            }
            let res = rb.send().await.expect("request");
            let status = res.status().as_u16();
            let headers = header_map(res.headers());
            // A transport error ends the body, as a closed connection would.
            let body = res
                .bytes_stream()
                .take_while(|chunk| std::future::ready(chunk.is_ok()))
                .filter_map(|chunk| std::future::ready(chunk.ok()));
            TransportResponse::new(status, headers, Box::pin(body))
        })
    }

    fn websocket(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WsClient, TransportResponse>> + Send + '_>> {
        Box::pin(async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let url = format!("ws{}{}", self.base.trim_start_matches("http"), request.path);
            let mut req = url
                .as_str()
                .into_client_request()
                .expect("a WebSocket request");
            for (k, v) in &request.headers {
                req.headers_mut().append(k.clone(), v.clone());
            }
            let stream = match tokio_tungstenite::connect_async(req).await {
                Ok((stream, _)) => stream,
                Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                    let body = Bytes::from(res.body().clone().unwrap_or_default());
                    return Err(TransportResponse::new(
                        res.status().as_u16(),
                        header_map(res.headers()),
                        Box::pin(futures_util::stream::once(async { body })),
                    ));
                }
                Err(e) => panic!("WebSocket connection to {url}: {e}"),
            };
            let (client, mut from_client, to_client) = ws_channels();
            let (mut sink, mut source) = stream.split();
            tokio::spawn(async move {
                use futures_util::SinkExt;
                loop {
                    tokio::select! {
                        m = source.next() => match m.and_then(Result::ok) {
                            Some(m) => {
                                if let Some(m) = tungstenite_in(m) {
                                    if to_client.send(m).is_err() {
                                        break;
                                    }
                                }
                            }
                            None => break,
                        },
                        m = from_client.recv() => match m {
                            Some(m) => {
                                if sink.send(tungstenite_out(m)).await.is_err() {
                                    break;
                                }
                            }
                            None => break,
                        },
                    }
                }
            });
            Ok(client)
        })
    }
}

/// The [`Api`] itself, mounted under a prefix: requests are routed with
/// [`match_route`](crate::http::match_route), bodies over [`Api::body_limit`] answered with
/// [`Api::payload_too_large`], the `x-request-id` kept or made
/// ([`request_id`](crate::http::request_id)), and the [`ApiResponse`](crate::http::ApiResponse)
/// read back as it is, streams included. Paths are relative to the mount point, as they are to a
/// [`Served::base_url`]; the prefix only shows in the URLs of answers.
#[derive(Clone, Debug)]
pub struct ApiTransport {
    api: Api,
    prefix: String,
}

impl ApiTransport {
    /// A transport to `api` mounted under `prefix` (`""` for the root).
    #[must_use]
    pub fn new(api: Api, prefix: &str) -> Self {
        Self {
            api,
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// The API's answer, with the request's id kept or made as the routers do.
    async fn answer(&self, mut request: TransportRequest) -> crate::http::ApiResponse {
        let id = crate::http::request_id(&mut request.headers);
        let mut res = match self.api_request(request) {
            Ok(request) => self.api.handle(request).await,
            Err(res) => *res,
        };
        crate::http::answer_with_request_id(&mut res.headers, id);
        res
    }

    fn api_request(
        &self,
        request: TransportRequest,
    ) -> Result<ApiRequest, Box<crate::http::ApiResponse>> {
        let (path, query) = match request.path.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (request.path.as_str(), None),
        };
        let Some((spec, raw)) = crate::http::match_route(path) else {
            return Err(Box::new(self.api.not_found()));
        };
        // A router registers only the routes the API serves ([`Api::routes`]).
        if !self.api.serves(spec.route) {
            return Err(Box::new(self.api.not_found()));
        }
        if request.body.len() > self.api.body_limit() {
            return Err(Box::new(self.api.payload_too_large()));
        }
        let params = raw.into_iter().map(percent_decode).collect();
        let request = ApiRequest::new(spec.route, request.method)
            .with_params(params)
            .with_query(query)
            .with_headers(request.headers)
            .with_body(request.body)
            .with_peer(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .with_base_path(self.prefix.clone());
        Ok(request)
    }
}

/// Decodes `%XX` escapes of a path segment (`+` stays `+`), as the routers decode parameters.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Transport for ApiTransport {
    fn send(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = TransportResponse> + Send + '_>> {
        Box::pin(async move {
            let res = self.answer(request).await;
            let body: BodyStream = match res.body {
                ApiBody::Full(bytes) => Box::pin(futures_util::stream::once(async { bytes })),
                ApiBody::Stream(stream) => stream,
            };
            TransportResponse::new(res.status.as_u16(), header_map(&res.headers), body)
        })
    }

    fn websocket(
        &self,
        request: TransportRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WsClient, TransportResponse>> + Send + '_>> {
        Box::pin(async move {
            let refused = |res: crate::http::ApiResponse| {
                let body: BodyStream = match res.body {
                    ApiBody::Full(bytes) => Box::pin(futures_util::stream::once(async { bytes })),
                    ApiBody::Stream(stream) => stream,
                };
                TransportResponse::new(res.status.as_u16(), header_map(&res.headers), body)
            };
            let request = self.api_request(request).map_err(|r| refused(*r))?;
            let session = self.api.websocket(request).await.map_err(refused)?;
            let (client, from_client, to_client) = ws_channels();
            // Like a real client, answer the server's pings.
            let pong = client.tx.clone();
            let incoming = futures_util::stream::unfold(from_client, |mut rx| async move {
                rx.recv().await.map(|m| (m, rx))
            });
            tokio::spawn(async move {
                let out = session.run(incoming);
                futures_util::pin_mut!(out);
                while let Some(m) = out.next().await {
                    if let WsMessage::Ping(p) = &m {
                        let _ = pong.send(WsMessage::Pong(p.clone()));
                    }
                    if to_client.send(m).is_err() {
                        break;
                    }
                }
            });
            Ok(client)
        })
    }
}

/// A running server; dropping it (or calling `stop`) shuts it down.
pub struct Served {
    /// `http://127.0.0.1:<port><prefix>` (no trailing slash); for an in-process API, a
    /// placeholder URL ending in the prefix.
    pub base_url: String,
    transport: Arc<dyn Transport>,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Served {
    /// A server at `base_url`, reached over HTTP; `stop` is called on drop.
    pub fn new(base_url: impl Into<String>, stop: impl FnOnce() + Send + 'static) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        let transport = Arc::new(HttpTransport::new(&base_url));
        Self {
            base_url,
            transport,
            stop: Some(Box::new(stop)),
        }
    }

    /// `api` under `prefix`, reached in process through an [`ApiTransport`].
    pub fn in_process(api: Api, prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            base_url: format!("http://in-process{prefix}"),
            transport: Arc::new(ApiTransport::new(api, prefix)),
            stop: None,
        }
    }

    /// A client for this server, over its transport.
    #[must_use]
    pub fn client(&self) -> Client {
        Client::with_transport(self.transport.clone())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// What an adapter test provides: serve `api` on `127.0.0.1:0`, mounted under `prefix` (`""`
/// for the root, or e.g. `"/aiwg"`, inside a host app that has routes of its own).
pub trait Serve: Send + Sync {
    /// Starts the server.
    fn serve(&self, api: Api, prefix: &str) -> Pin<Box<dyn Future<Output = Served> + Send + '_>>;
}

/// Serves an [`Api`] in process ([`Served::in_process`]): the suite then tests the
/// framework-neutral HTTP layer on its own, with no router and no socket.
#[derive(Clone, Copy, Debug, Default)]
pub struct InProcess;

impl Serve for InProcess {
    fn serve(&self, api: Api, prefix: &str) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        let served = Served::in_process(api, prefix);
        Box::pin(async move { served })
    }
}

/// The admin key of the suite's servers.
pub const ADMIN_KEY: &str = "suite-admin-key-0123456789";
/// A key with only the `trigger` scope.
pub const TRIGGER_KEY: &str = "suite-trigger-key-0123456789";
/// A key with only the `read` scope.
pub const READ_KEY: &str = "suite-read-key-0123456789";

const WAIT: Duration = Duration::from_secs(20);

/// The suite's fixture: an engine with scripted executors, its project folder and its API.
pub struct Fixture {
    /// The engine.
    pub engine: Engine,
    /// The executor behind workflow `hang` (hangs until cancelled).
    pub hang: ScriptedExecutor,
    /// The executor behind workflow `echo`.
    pub echo: ScriptedExecutor,
    /// The project root (holds a `proj` folder).
    pub root: tempfile::TempDir,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture").finish_non_exhaustive()
    }
}

/// Options for [`fixture`].
#[derive(Clone, Copy, Debug, Default)]
pub struct FixtureOptions {
    /// Queue capacity (default 1000).
    pub queue_capacity: Option<usize>,
    /// Workers (default 2).
    pub workers: Option<usize>,
}

/// An engine with workflows `echo` (param `who`, default `world`) and `hang`, executors of the
/// same names, and a project root with a `proj` folder.
pub fn fixture(opts: FixtureOptions) -> Fixture {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("proj")).expect("mkdir");
    let echo = ScriptedExecutor::succeeding("done").emit(AgentEvent::Text {
        text: "working".into(),
    });
    let hang = ScriptedExecutor::hanging();
    let engine = Engine::builder()
        .policy(
            ProjectPolicy::builder()
                .root(root.path())
                .build()
                .expect("policy"),
        )
        .executor("echo", Arc::new(echo.clone()))
        .executor("hang", Arc::new(hang.clone()))
        .workflow(
            Workflow::new("echo")
                .describe("Says hello")
                .param(crate::Parameter::new("who").with_default("world"))
                .step(Step::prompt("greet", "echo", "hello {{who}} {{guidance}}")),
        )
        .workflow(
            Workflow::new("hang")
                .describe("Never ends")
                .step(Step::prompt("wait", "hang", "wait")),
        )
        .workers(opts.workers.unwrap_or(2))
        .queue_capacity(opts.queue_capacity.unwrap_or(1000))
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("engine");
    Fixture {
        engine,
        hang,
        echo,
        root,
    }
}

/// The suite's API builder over `engine`: the three keys, 64 KiB bodies, 200 ms keep-alive,
/// the dashboard on.
pub fn api_builder(engine: Engine) -> crate::http::ApiBuilder {
    Api::builder(engine)
        .dashboard(true)
        .key(ApiKey::plain("admin", ADMIN_KEY, vec![Scope::Admin]).expect("key"))
        .key(ApiKey::plain("ci", TRIGGER_KEY, vec![Scope::Trigger]).expect("key"))
        .key(ApiKey::plain("viewer", READ_KEY, vec![Scope::Read]).expect("key"))
        .body_limit(64 * 1024)
        .keep_alive(Duration::from_millis(200))
}

/// A small client for the suite, over any [`Transport`].
#[derive(Clone)]
pub struct Client {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// A response read in full.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: BTreeMap<String, String>,
    /// Body text.
    pub text: String,
}

impl Reply {
    /// The body as JSON (panics if it is not).
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// A header.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Asserts a problem+json answer with `status`.
    pub fn assert_problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "status {status} must be problem+json"
        );
        let v = self.json();
        assert_eq!(v["status"], status);
        assert!(v["type"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(v["detail"].as_str().is_some());
        v
    }
}

/// Reads a body to its end, at most [`WAIT`] long.
async fn read_all(mut body: BodyStream) -> String {
    let mut buf = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk);
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("stream ended");
    String::from_utf8_lossy(&buf).into_owned()
}

impl Client {
    /// A client for the server at `base`, over HTTP.
    #[must_use]
    pub fn new(base: &str) -> Self {
        Self::with_transport(Arc::new(HttpTransport::new(base)))
    }

    /// A client over `transport`.
    #[must_use]
    pub fn with_transport(transport: Arc<dyn Transport>) -> Self {
        Self { transport }
    }

    /// Sends a request and returns the answer as it starts (the body still streaming).
    pub async fn start(&self, request: TransportRequest) -> TransportResponse {
        self.transport.send(request).await
    }

    /// Sends a request and reads the answer in full.
    pub async fn request(&self, request: TransportRequest) -> Reply {
        let res = self.start(request).await;
        let text = read_all(res.body).await;
        Reply {
            status: res.status,
            headers: res.headers,
            text,
        }
    }

    /// Sends a request; `key` adds a bearer token; `body` is sent as JSON when it is a
    /// [`Value`], raw otherwise.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Body>,
    ) -> Reply {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = TransportRequest::new(method, path);
        if let Some(k) = key {
            req = req.header("authorization", &format!("Bearer {k}"));
        }
        match body {
            Some(Body::Json(v)) => {
                req = req
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&v).expect("JSON"));
            }
            Some(Body::Raw(ct, bytes)) => req = req.header("content-type", ct).body(bytes),
            None => {}
        }
        self.request(req).await
    }

    /// Reads an SSE stream until it ends (or `WAIT`), returning the frames.
    pub async fn sse(
        &self,
        path: &str,
        key: &str,
        last_event_id: Option<u64>,
    ) -> (Reply, Vec<SseFrame>) {
        let mut req = TransportRequest::new(Method::GET, path)
            .header("authorization", &format!("Bearer {key}"));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", &id.to_string());
        }
        let reply = self.request(req).await;
        let frames = parse_sse(&reply.text);
        (reply, frames)
    }

    /// Opens an SSE stream and returns frames as they arrive.
    pub async fn sse_live(&self, path: &str, key: &str) -> SseLive {
        self.sse_resume(path, key, None).await
    }

    /// Opens an SSE stream with an optional `Last-Event-ID` and returns frames as they arrive.
    pub async fn sse_resume(&self, path: &str, key: &str, last_event_id: Option<&str>) -> SseLive {
        let mut req = TransportRequest::new(Method::GET, path)
            .header("authorization", &format!("Bearer {key}"));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = self.start(req).await;
        assert_eq!(res.status, 200, "{path}");
        assert!(
            res.headers
                .get("content-type")
                .is_some_and(|t| t.starts_with("text/event-stream")),
            "{path}: {:?}",
            res.headers
        );
        SseLive {
            stream: res.body,
            buf: String::new(),
        }
    }
}

/// A request body.
#[derive(Debug, Clone)]
pub enum Body {
    /// JSON.
    Json(Value),
    /// Raw bytes with a content type.
    Raw(&'static str, Vec<u8>),
}

/// One SSE frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseFrame {
    /// `id:`.
    pub id: Option<String>,
    /// `event:`.
    pub event: Option<String>,
    /// `data:` (joined).
    pub data: String,
    /// Whether the frame was only a comment.
    pub comment: bool,
}

/// Parses SSE text into frames (comments included, flagged).
#[must_use]
pub fn parse_sse(text: &str) -> Vec<SseFrame> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        if block.trim().is_empty() {
            continue;
        }
        let mut f = SseFrame::default();
        let mut only_comments = true;
        for line in block.lines() {
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line
                .split_once(':')
                .map_or((line, ""), |(a, b)| (a, b.trim_start()));
            match field {
                "id" => f.id = Some(value.to_owned()),
                "event" => f.event = Some(value.to_owned()),
                "data" => {
                    if !f.data.is_empty() {
                        f.data.push('\n');
                    }
                    f.data.push_str(value);
                }
                _ => {}
            }
            if field != "retry" {
                only_comments = false;
            }
        }
        f.comment = only_comments;
        out.push(f);
    }
    out
}

/// A live SSE stream.
pub struct SseLive {
    stream: BodyStream,
    buf: String,
}

impl std::fmt::Debug for SseLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseLive").finish_non_exhaustive()
    }
}

impl SseLive {
    /// Waits for the next frame with an `event:` (skipping comments), or `None` at the end.
    pub async fn next_event(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let frames = parse_sse(&block);
                if let Some(f) = frames.into_iter().find(|f| f.event.is_some()) {
                    return Some(f);
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Waits for the next frame that is not only a comment: an event, or an `id:` line alone
    /// (the opening of `GET /events`).
    pub async fn next_frame(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                if let Some(f) = parse_sse(&block)
                    .into_iter()
                    .find(|f| f.event.is_some() || f.id.is_some())
                {
                    return Some(f);
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Waits for the next comment-only frame (keep-alive).
    pub async fn next_comment(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                if block
                    .lines()
                    .filter(|l| !l.is_empty())
                    .all(|l| l.starts_with(':') || l.starts_with("retry:"))
                    && block.contains("keep-alive")
                {
                    return Some(block);
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn trigger(workflow: &str) -> Option<Body> {
    Some(Body::Json(
        json!({ "workflow": workflow, "project_path": "proj" }),
    ))
}

/// Runs every check against `server`. Panics on the first failure, naming it.
pub async fn conformance_suite(server: &dyn Serve) {
    public_endpoints(server).await;
    auth_on_every_protected_route(server).await;
    trigger_status_events_completion(server, "").await;
    trigger_status_events_completion(server, "/aiwg").await;
    synchronous_trigger(server).await;
    cancel_running_and_finished(server).await;
    idempotency(server).await;
    audit_trail(server).await;
    bad_requests_are_problems(server).await;
    body_limit(server).await;
    rate_limit(server).await;
    failed_keys_lock_the_address_out(server).await;
    queue_full(server).await;
    listing_and_status(server).await;
    keep_alive_and_replay(server).await;
    webhook_subscriptions(server).await;
    robustness(server).await;
    cors(server).await;
    request_ids(server).await;
    whoami(server).await;
    all_events(server).await;
    all_events_resets(server).await;
    dashboard(server).await;
    jwt_bearer_tokens(server).await;
    websockets(server).await;
    websocket_refusals(server).await;
    websocket_rate_limit(server).await;
    websocket_sockets_waiting_for_credentials(server).await;
}

/// A concrete path for a route pattern: every parameter replaced by `id`.
#[must_use]
pub fn concrete_path(pattern: &str, id: &str) -> String {
    pattern
        .replace("{job_id}", id)
        .replace("{id}", id)
        .replace("{delivery_id}", id)
        .replace("{platform}", id)
        .replace("{asset}", id)
}

/// The method, a concrete path and the scope of every route of the table that needs a key
/// (with the suite's [`api_builder`], `/metrics` needs one too).
#[must_use]
pub fn protected() -> Vec<(Method, String, Scope)> {
    const ZERO: &str = "00000000-0000-7000-8000-000000000000";
    let mut out = Vec::new();
    for spec in ROUTES {
        let scope = match spec.access {
            Access::Key(scope) | Access::Configurable(scope) => scope,
            _ => continue,
        };
        let path = concrete_path(spec.path, ZERO);
        for method in spec.methods {
            out.push((method.clone(), path.clone(), scope));
        }
    }
    out
}

async fn public_endpoints(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let r = c.send("GET", "/health", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    let r = c.send("GET", "/openapi.json", None, None).await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "OpenAPI 3.1"
    );
    for spec in ROUTES {
        let item = &doc["paths"][spec.path];
        assert!(item.is_object(), "openapi.json lacks {}", spec.path);
        for m in spec.methods {
            let m = m.as_str().to_ascii_lowercase();
            assert!(
                item.get(&m).is_some(),
                "openapi.json lacks {m} {}",
                spec.path
            );
        }
    }
    let r = c.send("GET", "/no-such-thing", None, None).await;
    assert_eq!(r.status, 404, "unknown paths are 404");
    let r = c.send("DELETE", "/health", None, None).await;
    r.assert_problem(405);
    assert!(r.header("allow").is_some_and(|a| a.contains("GET")));
    let r = c.send("GET", "/hooks/github", None, None).await;
    r.assert_problem(405);
    // Every route answers a method it does not take with 405 and exactly its table methods.
    for spec in ROUTES {
        let path = concrete_path(spec.path, "x");
        let r = c.send("PUT", &path, Some(ADMIN_KEY), None).await;
        r.assert_problem(405);
        assert_eq!(
            r.header("allow"),
            spec.allow_header().to_str().ok(),
            "Allow of {}",
            spec.path
        );
    }
}

async fn auth_on_every_protected_route(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    for (method, path, scope) in protected() {
        let (method, path) = (method.as_str(), path.as_str());
        let r = c.send(method, path, None, None).await;
        r.assert_problem(401);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer")),
            "{method} {path}: 401 without WWW-Authenticate"
        );
        let r = c
            .send(method, path, Some("wrong-key-wrong-key-wrong"), None)
            .await;
        r.assert_problem(401);
        let other = match scope {
            Scope::Trigger => READ_KEY,
            _ => TRIGGER_KEY,
        };
        let r = c.send(method, path, Some(other), None).await;
        let p = r.assert_problem(403);
        assert!(
            !p["detail"].as_str().unwrap().contains("0123456789"),
            "a problem leaked a key"
        );
    }
    // The right scope passes authentication (whatever the route then answers).
    let r = c.send("GET", "/jobs", Some(READ_KEY), None).await;
    assert_eq!(r.status, 200);
    // What a key reads is not for caches to keep; what anyone may read is left alone.
    assert_eq!(
        r.headers.get("cache-control").map(String::as_str),
        Some("no-store"),
        "{:?}",
        r.headers
    );
    let r = c.send("GET", "/health", None, None).await;
    assert_ne!(
        r.headers.get("cache-control").map(String::as_str),
        Some("no-store")
    );
    let r = c.send("GET", "/jobs", None, None).await;
    assert!(!r.text.contains(ADMIN_KEY));
    assert_eq!(
        r.headers.get("cache-control").map(String::as_str),
        Some("no-store"),
        "a refusal too"
    );
}

async fn trigger_status_events_completion(server: &dyn Serve, prefix: &str) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), prefix)
        .await;
    assert!(s.base_url.ends_with(prefix));
    let c = s.client();
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(json!({"workflow": "echo", "project_path": "proj", "guidance": "now", "params": {"who": "you"}}))),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let v = r.json();
    let id = v["job_id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["status_url"], format!("{prefix}/workflows/{id}/status"));
    assert_eq!(v["events_url"], format!("{prefix}/workflows/{id}/events"));
    assert!(v.get("estimated_duration").is_some());

    let (res, frames) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, None)
        .await;
    assert_eq!(res.status, 200);
    assert!(res
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream")));
    let events: Vec<&SseFrame> = frames.iter().filter(|f| !f.comment).collect();
    let ids: Vec<u64> = events
        .iter()
        .map(|f| f.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "ids are the sequence numbers"
    );
    let kinds: Vec<&str> = events.iter().map(|f| f.event.as_deref().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "step.started",
            "agent",
            "step.finished",
            "status"
        ]
    );
    let last: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(last["to"], "completed");

    let r = c
        .send(
            "GET",
            &format!("/workflows/{id}/status"),
            Some(READ_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["job_id"], id);
    assert_eq!(doc["status"], "completed");
    assert_eq!(doc["workflow"], "echo");
    assert_eq!(doc["params"]["who"], "you");
    assert_eq!(doc["progress"]["completed"], json!(["greet"]));
    assert_eq!(doc["result"]["summary"], "done");
    assert_eq!(doc["error"], Value::Null);
    assert_eq!(doc["dead_letter"], false);
    assert_eq!(doc["trigger"]["source"], "api");
    assert_eq!(doc["trigger"]["actor"], "ci");
    for field in [
        "project_path",
        "priority",
        "attempt",
        "max_attempts",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(doc.get(field).is_some(), "status lacks {field}");
    }
    assert_eq!(fx.echo.requests()[0].prompt, "hello you now");
}

async fn synchronous_trigger(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "proj", "async": false}),
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "completed");
    assert_eq!(r.json()["result"]["summary"], "done");
    // JSON Schema counts 5.0 as an integer, so the server does too.
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "proj", "async": false, "priority": 5.0}),
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["priority"], 5);
}

async fn cancel_running_and_finished(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("hang"),
        )
        .await;
    assert_eq!(r.status, 202);
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let mut live = c
        .sse_live(&format!("/workflows/{id}/events"), READ_KEY)
        .await;
    loop {
        let f = live
            .next_event()
            .await
            .expect("stream ended before the step started");
        if f.event.as_deref() == Some("step.started") {
            break;
        }
    }
    let r = c
        .send(
            "POST",
            &format!("/workflows/{id}/cancel"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), json!({"job_id": id, "status": "cancelled"}));
    assert_eq!(
        fx.hang.running(),
        0,
        "the agent was stopped before the answer"
    );
    assert_eq!(fx.hang.cancelled(), 1);
    let mut last = None;
    while let Some(f) = live.next_event().await {
        last = Some(f);
    }
    let last: Value = serde_json::from_str(&last.expect("terminal event").data).unwrap();
    assert_eq!(last["to"], "cancelled");
    let r = c
        .send(
            "POST",
            &format!("/workflows/{id}/cancel"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    let p = r.assert_problem(409);
    assert_eq!(p["job_status"], "cancelled");
    let r = c
        .send(
            "POST",
            "/workflows/00000000-0000-7000-8000-000000000000/cancel",
            Some(ADMIN_KEY),
            None,
        )
        .await;
    r.assert_problem(404);
    let r = c
        .send("POST", "/workflows/not-a-job/cancel", Some(ADMIN_KEY), None)
        .await;
    r.assert_problem(400);
    let r = c
        .send(
            "GET",
            "/workflows/00000000-0000-7000-8000-000000000000/status",
            Some(READ_KEY),
            None,
        )
        .await;
    r.assert_problem(404);
    let r = c
        .send(
            "GET",
            "/workflows/00000000-0000-7000-8000-000000000000/events",
            Some(READ_KEY),
            None,
        )
        .await;
    r.assert_problem(404);
}

async fn idempotency(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let body = json!({"workflow": "echo", "project_path": "proj", "idempotency_key": "k-1"});
    let a = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(body.clone())),
        )
        .await;
    let b = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(body)),
        )
        .await;
    assert_eq!(a.status, 202);
    assert_eq!(b.status, 202);
    assert_eq!(a.json()["job_id"], b.json()["job_id"]);
    let other = json!({"workflow": "echo", "project_path": "proj", "idempotency_key": "k-1", "guidance": "different"});
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(other)),
        )
        .await;
    r.assert_problem(409);
    // Keys are namespaced per API key: another key's `k-1` is its own job, and the first
    // key's job is not revealed to it.
    let other_key = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(ADMIN_KEY),
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "proj", "idempotency_key": "k-1"}),
            )),
        )
        .await;
    assert_eq!(other_key.status, 202);
    assert_ne!(other_key.json()["job_id"], a.json()["job_id"]);
    // The header form works the same way.
    let res = c
        .request(
            TransportRequest::new(Method::POST, "/workflows/trigger")
                .header("authorization", &format!("Bearer {TRIGGER_KEY}"))
                .header("idempotency-key", "k-1")
                .header("content-type", "application/json")
                .body(json!({"workflow": "echo", "project_path": "proj"}).to_string()),
        )
        .await;
    assert_eq!(res.status, 202);
    assert_eq!(res.json()["job_id"], a.json()["job_id"]);
    // Two jobs at most: the first key's and the other key's.
    assert!(fx.echo.calls() <= 2);
}

/// Every trigger attempt lands in `GET /audit`: accepted, duplicate and refused ones (wrong
/// key, missing scope, unknown workflow, bad parameters), newest first, filtered and paged,
/// and no key ever appears in it.
async fn audit_trail(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let post = |key: Option<&'static str>, body: Value| {
        let c = &c;
        async move {
            c.send("POST", "/workflows/trigger", key, Some(Body::Json(body)))
                .await
        }
    };
    let ok = json!({"workflow": "echo", "project_path": "proj", "idempotency_key": "audit-1"});
    let accepted = post(Some(TRIGGER_KEY), ok.clone()).await;
    assert_eq!(accepted.status, 202);
    let job_id = accepted.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(post(Some(TRIGGER_KEY), ok).await.status, 202);
    post(Some("wrong-key"), json!({"workflow": "echo"}))
        .await
        .assert_problem(401);
    post(Some(READ_KEY), json!({"workflow": "echo"}))
        .await
        .assert_problem(403);
    post(
        Some(TRIGGER_KEY),
        json!({"workflow": "nope", "project_path": "proj"}),
    )
    .await
    .assert_problem(404);
    post(
        Some(TRIGGER_KEY),
        json!({"workflow": "echo", "project_path": "proj", "params": {"x": [1]}}),
    )
    .await
    .assert_problem(400);

    let audit = |query: &str| {
        let c = &c;
        let path = format!("/audit{query}");
        async move { c.send("GET", &path, Some(ADMIN_KEY), None).await }
    };
    let all = audit("").await;
    assert_eq!(all.status, 200, "{}", all.text);
    for secret in [TRIGGER_KEY, READ_KEY, ADMIN_KEY, "wrong-key"] {
        assert!(!all.text.contains(secret), "a key in the audit trail");
    }
    let entries = all.json()["entries"].as_array().unwrap().clone();
    let decisions: Vec<&str> = entries
        .iter()
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        [
            "refused",
            "refused",
            "refused",
            "refused",
            "duplicate",
            "accepted"
        ],
        "newest first: {}",
        all.text
    );
    let accepted = &entries[5];
    assert_eq!(accepted["source"], "api");
    assert_eq!(accepted["key_name"], "ci");
    assert_eq!(accepted["actor"], "ci");
    assert_eq!(accepted["workflow"], "echo");
    assert_eq!(accepted["delivery_id"], "audit-1");
    assert_eq!(accepted["job_id"], job_id.as_str());
    assert_eq!(entries[4]["job_id"], job_id.as_str());
    assert!(entries[4]["reason"]
        .as_str()
        .unwrap()
        .contains("idempotency"));
    let reasons: Vec<&str> = entries[..4]
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].contains("`x`"), "{reasons:?}");
    assert!(reasons[1].contains("nope"), "{reasons:?}");
    assert!(reasons[2].contains("scope"), "{reasons:?}");
    assert_eq!(reasons[3], "invalid API key");
    assert!(entries[3]["key_name"].is_null());
    // A known key lacking the scope is named.
    assert_eq!(entries[2]["key_name"], "viewer");
    assert!(entries[0]["at"].as_str().unwrap().contains('T'));

    // Filters and pages.
    let refused = audit("?decision=refused&source=api").await.json();
    assert_eq!(refused["entries"].as_array().unwrap().len(), 4);
    assert_eq!(
        audit("?source=github").await.json()["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let first = audit("?limit=4").await.json();
    assert_eq!(first["entries"].as_array().unwrap().len(), 4);
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let second = audit(&format!("?limit=4&cursor={cursor}")).await.json();
    assert_eq!(
        second["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["decision"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["duplicate", "accepted"]
    );
    assert!(second["next_cursor"].is_null());
    let future = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let none = audit(&format!("?since={future}")).await.json();
    assert_eq!(none["entries"].as_array().unwrap().len(), 0);
    for bad in [
        "?decision=maybe",
        "?since=yesterday",
        "?cursor=abc",
        "?cursor=0",
        "?limit=0",
        "?colour=red",
    ] {
        audit(bad).await.assert_problem(400);
    }
    // Admin only; reading the trail is no trigger attempt.
    c.send("GET", "/audit", Some(READ_KEY), None)
        .await
        .assert_problem(403);
    c.send("GET", "/audit", None, None)
        .await
        .assert_problem(401);
    assert_eq!(
        audit("").await.json()["entries"].as_array().unwrap().len(),
        6
    );
}

async fn bad_requests_are_problems(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let k = Some(ADMIN_KEY);
    let cases: Vec<(Option<Body>, u16)> = vec![
        (
            Some(Body::Raw("application/json", b"{not json".to_vec())),
            400,
        ),
        (Some(Body::Raw("application/json", b"".to_vec())), 400),
        (Some(Body::Raw("application/json", b"[]".to_vec())), 400),
        (Some(Body::Json(json!({"workflow": 5}))), 400),
        (
            Some(Body::Json(json!({"workflow": "echo", "unknown_field": 1}))),
            400,
        ),
        (
            Some(Body::Json(json!({"workflow": "echo", "priority": 1e300}))),
            400,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "priority": 99999999999999i64}),
            )),
            400,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "params": {"who": {"nested": true}}}),
            )),
            400,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "params": {"nope": "x"}}),
            )),
            400,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "missing"}),
            )),
            400,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "../.."}),
            )),
            403,
        ),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "project_path": "/etc"}),
            )),
            403,
        ),
        (Some(Body::Json(json!({"workflow": "ghost"}))), 404),
        (
            Some(Body::Json(
                json!({"workflow": "echo", "idempotency_key": "clé"}),
            )),
            400,
        ),
        (
            Some(Body::Json(json!({"workflow": "echo", "priority": 5.5}))),
            400,
        ),
        (
            Some(Body::Raw("text/plain", b"{\"workflow\":\"echo\"}".to_vec())),
            415,
        ),
        (None, 415),
    ];
    for (body, status) in cases {
        let desc = format!("{body:?}");
        let r = c.send("POST", "/workflows/trigger", k, body).await;
        assert_eq!(r.status, status, "{desc}: {}", r.text);
        r.assert_problem(status);
    }
    for (m, p) in [
        ("GET", "/workflows/trigger"),
        ("PUT", "/jobs"),
        ("POST", "/workflows/available"),
        ("PATCH", "/webhooks"),
    ] {
        let r = c.send(m, p, k, None).await;
        r.assert_problem(405);
    }
    for q in [
        "?status=done",
        "?limit=abc",
        "?limit=0",
        "?limit=100000000000000000000",
        "?cursor=xyz",
        "?bogus=1",
    ] {
        let r = c.send("GET", &format!("/jobs{q}"), k, None).await;
        r.assert_problem(400);
    }
    let r = c.send("GET", "/workflows/xyz/status", k, None).await;
    r.assert_problem(400);
    assert_eq!(fx.echo.calls(), 0, "no bad request started a job");
}

async fn body_limit(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(
            api_builder(fx.engine.clone())
                .body_limit(1024)
                .build()
                .unwrap(),
            "",
        )
        .await;
    let c = s.client();
    let big = json!({"workflow": "echo", "guidance": "x".repeat(4096)});
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(big)),
        )
        .await;
    r.assert_problem(413);
    // Without a Content-Length (chunked), the limit still holds.
    let res = c
        .request(
            TransportRequest::new(Method::POST, "/workflows/trigger")
                .header("authorization", &format!("Bearer {TRIGGER_KEY}"))
                .header("content-type", "application/json")
                .body(vec![b' '; 8 * 512])
                .chunked(),
        )
        .await;
    assert_eq!(res.status, 413);
    let small = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("echo"),
        )
        .await;
    assert_eq!(small.status, 202);
}

/// An API limited to a burst of two requests a minute (per key, per address), served.
async fn rate_limited(server: &dyn Serve) -> (Fixture, Served) {
    let fx = fixture(FixtureOptions::default());
    let api = api_builder(fx.engine.clone())
        .rate_limit(RateLimit {
            per_minute: 1,
            burst: 2,
        })
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    (fx, s)
}

async fn rate_limit(server: &dyn Serve) {
    let (_fx, s) = rate_limited(server).await;
    let c = s.client();
    assert_eq!(
        c.send("GET", "/jobs", Some(READ_KEY), None).await.status,
        200
    );
    assert_eq!(
        c.send("GET", "/jobs", Some(READ_KEY), None).await.status,
        200
    );
    let r = c.send("GET", "/jobs", Some(READ_KEY), None).await;
    r.assert_problem(429);
    let secs: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(secs >= 1);
    // Another key has its own bucket.
    assert_eq!(
        c.send("GET", "/jobs", Some(ADMIN_KEY), None).await.status,
        200
    );
    // Unauthenticated routes are limited per client address.
    let mut limited = false;
    for _ in 0..3 {
        if c.send("GET", "/openapi.json", None, None).await.status == 429 {
            limited = true;
        }
    }
    assert!(limited, "per-address limit on public routes");
    // The dashboard's files are not: one page load fetches a dozen of them.
    for _ in 0..6 {
        assert_eq!(c.send("GET", "/ui/app.js", None, None).await.status, 200);
    }
}

/// An address that presented wrong credentials too often is refused (429) before any
/// credentials it sends are looked at, the right ones included, until its wait is over:
/// guessing is slowed down, not only answered differently.
async fn failed_keys_lock_the_address_out(server: &dyn Serve) {
    let (_fx, s) = rate_limited(server).await;
    let c = s.client();
    let wrong = "sk-wrong-wrong-wrong-wrong-wrong";
    for _ in 0..2 {
        c.send("GET", "/jobs", Some(wrong), None)
            .await
            .assert_problem(401);
    }
    c.send("GET", "/jobs", Some(wrong), None)
        .await
        .assert_problem(429);
    let r = c.send("GET", "/jobs", Some(READ_KEY), None).await;
    r.assert_problem(429);
    assert!(r.header("retry-after").is_some(), "Retry-After");
}

async fn queue_full(server: &dyn Serve) {
    let fx = fixture(FixtureOptions {
        queue_capacity: Some(1),
        workers: Some(1),
    });
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    assert_eq!(
        c.send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("hang")
        )
        .await
        .status,
        202
    );
    assert!(fx.hang.wait_started(1, WAIT).await);
    assert_eq!(
        c.send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("hang")
        )
        .await
        .status,
        202
    );
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("hang"),
        )
        .await;
    r.assert_problem(503);
    assert!(r.header("retry-after").is_some());
    fx.engine.shutdown(Duration::ZERO).await;
}

async fn listing_and_status(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = c
            .send(
                "POST",
                "/workflows/trigger",
                Some(ADMIN_KEY),
                Some(Body::Json(
                    json!({"workflow": "echo", "project_path": "proj", "async": false}),
                )),
            )
            .await;
        ids.push(r.json()["job_id"].as_str().unwrap().to_owned());
    }
    let r = c
        .send(
            "GET",
            "/jobs?limit=2&workflow=echo&status=completed",
            Some(READ_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 2);
    assert_eq!(v["jobs"][0]["job_id"], ids[2], "newest first");
    let cursor = v["next_cursor"].as_str().expect("a next page").to_owned();
    let v = c
        .send(
            "GET",
            &format!("/jobs?limit=2&cursor={cursor}"),
            Some(READ_KEY),
            None,
        )
        .await
        .json();
    assert_eq!(v["jobs"][0]["job_id"], ids[0]);
    assert_eq!(v["next_cursor"], Value::Null);
    let v = c
        .send("GET", "/jobs?status=running", Some(READ_KEY), None)
        .await
        .json();
    assert_eq!(v["jobs"], json!([]));

    let v = c
        .send("GET", "/workflows/available", Some(READ_KEY), None)
        .await
        .json();
    let echo = v["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "echo")
        .expect("echo listed");
    assert_eq!(echo["description"], "Says hello");
    assert_eq!(echo["steps"], json!(["greet"]));
    assert_eq!(echo["parameters"][0]["name"], "who");
    assert_eq!(echo["parameters"][0]["default"], "world");
    assert_eq!(echo["parameters"][0]["required"], false);

    let v = c.send("GET", "/status", Some(READ_KEY), None).await.json();
    assert!(v["version"].as_str().is_some());
    assert!(v["uptime_secs"].as_u64().is_some());
    assert_eq!(v["queue"]["workers"], 2);
    for f in ["queued", "running", "busy"] {
        assert!(v["queue"][f].as_u64().is_some(), "queue.{f}");
    }
    let names: Vec<&str> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "hang"]);
    assert_eq!(v["agents"][0]["healthy"], true);
    assert_eq!(v["agents"][0]["kind"], "scripted");
    assert!(v["pending_deliveries"].as_u64().is_some());

    let r = c.send("GET", "/metrics", Some(READ_KEY), None).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    for m in [
        "aiwg_job_duration_seconds",
        "aiwg_queue_length",
        "aiwg_workers_busy",
    ] {
        assert!(r.text.contains(m), "/metrics lacks {m}");
    }
}

async fn keep_alive_and_replay(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let id = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("hang"),
        )
        .await
        .json()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut live = c
        .sse_live(&format!("/workflows/{id}/events"), READ_KEY)
        .await;
    assert!(
        live.next_comment().await.is_some(),
        "keep-alive comments on an idle stream"
    );
    let r = c
        .send(
            "POST",
            &format!("/workflows/{id}/cancel"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let (_, all) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, None)
        .await;
    let all: Vec<_> = all.into_iter().filter(|f| !f.comment).collect();
    assert!(all.len() >= 3);
    let (_, tail) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, Some(2))
        .await;
    let tail_ids: Vec<String> = tail
        .into_iter()
        .filter(|f| !f.comment)
        .filter_map(|f| f.id)
        .collect();
    let expected: Vec<String> = all.iter().skip(2).filter_map(|f| f.id.clone()).collect();
    assert_eq!(tail_ids, expected, "Last-Event-ID resumes after that event");
    // Resumed after its last event, a finished job's stream has nothing to carry: 204, the SSE
    // standard's "stop reconnecting" (an EventSource that reconnects after the stream closed
    // would otherwise be answered an empty stream every `retry`, forever); and past it too.
    let last: u64 = all
        .last()
        .and_then(|f| f.id.as_deref())
        .unwrap()
        .parse()
        .unwrap();
    for after in [last, last + 5] {
        let (r, frames) = c
            .sse(&format!("/workflows/{id}/events"), READ_KEY, Some(after))
            .await;
        assert_eq!(r.status, 204, "after {after}: {}", r.text);
        assert!(frames.is_empty() && r.text.is_empty(), "{}", r.text);
    }
    let (r, one) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, Some(last - 1))
        .await;
    assert_eq!(r.status, 200);
    let one: Vec<_> = one.into_iter().filter_map(|f| f.id).collect();
    assert_eq!(
        one,
        [last.to_string()],
        "the last event is still there to resume to"
    );
    let (r, _) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, None)
        .await;
    assert_eq!(r.status, 200);
    let bad = c
        .request(
            TransportRequest::new(Method::GET, format!("/workflows/{id}/events"))
                .header("authorization", &format!("Bearer {READ_KEY}"))
                .header("last-event-id", "abc"),
        )
        .await;
    bad.assert_problem(400);
}

async fn webhook_subscriptions(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let c404 = {
        let s = server
            .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
            .await;
        s.client()
            .send("GET", "/webhooks", Some(ADMIN_KEY), None)
            .await
    };
    c404.assert_problem(404);
    let dispatcher = Dispatcher::builder().build().expect("dispatcher");
    let api = api_builder(fx.engine.clone())
        .dispatcher(dispatcher)
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    let c = s.client();
    let r = c
        .send("POST", "/webhooks", Some(ADMIN_KEY), Some(Body::Json(json!({"url": "https://example.com/hook", "events": ["job.completed", "job.*"], "description": "ci"}))))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let created = r.json();
    let sub = if created.get("subscription").is_some() {
        created["subscription"].clone()
    } else {
        created.clone()
    };
    let id = sub["id"].as_str().unwrap().to_owned();
    assert!(created["secret"].as_str().unwrap().starts_with("whsec_"));
    let listed = c.send("GET", "/webhooks", Some(ADMIN_KEY), None).await;
    assert_eq!(listed.status, 200);
    assert!(listed.text.contains(&id));
    assert!(
        !listed.text.contains("whsec_"),
        "a listing never shows secrets"
    );
    let got = c
        .send("GET", &format!("/webhooks/{id}"), Some(ADMIN_KEY), None)
        .await;
    assert_eq!(got.status, 200);
    assert!(!got.text.contains("whsec_"));
    let r = c
        .send(
            "PATCH",
            &format!("/webhooks/{id}"),
            Some(ADMIN_KEY),
            Some(Body::Json(json!({"enabled": false}))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["enabled"], false);
    // A struct is never read from an array (serde would): bodies are JSON objects.
    c.send(
        "PATCH",
        &format!("/webhooks/{id}"),
        Some(ADMIN_KEY),
        Some(Body::Raw("application/json", b"[null, null]".to_vec())),
    )
    .await
    .assert_problem(400);
    let r = c
        .send(
            "POST",
            &format!("/webhooks/{id}/rotate-secret"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("whsec_"));
    let r = c
        .send(
            "GET",
            &format!("/webhooks/{id}/deliveries"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c
        .send(
            "POST",
            "/webhooks",
            Some(ADMIN_KEY),
            Some(Body::Json(
                json!({"url": "ftp://example.com", "events": ["job.completed"]}),
            )),
        )
        .await;
    r.assert_problem(400);
    let r = c
        .send(
            "POST",
            "/webhooks",
            Some(ADMIN_KEY),
            Some(Body::Json(
                json!({"url": "https://example.com", "events": ["job.nope"]}),
            )),
        )
        .await;
    r.assert_problem(400);
    // URLs and filters exactly as the OpenAPI document describes them.
    for body in [
        json!({"url": "https://10.0.0.1/hook", "events": ["job.*"]}),
        json!({"url": " https://example.com/hook", "events": ["job.*"]}),
        json!({"url": "https://example.com/hook", "events": [" job.*"]}),
    ] {
        c.send("POST", "/webhooks", Some(ADMIN_KEY), Some(Body::Json(body)))
            .await
            .assert_problem(400);
    }
    let r = c
        .send("DELETE", &format!("/webhooks/{id}"), Some(ADMIN_KEY), None)
        .await;
    assert_eq!(r.status, 204);
    c.send("GET", &format!("/webhooks/{id}"), Some(ADMIN_KEY), None)
        .await
        .assert_problem(404);
    c.send("GET", "/webhooks/not-an-id", Some(ADMIN_KEY), None)
        .await
        .assert_problem(404);
}

/// Every route, every method, and bodies that are malformed, mistyped, huge-numbered or carry
/// unknown fields: always a 4xx problem (or a normal answer), never a 5xx.
async fn robustness(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let dispatcher = Dispatcher::builder().build().expect("dispatcher");
    let s = server
        .serve(
            api_builder(fx.engine.clone())
                .dispatcher(dispatcher)
                .build()
                .unwrap(),
            "",
        )
        .await;
    let c = s.client();
    let bodies: Vec<Option<Body>> = vec![
        None,
        Some(Body::Raw("application/json", b"{".to_vec())),
        Some(Body::Raw("application/json", b"null".to_vec())),
        Some(Body::Raw("application/json", br#""text""#.to_vec())),
        Some(Body::Raw(
            "application/json",
            b"{\"workflow\": \"echo\", \"priority\": 123456789012345678901234567890}".to_vec(),
        )),
        Some(Body::Raw("application/json", vec![0xff, 0xfe, 0x00])),
        Some(Body::Json(json!({"workflow": ["echo"], "params": "x"}))),
        Some(Body::Json(
            json!({"workflow": "echo", "priority": -1e308, "async": "no"}),
        )),
        Some(Body::Json(
            json!({"url": 12, "events": "job.*", "enabled": "yes", "bogus": true}),
        )),
        Some(Body::Json(
            json!({"workflow": "echo", "params": {"who": 1.7e308}, "extra": {}}),
        )),
        Some(Body::Raw(
            "application/x-www-form-urlencoded",
            b"a=1&b=%zz".to_vec(),
        )),
    ];
    let ids = [
        "00000000-0000-7000-8000-000000000000",
        "x",
        "%00",
        "..%2F..%2Fetc",
        &"9".repeat(300),
    ];
    for spec in ROUTES {
        for id in ids {
            let path = concrete_path(spec.path, id);
            for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                if spec.route == Route::AllEvents && method == "GET" {
                    // A stream that never ends by itself: `all_events` covers it.
                    continue;
                }
                for body in &bodies {
                    let r = c.send(method, &path, Some(ADMIN_KEY), body.clone()).await;
                    assert!(
                        r.status < 500,
                        "{method} {path} with {body:?} answered {}: {}",
                        r.status,
                        r.text
                    );
                    if r.status >= 400 && r.status != 404 {
                        r.assert_problem(r.status);
                    }
                }
            }
        }
    }
    assert_eq!(fx.echo.calls(), 0, "no malformed request ran a job");
}

/// Every answer names its request: the client's `x-request-id` is kept, otherwise each request
/// gets a new one (problem documents and refusals included).
async fn request_ids(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let kept = c
        .request(TransportRequest::new(Method::GET, "/health").header("x-request-id", "req-42"))
        .await;
    assert_eq!(kept.status, 200);
    assert_eq!(kept.header("x-request-id"), Some("req-42"));
    let mut made = Vec::new();
    for (path, key, status) in [
        ("/health", None, 200),
        ("/jobs", None, 401),
        (
            "/workflows/00000000-0000-7000-8000-000000000000/status",
            Some(ADMIN_KEY),
            404,
        ),
    ] {
        let r = c.send("GET", path, key, None).await;
        assert_eq!(r.status, status, "GET {path}");
        let id = r
            .header("x-request-id")
            .unwrap_or_else(|| panic!("GET {path} answered without an x-request-id"));
        assert!(!id.is_empty() && id != "req-42", "GET {path}: {id}");
        made.push(id.to_owned());
    }
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 3, "each request gets its own id: {made:?}");
}

/// CORS is decided by the API: preflights for allowed origins, `Access-Control-Allow-Origin` on
/// answers to them, nothing for other origins (they still get their answer), `*` for any.
async fn cors(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let api = api_builder(fx.engine.clone())
        .cors_origins(vec!["https://app.example".into()])
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    let c = s.client();
    let preflight = |origin: &'static str| {
        c.request(
            TransportRequest::new(Method::OPTIONS, "/jobs")
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "authorization"),
        )
    };
    let ok = preflight("https://app.example").await;
    assert_eq!(ok.status, 204);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        ok.header("access-control-allow-methods"),
        Some("GET"),
        "the route's methods, from the route table"
    );
    assert!(ok
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    let denied = preflight("https://evil.example").await;
    assert_eq!(denied.status, 204);
    assert!(denied.header("access-control-allow-origin").is_none());
    let get_jobs = |origin: &'static str, key: Option<&'static str>| {
        let mut req = TransportRequest::new(Method::GET, "/jobs").header("origin", origin);
        if let Some(k) = key {
            req = req.header("authorization", &format!("Bearer {k}"));
        }
        c.request(req)
    };
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let res = get_jobs(origin, Some(READ_KEY)).await;
        assert_eq!(res.status, 200);
        assert_eq!(
            res.header("access-control-allow-origin").is_some(),
            allowed,
            "{origin}"
        );
    }
    // A 401 to an allowed origin carries the header too, so the browser shows the problem.
    let res = get_jobs("https://app.example", None).await;
    assert_eq!(res.status, 401);
    assert_eq!(
        res.header("access-control-allow-origin"),
        Some("https://app.example")
    );

    let any = server
        .serve(
            api_builder(fx.engine.clone())
                .cors_origins(vec!["*".into()])
                .build()
                .unwrap(),
            "",
        )
        .await;
    let res = any
        .client()
        .request(
            TransportRequest::new(Method::GET, "/health").header("origin", "https://x.example"),
        )
        .await;
    assert_eq!(res.header("access-control-allow-origin"), Some("*"));

    // Without configured origins nothing is added, and OPTIONS is just a method no route takes.
    let none = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let res = none
        .client()
        .request(
            TransportRequest::new(Method::OPTIONS, "/jobs")
                .header("origin", "https://app.example")
                .header("access-control-request-method", "GET"),
        )
        .await;
    assert_eq!(res.status, 405);
    assert!(res.header("access-control-allow-origin").is_none());
}

/// `GET /whoami` answers any valid key with its name and scopes, and nothing else.
async fn whoami(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    for (key, name, scope) in [
        (READ_KEY, "viewer", "read"),
        (TRIGGER_KEY, "ci", "trigger"),
        (ADMIN_KEY, "admin", "admin"),
    ] {
        let r = c.send("GET", "/whoami", Some(key), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json(), json!({"name": name, "scopes": [scope]}));
    }
    for key in [None, Some("wrong-key-wrong-key-wrong")] {
        let r = c.send("GET", "/whoami", key, None).await;
        r.assert_problem(401);
        assert!(r
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer")));
    }
}

/// Reads frames of a live stream until `done` says stop, at most `limit` frames.
async fn frames_until(
    live: &mut SseLive,
    limit: usize,
    mut done: impl FnMut(&SseFrame) -> bool,
) -> Vec<SseFrame> {
    let mut out = Vec::new();
    while out.len() < limit {
        let f = live.next_event().await.expect("the stream goes on");
        let stop = done(&f);
        out.push(f);
        if stop {
            break;
        }
    }
    out
}

fn cursor_of(f: &SseFrame) -> FeedCursor {
    f.id.as_deref()
        .expect("an id")
        .parse()
        .unwrap_or_else(|_| panic!("not a feed cursor: {f:?}"))
}

/// `GET /events`: every job's events in one stream, ids that resume it, the opening position,
/// the `kinds` filter, keep-alives and the errors.
async fn all_events(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let mut live = c.sse_live("/events", READ_KEY).await;
    let opening = live.next_frame().await.expect("the opening");
    assert!(opening.event.is_none(), "{opening:?}");
    let start = cursor_of(&opening);
    assert!(
        live.next_comment().await.is_some(),
        "keep-alive comments on an idle stream"
    );
    let trigger_job = |workflow: &'static str| {
        let c = c.clone();
        async move {
            let r = c
                .send(
                    "POST",
                    "/workflows/trigger",
                    Some(TRIGGER_KEY),
                    trigger(workflow),
                )
                .await;
            assert_eq!(r.status, 202, "{}", r.text);
            r.json()["job_id"].as_str().unwrap().to_owned()
        }
    };
    let id = trigger_job("echo").await;
    let frames = frames_until(&mut live, 50, |f| {
        f.data.contains(r#""to":"completed""#) && f.data.contains(&id)
    })
    .await;
    let frames: Vec<&SseFrame> = frames.iter().filter(|f| f.data.contains(&id)).collect();
    let kinds: Vec<&str> = frames.iter().map(|f| f.event.as_deref().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "status",
            "status",
            "step.started",
            "agent",
            "step.finished",
            "status"
        ]
    );
    let cursors: Vec<FeedCursor> = frames.iter().map(|f| cursor_of(f)).collect();
    assert!(cursors.iter().all(|c| c.epoch == start.epoch));
    assert!(
        cursors.windows(2).all(|w| w[0].seq < w[1].seq),
        "ids grow: {cursors:?}"
    );
    assert!(cursors[0].seq > start.seq);
    for (n, f) in frames.iter().enumerate() {
        let data: Value = serde_json::from_str(&f.data).unwrap();
        assert_eq!(data["job_id"], id);
        assert_eq!(data["seq"], n as u64 + 1, "the job's own sequence number");
        assert_eq!(data["kind"], f.event.as_deref().unwrap().replace('.', "_"));
    }

    // Resuming after the second event gives the rest, exactly.
    let mut resumed = c
        .sse_resume("/events", READ_KEY, Some(&cursors[1].to_string()))
        .await;
    let rest = frames_until(&mut resumed, 4, |_| false).await;
    let rest: Vec<FeedCursor> = rest.iter().map(cursor_of).collect();
    assert_eq!(rest, cursors[2..], "Last-Event-ID resumes after that event");
    // So does the opening position of a stream that saw nothing yet: nothing is missed.
    let mut quiet = c.sse_live("/events", READ_KEY).await;
    let quiet_start = cursor_of(&quiet.next_frame().await.expect("opening"));
    drop(quiet);
    let second = trigger_job("echo").await;
    let mut back = c
        .sse_resume("/events", READ_KEY, Some(&quiet_start.to_string()))
        .await;
    let first = back.next_event().await.expect("an event");
    let data: Value = serde_json::from_str(&first.data).unwrap();
    assert_eq!(
        (data["job_id"].as_str(), data["seq"].as_u64()),
        (Some(second.as_str()), Some(1))
    );

    // Only the kinds asked for.
    let mut statuses = c
        .sse_resume("/events?kinds=status", READ_KEY, Some(&start.to_string()))
        .await;
    let got = frames_until(&mut statuses, 6, |f| {
        f.data.contains(&second) && f.data.contains(r#""to":"completed""#)
    })
    .await;
    assert!(
        got.iter().all(|f| f.event.as_deref() == Some("status")),
        "{got:?}"
    );
    assert_eq!(got.len(), 6, "three status changes of each job");

    for (path, last) in [
        ("/events", Some("abc")),
        ("/events", Some("5")),
        ("/events?last_event_id=x-1", None),
        ("/events?kinds=status,bogus", None),
        ("/events?kinds=", None),
        ("/events?limit=1", None),
    ] {
        let mut req = TransportRequest::new(Method::GET, path)
            .header("authorization", &format!("Bearer {READ_KEY}"));
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        c.request(req).await.assert_problem(400);
    }
    c.send("GET", "/events", Some(TRIGGER_KEY), None)
        .await
        .assert_problem(403);
}

/// A cursor the feed cannot resume from (another process's, or older than what the feed keeps)
/// starts the stream with a `reset` event naming where it goes on from.
async fn all_events_resets(server: &dyn Serve) {
    let echo = ScriptedExecutor::succeeding("done");
    let engine = Engine::builder()
        .executor("echo", Arc::new(echo))
        .workflow(Workflow::new("echo").step(Step::prompt("say", "echo", "hi")))
        .feed_capacity(4, 1024 * 1024)
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("engine");
    let s = server
        .serve(api_builder(engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let before = engine.feed_cursor();
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(Body::Json(json!({"workflow": "echo", "async": false}))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The answer may come before the feed has the last event: wait (bounded) for all five.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while engine.feed_cursor().seq < before.seq + 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let now = engine.feed_cursor();
    assert!(now.seq >= before.seq + 5, "a job makes five events");
    // Events after `before` are gone from a ring of four.
    let other = FeedCursor {
        epoch: now.epoch ^ 1,
        seq: 3,
    };
    for (from, reason) in [(before, "expired"), (other, "other_feed")] {
        let mut live = c
            .sse_resume("/events", READ_KEY, Some(&from.to_string()))
            .await;
        let f = live.next_event().await.expect("a reset");
        assert_eq!(f.event.as_deref(), Some("reset"), "{f:?}");
        let data: Value = serde_json::from_str(&f.data).unwrap();
        assert_eq!(data["reason"], reason);
        assert_eq!(cursor_of(&f), now);
        assert_eq!(data["cursor"], now.to_string());
    }
    // The newest events are still there: no reset.
    let kept = FeedCursor {
        epoch: now.epoch,
        seq: now.seq - 2,
    };
    let mut live = c
        .sse_resume("/events", READ_KEY, Some(&kept.to_string()))
        .await;
    let f = live.next_event().await.expect("an event");
    assert_eq!(cursor_of(&f).seq, now.seq - 1);
    engine.shutdown(Duration::from_secs(1)).await;
}

/// The dashboard: its page and files without a key, with a strict policy; unknown files 404;
/// `ui` redirects to `ui/`; off, nothing is served.
async fn dashboard(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    for prefix in ["", "/aiwg"] {
        let s = server
            .serve(api_builder(fx.engine.clone()).build().unwrap(), prefix)
            .await;
        let c = s.client();
        let page = c.send("GET", "/ui/", None, None).await;
        assert_eq!(page.status, 200, "{}", page.text);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let csp = page.header("content-security-policy").expect("a CSP");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ] {
            assert!(csp.contains(directive), "the CSP lacks {directive}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(page.header("referrer-policy"), Some("no-referrer"));
        // Relative URLs: the page works wherever the router is mounted.
        assert!(page.text.contains(r#"src="app.js""#), "{}", page.text);
        assert!(page.text.contains(r#"href="style.css""#));
        for (file, ct) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("api.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ] {
            let r = c.send("GET", &format!("/ui/{file}"), None, None).await;
            assert_eq!(r.status, 200, "{file}");
            assert_eq!(r.header("content-type"), Some(ct), "{file}");
            assert_eq!(r.header("content-security-policy"), Some(csp), "{file}");
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        }
        c.send("GET", "/ui/nope.js", None, None)
            .await
            .assert_problem(404);
        // Whatever a router makes of these (decoded, normalised), nothing outside the
        // embedded files is served.
        for missing in ["/ui/..%2Fmod.rs", "/ui/%2e%2e", "/ui/..%2F..%2FCargo.toml"] {
            let r = c.send("GET", missing, None, None).await;
            assert_eq!(r.status, 404, "{missing}: {}", r.text);
        }
        let r = c.send("GET", "/ui", None, None).await;
        assert_eq!(r.status, 308);
        assert_eq!(r.header("location"), Some("ui/"));
        let r = c.send("POST", "/ui/", Some(ADMIN_KEY), None).await;
        r.assert_problem(405);
        assert_eq!(r.header("allow"), Some("GET"));
    }
    let off = server
        .serve(
            api_builder(fx.engine.clone())
                .dashboard(false)
                .build()
                .unwrap(),
            "",
        )
        .await;
    let c = off.client();
    for path in ["/ui/", "/ui/app.js", "/ui"] {
        assert_eq!(c.send("GET", path, None, None).await.status, 404, "{path}");
    }
    assert_eq!(c.send("GET", "/health", None, None).await.status, 200);
}

/// Asserts a 401 whose `WWW-Authenticate` is `Bearer … error="invalid_token"` with an
/// `error_description` containing `why`.
fn assert_invalid_token(r: &Reply, why: &str) {
    r.assert_problem(401);
    let h = r.header("www-authenticate").unwrap_or_default();
    assert!(
        h.starts_with("Bearer ") && h.contains("error=\"invalid_token\""),
        "{why}: {h}"
    );
    let desc = h
        .split_once("error_description=\"")
        .map(|(_, d)| d.trim_end_matches('"'))
        .unwrap_or_default();
    assert!(desc.contains(why), "expected `{why}` in: {desc}");
}

async fn jwt_bearer_tokens(server: &dyn Serve) {
    use super::jwt::{now, JwksServer, KeyKind, TestIssuer, AUDIENCE, ISSUER};
    let issuer = TestIssuer::generate();
    let jwks = JwksServer::start(json!({"keys": [
        issuer.jwk(KeyKind::Rsa, "rsa-1"),
        issuer.jwk(KeyKind::Ec, "ec-1"),
    ]}))
    .await;
    let verifier = crate::http::JwtVerifier::builder(ISSUER, AUDIENCE)
        .jwks_url(jwks.url())
        .unwrap()
        .refresh_cooldown(Duration::from_secs(3600))
        .build()
        .unwrap();
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(
            api_builder(fx.engine.clone())
                .jwt(verifier)
                .build()
                .unwrap(),
            "",
        )
        .await;
    let c = s.client();

    // RS256 from the JWKS: the subject and the scopes of the `scope` claim.
    let alice = issuer.sign(
        KeyKind::Rsa,
        Some("rsa-1"),
        &issuer.claims("alice", "openid read trigger"),
    );
    let r = c.send("GET", "/whoami", Some(&alice), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.json(),
        json!({"name": "alice", "scopes": ["read", "trigger"]})
    );
    assert_eq!(jwks.hits(), 1, "the JWKS is fetched once, then cached");
    let r = c
        .send("POST", "/workflows/trigger", Some(&alice), trigger("echo"))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let done = fx
        .engine
        .wait(id.parse().unwrap(), WAIT)
        .await
        .expect("job ends");
    assert_eq!(done.trigger.actor.as_deref(), Some("alice"));
    // `cancel` is not among alice's scopes.
    let r = c
        .send(
            "POST",
            &format!("/workflows/{id}/cancel"),
            Some(&alice),
            None,
        )
        .await;
    let p = r.assert_problem(403);
    assert!(p["detail"].as_str().unwrap().contains("alice"), "{p}");

    // ES256 from the same JWKS, scopes as an array; unknown names are ignored.
    let mut claims = issuer.claims("bob", "");
    claims["scope"] = json!(["read", "approve-everything"]);
    let bob = issuer.sign(KeyKind::Ec, Some("ec-1"), &claims);
    let r = c.send("GET", "/jobs", Some(&bob), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = c.send("GET", "/whoami", Some(&bob), None).await;
    assert_eq!(r.json()["scopes"], json!(["read"]));
    // A token without a known scope authenticates, and may do nothing.
    let nobody = issuer.sign(
        KeyKind::Rsa,
        Some("rsa-1"),
        &issuer.claims("carol", "openid"),
    );
    let r = c.send("GET", "/jobs", Some(&nobody), None).await;
    r.assert_problem(403);

    // API keys keep working beside tokens.
    let r = c.send("GET", "/jobs", Some(READ_KEY), None).await;
    assert_eq!(r.status, 200);

    // Every refusal: 401 with a precise `invalid_token` description.
    let good = issuer.claims("mallory", "admin");
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let cases: Vec<(String, &str)> = vec![
        (TestIssuer::unsigned(&good), "alg `none`"),
        (
            issuer.confused(KeyKind::Rsa, Some("rsa-1"), &good),
            "shared-secret algorithm",
        ),
        (
            issuer.sign(
                KeyKind::Rsa,
                Some("rsa-1"),
                &with("exp", json!(now() - 3600)),
            ),
            "expired",
        ),
        (
            issuer.sign(
                KeyKind::Rsa,
                Some("rsa-1"),
                &with("nbf", json!(now() + 3600)),
            ),
            "not valid yet",
        ),
        (
            issuer.sign(
                KeyKind::Ec,
                Some("ec-1"),
                &with("aud", json!("someone-else")),
            ),
            "audience",
        ),
        (
            issuer.sign(
                KeyKind::Rsa,
                Some("rsa-1"),
                &with("iss", json!("https://evil.test/")),
            ),
            "issuer",
        ),
        (
            {
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("sub");
                issuer.sign(KeyKind::Rsa, Some("rsa-1"), &c)
            },
            "`sub`",
        ),
        (
            {
                // alice's signature over mallory's claims.
                let forged = issuer.sign(KeyKind::Rsa, Some("rsa-1"), &good);
                let mut parts: Vec<&str> = forged.split('.').collect();
                let sig = alice.rsplit('.').next().unwrap();
                parts[2] = sig;
                parts.join(".")
            },
            "signature is invalid",
        ),
    ];
    for (token, why) in &cases {
        let r = c.send("GET", "/jobs", Some(token), None).await;
        assert_invalid_token(&r, why);
        assert!(
            !r.text.contains(token.as_str()),
            "a problem echoed the token"
        );
    }
    assert_eq!(jwks.hits(), 1, "refusals fetched nothing");

    // A key the JWKS did not hold yet: an unknown `kid` fetches it again, once.
    jwks.set(json!({"keys": [
        issuer.jwk(KeyKind::Rsa, "rsa-1"),
        issuer.jwk(KeyKind::Ec, "ec-1"),
        issuer.jwk(KeyKind::Ed, "ed-1"),
    ]}));
    let dave = issuer.sign(KeyKind::Ed, Some("ed-1"), &issuer.claims("dave", "read"));
    let r = c.send("GET", "/jobs", Some(&dave), None).await;
    assert_eq!(r.status, 200, "EdDSA after a refresh: {}", r.text);
    assert_eq!(jwks.hits(), 2);
    // Within the cooldown, further unknown key ids fetch nothing; nor does a key id used
    // with another key's algorithm (the EC key's signature under the RSA key's id).
    let mut unknown: Vec<String> = ["ghost-1", "ghost-2", "ghost-3"]
        .iter()
        .map(|kid| issuer.sign(KeyKind::Ed, Some(kid), &issuer.claims("eve", "read")))
        .collect();
    unknown.push(issuer.sign(KeyKind::Ec, Some("rsa-1"), &good));
    for t in &unknown {
        let r = c.send("GET", "/jobs", Some(t), None).await;
        assert_invalid_token(&r, "no signing key matches");
    }
    assert_eq!(jwks.hits(), 2, "unknown key ids are rate limited");
    // A token works on a WebSocket too, sent as the first message.
    let mut ws = ws_open(&c, "/ws", None).await;
    ws.auth(&dave);
    let ready = ws.next_json().await.expect("ready");
    assert_eq!(ready["data"], json!({"name": "dave", "scopes": ["read"]}));
    let mut ws = ws_open(&c, "/ws", None).await;
    ws.auth(&cases[2].0);
    let close = ws.until_close().await.1;
    assert_eq!(close.code, 4401);
    assert!(close.reason.contains("expired"), "{close:?}");
    // Audit records name the token's subject.
    let r = c.send("GET", "/audit", Some(ADMIN_KEY), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.json();
    let mine = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["actor"] == "alice")
        .cloned()
        .unwrap_or_else(|| panic!("no audit entry for alice: {entries}"));
    assert_eq!(mine["key_name"], "jwt:alice");

    // A provider whose JWKS cannot be read: 503 (the token could not be checked, it is not
    // refused), and no fetch again within the backoff, whatever comes in.
    let broken = JwksServer::start(json!("not a JWKS")).await;
    let verifier = crate::http::JwtVerifier::builder(ISSUER, AUDIENCE)
        .jwks_url(broken.url())
        .unwrap()
        .build()
        .unwrap();
    let s = server
        .serve(
            api_builder(fx.engine.clone())
                .jwt(verifier)
                .build()
                .unwrap(),
            "",
        )
        .await;
    let c = s.client();
    for _ in 0..3 {
        let r = c.send("GET", "/jobs", Some(&alice), None).await;
        let p = r.assert_problem(503);
        assert_eq!(p["type"], "urn:aiwg:problem:jwks-unavailable");
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(broken.hits(), 1, "failed fetches are not retried at once");
    let r = c.send("GET", "/jobs", Some(READ_KEY), None).await;
    assert_eq!(r.status, 200, "keys work while the provider is down");
}

impl Client {
    /// Opens a WebSocket at `path`; `key` goes in the `Authorization` header when given.
    pub async fn websocket(&self, path: &str, key: Option<&str>) -> Result<WsClient, Reply> {
        let mut req = TransportRequest::new(Method::GET, path);
        if let Some(k) = key {
            req = req.header("authorization", &format!("Bearer {k}"));
        }
        match self.transport.websocket(req).await {
            Ok(ws) => Ok(ws),
            Err(res) => {
                let text = read_all(res.body).await;
                Err(Reply {
                    status: res.status,
                    headers: res.headers,
                    text,
                })
            }
        }
    }
}

/// An SSE frame as the WebSocket carries it: `{"id", "event", "data"}` with `data` as JSON.
fn sse_as_json(f: &SseFrame) -> Value {
    json!({
        "id": f.id.clone().expect("an id"),
        "event": f.event.clone().expect("an event"),
        "data": serde_json::from_str::<Value>(&f.data).expect("JSON data"),
    })
}

/// A WebSocket that must open.
async fn ws_open(c: &Client, path: &str, key: Option<&str>) -> WsClient {
    match c.websocket(path, key).await {
        Ok(ws) => ws,
        Err(r) => panic!(
            "{path}: the upgrade was refused with {}: {}",
            r.status, r.text
        ),
    }
}

/// The WebSocket streams carry what the SSE streams carry, in the same order, with the same
/// ids and the same JSON; they resume after `last_event_id`, ping, and close with 1000 after a
/// job's terminal event.
async fn websockets(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let s = server
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "/aiwg")
        .await;
    let c = s.client();

    // `/ws` first, so that it sees the job from its start (header authentication).
    let mut all = ws_open(&c, "/ws", Some(READ_KEY)).await;
    let ready = all.next_json().await.expect("ready");
    assert_eq!(ready["event"], "ready", "{ready}");
    assert_eq!(ready["data"], json!({"name": "viewer", "scopes": ["read"]}));
    let start: FeedCursor = ready["id"]
        .as_str()
        .expect("the starting cursor")
        .parse()
        .unwrap();
    let mut feed = c
        .sse_resume("/events", READ_KEY, Some(&start.to_string()))
        .await;

    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("echo"),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["job_id"].as_str().unwrap().to_owned();

    // The job's own streams: SSE, then the WebSocket (history, then the close).
    let (_, frames) = c
        .sse(&format!("/workflows/{id}/events"), READ_KEY, None)
        .await;
    let sse: Vec<Value> = frames
        .iter()
        .filter(|f| !f.comment)
        .map(sse_as_json)
        .collect();
    assert_eq!(sse.len(), 6, "{sse:?}");
    let mut ws = ws_open(&c, &format!("/workflows/{id}/ws"), Some(READ_KEY)).await;
    let (msgs, close) = ws.until_close().await;
    assert_eq!(msgs[0]["event"], "ready");
    assert!(msgs[0].get("id").is_none(), "a job's ready names no cursor");
    assert_eq!(
        msgs[1..],
        sse[..],
        "the WebSocket carries the SSE stream's events"
    );
    assert_eq!(close.code, 1000, "{close:?}");

    // Resume after the third event, authenticating by message as a browser does.
    let mut ws = ws_open(&c, &format!("/workflows/{id}/ws?last_event_id=3"), None).await;
    ws.auth(READ_KEY);
    let (msgs, close) = ws.until_close().await;
    assert_eq!(msgs[0]["data"]["name"], "viewer");
    assert_eq!(msgs[1..], sse[3..], "resumed after event 3");
    assert_eq!(close.code, 1000);
    // Resumed after the last event: nothing more, and a normal close.
    let mut ws = ws_open(
        &c,
        &format!("/workflows/{id}/ws?last_event_id=6"),
        Some(READ_KEY),
    )
    .await;
    let (msgs, close) = ws.until_close().await;
    assert_eq!(msgs.len(), 1, "only ready: {msgs:?}");
    assert_eq!(close.code, 1000, "{close:?}");

    // `/ws` and `GET /events` give the same sequence for the job.
    let mut ws_events = Vec::new();
    while !ws_events
        .iter()
        .any(|v: &Value| v["data"]["to"] == "completed")
    {
        match all.next_json().await {
            Ok(v) => ws_events.push(v),
            Err(c) => panic!("/ws closed: {c:?}"),
        }
    }
    let sse_feed: Vec<Value> =
        frames_until(&mut feed, 50, |f| f.data.contains(r#""to":"completed""#))
            .await
            .iter()
            .map(sse_as_json)
            .collect();
    assert_eq!(ws_events, sse_feed, "/ws carries what GET /events carries");
    assert_eq!(ws_events.len(), 6);
    assert!(ws_events.iter().all(|v| v["data"]["job_id"] == id.as_str()));
    // Resume `/ws` after its second event: the rest, exactly.
    let second = ws_events[1]["id"].as_str().unwrap().to_owned();
    let mut resumed = ws_open(&c, &format!("/ws?last_event_id={second}"), Some(READ_KEY)).await;
    let ready = resumed.next_json().await.expect("ready");
    assert!(
        ready.get("id").is_none(),
        "a resumed stream names no new start: {ready}"
    );
    let mut rest = Vec::new();
    for _ in 2..ws_events.len() {
        rest.push(resumed.next_json().await.expect("an event"));
    }
    assert_eq!(rest[..], ws_events[2..]);
    // `?kinds=` as on `GET /events`.
    let mut statuses = ws_open(
        &c,
        &format!("/ws?last_event_id={start}&kinds=status"),
        Some(READ_KEY),
    )
    .await;
    statuses.next_json().await.expect("ready");
    for expected in ws_events.iter().filter(|v| v["event"] == "status") {
        assert_eq!(&statuses.next_json().await.expect("a status"), expected);
    }

    // Keep-alive: an idle socket is pinged, and stays open while the client answers (more
    // pings than the three a silent client is allowed).
    let mut pings = 0;
    while pings < 5 {
        match all.next().await {
            Some(WsMessage::Ping(_)) => pings += 1,
            Some(WsMessage::Pong(_)) => {}
            other => panic!("an idle /ws sent {other:?}"),
        }
    }
    // The server answers a client's ping.
    all.send(WsMessage::Ping(Bytes::from_static(b"hi")));
    loop {
        match all.next().await {
            Some(WsMessage::Pong(p)) if p == "hi" => break,
            Some(WsMessage::Ping(_) | WsMessage::Pong(_)) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    // A message after authentication is a policy violation.
    all.send(WsMessage::Text("hello".into()));
    let (_, close) = all.until_close().await;
    assert_eq!(close.code, 1008, "{close:?}");
}

/// Every refusal of a WebSocket: HTTP answers before the upgrade, close codes after it.
async fn websocket_refusals(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let api = api_builder(fx.engine.clone())
        .ws_auth_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    let c = s.client();
    let code = |path: &'static str, key: Option<&'static str>, message: Option<WsMessage>| {
        let c = c.clone();
        async move {
            let mut ws = ws_open(&c, path, key).await;
            if let Some(m) = message {
                ws.send(m);
            }
            let (msgs, close) = ws.until_close().await;
            assert!(msgs.is_empty(), "{path}: {msgs:?}");
            close
        }
    };
    const ZERO: &str = "/workflows/00000000-0000-7000-8000-000000000000/ws";
    let auth = |k: &str| {
        Some(WsMessage::Text(
            json!({"type": "auth", "token": k}).to_string(),
        ))
    };
    // Bad credentials, by header or by message: 4401 naming why.
    let close = code("/ws", Some("wrong-key-wrong-key-wrong"), None).await;
    assert_eq!(close.code, 4401, "{close:?}");
    assert!(close.reason.contains("invalid API key"), "{close:?}");
    let close = code("/ws", None, auth("wrong-key-wrong-key-wrong")).await;
    assert_eq!(close.code, 4401, "{close:?}");
    // No credentials by the deadline.
    let close = code("/ws", None, None).await;
    assert_eq!(close.code, 4401, "{close:?}");
    assert!(close.reason.contains("no credentials"), "{close:?}");
    // A key without `read`.
    let close = code("/ws", Some(TRIGGER_KEY), None).await;
    assert_eq!(close.code, 4403, "{close:?}");
    assert!(close.reason.contains("read"), "{close:?}");
    let close = code(ZERO, None, auth(TRIGGER_KEY)).await;
    assert_eq!(close.code, 4403, "{close:?}");
    // No such job.
    let close = code(ZERO, Some(READ_KEY), None).await;
    assert_eq!(close.code, 4404, "{close:?}");
    // Something else than the auth message first.
    let close = code("/ws", None, Some(WsMessage::Text("hello".into()))).await;
    assert_eq!(close.code, 1008, "{close:?}");
    let close = code(
        "/ws",
        None,
        Some(WsMessage::Binary(Bytes::from_static(b"\x00"))),
    )
    .await;
    assert_eq!(close.code, 1003, "{close:?}");

    // Before the upgrade: malformed parameters are 400 problems.
    for path in [
        "/workflows/not-a-job/ws",
        "/workflows/00000000-0000-7000-8000-000000000000/ws?last_event_id=9223372036854775808",
        "/ws?last_event_id=nope",
        "/ws?kinds=nope",
        "/ws?x=1",
    ] {
        let r = c
            .websocket(path, Some(READ_KEY))
            .await
            .err()
            .unwrap_or_else(|| panic!("{path} upgraded"));
        r.assert_problem(400);
    }
    // Without an upgrade: authenticated like any request, then 426.
    let r = c.send("GET", "/ws", Some(READ_KEY), None).await;
    r.assert_problem(426);
    assert_eq!(r.header("upgrade"), Some("websocket"));
    let r = c.send("GET", ZERO, None, None).await;
    r.assert_problem(401);
}

/// Upgrades are limited per client address like any request that needs credentials: a socket
/// that never authenticates (no credentials by the deadline, something else than the auth
/// message first) counts as a failed verification, as a request with a missing or wrong key
/// does; past the limit the session closes 4429, and the address's next upgrades are refused
/// 429 with `Retry-After` before any handshake, whatever credentials they carry.
async fn websocket_rate_limit(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let api = api_builder(fx.engine.clone())
        .rate_limit(RateLimit {
            per_minute: 1,
            burst: 2,
        })
        .ws_auth_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    let c = s.client();
    // No credentials by the deadline: one failure.
    let mut ws = ws_open(&c, "/ws", None).await;
    let (msgs, close) = ws.until_close().await;
    assert!(msgs.is_empty(), "{msgs:?}");
    assert_eq!(close.code, 4401, "{close:?}");
    // Something else than the auth message first: a second.
    let mut ws = ws_open(&c, "/ws", None).await;
    ws.send(WsMessage::Text("hello".into()));
    let (_, close) = ws.until_close().await;
    assert_eq!(close.code, 1008, "{close:?}");
    // A third runs over the limit.
    let mut ws = ws_open(&c, "/ws", None).await;
    let (_, close) = ws.until_close().await;
    assert_eq!(
        close.code, 4429,
        "a third socket without credentials: {close:?}"
    );
    // The address is now refused before the upgrade, with the right key too, and so are its
    // requests.
    for key in [None, Some(READ_KEY)] {
        let r =
            c.websocket("/ws", key).await.err().unwrap_or_else(|| {
                panic!("an upgrade from a blocked address ({key:?}) went through")
            });
        r.assert_problem(429);
        assert!(r.header("retry-after").is_some(), "Retry-After");
    }
    c.send("GET", "/jobs", Some(READ_KEY), None)
        .await
        .assert_problem(429);
}

/// An address may hold `burst` sockets waiting for their credentials at once (upgraded without
/// an `Authorization` header, no auth message yet): another such upgrade is refused 429 before
/// the handshake, with `Retry-After` (the auth deadline), until one of them presents its
/// credentials. Upgrades that carry credentials never wait, and are not refused for it.
async fn websocket_sockets_waiting_for_credentials(server: &dyn Serve) {
    let fx = fixture(FixtureOptions::default());
    let api = api_builder(fx.engine.clone())
        .rate_limit(RateLimit {
            per_minute: 6000,
            burst: 2,
        })
        .ws_auth_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let s = server.serve(api, "").await;
    let c = s.client();
    let first = ws_open(&c, "/ws", None).await;
    let mut second = ws_open(&c, "/ws", None).await;
    let r = c
        .websocket("/ws", None)
        .await
        .err()
        .unwrap_or_else(|| panic!("a third socket waiting for credentials was upgraded"));
    r.assert_problem(429);
    assert_eq!(r.header("retry-after"), Some("30"), "Retry-After");
    // With credentials in the upgrade nothing waits. (Each key authenticates once here: a
    // key's own budget has the same burst.)
    let mut by_header = ws_open(&c, "/ws", Some(ADMIN_KEY)).await;
    let ready = by_header.next_json().await.expect("ready");
    assert_eq!(ready["event"], "ready", "{ready}");
    // Once one of the two has presented its credentials, its place is free again.
    second.auth(READ_KEY);
    let ready = second.next_json().await.expect("ready");
    assert_eq!(ready["event"], "ready", "{ready}");
    let third = ws_open(&c, "/ws", None).await;
    c.websocket("/ws", None)
        .await
        .err()
        .unwrap_or_else(|| panic!("a third socket waiting beside two was upgraded"))
        .assert_problem(429);
    drop((first, third));
}

/// A WebSocket client that stops reading is dropped: every write to it is bounded (by the
/// keep-alive interval times the pings a client may leave unanswered), so a stalled client
/// holds neither a socket nor a task for ever. Over real HTTP only (an in-process API has no
/// socket to stall): an adapter's tests call it beside [`conformance_suite`].
///
/// The client authenticates by header, then reads nothing (a small receive buffer), while its
/// finished job's stream has some 15 MiB of events to send, more than the buffers between them
/// hold. While a write is stuck the server reads nothing either, so the client's own writes
/// (8 MiB of pongs) stall too, until the server gives the session up: then they go through
/// (the input discarded) or fail (the connection dropped). Either way the stream then ends
/// without a close frame: the session was cut, it did not run to its end.
pub async fn websocket_client_that_stops_reading(server: &dyn Serve) {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("proj")).expect("mkdir");
    let chunk = "x".repeat(60 * 1024);
    let flood = (0..256).fold(ScriptedExecutor::succeeding("done"), |e, _| {
        e.emit(AgentEvent::Text {
            text: chunk.clone(),
        })
    });
    let engine = Engine::builder()
        .policy(
            ProjectPolicy::builder()
                .root(root.path())
                .build()
                .expect("policy"),
        )
        .executor("flood", Arc::new(flood))
        .workflow(Workflow::new("flood").step(Step::prompt("flood", "flood", "go")))
        .max_output_bytes(64 << 20)
        .max_line_bytes(128 << 10)
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("engine");
    let s = server
        .serve(api_builder(engine.clone()).build().unwrap(), "")
        .await;
    let c = s.client();
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            trigger("flood"),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    // Finished first, so that the whole flood is there to send the moment the socket opens.
    let job = engine
        .wait(id.parse().expect("a job id"), WAIT)
        .await
        .expect("the job ends");
    assert!(job.is_terminal(), "{job:?}");

    let addr = s
        .base_url
        .strip_prefix("http://")
        .expect("a server over HTTP")
        .to_owned();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_send_buffer_size(4096).expect("SO_SNDBUF");
    let tcp = socket
        .connect(addr.parse().expect("an address"))
        .await
        .expect("connect");
    let mut req = format!("ws://{addr}/workflows/{id}/ws")
        .into_client_request()
        .expect("a WebSocket request");
    req.headers_mut().insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {READ_KEY}")).unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("the upgrade");

    // From here on the client reads nothing until the server has let the session go. What it
    // writes are pongs, which the session takes at any time without closing.
    let pong = Bytes::from_static(&[0u8; 125]);
    let wrote = tokio::time::timeout(WAIT, async {
        for _ in 0..(8 << 20) / 131 {
            if ws.feed(Message::Pong(pong.clone())).await.is_err() {
                return;
            }
        }
        let _ = ws.flush().await;
    })
    .await;
    assert!(
        wrote.is_ok(),
        "the server still holds the session of a client that stopped reading"
    );
    let close = tokio::time::timeout(WAIT, async {
        let mut close = None;
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(c)) => close = Some(c),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        close
    })
    .await
    .expect("the connection ends");
    assert!(
        close.is_none(),
        "the stream ran to its end ({close:?}): the client never stalled the server"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The framework-neutral HTTP layer passes the suite on its own, with no router.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_api_passes_the_conformance_suite_in_process() {
        conformance_suite(&InProcess).await;
    }

    #[test]
    fn path_segments_are_percent_decoded_like_the_routers_do() {
        assert_eq!(percent_decode("..%2F..%2Fetc"), "../../etc");
        assert_eq!(percent_decode("a+b%20c%zz%4"), "a+b c%zz%4");
        assert_eq!(percent_decode("%00"), "\0");
    }
}
