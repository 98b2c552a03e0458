//! WebSocket streams beside SSE: `GET /workflows/{job_id}/ws` (one job) and `GET /ws` (every
//! job), carrying exactly the events of `GET /workflows/{job_id}/events` and `GET /events`.
//!
//! The protocol lives here, framework-neutral; an adapter only bridges frames. It asks
//! [`Api::websocket`] whether an upgrade request may proceed (an answer other than the upgrade
//! is an ordinary HTTP response: a malformed job id or `last_event_id` is a 400 problem),
//! performs the handshake with its framework, and hands the socket's incoming messages to
//! [`WsSession::run`], writing out every [`WsMessage`] the returned stream yields until it
//! ends (after a close frame, or when the client is gone). Every write is bounded by
//! [`WsSession::send_timeout`] (through [`send_within`]): a write that does not finish in time
//! ends the session, and the adapter lets go of the connection, so a client that stops reading
//! holds neither a session nor a task for ever.
//!
//! ## The protocol
//!
//! 1. **Authentication.** With an `Authorization: Bearer <key or JWT>` header on the upgrade
//!    request the session authenticates at once. Browsers cannot set headers on a WebSocket,
//!    so without one the first message must be the text frame
//!    `{"type": "auth", "token": "<key or JWT>"}`, sent within the auth deadline (10 s by
//!    default, [`ApiBuilder::ws_auth_timeout`](super::ApiBuilder::ws_auth_timeout)). The key
//!    needs the `read` scope. With a rate limit
//!    ([`ApiBuilder::rate_limit`](super::ApiBuilder::rate_limit)), upgrades are limited per
//!    client address as requests with credentials are: a socket that never authenticates (no
//!    credentials by the deadline, another message first, refused credentials, or gone before
//!    sending any) counts as one failed verification, and an address over the limit is
//!    refused `429` (with `Retry-After`) before the upgrade, or closed 4429 after it. An
//!    address may also hold at most the limit's `burst` sockets waiting for their credentials
//!    at once (upgraded without the header, no auth message yet); another such upgrade is
//!    refused `429` (with the auth deadline as `Retry-After`) until one of them has presented
//!    its credentials or ended.
//! 2. **Ready.** The server answers `{"event": "ready", "data": {"name", "scopes"}}`; on `/ws`
//!    without `last_event_id` it also carries `"id": "<cursor>"`, the position the stream
//!    starts from (what the SSE stream's opening `id:` line names).
//! 3. **Events.** One text frame per event, `{"id": "<id>", "event": "<kind>", "data": {…}}`:
//!    the SSE frame's `id:`, `event:` and `data:` (the same JSON), ids being the job's
//!    sequence numbers on a job's stream and `<epoch>-<seq>` cursors on `/ws` (which also
//!    sends `reset` events, as `GET /events` does). History comes first, then live events.
//!    Reconnect with `?last_event_id=<the last id seen>` to resume after it. `/ws` takes
//!    `?kinds=` like `GET /events`.
//! 4. **Keep-alive.** The server pings every keep-alive interval (15 s by default, the SSE
//!    keep-alive); a client that answers none of three pings in a row is disconnected. The
//!    server answers the client's pings. A client that stops reading is disconnected too,
//!    without a close frame (none can reach it): a message it has not taken within three
//!    keep-alive intervals ends the session.
//! 5. **Close codes** say why the stream ended:
//!
//! | code | when |
//! |---|---|
//! | 1000 | a job's stream after its terminal event; or the client closed |
//! | 1003 | the client sent a binary message |
//! | 1008 | the client sent something other than the auth message, or anything after it |
//! | 1011 | the server failed (the event stream broke) |
//! | 1013 | a JWT's signing keys could not be fetched; try again later |
//! | 4401 | no credentials by the deadline, or credentials refused (the reason says which) |
//! | 4403 | the key lacks the `read` scope |
//! | 4404 | no such job |
//! | 4408 | three keep-alive pings went unanswered |
//! | 4429 | rate limited |
//!
//! A plain `GET` (no upgrade) is authenticated like any request, then answered
//! `426 Upgrade Required`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::auth::Scope;
use super::{handlers, parse_query, Api, ApiRequest, ApiResponse, Problem, Route};
use crate::engine::{FeedCursor, FeedItem};
use crate::event::JobEvent;
use crate::job::JobId;

