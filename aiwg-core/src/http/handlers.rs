//! The endpoints: from an [`ApiRequest`] to an [`ApiResponse`].

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use serde::de::DeserializeOwned;

use super::auth::{find_key, Caller, Scope};
use super::types::{
    AgentStatus, AuditEntryDoc, AuditList, CancelAnswer, HealthAnswer, JobListView, ServerStatus,
    StatusView, TriggerAccepted, TriggerBody, WorkflowInfo, WorkflowList,
};
use super::{parse_query, sse, Access, Api, ApiRequest, ApiResponse, Problem, Route, RouteSpec};
use crate::audit::{AuditQuery, AuditRecord, Decision};
use crate::dispatch::{CreateSubscription, DispatchError, UpdateSubscription};
use crate::engine::EngineError;
use crate::job::{JobId, JobStatus};
use crate::store::JobQuery;

type Answer = Result<ApiResponse, Problem>;

/// How often the Prometheus recorder's histograms are drained when nothing scrapes them.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use unless another recorder is.
pub(super) fn global_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("aiwg_job_duration_seconds".into()),
                    &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            // A histogram keeps every sample until it is drained: by a scrape, or by this
            // upkeep. Without it a server nobody scrapes grows by each job's duration.
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("aiwg-metrics".into())
                .spawn(move || {
                    #[cfg(test)]
                    tests::upkeep_started();
                    loop {
                        std::thread::sleep(METRICS_UPKEEP);
                        upkeep.run_upkeep();
                    }
                })
                .ok()?;
            Some(handle)
        })
        .clone()
}

fn method_not_allowed(spec: &RouteSpec, req: &ApiRequest) -> Problem {
    let list: Vec<&str> = spec.methods.iter().map(Method::as_str).collect();
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!(
            "{} is not allowed here; use {}",
            req.method,
            list.join(", ")
        ),
    )
}

/// Whether a route needs a key (`None`: no key) and which scope (`Some(None)`: any valid
/// key), from the route table.
fn required_scope(api: &Api, spec: &RouteSpec) -> Option<Option<Scope>> {
    match spec.access {
        Access::Key(scope) => Some(Some(scope)),
        Access::AnyKey => Some(None),
        Access::Configurable(_) if api.inner.metrics_public => None,
        Access::Configurable(scope) => Some(Some(scope)),
        Access::Public | Access::Unlimited | Access::Signature => None,
    }
}

pub(super) fn too_many(wait: Duration) -> Problem {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate-limited",
        "too many requests; slow down",
    )
    .retry_after(secs)
}

/// The bearer token of a request's `Authorization` header.
pub(super) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
}

/// Authenticates a bearer token — an API key, or a JWT when `auth.jwt` is configured — and
/// checks `scope` (`None`: any valid credentials). Every key is compared whatever the token.
pub(super) async fn authenticate(
    api: &Api,
    token: Option<&str>,
    scope: Option<Scope>,
) -> Result<Caller, Problem> {
    let caller = identify(api, token).await?;
    match lacking(&caller, scope) {
        Some(p) => Err(p),
        None => Ok(caller),
    }
}

/// Who `token` is (an API key, or a JWT's subject), whatever it may do.
async fn identify(api: &Api, token: Option<&str>) -> Result<Caller, Problem> {
    let unauthorized =
        |detail: &str| Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(unauthorized("missing bearer token").bearer_challenge());
    };
    let caller = if let Some(key) = find_key(&api.inner.keys, token) {
        Caller::key(key)
    } else {
        match &api.inner.jwt {
            Some(jwt) if super::jwt::looks_like_jwt(token) => match jwt.verify(token).await {
                Ok(id) => Caller::jwt(id),
                Err(e) if e.is_invalid_token() => {
                    let why = e.description();
                    return Err(unauthorized(&format!("invalid token: {why}")).invalid_token(&why));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a JWT could not be checked");
                    return Err(Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "jwks-unavailable",
                        "the token's signing keys could not be fetched; try again later",
                    )
                    .retry_after(5));
                }
            },
            _ => {
                return Err(unauthorized("invalid API key")
                    .invalid_token("the token is not a valid API key"))
            }
        }
    };
    Ok(caller)
}

