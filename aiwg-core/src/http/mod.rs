//! Framework-neutral HTTP handling.
//!
//! Everything the HTTP API decides — authentication, scopes, rate limits, parsing, status codes,
//! problem documents, SSE framing, idempotency — is decided here, so the axum and actix-web
//! adapters only translate: they register the paths of the route table [`ROUTES`] (the one
//! place that names each endpoint's path, methods and access) that the API serves
//! ([`Api::routes`]), buffer the body up to [`Api::body_limit`] (answering
//! [`Api::payload_too_large`] beyond it, before buffering more), build an [`ApiRequest`] and
//! write back the [`ApiResponse`].
//!
//! ## The dashboard
//!
//! With [`ApiBuilder::dashboard`] on, the API also serves a dashboard at `ui/` under wherever
//! the router is mounted: a page (HTML, CSS and JavaScript embedded in this crate — nothing is
//! fetched from anywhere else, and nothing needs building) that shows jobs with their live
//! logs, workflows with a form that triggers them, outbound webhook subscriptions with their
//! deliveries, and the server's status. The page itself needs no key; it asks the operator for
//! one, keeps it in the browser tab's `sessionStorage`, and calls this same API with it, so
//! what the key's scopes do not allow is not offered. It is served with a strict
//! Content-Security-Policy (only its own scripts and styles, no inline code, Trusted Types), and
//! it inserts every piece of data as text, never as markup. Live updates come from
//! `GET /events`, every job's events as server-sent events ([`Engine::feed`](crate::Engine::feed)),
//! which the page reads with `fetch` (so the key travels in the `Authorization` header, never
//! in a URL) and resumes with `Last-Event-ID` after a lost connection.
//!
//! ```
//! # use std::sync::Arc;
//! # use aiwg_core::http::{Api, Route};
//! # use aiwg_core::{Engine, Step, Workflow};
//! # use aiwg_core::test_util::ScriptedExecutor;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let engine = Engine::builder()
//! #     .executor("echo", Arc::new(ScriptedExecutor::succeeding("done")))
//! #     .workflow(Workflow::new("hello").step(Step::prompt("say", "echo", "hi")))
//! #     .build()
//! #     .unwrap();
//! let api = Api::builder(engine).dashboard(true).build().unwrap();
//! assert!(api.serves(Route::Dashboard));
//! // Mounted at /aiwg, the page is at /aiwg/ui/.
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::dispatch::Dispatcher;
use crate::engine::Engine;

mod auth;
mod cors;
mod handlers;
mod jwt;
pub mod openapi;
mod problem;
mod request_id;
mod routes;
mod sse;
mod trigger;
pub mod types;
mod ui;
mod verified_tokens;
pub mod ws;

pub use auth::{ApiKey, KeyError, RateLimit, Scope};
pub use jwt::{JwtConfigError, JwtError, JwtIdentity, JwtVerifier, JwtVerifierBuilder, MAX_LEEWAY};
pub use problem::Problem;
pub use request_id::{answer_with_request_id, new_request_id, request_id, REQUEST_ID};
pub use routes::{match_route, Access, Route, RouteSpec, ROUTES};
pub use trigger::trigger_body;
pub use ws::{is_websocket_upgrade, WsClose, WsMessage, WsSession};

/// One HTTP request, as an adapter hands it over.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ApiRequest {
    /// Which endpoint matched.
    pub route: Route,
    /// The method.
    pub method: Method,
    /// Path parameters in the order of the route's pattern.
    pub params: Vec<String>,
    /// The raw query string (without `?`).
    pub query: Option<String>,
    /// Request headers.
    pub headers: HeaderMap,
    /// The body, already limited to [`Api::body_limit`].
    pub body: Bytes,
    /// The client's address, for per-address rate limits.
    pub peer: Option<IpAddr>,
    /// Where the router is mounted (e.g. `/aiwg`; empty at the root), for the URLs in answers.
    pub base_path: String,
}

impl ApiRequest {
    /// A request for `route` with `method`; fill the rest with the `with_*` methods.
    #[must_use]
    pub fn new(route: Route, method: Method) -> Self {
        Self {
            route,
            method,
            params: Vec::new(),
            query: None,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            peer: None,
            base_path: String::new(),
        }
    }