/// One WebSocket message, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsMessage {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Bytes),
    /// A ping.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame, with its code and reason when it has them.
    Close(Option<WsClose>),
}

/// A close frame's code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WsClose {
    /// The close code (the table in the [module docs](self)).
    pub code: u16,
    /// Why, in words (at most 123 bytes, as a close frame allows).
    pub reason: String,
}

impl WsClose {
    /// A close frame; the reason is cut to 123 bytes on a character boundary.
    #[must_use]
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > 123 {
            let mut end = 123;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
        }
        Self { code, reason }
    }
}

/// Close codes of the protocol.
pub mod close {
    /// The job's stream ended after its terminal event, or the client closed.
    pub const NORMAL: u16 = 1000;
    /// A binary message.
    pub const UNSUPPORTED: u16 = 1003;
    /// A message other than the auth message, or any message after it.
    pub const POLICY: u16 = 1008;
    /// The server failed.
    pub const INTERNAL: u16 = 1011;
    /// Try again later (a JWT's keys could not be fetched).
    pub const TRY_AGAIN: u16 = 1013;
    /// Credentials missing by the deadline, or refused.
    pub const UNAUTHORIZED: u16 = 4401;
    /// The credentials lack the `read` scope.
    pub const FORBIDDEN: u16 = 4403;
    /// No such job.
    pub const NOT_FOUND: u16 = 4404;
    /// Keep-alive pings went unanswered.
    pub const TIMEOUT: u16 = 4408;
    /// Rate limited.
    pub const RATE_LIMITED: u16 = 4429;
}

/// Unanswered pings after which a client is disconnected.
const MISSED_PINGS: u32 = 3;

/// Whether a request asks to upgrade to a WebSocket (`Connection: upgrade`,
/// `Upgrade: websocket`). Adapters call it on the routes for which [`Route::is_websocket`]
/// holds; the handshake itself is their framework's.
#[must_use]
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: http::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has_token(http::header::CONNECTION, "upgrade") && has_token(http::header::UPGRADE, "websocket")
}

/// What a session streams.
enum Target {
    Job {
        id: JobId,
        after: u64,
    },
    Feed {
        after: Option<FeedCursor>,
        kinds: Option<Vec<&'static str>>,
    },
}

/// An accepted upgrade: run it over the socket with [`WsSession::run`].
pub struct WsSession {
    api: Api,
    target: Target,
    token: Option<String>,
    peer: Option<std::net::IpAddr>,
    waiting: Option<Waiting>,
}

/// A socket's place among those of its address that wait for their credentials
/// ([`Limiter::wait_for_credentials`](super::auth::Limiter::wait_for_credentials)), given back
/// when dropped: once credentials are presented, or the session ends.
struct Waiting {
    api: Api,
    addr: std::net::IpAddr,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(l) = &self.api.inner.limiter {
            l.done_waiting(self.addr);
        }
    }
}

impl std::fmt::Debug for WsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsSession").finish_non_exhaustive()
    }
}

impl Api {
    /// Decides an upgrade request to a WebSocket route: `Ok` to upgrade and run the session,
    /// `Err` with the HTTP answer otherwise (404 for a route that is not a WebSocket one or not
    /// served, 405 for a method other than `GET`, 400 for a malformed job id, `last_event_id`
    /// or `kinds`). Credentials are checked in the session, so that browsers, which see no
    /// HTTP status of a failed handshake, get a close code that says why.
    pub async fn websocket(&self, mut request: ApiRequest) -> Result<WsSession, ApiResponse> {
        if !self.serves(request.route) || !request.route.is_websocket() {
            return Err(self.not_found());
        }
        if request.method != Method::GET {
            return Err(self.handle(request).await);
        }
        request.peer = self.client_address(request.peer, &request.headers);
        // As for any request that needs credentials: an address that failed too often is
        // refused before anything else (sockets that never authenticate count as failures).
        if let (Some(l), Some(ip)) = (&self.inner.limiter, request.peer) {
            l.check_blocked(ip)
                .map_err(|wait| handlers::too_many(wait).into_response())?;
        }
        let target = target(&request).map_err(Problem::into_response)?;
        let token = handlers::bearer(&request.headers).map(str::to_owned);
        // A socket without credentials in its upgrade waits for them: an address may have
        // `burst` such sockets at once, and is refused until one presents its credentials or
        // ends (at the latest by the auth deadline).
        let waiting = match (&self.inner.limiter, request.peer, &token) {
            (Some(l), Some(addr), None) => {
                if !l.wait_for_credentials(addr) {
                    return Err(handlers::too_many(self.inner.ws_auth_timeout).into_response());
                }
                Some(Waiting {
                    api: self.clone(),
                    addr,
                })
            }
            _ => None,
        };
        Ok(WsSession {
            api: self.clone(),
            target,
            token,
            peer: request.peer,
            waiting,
        })
    }
}

