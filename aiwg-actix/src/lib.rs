//! # aiwg-actix
//!
//! The aiwg HTTP API as an actix-web service configuration you mount in your own app. Everything
//! the API decides (authentication, scopes, rate limits, status codes, problem documents, SSE
//! framing, `405` with `Allow`) lives in [`aiwg_core::http`]; this crate only translates between
//! actix-web and that module, so an actix app answers byte for byte what the `aiwg-axum` router
//! answers.
//!
//! ## 1. Build an engine and an API
//!
//! An [`Engine`](aiwg_core::Engine) runs workflows; an [`Api`] puts keys, limits and the
//! outbound webhook dispatcher in front of it. Both are cheap handles: clone them freely.
//!
//! ## 2. Mount it
//!
//! [`configure`] returns a closure for [`App::configure`](actix_web::App::configure) or
//! [`Scope::configure`](actix_web::Scope::configure). Mount it at the root, or under a prefix
//! next to your own routes and state; the URLs in answers (`status_url`, `events_url`) carry
//! the prefix. `HttpServer` builds one app per worker, so clone the closure (or the `Api`) into
//! the app factory.
//!
//! ```no_run
//! use std::sync::Arc;
//! use actix_web::{web, App, HttpServer, Responder};
//! use aiwg_core::http::{Api, ApiKey, Scope};
//! use aiwg_core::{Engine, Step, Workflow};
//! use aiwg_core::test_util::ScriptedExecutor;
//!
//! /// The host app's own state.
//! struct Greeting(String);
//!
//! async fn index(greeting: web::Data<Greeting>) -> impl Responder {
//!     greeting.0.clone()
//! }
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
//! // Your app, with its own state and routes, and aiwg under /aiwg.
//! let greeting = web::Data::new(Greeting("my service".into()));
//! let aiwg = aiwg_actix::configure(api);
//! HttpServer::new(move || {
//!     App::new()
//!         .app_data(greeting.clone())
//!         .route("/", web::get().to(index))
//!         .service(web::scope("/aiwg").configure(aiwg.clone()))
//! })
//! .bind(("127.0.0.1", 3100))?
//! .run()
//! .await?;
//! # Ok(()) }
//! ```
//!
//! ## 3. What the adapter does for you
//!
//! - **Body limit before buffering.** A declared `Content-Length` over [`Api::body_limit`] is
//!   refused at once with [`Api::payload_too_large`]; otherwise the body is read chunk by chunk
//!   and refused as soon as it passes the limit (chunked bodies too). actix's own
//!   `PayloadConfig` is not involved.
//! - **SSE streaming.** `GET /workflows/{job_id}/events` is streamed chunk by chunk, keep-alive
//!   comments included; nothing is buffered.
//! - **WebSockets.** Upgrade requests to `GET /workflows/{job_id}/ws` and `GET /ws` are
//!   accepted with [`actix-ws`](actix_ws) once [`Api::websocket`] agrees, and the session of
//!   [`aiwg_core::http::ws`] (authentication, events, pings, close codes) runs on the worker's
//!   runtime; this crate only carries its frames.
//! - **Headers copied exactly**, both ways; actix adds only `content-length` (or chunked
//!   framing) and `date`.
//! - **`x-request-id`.** An incoming `x-request-id` is kept, otherwise one is made; the API sees
//!   it and the response carries it.
//! - **CORS** follows [`Api::cors_origins`]; the API answers preflights and adds the headers
//!   itself, exactly as under axum (nothing is added when it is empty).
//! - **Client address** from the connection ([`HttpRequest::peer_addr`]), for per-address rate
//!   limits on unauthenticated routes. Behind a proxy the address is the proxy's.
//!
//! ## 4. Testing your app
//!
//! Start your app with `HttpServer` on `127.0.0.1:0` (one worker is plenty), read the bound
//! address from [`HttpServer::addrs`](actix_web::HttpServer::addrs), spawn the server on the
//! test's tokio runtime and talk to it with any HTTP client; stop it with
//! [`ServerHandle::stop`](actix_web::dev::ServerHandle::stop). This crate's own tests run the
//! shared conformance suite of `aiwg_core::test_util::conformance` and the platform-hooks
//! suite of `aiwg_webhook::testing` that way, and compare its answers with the axum router's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::task::Context;

use actix_web::body::{BodyStream, BoxBody};
use actix_web::http::header as ax_header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use aiwg_core::http::ws::send_within;
use aiwg_core::http::{
    Api, ApiBody, ApiRequest, ApiResponse, RouteSpec, WsClose, WsMessage, WsSession,
};
use bytes::BytesMut;
use futures_util::StreamExt;

const REQUEST_ID: &str = "x-request-id";

