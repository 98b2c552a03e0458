//! # aiwg-axum
//!
//! The aiwg HTTP API as an [`axum::Router`] you mount in your own app. Everything the API
//! decides (authentication, status codes, problem documents, SSE framing) lives in
//! [`aiwg_core::http`]; this crate only translates between axum and that module.
//!
//! ```no_run
//! use std::sync::Arc;
//! use aiwg_core::http::{Api, ApiKey, Scope};
//! use aiwg_core::{Engine, Step, Workflow};
//! use aiwg_core::test_util::ScriptedExecutor;
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::builder()
//!     .executor("echo", Arc::new(ScriptedExecutor::succeeding("done")))
//!     .workflow(Workflow::new("hello").step(Step::prompt("say", "echo", "hi")))
//!     .build()?;
//! let api = Api::builder(engine)
//!     .key(ApiKey::plain("ci", &std::env::var("AIWG_API_KEY")?, vec![Scope::Admin])?)
//!     .build()?;
//!
//! // Your app, with aiwg under /aiwg.
//! let app = axum::Router::new()
//!     .route("/", axum::routing::get(|| async { "my service" }))
//!     .nest("/aiwg", aiwg_axum::router(api));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3100").await?;
//! axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
//! # Ok(()) }
//! ```
//!
//! Serve with `into_make_service_with_connect_info::<SocketAddr>()` so per-address rate limits
//! see the client address. The WebSocket routes (`GET /workflows/{job_id}/ws`, `GET /ws`) are
//! upgraded with axum's own [`WebSocketUpgrade`]; the
//! protocol itself is [`aiwg_core::http::ws`], this crate only carries its frames. Request bodies are limited to [`Api::body_limit`] before they are
//! buffered; responses carry an `x-request-id` (the client's, or a new UUIDv7, which the API
//! sees too); CORS follows [`Api::cors_origins`] (decided by the API itself, identically for
//! both routers).
//!
//! The router adds no middleware of its own: wrap your app in the layers you want (a
//! `tower_http::trace::TraceLayer` for a span per request, compression, timeouts), and they
//! apply to aiwg's routes as to yours.

use std::convert::Infallible;
use std::net::SocketAddr;

use aiwg_core::http::ws::send_within;
use aiwg_core::http::{
    answer_with_request_id, request_id, Api, ApiBody, ApiRequest, ApiResponse, Route, WsClose,
    WsMessage, WsSession,
};
use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, OriginalUri, RawPathParams, Request};
use axum::response::Response;
use axum::routing::any;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use http::header::CONTENT_LENGTH;

/// The aiwg API as a router: `nest` it under a prefix or `merge` it at the root. Every path
/// the API serves ([`Api::routes`]: the route table, with the dashboard's `ui/` paths when
/// [`ApiBuilder::dashboard`](aiwg_core::http::ApiBuilder::dashboard) is on) is registered.
pub fn router<S>(api: Api) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let mut router = Router::new();
    for spec in api.routes() {
        let api = api.clone();
        let (pattern, route) = (spec.path, spec.route);
        router = router.route(
            pattern,
            any(move |req: Request| serve(api.clone(), route, pattern, req)),
        );
    }
    router
}

/// One request: its id kept or made (the API sees it; the response carries it), then the API's
/// answer.
async fn serve(api: Api, route: Route, pattern: &'static str, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let request_id = request_id(&mut parts.headers);
    let mut res = answer(api, route, pattern, parts, body).await;
    answer_with_request_id(res.headers_mut(), request_id);
    res
}