/// The 403 when `caller` lacks `scope`.
fn lacking(caller: &Caller, scope: Option<Scope>) -> Option<Problem> {
    let scope = scope.filter(|s| !caller.allows(*s))?;
    Some(Problem::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{} lacks the `{}` scope",
            caller.describe(),
            scope_name(scope)
        ),
    ))
}

fn scope_name(s: Scope) -> &'static str {
    match s {
        Scope::Trigger => "trigger",
        Scope::Read => "read",
        Scope::Cancel => "cancel",
        Scope::Approve => "approve",
        Scope::Admin => "admin",
    }
}

pub(super) async fn handle(api: &Api, req: ApiRequest) -> ApiResponse {
    let spec = req.route.spec();
    let allow_origin = super::cors::allow_origin(api, &req.headers);
    if super::cors::is_preflight(api, &req.method, &req.headers) {
        return super::cors::preflight(allow_origin, spec);
    }
    let needs_key = required_scope(api, spec);
    let answer = async {
        if !spec.allows(&req.method) {
            return Err(method_not_allowed(spec, &req));
        }
        let actor: Option<Caller> = match needs_key {
            Some(scope) => {
                // Failed authentication counts against the client's address, and an address
                // that failed too often is refused before its credentials are looked at, so
                // guessing keys is slowed down, not only answered differently.
                if let (Some(l), Some(ip)) = (&api.inner.limiter, req.peer) {
                    l.check_blocked(ip).map_err(too_many)?;
                }
                // A caller lacking the scope is named in the audit; one not known is not.
                let checked = match identify(api, bearer(&req.headers)).await {
                    Ok(caller) => match lacking(&caller, scope) {
                        None => Ok(caller),
                        Some(p) => Err((p, Some(caller.bucket()))),
                    },
                    Err(p) => Err((p, None)),
                };
                let key = match checked {
                    Ok(k) => k,
                    Err((p, name)) => {
                        if let (Some(l), Some(ip)) = (&api.inner.limiter, req.peer) {
                            l.failed_verification(ip).map_err(too_many)?;
                        }
                        if let Some(what) = audited_as(req.route) {
                            let mut record = AuditRecord::new("api", Decision::Refused)
                                .reason(format!("{what}{}", p.detail()));
                            if let Some(name) = name {
                                record = record.key_name(name);
                            }
                            api.engine().audit().record(record).await;
                        }
                        return Err(p);
                    }
                };
                if let Some(l) = &api.inner.limiter {
                    l.check_key(&key.bucket()).map_err(too_many)?;
                }
                Some(key)
            }
            None => {
                if let (Some(l), Some(ip)) = (&api.inner.limiter, req.peer) {
                    match spec.access {
                        // Only failed verifications count (below): a flood of forged
                        // deliveries from other addresses never starves the platform's own.
                        // Nor is an address refused before its delivery is verified: a
                        // platform's deliveries share their address with whatever else runs
                        // there (another project's stale webhook on the same GitLab, the
                        // same egress of GitHub), and a 429 loses a delivery for good.
                        Access::Unlimited | Access::Signature => {}
                        _ => l.check_addr(ip).map_err(too_many)?,
                    }
                }
                None
            }
        };
        let res = dispatch(api, &req, actor.as_ref()).await;
        if spec.access == Access::Signature {
            let failed = match &res {
                Ok(r) => r.status == StatusCode::UNAUTHORIZED,
                Err(p) => p.status() == 401,
            };
            if let (true, Some(l), Some(ip)) = (failed, &api.inner.limiter, req.peer) {
                // Past its limit, a failing address is told to wait; its verified deliveries
                // still go through.
                if let Err(wait) = l.check_blocked(ip).and_then(|()| l.failed_verification(ip)) {
                    return Err(too_many(wait));
                }
            }
        }
        res
    }
    .await;
    let mut res = answer.unwrap_or_else(Problem::into_response);
    // What a key may read is no cache's to keep (job output, deliveries, subscription URLs);
    // a stream names its own policy.
    if needs_key.is_some() {
        res.headers
            .entry(http::header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    if res.status == StatusCode::METHOD_NOT_ALLOWED {
        res.headers.insert(http::header::ALLOW, spec.allow_header());
    }
    super::cors::decorate(&mut res, allow_origin, !api.cors_origins().is_empty());
    res
}

/// The routes whose refusals the audit trail records, and how a refusal's reason starts:
/// triggers, and decisions on jobs waiting for approval.
fn audited_as(route: Route) -> Option<&'static str> {
    match route {
        Route::Trigger => Some(""),
        Route::Approve => Some("approved: "),
        Route::Reject => Some("rejected: "),
        _ => None,
    }
}

async fn dispatch(api: &Api, req: &ApiRequest, key: Option<&Caller>) -> Answer {
    match req.route {
        Route::Trigger => trigger(api, req, key).await,
        Route::Available => Ok(available(api)),
        Route::Status => status(api, req).await,
        Route::Cancel => cancel(api, req).await,
        Route::Approve => decide(api, req, true, key).await,
        Route::Reject => decide(api, req, false, key).await,
        Route::Events => events(api, req).await,
        Route::Jobs => jobs(api, req).await,
        Route::Webhooks
        | Route::Webhook
        | Route::WebhookRotate
        | Route::WebhookDeliveries
        | Route::WebhookRetry => webhooks(api, req).await,
        Route::Hook => match &api.inner.hooks {
            Some(h) => Ok(h
                .handle(param(req, 0), &req.headers, req.body.clone())
                .await),
            None => Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "no platform webhooks are configured",
            )),
        },
        Route::Health => Ok(ApiResponse::json(
            StatusCode::OK,
            &HealthAnswer {
                status: "ok".into(),
            },
        )),
        Route::ServerStatus => server_status(api).await,
        Route::Metrics => metrics_text(api).await,
        Route::OpenApi => Ok(ApiResponse::json(
            StatusCode::OK,
            &super::openapi::document(),
        )),
        Route::Audit => audit(api, req).await,
        Route::AllEvents => all_events(api, req),
        Route::Whoami => whoami(key),
        Route::Dashboard => Ok(super::ui::page()),
        Route::DashboardAsset => super::ui::asset(param(req, 0)),
        Route::DashboardRedirect => Ok(super::ui::redirect()),
        Route::JobWebSocket | Route::AllWebSocket => {
            super::ws::target_check(req)?;
            Ok(super::ws::upgrade_required()
                .into_response()
                .header(http::header::UPGRADE, HeaderValue::from_static("websocket")))
        }
    }
}