fn target(req: &ApiRequest) -> Result<Target, Problem> {
    let query = parse_query(req.query.as_deref());
    match req.route {
        Route::JobWebSocket => Ok(Target::Job {
            id: handlers::job_id(req)?,
            after: handlers::job_position(req, &query)?,
        }),
        _ => {
            let (after, kinds) = handlers::feed_position(req, &query)?;
            Ok(Target::Feed { after, kinds })
        }
    }
}

/// Checks a WebSocket route's parameters (for a request without an upgrade, answered 426 if
/// they are well-formed).
pub(super) fn target_check(req: &ApiRequest) -> Result<(), Problem> {
    target(req).map(|_| ())
}

/// The answer to a WebSocket route without an upgrade.
pub(super) fn upgrade_required() -> Problem {
    Problem::new(
        StatusCode::UPGRADE_REQUIRED,
        "upgrade-required",
        "this endpoint speaks WebSocket: send an upgrade request (Connection: upgrade, \
         Upgrade: websocket)",
    )
}

fn event_frame(id: &dyn std::fmt::Display, event: &JobEvent) -> String {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    format!(
        "{{\"id\":{},\"event\":{},\"data\":{data}}}",
        Value::String(id.to_string()),
        Value::String(event.kind.name().to_owned()),
    )
}

enum Phase {
    Auth,
    Streaming,
    Done,
}

/// Items of the stream a session follows: a frame to send, or the end of a job's stream after
/// its terminal event.
type Frames = Pin<Box<dyn Stream<Item = (String, bool)> + Send>>;

struct Run<I> {
    api: Api,
    target: Target,
    token: Option<String>,
    peer: Option<std::net::IpAddr>,
    incoming: Pin<Box<I>>,
    phase: Phase,
    deadline: Instant,
    frames: Option<Frames>,
    out: VecDeque<WsMessage>,
    ping: tokio::time::Interval,
    missed: u32,
    /// Credentials were presented (by header or message): their check counts a failure.
    presented: bool,
    /// A failed verification was counted against the client's address.
    counted: bool,
    /// The socket's place among those of its address waiting for credentials, until they come.
    waiting: Option<Waiting>,
}

impl<I> Run<I> {
    /// Counts one failed verification against the client's address, once per session: `true`
    /// when the address is now over its limit (and blocked).
    fn count_failure(&mut self) -> bool {
        if std::mem::replace(&mut self.counted, true) {
            return false;
        }
        match (&self.api.inner.limiter, self.peer) {
            (Some(l), Some(ip)) => l.failed_verification(ip).is_err(),
            _ => false,
        }
    }
}

impl<I> Drop for Run<I> {
    /// A socket that ends without ever presenting credentials (the client left, closed, or
    /// sent a binary message first) is a failed verification too, or unauthenticated upgrades
    /// would cost an address nothing.
    fn drop(&mut self) {
        if !self.presented {
            self.count_failure();
        }
    }
}

impl WsSession {
    /// Runs the session over a socket: `incoming` is what the client sends (end it when the
    /// connection is gone); the returned stream is what to send, in order. It ends after a
    /// close frame, or when `incoming` ends. The adapter writes each message and stops when
    /// the stream ends or a write fails.
    pub fn run<I>(self, incoming: I) -> impl Stream<Item = WsMessage>
    where
        I: Stream<Item = WsMessage>,
    {
        let presented = self.token.is_some();
        let keep_alive = self.api.inner.keep_alive;
        let deadline = crate::util::deadline(Instant::now(), self.api.inner.ws_auth_timeout);
        let mut ping = tokio::time::interval_at(
            crate::util::deadline(Instant::now(), keep_alive),
            keep_alive,
        );
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let run = Run {
            api: self.api,
            target: self.target,
            token: self.token,
            peer: self.peer,
            incoming: Box::pin(incoming),
            phase: Phase::Auth,
            deadline,
            frames: None,
            out: VecDeque::new(),
            ping,
            missed: 0,
            presented,
            counted: false,
            waiting: self.waiting,
        };
        futures_util::stream::unfold(run, |mut run| async move {
            let msg = run.next().await?;
            Some((msg, run))
        })
    }
}