async fn answer(
    api: Api,
    route: Route,
    pattern: &'static str,
    mut parts: http::request::Parts,
    body: Body,
) -> Response {
    // Picked by name (the last of a name: the route's own), as the actix adapter does: under a
    // router nested at a pattern with parameters (`/{tenant}`), axum lists the enclosing
    // parameters first, and taking them by position shifted every parameter of the route.
    let params = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(raw) => {
            let raw: Vec<(&str, &str)> = raw.iter().collect();
            route
                .spec()
                .param_names()
                .map(|name| {
                    raw.iter()
                        .rev()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| (*v).to_owned())
                        .unwrap_or_default()
                })
                .collect()
        }
        Err(_) => Vec::new(),
    };
    // The request's own prefix (`/acme` under `/{tenant}`), from the path as sent: a nested
    // router sees its own part of it in `uri`, the whole in `OriginalUri`.
    let base_path = aiwg_core::http::mount_prefix(
        parts
            .extensions
            .get::<OriginalUri>()
            .map_or(parts.uri.path(), |OriginalUri(uri)| uri.path()),
        pattern,
    );
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    if route.is_websocket() && aiwg_core::http::is_websocket_upgrade(&parts.headers) {
        // The API decides first (method, job id, credentials), then the handshake is checked,
        // as on actix: a `POST` with upgrade headers is a 405 with `Allow`, an unknown job a
        // 400 `invalid-job-id`, whatever the handshake's headers.
        let request = ApiRequest::new(route, parts.method.clone())
            .with_params(params)
            .with_query(parts.uri.query().map(str::to_owned))
            .with_headers(parts.headers.clone())
            .with_peer(peer)
            .with_base_path(base_path);
        let session = match api.websocket(request).await {
            Ok(session) => session,
            Err(res) => return into_response(res),
        };
        return match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => upgrade
                .max_message_size(MAX_MESSAGE)
                .max_frame_size(MAX_MESSAGE)
                .on_upgrade(move |socket| run_socket(session, socket)),
            // A malformed handshake (no `Sec-WebSocket-Key`, a wrong version…): the API's
            // problem document, with axum's reason.
            Err(rejection) => into_response(
                aiwg_core::http::Problem::new(
                    rejection.status(),
                    "invalid-upgrade",
                    format!("not a valid WebSocket upgrade: {}", rejection.body_text()),
                )
                .into_response(),
            ),
        };
    }
    let limit = api.body_limit();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return into_response(api.payload_too_large());
    }
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        return into_response(api.payload_too_large());
    };
    let request = ApiRequest::new(route, parts.method)
        .with_params(params)
        .with_query(parts.uri.query().map(str::to_owned))
        .with_headers(parts.headers)
        .with_body(body)
        .with_peer(peer)
        .with_base_path(base_path);
    into_response(api.handle(request).await)
}

/// The largest WebSocket message a client may send (its auth message).
const MAX_MESSAGE: usize = 64 * 1024;

/// Carries a session's frames over the socket until either side is done. Every write is
/// bounded by the session's [`send_timeout`](WsSession::send_timeout): a client that stops
/// reading is dropped (the socket closed, the session's stream with it) instead of holding
/// both for ever.
async fn run_socket(session: WsSession, socket: WebSocket) {
    let limit = session.send_timeout();
    let (mut sink, source) = socket.split();
    let incoming = source
        .take_while(|m| std::future::ready(m.is_ok()))
        .filter_map(|m| std::future::ready(m.ok().and_then(message_in)));
    let out = session.run(incoming);
    futures_util::pin_mut!(out);
    while let Some(m) = out.next().await {
        let last = matches!(m, WsMessage::Close(_));
        if !send_within(limit, sink.send(message_out(m))).await {
            // Failed or stuck: nothing more is written, the connection is dropped.
            return;
        }
        if last {
            break;
        }
    }
    let _ = send_within(limit, sink.close()).await;
}

fn message_in(m: Message) -> Option<WsMessage> {
    Some(match m {
        Message::Text(t) => WsMessage::Text(t.as_str().to_owned()),
        Message::Binary(b) => WsMessage::Binary(b),
        Message::Ping(p) => WsMessage::Ping(p),
        Message::Pong(p) => WsMessage::Pong(p),
        Message::Close(c) => WsMessage::Close(c.map(|c| WsClose::new(c.code, c.reason.as_str()))),
    })
}

fn message_out(m: WsMessage) -> Message {
    match m {
        WsMessage::Text(t) => Message::Text(t.into()),
        WsMessage::Binary(b) => Message::Binary(b),
        WsMessage::Ping(p) => Message::Ping(p),
        WsMessage::Pong(p) => Message::Pong(p),
        WsMessage::Close(c) => Message::Close(c.map(|c| CloseFrame {
            code: c.code,
            reason: c.reason.into(),
        })),
        // A message kind added to the core later: nothing to send for it here.
        _ => Message::Pong(bytes_empty()),
    }
}

fn bytes_empty() -> axum::body::Bytes {
    axum::body::Bytes::new()
}

/// The API's `404` problem document, for a fallback of your own: paths the aiwg router does not
/// serve then get the same `application/problem+json` answer as an unknown job.
///
/// ```no_run
/// # fn app(api: aiwg_core::http::Api) -> axum::Router {
/// let fallback = api.clone();
/// aiwg_axum::router(api).fallback(move || {
///     let res = aiwg_axum::not_found(&fallback);
///     async move { res }
/// })
/// # }
/// ```
#[must_use]
pub fn not_found(api: &Api) -> Response {
    into_response(api.not_found())
}

fn into_response(res: ApiResponse) -> Response {
    let body = match res.body {
        ApiBody::Full(bytes) => Body::from(bytes),
        ApiBody::Stream(stream) => Body::from_stream(stream.map(Ok::<_, Infallible>)),
    };
    let mut out = Response::new(body);
    *out.status_mut() = res.status;
    *out.headers_mut() = res.headers;
    out
}