fn param(req: &ApiRequest, i: usize) -> &str {
    req.params.get(i).map_or("", String::as_str)
}

pub(super) fn job_id(req: &ApiRequest) -> Result<JobId, Problem> {
    param(req, 0).parse().map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-job-id",
            format!("`{}` is not a job id", param(req, 0)),
        )
    })
}

fn json_body<T: DeserializeOwned>(req: &ApiRequest) -> Result<T, Problem> {
    let ct = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !(essence.eq_ignore_ascii_case("application/json")
        || essence.to_ascii_lowercase().ends_with("+json"))
    {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "the body must be application/json",
        ));
    }
    super::trigger::json_object(&req.body)
}

fn internal(e: &dyn std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "internal error");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the server log",
    )
}

fn engine_problem(e: EngineError) -> Problem {
    match e {
        EngineError::NotFound(id) => Problem::new(
            StatusCode::NOT_FOUND,
            "job-not-found",
            format!("no job {id}"),
        ),
        EngineError::AlreadyFinished { id, status } => Problem::new(
            StatusCode::CONFLICT,
            "job-finished",
            format!("job {id} already finished with status {status}"),
        )
        .job(id.to_string(), status.as_str()),
        EngineError::NotAwaitingApproval { id, status } => Problem::new(
            StatusCode::CONFLICT,
            "not-awaiting-approval",
            format!("job {id} is not awaiting approval; its status is {status}"),
        )
        .job(id.to_string(), status.as_str()),
        EngineError::WaitTimeout(id) => Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "wait-timeout",
            format!("job {id} did not finish in time; poll its status"),
        ),
        other => internal(&other),
    }
}