impl WsSession {
    /// How long an adapter waits for one message to be written before it gives the client up:
    /// the keep-alive interval times the pings a client may leave unanswered (45 s by
    /// default). A client that stops reading cannot even be pinged, so without this bound it
    /// would hold its socket and the session's task for ever. Take it before
    /// [`run`](Self::run), and write each message with [`send_within`].
    #[must_use]
    pub fn send_timeout(&self) -> Duration {
        self.api.inner.keep_alive.saturating_mul(MISSED_PINGS)
    }
}

/// Writes one message of a session: `write` is the adapter's send (or close) of the socket,
/// `limit` its [`WsSession::send_timeout`]. `true` once written; `false` when the write failed
/// or did not finish within `limit` (the client stopped reading, or is gone): the adapter then
/// stops, and drops the socket and the session's stream without another write.
pub async fn send_within<E>(limit: Duration, write: impl Future<Output = Result<(), E>>) -> bool {
    match tokio::time::timeout(limit, write).await {
        Ok(written) => written.is_ok(),
        Err(_) => {
            tracing::debug!(
                timeout = ?limit,
                "a WebSocket client took no message for too long; its session ends"
            );
            false
        }
    }
}

impl<I: Stream<Item = WsMessage>> Run<I> {
    /// Closes a session that has not authenticated: the failure is counted against the
    /// client's address (as a request with missing or bad credentials is), and the close is
    /// 4429 instead of `code` when that puts the address over its limit.
    fn refuse(&mut self, code: u16, reason: impl Into<String>) {
        if self.count_failure() {
            self.close(close::RATE_LIMITED, "too many failed attempts");
        } else {
            self.close(code, reason);
        }
    }

    fn close(&mut self, code: u16, reason: impl Into<String>) {
        self.out
            .push_back(WsMessage::Close(Some(WsClose::new(code, reason))));
        self.phase = Phase::Done;
        self.frames = None;
        self.waiting = None;
    }