    /// Sets the path parameters.
    #[must_use]
    pub fn with_params(mut self, params: Vec<String>) -> Self {
        self.params = params;
        self
    }

    /// Sets the query string.
    #[must_use]
    pub fn with_query(mut self, query: Option<String>) -> Self {
        self.query = query;
        self
    }

    /// Sets the headers.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn with_body(mut self, body: Bytes) -> Self {
        self.body = body;
        self
    }

    /// Sets the client address.
    #[must_use]
    pub fn with_peer(mut self, peer: Option<IpAddr>) -> Self {
        self.peer = peer;
        self
    }

    /// Sets the mount prefix.
    #[must_use]
    pub fn with_base_path(mut self, base: impl Into<String>) -> Self {
        self.base_path = base.into().trim_end_matches('/').to_owned();
        self
    }
}

/// Where the API is mounted, read off a request: the part of its path (`path`, as sent, still
/// percent-encoded) before the segments of the route's own pattern (`route_pattern`, one of
/// [`Api::routes`]' paths). Under a prefix with a parameter of the host's (`/{tenant}`) this is
/// the request's own (`/acme`), which is what the links in answers need; the matched pattern
/// would give the literal `/{tenant}`.
///
/// Empty at the root, and when the prefix would not be a path of this server (an empty
/// segment, as in `//host/…`, which a client would read as another host): a link without the
/// prefix is wrong, one to another host is worse.
///
/// ```
/// use aiwg_core::http::mount_prefix;
///
/// assert_eq!(mount_prefix("/acme/workflows/trigger", "/workflows/trigger"), "/acme");
/// assert_eq!(mount_prefix("/a/b%20c/workflows/j1/status", "/workflows/{job_id}/status"), "/a/b%20c");
/// assert_eq!(mount_prefix("/workflows/trigger", "/workflows/trigger"), "");
/// assert_eq!(mount_prefix("//evil.example/workflows/trigger", "/workflows/trigger"), "");
/// ```
#[must_use]
pub fn mount_prefix(path: &str, route_pattern: &str) -> String {
    let route_segments = route_pattern.trim_end_matches('/').matches('/').count();
    let Some(prefix_segments) = path
        .trim_end_matches('/')
        .matches('/')
        .count()
        .checked_sub(route_segments)
        .filter(|n| *n > 0)
    else {
        return String::new();
    };
    // The byte where the route's part begins: the `prefix_segments + 1`th slash.
    let end = path
        .match_indices('/')
        .nth(prefix_segments)
        .map_or(path.len(), |(i, _)| i);
    let prefix = &path[..end];
    if !prefix.starts_with('/') || prefix.split('/').skip(1).any(str::is_empty) {
        return String::new();
    }
    prefix.to_owned()
}

/// A response body: bytes, or a stream of chunks (SSE).
pub enum ApiBody {
    /// The whole body.
    Full(Bytes),
    /// A stream of chunks, flushed as they come.
    Stream(Pin<Box<dyn Stream<Item = Bytes> + Send>>),
}

impl fmt::Debug for ApiBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiBody::Full(b) => f.debug_tuple("Full").field(&b.len()).finish(),
            ApiBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// One HTTP response, for an adapter to write.
#[derive(Debug)]
#[non_exhaustive]
pub struct ApiResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: ApiBody,
}

impl ApiResponse {
    /// A JSON response.
    #[must_use]
    pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Self {
        // Sized for a typical answer (a trigger's is about 230 bytes): `to_vec` starts at 128
        // and grows, copying, once or twice.
        Self::json_sized(status, value, 512)
    }

    /// [`json`](Self::json), the body written into room for `capacity` bytes.
    pub(crate) fn json_sized(
        status: StatusCode,
        value: &impl serde::Serialize,
        capacity: usize,
    ) -> Self {
        let mut body = Vec::with_capacity(capacity);
        if serde_json::to_writer(&mut body, value).is_err() {
            body = b"{}".to_vec();
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Self {
            status,
            headers,
            body: ApiBody::Full(Bytes::from(body)),
        }
    }

    /// A response with a body of `content_type`.
    #[must_use]
    pub fn bytes(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        Self {
            status,
            headers,
            body: ApiBody::Full(body.into()),
        }
    }

    /// An empty response.
    #[must_use]
    pub fn empty(status: StatusCode) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: ApiBody::Full(Bytes::new()),
        }
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: http::header::HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The full body (empty for streams), for tests and logging.
    #[must_use]
    pub fn body_bytes(&self) -> Option<&Bytes> {
        match &self.body {
            ApiBody::Full(b) => Some(b),
            ApiBody::Stream(_) => None,
        }
    }
}