/// `POST /workflows/trigger`, with its decision recorded in the audit trail.
async fn trigger(api: &Api, req: &ApiRequest, caller: Option<&Caller>) -> Answer {
    let mut record = AuditRecord::new("api", Decision::Refused);
    if let Some(c) = caller {
        record = record.key_name(c.bucket()).actor(c.name().to_owned());
    }
    let answer = submit_trigger(api, req, caller, &mut record).await;
    if let Err(p) = &answer {
        record = record.reason(p.detail().to_owned());
    }
    api.engine().audit().record(record).await;
    answer
}

async fn submit_trigger(
    api: &Api,
    req: &ApiRequest,
    caller: Option<&Caller>,
    record: &mut AuditRecord,
) -> Answer {
    let mut body: TriggerBody = json_body(req)?;
    record.workflow = Some(body.workflow.clone());
    let header_key = req
        .headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "the Idempotency-Key header is not text",
                )
            })
        })
        .transpose()?;
    let idempotency_key = match (header_key, body.idempotency_key.take()) {
        (Some(h), Some(b)) if h != b => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "the Idempotency-Key header and the body's idempotency_key differ",
            ))
        }
        (h, b) => h.or(b),
    };
    record.delivery_id.clone_from(&idempotency_key);
    if idempotency_key
        .as_deref()
        .is_some_and(|k| !super::openapi::idempotency_key_ok(k))
    {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-request",
            "the idempotency key must be 1 to 255 printable ASCII characters",
        ));
    }
    let is_async = body.is_async;
    let mut request = body.into_job_request()?;
    // Namespaced per API key (or token subject): one client never finds (or collides with)
    // another's job.
    let bucket = caller.map(Caller::bucket).unwrap_or_default();
    request.idempotency_key = idempotency_key.map(|k| format!("api:{bucket}:{k}"));
    request.trigger.actor = caller.map(|c| c.name().to_owned());
    let engine = api.engine();
    let submission = engine
        .submission(request)
        .await
        .map_err(|e| Problem::from(&e))?;
    let job = submission.job;
    record.job_id = Some(job.id);
    record.decision = if submission.created {
        Decision::Accepted
    } else {
        record.reason = Some("idempotency key seen before: the same job".into());
        Decision::Duplicate
    };
    if is_async == Some(false) {
        let bound = job.timeout.saturating_add(Duration::from_secs(5));
        let done = engine.wait(job.id, bound).await.map_err(engine_problem)?;
        return Ok(status_answer(&done));
    }
    // The id is formatted once; the links are joined from it without `fmt` (about 2 % of a
    // trigger's instructions with `format!`).
    let job_id = job.id.to_string();
    let link = |tail: &str| [req.base_path.as_str(), "/workflows/", &job_id, tail].concat();
    let accepted = TriggerAccepted {
        status_url: link("/status"),
        events_url: link("/events"),
        job_id,
        status: job.status,
        estimated_duration: engine
            .estimated_duration(&job.workflow)
            .map(|d| d.as_secs().max(1)),
    };
    let location = HeaderValue::from_str(&accepted.status_url).ok();
    let mut res = ApiResponse::json(StatusCode::ACCEPTED, &accepted);
    if let Some(l) = location {
        res.headers.insert(http::header::LOCATION, l);
    }
    Ok(res)
}

fn available(api: &Api) -> ApiResponse {
    let workflows = api
        .engine()
        .catalog()
        .iter()
        .map(|w| WorkflowInfo::from(&**w))
        .collect();
    ApiResponse::json(StatusCode::OK, &WorkflowList { workflows })
}

async fn status(api: &Api, req: &ApiRequest) -> Answer {
    let id = job_id(req)?;
    let job = api.engine().get(id).await.map_err(engine_problem)?;
    Ok(status_answer(&job))
}

/// `200` with the job as the API shows it (about a kilobyte, written into room for it).
fn status_answer(job: &crate::job::Job) -> ApiResponse {
    ApiResponse::json_sized(StatusCode::OK, &StatusView::of(job), 1536)
}

async fn cancel(api: &Api, req: &ApiRequest) -> Answer {
    let id = job_id(req)?;
    let job = api.engine().cancel(id).await.map_err(engine_problem)?;
    if job.status != JobStatus::Cancelled {
        // It finished some other way while the cancel was on its way.
        return Err(engine_problem(EngineError::AlreadyFinished {
            id,
            status: job.status,
        }));
    }
    Ok(ApiResponse::json(
        StatusCode::OK,
        &CancelAnswer {
            job_id: id.to_string(),
            status: job.status,
        },
    ))
}