/// The aiwg API as an actix-web service configuration: pass it to
/// [`App::configure`](actix_web::App::configure) or
/// [`Scope::configure`](actix_web::Scope::configure). Every path the API serves
/// ([`Api::routes`]: the route table [`ROUTES`](aiwg_core::http::ROUTES), with the dashboard's
/// `ui/` paths when [`ApiBuilder::dashboard`](aiwg_core::http::ApiBuilder::dashboard) is on) is
/// registered for every method; the API itself answers `405` (with `Allow`) for methods a route
/// does not take. Other paths are left to the host app (its default service answers them).
pub fn configure(api: Api) -> impl FnOnce(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        for spec in api.routes() {
            let api = api.clone();
            let handler = move |req: HttpRequest, payload: web::Payload| {
                let api = api.clone();
                async move { serve(api, spec, req, payload).await }
            };
            cfg.service(web::resource(spec.path).route(web::route().to(handler)));
        }
    }
}

/// The API's `404` problem document, for the host app's default service: paths the API does
/// not serve then get the same `application/problem+json` answer as an unknown job.
///
/// ```no_run
/// # fn app(api: aiwg_core::http::Api) {
/// use actix_web::{web, App};
/// let (aiwg, fallback) = (aiwg_actix::configure(api.clone()), api);
/// let _app = App::new().configure(aiwg).default_service(web::to(move || {
///     let res = aiwg_actix::not_found(&fallback);
///     async move { res }
/// }));
/// # }
/// ```
#[must_use]
pub fn not_found(api: &Api) -> HttpResponse {
    into_response(api.not_found())
}

async fn serve(
    api: Api,
    spec: &'static RouteSpec,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok())
        .unwrap_or_else(aiwg_core::http::new_request_id);
    let mut res = if spec.route.is_websocket()
        && aiwg_core::http::is_websocket_upgrade(&headers_in(req.headers()))
    {
        websocket(&api, spec, &req, payload, &request_id).await
    } else {
        into_response(translate(&api, spec, &req, payload, &request_id).await)
    };
    let id_name = ax_header::HeaderName::from_static(REQUEST_ID);
    if !res.headers().contains_key(&id_name) {
        if let Ok(v) = ax_header::HeaderValue::from_bytes(request_id.as_bytes()) {
            res.headers_mut().insert(id_name, v);
        }
    }
    res
}

async fn translate(
    api: &Api,
    spec: &'static RouteSpec,
    req: &HttpRequest,
    mut payload: web::Payload,
    request_id: &http::HeaderValue,
) -> ApiResponse {
    let limit = api.body_limit();
    let declared = req
        .headers()
        .get(ax_header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return api.payload_too_large();
    }
    // At most `limit` bytes are ever held, and memory follows the bytes that arrive: a declared
    // length reserves at most 64 KiB before any of it is there.
    let mut body = BytesMut::with_capacity(declared.map_or(0, |n| n as usize).min(64 * 1024));
    while let Some(chunk) = payload.next().await {
        // Like the axum adapter: a body that cannot be read whole within the limit is refused.
        let Ok(chunk) = chunk else {
            return api.payload_too_large();
        };
        if body.len() + chunk.len() > limit {
            return api.payload_too_large();
        }
        body.extend_from_slice(&chunk);
    }

    let Some(request) = request_for(spec, req, request_id) else {
        return ApiResponse::empty(http::StatusCode::BAD_REQUEST);
    };
    api.handle(request.with_body(body.freeze())).await
}

/// The largest WebSocket message a client may send (its auth message).
const MAX_MESSAGE: usize = 64 * 1024;

/// An upgrade request: the API decides, actix-ws does the handshake, and the session runs on
/// this worker's runtime.
async fn websocket(
    api: &Api,
    spec: &'static RouteSpec,
    req: &HttpRequest,
    payload: web::Payload,
    request_id: &http::HeaderValue,
) -> HttpResponse {
    let Some(request) = request_for(spec, req, request_id) else {
        return HttpResponse::BadRequest().finish();
    };
    let session = match api.websocket(request).await {
        Ok(session) => session,
        Err(res) => return into_response(res),
    };
    let (response, socket, stream) = match actix_ws::handle(req, payload) {
        Ok(parts) => parts,
        // A malformed handshake (no `Sec-WebSocket-Key`, a wrong version…): the API's problem
        // document, with actix's reason.
        Err(e) => {
            // actix-ws's handshake errors set their status in `error_response` (400 for a
            // missing key or a wrong version), not in `status_code`.
            let status = http::StatusCode::from_u16(e.error_response().status().as_u16())
                .unwrap_or(http::StatusCode::BAD_REQUEST);
            return into_response(
                aiwg_core::http::Problem::new(
                    status,
                    "invalid-upgrade",
                    format!("not a valid WebSocket upgrade: {e}"),
                )
                .into_response(),
            );
        }
    };
    let stream = stream
        .max_frame_size(MAX_MESSAGE)
        .aggregate_continuations()
        .max_continuation_size(MAX_MESSAGE);
    actix_web::rt::spawn(run_socket(session, socket, stream));
    response
}