/// Handles `/hooks/{platform}` (implemented by `aiwg-webhook`). It receives the raw body and
/// answers as the platform expects; the API has already applied the body limit and the
/// per-address rate limit.
#[async_trait]
pub trait HookHandler: Send + Sync + 'static {
    /// Verifies, parses and acts on one platform delivery.
    async fn handle(&self, platform: &str, headers: &HeaderMap, body: Bytes) -> ApiResponse;
}

struct Inner {
    engine: Engine,
    keys: Vec<ApiKey>,
    jwt: Option<JwtVerifier>,
    limiter: Option<auth::Limiter>,
    dispatcher: Option<Dispatcher>,
    hooks: Option<Arc<dyn HookHandler>>,
    body_limit: usize,
    keep_alive: Duration,
    /// The SSE frames of job events, shared by the subscribers of a job.
    frames: Arc<sse::FrameCache>,
    ws_auth_timeout: Duration,
    metrics_public: bool,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    cors_origins: Vec<String>,
    trusted_proxies: Vec<crate::dispatch::IpNet>,
    forwarded_header: ForwardedHeader,
    dashboard: bool,
}

/// The HTTP API over an [`Engine`]. Cheap to clone; build it with [`Api::builder`].
#[derive(Clone)]
pub struct Api {
    inner: Arc<Inner>,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("keys", &self.inner.keys.len())
            .field("body_limit", &self.inner.body_limit)
            .field("hooks", &self.inner.hooks.is_some())
            .field("dispatcher", &self.inner.dispatcher.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds an [`Api`].
#[must_use]
pub struct ApiBuilder {
    engine: Engine,
    keys: Vec<ApiKey>,
    jwt: Option<JwtVerifier>,
    rate_limit: Option<RateLimit>,
    dispatcher: Option<Dispatcher>,
    hooks: Option<Arc<dyn HookHandler>>,
    body_limit: usize,
    keep_alive: Duration,
    ws_auth_timeout: Duration,
    metrics_public: bool,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    cors_origins: Vec<String>,
    trusted_proxies: Vec<crate::dispatch::IpNet>,
    forwarded_header: ForwardedHeader,
    dashboard: bool,
}

/// Why an [`Api`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// A setting is out of range.
    #[error("invalid API setting `{key}`: {reason}")]
    Setting {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ApiBuilder {
    /// Adds an API key.
    pub fn key(mut self, key: ApiKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Adds API keys.
    pub fn keys(mut self, keys: impl IntoIterator<Item = ApiKey>) -> Self {
        self.keys.extend(keys);
        self
    }

    /// Accept JWTs verified by `verifier` as bearer tokens beside the API keys (`auth.jwt`).
    /// A bearer value that matches a key is that key; one shaped like a JWT is verified as a
    /// token, and refused with `WWW-Authenticate: Bearer error="invalid_token",
    /// error_description="…"` when it fails.
    pub fn jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    /// Rate limit per key and per client address (default: none).
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// The outbound webhook dispatcher behind `/webhooks` (without one those routes answer 404).
    pub fn dispatcher(mut self, dispatcher: Dispatcher) -> Self {
        self.dispatcher = Some(dispatcher);
        self
    }

    /// The platform webhook handler behind `/hooks/*` (without one they answer 404).
    pub fn hooks(mut self, hooks: Arc<dyn HookHandler>) -> Self {
        self.hooks = Some(hooks);
        self
    }

    /// Largest accepted request body (default 1 MiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Interval of SSE keep-alive comments and WebSocket pings (default 15 s).
    pub fn keep_alive(mut self, every: Duration) -> Self {
        self.keep_alive = every;
        self
    }

    /// How long a WebSocket client without an `Authorization` header has to send its
    /// `{"type": "auth", "token": "..."}` message (default 10 s); past it the socket is
    /// closed with 4401.
    pub fn ws_auth_timeout(mut self, timeout: Duration) -> Self {
        self.ws_auth_timeout = timeout;
        self
    }

    /// Serve `/metrics` without a key (default: `read` scope required).
    pub fn public_metrics(mut self, public: bool) -> Self {
        self.metrics_public = public;
        self
    }

    /// The Prometheus handle `/metrics` renders (default: the process-wide recorder aiwg
    /// installs on first use, if no other recorder is installed).
    pub fn metrics_handle(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Origins allowed by CORS (adapters read them with [`Api::cors_origins`]).
    pub fn cors_origins(mut self, origins: Vec<String>) -> Self {
        self.cors_origins = origins;
        self
    }

    /// Proxies whose `X-Forwarded-For` / `Forwarded` headers are believed (`server.
    /// trusted_proxies`). A request from one of them is attributed to the last address in
    /// those headers that is not itself a trusted proxy; from anyone else the headers are
    /// ignored, so a client cannot choose the address its rate limit is counted against.
    pub fn trusted_proxies(mut self, proxies: Vec<crate::dispatch::IpNet>) -> Self {
        self.trusted_proxies = proxies;
        self
    }

    /// The header trusted proxies write the client's address in (`server.forwarded_header`;
    /// default `X-Forwarded-For`). Only it is read: a proxy that writes one passes the other
    /// through as the client sent it.
    pub fn forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.forwarded_header = header;
        self
    }

    /// Serve the dashboard at `ui/` (default: off). Off, the routes [`Route::Dashboard`],
    /// [`Route::DashboardAsset`] and [`Route::DashboardRedirect`] are not among
    /// [`Api::routes`], so the adapters leave `ui/` to the host app (and [`Api::handle`]
    /// answers them 404).
    pub fn dashboard(mut self, on: bool) -> Self {
        self.dashboard = on;
        self
    }

    /// Builds the API.
    pub fn build(self) -> Result<Api, ApiError> {
        if self.body_limit == 0 {
            return Err(ApiError::Setting {
                key: "server.body_limit",
                reason: "must be greater than zero".into(),
            });
        }
        if self.ws_auth_timeout.is_zero() {
            return Err(ApiError::Setting {
                key: "ws_auth_timeout",
                reason: "must be greater than zero".into(),
            });
        }
        if self.keep_alive.is_zero() {
            return Err(ApiError::Setting {
                key: "keep_alive",
                reason: "must be greater than zero".into(),
            });
        }
        let limiter = self
            .rate_limit
            .map(auth::Limiter::new)
            .transpose()
            .map_err(|reason| ApiError::Setting {
                key: "auth.rate_limit",
                reason,
            })?;
        let metrics = self.metrics.or_else(handlers::global_metrics);
        Ok(Api {
            inner: Arc::new(Inner {
                engine: self.engine,
                keys: self.keys,
                jwt: self.jwt,
                limiter,
                dispatcher: self.dispatcher,
                hooks: self.hooks,
                body_limit: self.body_limit,
                keep_alive: self.keep_alive,
                frames: Arc::new(sse::FrameCache::new()),
                ws_auth_timeout: self.ws_auth_timeout,
                metrics_public: self.metrics_public,
                metrics,
                cors_origins: self.cors_origins,
                trusted_proxies: self.trusted_proxies,
                forwarded_header: self.forwarded_header,
                dashboard: self.dashboard,
            }),
        })
    }
}

impl Api {
    /// A builder over `engine`: no keys (every protected route answers 401 until one is
    /// added), no rate limit, 1 MiB bodies.
    pub fn builder(engine: Engine) -> ApiBuilder {
        ApiBuilder {
            engine,
            keys: Vec::new(),
            jwt: None,
            rate_limit: None,
            dispatcher: None,
            hooks: None,
            body_limit: 1024 * 1024,
            keep_alive: Duration::from_secs(15),
            ws_auth_timeout: ws::AUTH_TIMEOUT,
            metrics_public: false,
            metrics: None,
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: ForwardedHeader::default(),
            dashboard: false,
        }
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Whether this API serves `route` (the dashboard's routes only with
    /// [`ApiBuilder::dashboard`]).
    #[must_use]
    pub fn serves(&self, route: Route) -> bool {
        match route {
            Route::Dashboard | Route::DashboardAsset | Route::DashboardRedirect => {
                self.inner.dashboard
            }
            _ => true,
        }
    }

    /// The rows of [`ROUTES`] this API serves: what an adapter registers.
    pub fn routes(&self) -> impl Iterator<Item = &'static RouteSpec> + '_ {
        ROUTES.iter().filter(|spec| self.serves(spec.route))
    }

    /// The dispatcher, if any.
    #[must_use]
    pub fn dispatcher(&self) -> Option<&Dispatcher> {
        self.inner.dispatcher.as_ref()
    }

    /// The largest body adapters may buffer.
    #[must_use]
    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
    }

    /// CORS origins from the configuration (`*` allows any); the API answers preflights and
    /// adds the CORS headers itself, so adapters need no CORS middleware.
    #[must_use]
    pub fn cors_origins(&self) -> &[String] {
        &self.inner.cors_origins
    }

    /// The answer for a body over the limit (413 problem).
    #[must_use]
    pub fn payload_too_large(&self) -> ApiResponse {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "the request body exceeds the limit of {} bytes",
                self.inner.body_limit
            ),
        )
        .into_response()
    }

    /// The answer for a path no route matches (404 problem), for adapters' fallbacks.
    #[must_use]
    pub fn not_found(&self) -> ApiResponse {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint").into_response()
    }

    /// Answers one request.
    pub async fn handle(&self, mut request: ApiRequest) -> ApiResponse {
        if !self.serves(request.route) {
            return self.not_found();
        }
        request.peer = self.client_address(request.peer, &request.headers);
        handlers::handle(self, request).await
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the last address
    /// of the proxies' header ([`ApiBuilder::forwarded_header`]: `X-Forwarded-For` by default,
    /// else `Forwarded: for=`) that is not a trusted proxy. Only that header is read: a proxy
    /// passes the other through as the client wrote it. A hop that is not an address (`unknown`,
    /// an obfuscated name) ends the walk, and the trusted proxy nearest to it is taken for the
    /// client: what lies beyond it may be the client's own invention. Hops may carry a port
    /// (`203.0.113.5:4711`, `[2001:db8::1]:4711`).
    #[must_use]
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let trusted = |ip: IpAddr| self.inner.trusted_proxies.iter().any(|n| n.contains(ip));
        let peer = peer?;
        if !trusted(peer) {
            return Some(peer);
        }
        let mut hops: Vec<Option<IpAddr>> = Vec::new();
        match self.inner.forwarded_header {
            ForwardedHeader::XForwardedFor => {
                for v in headers.get_all("x-forwarded-for") {
                    let Ok(v) = v.to_str() else {
                        hops.push(None);
                        continue;
                    };
                    hops.extend(v.split(',').map(hop_address));
                }
            }
            ForwardedHeader::Forwarded => {
                for v in headers.get_all("forwarded") {
                    let Ok(v) = v.to_str() else {
                        hops.push(None);
                        continue;
                    };
                    // One element per hop; its `for=` names the address.
                    hops.extend(v.split(',').map(|element| {
                        element.split(';').find_map(|part| {
                            let (k, val) = part.trim().split_once('=')?;
                            k.trim()
                                .eq_ignore_ascii_case("for")
                                .then(|| hop_address(val.trim().trim_matches('"')))
                        })?
                    }));
                }
            }
        }
        let mut nearest = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if trusted(ip) => nearest = ip,
                Some(ip) => return Some(ip),
                None => break,
            }
        }
        Some(nearest)
    }
}

/// One hop of a forwarding header as an address: `203.0.113.5`, `203.0.113.5:4711`,
/// `2001:db8::1`, `[2001:db8::1]:4711`; `None` for anything else.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (ip, port) = rest.split_once(']')?;
        if !(port.is_empty()
            || port
                .strip_prefix(':')
                .is_some_and(|p| p.parse::<u16>().is_ok()))
        {
            return None;
        }
        return ip.parse().ok();
    }
    let (ip, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Which header trusted proxies write the client's address in (`server.forwarded_header`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (the default: nginx, HAProxy's `option forwardfor`, most load
    /// balancers).
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    /// `Forwarded` (RFC 7239: HAProxy's `option forwarded`, some configured proxies).
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// Parses a query string into a map (last value wins).
pub(crate) fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}