/// `POST /workflows/{job_id}/approve` and `/reject`: the decision is recorded with the key's
/// name, in the job and in the audit trail (as is a refused one: no such job, not waiting).
async fn decide(api: &Api, req: &ApiRequest, approve: bool, caller: Option<&Caller>) -> Answer {
    let decision = if approve {
        Decision::Approved
    } else {
        Decision::Rejected
    };
    let mut record = AuditRecord::new("api", Decision::Refused);
    if let Some(c) = caller {
        record = record.key_name(c.bucket()).actor(c.name().to_owned());
    }
    let answer = async {
        let id = job_id(req)?;
        record.job_id = Some(id);
        // Named as the audit names callers: a token's subject `jwt:<sub>`, never to be taken
        // for the API key of the same name.
        let by = caller.map_or_else(|| "anonymous".to_owned(), Caller::bucket);
        let engine = api.engine();
        let job = if approve {
            engine.approve(id, &by, "api").await
        } else {
            engine.reject(id, &by, "api").await
        }
        .map_err(engine_problem)?;
        record.workflow = Some(job.workflow.to_string());
        record.decision = decision;
        Ok::<_, Problem>(status_answer(&job))
    }
    .await;
    if let Err(p) = &answer {
        let what = audited_as(req.route).unwrap_or_default();
        record = record.reason(format!("{what}{}", p.detail()));
    }
    api.engine().audit().record(record).await;
    answer
}

fn event_stream_headers() -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers
}

/// The client's position in a stream: its `Last-Event-ID` header and its `last_event_id` query
/// parameter are both checked with `parse`; the header wins when both are given.
fn last_event_id<T>(
    req: &ApiRequest,
    query: &BTreeMap<String, String>,
    parse: impl Fn(&str) -> Result<T, Problem>,
) -> Result<Option<T>, Problem> {
    let from_query = query.get("last_event_id").map(|s| parse(s)).transpose()?;
    let from_header = req
        .headers
        .get("last-event-id")
        .map(|v| parse(v.to_str().unwrap_or("-")))
        .transpose()?;
    Ok(from_header.or(from_query))
}

/// Where a job's stream resumes: after `Last-Event-ID` / `?last_event_id=` (0: from the start).
pub(super) fn job_position(
    req: &ApiRequest,
    query: &BTreeMap<String, String>,
) -> Result<u64, Problem> {
    // Sequence numbers are stored as PostgreSQL `bigint`s: at most `i64::MAX`.
    let seq = |s: &str| {
        s.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid-last-event-id",
                    "Last-Event-ID must be a sequence number",
                )
            })
    };
    Ok(last_event_id(req, query, seq)?.unwrap_or(0))
}

async fn events(api: &Api, req: &ApiRequest) -> Answer {
    let id = job_id(req)?;
    let query = parse_query(req.query.as_deref());
    let after = job_position(req, &query)?;
    let Some(stream) = api
        .engine()
        .resume_shared(id, after)
        .await
        .map_err(engine_problem)?
    else {
        // The SSE standard's "stop reconnecting": a client that resumes a finished job's stream
        // after its last event (as every EventSource does once the stream closes) would
        // otherwise be answered an empty stream and come back every `retry` forever.
        return Ok(ApiResponse::empty(StatusCode::NO_CONTENT));
    };
    Ok(ApiResponse {
        status: StatusCode::OK,
        headers: event_stream_headers(),
        body: super::ApiBody::Stream(sse::stream(
            stream,
            Arc::clone(&api.inner.frames),
            api.inner.keep_alive,
        )),
    })
}