/// Carries a session's frames over the socket until either side is done. Every write (into
/// actix-ws's bounded channel, which fills when the client stops reading) is bounded by the
/// session's [`send_timeout`](WsSession::send_timeout): past it the session ends, its task and
/// its stream are gone, and actix-web is told that the client's input is no longer wanted (it
/// then reads and discards it). The connection itself belongs to actix-web's HTTP/1
/// dispatcher, which has no timeout on a blocked write: it closes it once the client reads
/// what is already buffered for it, or the TCP connection fails.
async fn run_socket(
    session: WsSession,
    mut socket: actix_ws::Session,
    stream: actix_ws::AggregatedMessageStream,
) {
    let limit = session.send_timeout();
    // Shared with the session so that it can be let go of after a write that timed out.
    let stream = Rc::new(RefCell::new(stream));
    let input = Rc::clone(&stream);
    let incoming = futures_util::stream::poll_fn(move |cx| input.borrow_mut().poll_next_unpin(cx))
        .take_while(|m| std::future::ready(m.is_ok()))
        .filter_map(|m| std::future::ready(m.ok().and_then(message_in)));
    let mut out = Box::pin(session.run(incoming));
    while let Some(m) = out.next().await {
        let sent = match m {
            WsMessage::Text(t) => send_within(limit, socket.text(t)).await,
            WsMessage::Binary(b) => send_within(limit, socket.binary(b)).await,
            WsMessage::Ping(p) => send_within(limit, socket.ping(&p)).await,
            WsMessage::Pong(p) => send_within(limit, socket.pong(&p)).await,
            WsMessage::Close(c) => {
                let reason = c.map(|c| actix_ws::CloseReason {
                    code: actix_ws::CloseCode::from(c.code),
                    description: Some(c.reason),
                });
                let _ = send_within(limit, socket.close(reason)).await;
                return;
            }
            // A message kind added to the core later: nothing to send for it here.
            _ => true,
        };
        if !sent {
            // The session ends here. actix's dispatcher, stuck on the write, sleeps until the
            // client reads; dropping the request payload does not wake it. Polling the payload
            // once does (whatever it yields is discarded), and finding it dropped the
            // dispatcher discards the client's input from then on.
            drop(out);
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            let _ = stream.borrow_mut().poll_next_unpin(&mut cx);
            return;
        }
    }
    let _ = send_within(limit, socket.close(None)).await;
}

fn message_in(m: actix_ws::AggregatedMessage) -> Option<WsMessage> {
    use actix_ws::AggregatedMessage as M;
    Some(match m {
        M::Text(t) => WsMessage::Text(t.to_string()),
        M::Binary(b) => WsMessage::Binary(b),
        M::Ping(p) => WsMessage::Ping(p),
        M::Pong(p) => WsMessage::Pong(p),
        M::Close(c) => WsMessage::Close(
            c.map(|c| WsClose::new(u16::from(c.code), c.description.unwrap_or_default())),
        ),
    })
}

/// The [`ApiRequest`] of an actix request, without its body.
fn request_for(
    spec: &'static RouteSpec,
    req: &HttpRequest,
    request_id: &http::HeaderValue,
) -> Option<ApiRequest> {
    // Percent-decoded like actix's `web::Path` (and axum) decode them, picked by name so that
    // parameters of an enclosing scope do not shift them.
    let pattern = spec.path;
    let params = if pattern.contains('{') {
        let info = req.match_info();
        let values: Vec<String> = info.load().unwrap_or_default();
        let by_name: HashMap<&str, String> = info.iter().map(|(k, _)| k).zip(values).collect();
        spec.param_names()
            .map(|n| by_name.get(n).cloned().unwrap_or_default())
            .collect()
    } else {
        Vec::new()
    };
    // The request's own prefix (`/acme` under `/{tenant}`), from the path as sent.
    let base_path = aiwg_core::http::mount_prefix(req.uri().path(), pattern);
    let mut headers = headers_in(req.headers());
    if !headers.contains_key(REQUEST_ID) {
        headers.insert(REQUEST_ID, request_id.clone());
    }
    // Not `None` in practice: both `http` versions accept exactly the RFC 9110 method tokens.
    let method = http::Method::from_bytes(req.method().as_str().as_bytes()).ok()?;
    Some(
        ApiRequest::new(spec.route, method)
            .with_params(params)
            .with_query(req.uri().query().map(str::to_owned))
            .with_headers(headers)
            .with_peer(req.peer_addr().map(|a| a.ip()))
            .with_base_path(base_path),
    )
}

/// actix-web's (`http` 0.2) headers as `http` 1.x headers, every value kept.
fn headers_in(src: &ax_header::HeaderMap) -> http::HeaderMap {
    let mut out = http::HeaderMap::with_capacity(src.len());
    for (name, value) in src {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_str().as_bytes()),
            http::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.append(n, v);
        }
    }
    out
}

/// Writes an [`ApiResponse`] as it is: status, every header, the body (streamed for SSE).
fn into_response(res: ApiResponse) -> HttpResponse {
    let status =
        StatusCode::from_u16(res.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match res.body {
        ApiBody::Full(bytes) => BoxBody::new(bytes),
        ApiBody::Stream(stream) => BoxBody::new(BodyStream::new(stream.map(Ok::<_, Infallible>))),
    };
    let mut out = HttpResponse::with_body(status, body);
    let headers = out.headers_mut();
    for (name, value) in &res.headers {
        if let (Ok(n), Ok(v)) = (
            ax_header::HeaderName::from_bytes(name.as_str().as_bytes()),
            ax_header::HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(n, v);
        }
    }
    out
}