    async fn next(&mut self) -> Option<WsMessage> {
        loop {
            if let Some(m) = self.out.pop_front() {
                return Some(m);
            }
            match self.phase {
                Phase::Done => return None,
                Phase::Auth => {
                    if let Some(token) = self.token.take() {
                        self.authenticate(&token).await;
                        continue;
                    }
                    tokio::select! {
                        m = self.incoming.next() => match m {
                            None => return None,
                            Some(WsMessage::Text(text)) => match auth_message(&text) {
                                Some(token) => {
                                    self.presented = true;
                                    self.waiting = None;
                                    self.authenticate(&token).await;
                                }
                                None => self.refuse(
                                    close::POLICY,
                                    "the first message must be {\"type\":\"auth\",\"token\":\"...\"}",
                                ),
                            },
                            Some(m) => self.control(m),
                        },
                        () = tokio::time::sleep_until(self.deadline) => self.refuse(
                            close::UNAUTHORIZED,
                            "no credentials: send {\"type\":\"auth\",\"token\":\"...\"} first",
                        ),
                    }
                }
                Phase::Streaming => {
                    let Some(frames) = self.frames.as_mut() else {
                        self.close(close::INTERNAL, "internal error");
                        continue;
                    };
                    tokio::select! {
                        f = frames.next() => match f {
                            Some((text, last)) => {
                                if last {
                                    self.close(close::NORMAL, "the job has finished");
                                }
                                return Some(WsMessage::Text(text));
                            }
                            None => self.stream_ended().await,
                        },
                        m = self.incoming.next() => match m {
                            None => return None,
                            Some(WsMessage::Text(_)) => self.close(
                                close::POLICY,
                                "no messages are expected after authentication",
                            ),
                            Some(m) => self.control(m),
                        },
                        _ = self.ping.tick() => {
                            if self.missed >= MISSED_PINGS {
                                self.close(close::TIMEOUT, "keep-alive pings went unanswered");
                            } else {
                                self.missed += 1;
                                return Some(WsMessage::Ping(Bytes::from_static(b"aiwg")));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The followed stream ended without a terminal event: a job's stream resumed after its
    /// last event ends normally; anything else is a failure.
    async fn stream_ended(&mut self) {
        if let Target::Job { id, .. } = &self.target {
            if let Ok(job) = self.api.engine().get(*id).await {
                if job.is_terminal() {
                    return self.close(close::NORMAL, "the job has finished");
                }
            }
        }
        self.close(close::INTERNAL, "the event stream ended");
    }

    /// Pings, pongs, binary messages and the client's close.
    fn control(&mut self, m: WsMessage) {
        match m {
            WsMessage::Ping(p) => self.out.push_back(WsMessage::Pong(p)),
            WsMessage::Pong(_) => self.missed = 0,
            WsMessage::Binary(_) => {
                self.close(close::UNSUPPORTED, "binary messages are not accepted")
            }
            WsMessage::Close(_) => self.close(close::NORMAL, "closed by the client"),
            WsMessage::Text(_) => self.close(close::POLICY, "unexpected message"),
        }
    }

    async fn authenticate(&mut self, token: &str) {
        let api = self.api.clone();
        if let (Some(l), Some(ip)) = (&api.inner.limiter, self.peer) {
            if l.check_blocked(ip).is_err() {
                return self.close(close::RATE_LIMITED, "too many failed attempts");
            }
        }
        let caller = match handlers::authenticate(&api, Some(token), Some(Scope::Read)).await {
            Ok(c) => c,
            Err(p) => {
                let code = match p.status() {
                    401 => close::UNAUTHORIZED,
                    403 => close::FORBIDDEN,
                    _ => close::TRY_AGAIN,
                };
                return self.refuse(code, p.detail().to_owned());
            }
        };
        if let Some(l) = &api.inner.limiter {
            if l.check_key(&caller.bucket()).is_err() {
                return self.close(close::RATE_LIMITED, "too many requests; slow down");
            }
        }
        let mut ready =
            json!({"event": "ready", "data": {"name": caller.name(), "scopes": caller.scopes()}});
        let engine = api.engine();
        let frames: Frames = match &self.target {
            Target::Job { id, after } => match engine.subscribe(*id, *after).await {
                Ok(events) => {
                    Box::pin(events.map(|ev| (event_frame(&ev.seq, &ev), ev.is_terminal())))
                }
                Err(crate::engine::EngineError::NotFound(id)) => {
                    return self.close(close::NOT_FOUND, format!("no job {id}"));
                }
                Err(e) => {
                    tracing::error!(error = %e, "a WebSocket stream could not start");
                    return self.close(close::INTERNAL, "internal error; see the server log");
                }
            },
            Target::Feed { after, kinds } => {
                let start = match after {
                    Some(c) => *c,
                    None => {
                        let now = engine.feed_cursor();
                        ready["id"] = Value::String(now.to_string());
                        now
                    }
                };
                let kinds = kinds.clone();
                Box::pin(engine.feed(Some(start)).filter_map(move |item| {
                    let frame = match item {
                        FeedItem::Event { cursor, event } => kinds
                            .as_ref()
                            .is_none_or(|k| k.contains(&event.kind.name()))
                            .then(|| (event_frame(&cursor, &event), false)),
                        FeedItem::Reset { cursor, reason } => Some((
                            json!({"id": cursor.to_string(), "event": "reset",
                                "data": {"reason": reason.as_str(), "cursor": cursor.to_string()}})
                            .to_string(),
                            false,
                        )),
                    };
                    std::future::ready(frame)
                }))
            }
        };
        self.out.push_back(WsMessage::Text(ready.to_string()));
        self.frames = Some(frames);
        self.phase = Phase::Streaming;
    }
}

/// The token of `{"type": "auth", "token": "..."}`.
fn auth_message(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != "auth" {
        return None;
    }
    Some(v.get("token")?.as_str()?.to_owned())
}

/// How long a client has to authenticate by default.
pub(super) const AUTH_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_and_auth_messages() {
        let mut h = HeaderMap::new();
        assert!(!is_websocket_upgrade(&h));
        h.insert(
            http::header::CONNECTION,
            "keep-alive, Upgrade".parse().unwrap(),
        );
        h.insert(http::header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_websocket_upgrade(&h));
        assert_eq!(
            auth_message(r#"{"type":"auth","token":"k"}"#).as_deref(),
            Some("k")
        );
        assert!(auth_message(r#"{"type":"hello","token":"k"}"#).is_none());
        assert!(auth_message("k").is_none());
        let long = WsClose::new(1000, "é".repeat(100));
        assert!(long.reason.len() <= 123);
    }
}