/// The feed's resume point (`Last-Event-ID` / `?last_event_id=`) and `?kinds=` filter; any
/// other query parameter is refused.
pub(super) fn feed_position(
    req: &ApiRequest,
    query: &BTreeMap<String, String>,
) -> Result<(Option<crate::engine::FeedCursor>, Option<Vec<&'static str>>), Problem> {
    let bad = |what: String| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", what);
    let mut kinds: Option<Vec<&'static str>> = None;
    for (k, v) in query {
        match k.as_str() {
            "last_event_id" => {}
            "kinds" => {
                let mut names = Vec::new();
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let known = crate::event::JobEventKind::NAMES
                        .iter()
                        .find(|k| **k == name)
                        .ok_or_else(|| {
                            bad(format!(
                                "unknown event kind `{name}` (expected any of {})",
                                crate::event::JobEventKind::NAMES.join(", ")
                            ))
                        })?;
                    names.push(*known);
                }
                if names.is_empty() {
                    return Err(bad("kinds names no event kind".into()));
                }
                kinds = Some(names);
            }
            other => return Err(bad(format!("unknown query parameter `{other}`"))),
        }
    }
    let after = last_event_id(req, query, |s| {
        s.parse::<crate::engine::FeedCursor>().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-last-event-id",
                "Last-Event-ID must be an id of this stream (`<16 hex digits>-<number>`)",
            )
        })
    })?;
    Ok((after, kinds))
}

fn all_events(api: &Api, req: &ApiRequest) -> Answer {
    let query = parse_query(req.query.as_deref());
    let (after, kinds) = feed_position(req, &query)?;
    let engine = api.engine();
    // Without a cursor the stream starts now, and its opening names that position, so a
    // client that reconnects before any event arrived still misses nothing.
    let (start, opening_id) = match after {
        Some(c) => (c, None),
        None => {
            let now = engine.feed_cursor();
            (now, Some(now))
        }
    };
    let feed = engine.feed(Some(start));
    Ok(ApiResponse {
        status: StatusCode::OK,
        headers: event_stream_headers(),
        body: super::ApiBody::Stream(sse::feed_stream(
            feed,
            kinds,
            opening_id,
            api.inner.keep_alive,
        )),
    })
}

/// `GET /whoami`: the key's name and scopes, so a client (the dashboard) offers only what the
/// key may do.
fn whoami(key: Option<&Caller>) -> Answer {
    let Some(key) = key else {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token",
        )
        .bearer_challenge());
    };
    Ok(ApiResponse::json(
        StatusCode::OK,
        &super::types::KeyInfo {
            name: key.name().to_owned(),
            scopes: key.scopes().to_vec(),
        },
    ))
}

async fn jobs(api: &Api, req: &ApiRequest) -> Answer {
    let q = parse_query(req.query.as_deref());
    let bad = |what: &str| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", what.to_owned());
    let mut query = JobQuery::default();
    for (k, v) in &q {
        match k.as_str() {
            "status" => {
                query.status = Some(
                    v.parse()
                        .map_err(|e: crate::job::UnknownStatus| bad(&e.to_string()))?,
                )
            }
            "workflow" => query.workflow = Some(v.clone()),
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| bad("limit must be a number from 1 to 500"))?;
                if !(1..=500).contains(&n) {
                    return Err(bad("limit must be a number from 1 to 500"));
                }
                query.limit = Some(n);
            }
            "cursor" => query.cursor = Some(v.parse().map_err(|_| bad("cursor is not valid"))?),
            other => return Err(bad(&format!("unknown query parameter `{other}`"))),
        }
    }
    let page = api.engine().list(&query).await.map_err(engine_problem)?;
    // About a kilobyte a job: the body is written once, not grown and copied to 64 KiB.
    Ok(ApiResponse::json_sized(
        StatusCode::OK,
        &JobListView {
            jobs: page.jobs.iter().map(StatusView::of).collect(),
            next_cursor: page.next_cursor,
        },
        512 + 1024 * page.jobs.len(),
    ))
}

/// `GET /audit?since=&source=&decision=&limit=&cursor=`.
async fn audit(api: &Api, req: &ApiRequest) -> Answer {
    let bad = |what: &str| Problem::new(StatusCode::BAD_REQUEST, "invalid-query", what.to_owned());
    let mut query = AuditQuery::default();
    for (k, v) in &parse_query(req.query.as_deref()) {
        match k.as_str() {
            "since" => {
                let at = chrono::DateTime::parse_from_rfc3339(v)
                    .map_err(|_| bad("since must be an RFC 3339 time (2026-12-02T08:00:00Z)"))?;
                query.since = Some(at.with_timezone(&chrono::Utc));
            }
            "source" => query.source = Some(v.clone()),
            "decision" => {
                query.decision = Some(
                    v.parse()
                        .map_err(|e: crate::audit::UnknownDecision| bad(&e.to_string()))?,
                );
            }
            "limit" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| bad("limit must be a number from 1 to 500"))?;
                if !(1..=500).contains(&n) {
                    return Err(bad("limit must be a number from 1 to 500"));
                }
                query.limit = Some(n);
            }
            "cursor" => {
                let c: i64 = v.parse().map_err(|_| bad("cursor is not valid"))?;
                if c < 1 {
                    return Err(bad("cursor is not valid"));
                }
                query.cursor = Some(c);
            }
            other => return Err(bad(&format!("unknown query parameter `{other}`"))),
        }
    }
    let page = api
        .engine()
        .audit()
        .store()
        .list(&query)
        .await
        .map_err(|e| internal(&e))?;
    Ok(ApiResponse::json(
        StatusCode::OK,
        &AuditList {
            entries: page.entries.iter().map(AuditEntryDoc::from).collect(),
            next_cursor: page.next_cursor.map(|c| c.to_string()),
        },
    ))
}

fn dispatch_problem(e: DispatchError) -> Problem {
    match e {
        DispatchError::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such webhook or delivery",
        ),
        DispatchError::Invalid(m) => Problem::new(StatusCode::BAD_REQUEST, "invalid-request", m),
        DispatchError::Conflict(m) => Problem::new(StatusCode::CONFLICT, "conflict", m),
        e @ DispatchError::PayloadTooLarge { .. } => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            e.to_string(),
        ),
        other => internal(&other),
    }
}

/// A subscription's `url` and `events` as the OpenAPI document describes them, so that the
/// document says exactly what is accepted; the dispatcher then applies its own checks.
fn check_subscription(url: Option<&str>, events: Option<&[String]>) -> Result<(), Problem> {
    let bad = |detail: String| Problem::new(StatusCode::BAD_REQUEST, "invalid-request", detail);
    if let Some(url) = url {
        if !super::openapi::subscription_url_ok(url) {
            return Err(bad(format!(
                "`url` must be an http or https URL with a host name (not an address), at most {} bytes",
                super::openapi::SUBSCRIPTION_URL_MAX
            )));
        }
    }
    if let Some(bad_filter) = events
        .unwrap_or_default()
        .iter()
        .find(|e| !super::openapi::event_filter_ok(e))
    {
        return Err(bad(format!(
            "unknown event filter `{bad_filter}` (expected `*`, `job.*` or one of {})",
            crate::dispatch::EVENT_TYPES.join(", ")
        )));
    }
    Ok(())
}

fn json_ok(status: StatusCode, value: &impl serde::Serialize) -> Answer {
    Ok(ApiResponse::json(status, value))
}

async fn webhooks(api: &Api, req: &ApiRequest) -> Answer {
    let Some(d) = api.dispatcher() else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "outbound webhooks are not configured",
        ));
    };
    let sub_id = || {
        param(req, 0)
            .parse()
            .map_err(|_| dispatch_problem(DispatchError::NotFound))
    };
    match (req.route, &req.method) {
        (Route::Webhooks, &Method::GET) => {
            json_ok(StatusCode::OK, &d.list().await.map_err(dispatch_problem)?)
        }
        (Route::Webhooks, _) => {
            let body: CreateSubscription = json_body(req)?;
            check_subscription(Some(&body.url), Some(&body.events))?;
            json_ok(
                StatusCode::CREATED,
                &d.create(body).await.map_err(dispatch_problem)?,
            )
        }
        (Route::Webhook, &Method::GET) => json_ok(
            StatusCode::OK,
            &d.get(sub_id()?).await.map_err(dispatch_problem)?,
        ),
        (Route::Webhook, &Method::PATCH) => {
            let body: UpdateSubscription = json_body(req)?;
            check_subscription(body.url.as_deref(), body.events.as_deref())?;
            json_ok(
                StatusCode::OK,
                &d.update(sub_id()?, body).await.map_err(dispatch_problem)?,
            )
        }
        (Route::Webhook, _) => {
            d.delete(sub_id()?).await.map_err(dispatch_problem)?;
            Ok(ApiResponse::empty(StatusCode::NO_CONTENT))
        }
        (Route::WebhookRotate, _) => json_ok(
            StatusCode::OK,
            &d.rotate_secret(sub_id()?).await.map_err(dispatch_problem)?,
        ),
        (Route::WebhookDeliveries, _) => {
            let q = parse_query(req.query.as_deref());
            let limit = match q.get("limit") {
                Some(v) => v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        Problem::new(
                            StatusCode::BAD_REQUEST,
                            "invalid-query",
                            "limit must be 1 to 500",
                        )
                    })?,
                None => 50,
            };
            let page = d
                .deliveries(sub_id()?, limit, q.get("cursor").map(String::as_str))
                .await
                .map_err(dispatch_problem)?;
            json_ok(StatusCode::OK, &page)
        }
        (Route::WebhookRetry, _) => {
            let delivery = param(req, 1)
                .parse()
                .map_err(|_| dispatch_problem(DispatchError::NotFound))?;
            d.retry_delivery(sub_id()?, delivery)
                .await
                .map_err(dispatch_problem)?;
            Ok(ApiResponse::json(
                StatusCode::ACCEPTED,
                &serde_json::json!({"status": "retrying"}),
            ))
        }
        _ => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no such endpoint",
        )),
    }
}

async fn server_status(api: &Api) -> Answer {
    let engine = api.engine();
    let queue = engine.queue_stats().await.map_err(engine_problem)?;
    let mut agents = Vec::new();
    for (name, exec) in engine.registry().entries() {
        let health = tokio::time::timeout(Duration::from_secs(5), exec.health())
            .await
            .unwrap_or_else(|_| crate::Health::unhealthy("health check timed out"));
        agents.push(AgentStatus {
            name,
            kind: exec.kind().to_owned(),
            healthy: health.healthy,
            circuit: health.circuit,
            detail: health.detail,
            backends: health.backends,
        });
    }
    let pending_deliveries = match api.dispatcher() {
        Some(d) => d.pending_deliveries().await.map_err(dispatch_problem)? as u64,
        None => 0,
    };
    Ok(ApiResponse::json(
        StatusCode::OK,
        &ServerStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: engine.uptime().as_secs(),
            queue,
            agents,
            pending_deliveries,
        },
    ))
}

async fn metrics_text(api: &Api) -> Answer {
    let Some(handle) = &api.inner.metrics else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "metrics are unavailable: another metrics recorder is installed in this process",
        ));
    };
    if let Ok(q) = api.engine().queue_stats().await {
        metrics::gauge!("aiwg_queue_length").set(q.queued as f64);
        metrics::gauge!("aiwg_workers_busy").set(q.busy as f64);
    }
    Ok(ApiResponse::bytes(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        handle.render(),
    ))
}

#[cfg(test)]
mod tests {
    /// The recorder is drained without scrapes: a thread of its own runs its upkeep.
    /// (Without it, every histogram sample of a server nobody scrapes was kept.)
    static STARTED: (std::sync::Mutex<bool>, std::sync::Condvar) =
        (std::sync::Mutex::new(false), std::sync::Condvar::new());

    /// Called by the upkeep thread once it runs (and so bears its name).
    pub(super) fn upkeep_started() {
        *STARTED.0.lock().unwrap() = true;
        STARTED.1.notify_all();
    }

    #[test]
    fn the_prometheus_recorder_has_an_upkeep_thread() {
        let Some(handle) = super::global_metrics() else {
            panic!("the recorder was not installed");
        };
        // A new thread bears its parent's name until it runs: wait for it to start.
        let (started, _) = STARTED
            .1
            .wait_timeout_while(
                STARTED.0.lock().unwrap(),
                std::time::Duration::from_secs(20),
                |started| !*started,
            )
            .unwrap();
        assert!(*started, "the upkeep thread started");
        drop(started);
        metrics::histogram!("aiwg_job_duration_seconds", "workflow" => "w").record(1.0);
        let names: Vec<String> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect();
        assert!(names.iter().any(|n| n == "aiwg-metrics"), "{names:?}");
        assert!(handle.render().contains("aiwg_job_duration_seconds"));
    }
}
