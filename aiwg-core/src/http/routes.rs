//! The route table: every endpoint's path, methods and access, written once.
//!
//! The routers register [`ROUTES`]; [`Api::handle`](super::Api::handle) reads the table for the
//! `405` answer and its `Allow` header, for the CORS preflight's methods and for the scope a key
//! needs; the OpenAPI document is assembled from it. Adding an endpoint means one row here (and
//! its handler and OpenAPI details), never a path or a method list somewhere else.

use http::{HeaderValue, Method};

use super::auth::Scope;

/// The endpoints of the API. Adapters register each path of [`ROUTES`] for every method and
/// hand the matched [`Route`] and path parameters to [`Api::handle`](super::Api::handle), which
/// answers 405 for methods a route does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// `POST /workflows/trigger`
    Trigger,
    /// `GET /workflows/available`
    Available,
    /// `GET /workflows/{job_id}/status`
    Status,
    /// `POST /workflows/{job_id}/cancel`
    Cancel,
    /// `GET /workflows/{job_id}/events`
    Events,
    /// `GET /jobs`
    Jobs,
    /// `GET|POST /webhooks`
    Webhooks,
    /// `GET|PATCH|DELETE /webhooks/{id}`
    Webhook,
    /// `POST /webhooks/{id}/rotate-secret`
    WebhookRotate,
    /// `GET /webhooks/{id}/deliveries`
    WebhookDeliveries,
    /// `POST /webhooks/{id}/deliveries/{delivery_id}/retry`
    WebhookRetry,
    /// `POST /hooks/{platform}`
    Hook,
    /// `GET /health`
    Health,
    /// `GET /status`
    ServerStatus,
    /// `GET /metrics`
    Metrics,
    /// `GET /openapi.json`
    OpenApi,
    /// `GET /audit`
    Audit,
    /// `GET /events`: every job's events (the engine's [feed](crate::Engine::feed)) as SSE
    AllEvents,
    /// `GET /whoami`: the presented key's name and scopes
    Whoami,
    /// `GET /ui/`: the dashboard's page (when [`ApiBuilder::dashboard`](super::ApiBuilder::dashboard) is on)
    Dashboard,
    /// `GET /ui/{asset}`: the dashboard's scripts, styles and icon
    DashboardAsset,
    /// `GET /ui`: a redirect to `ui/`, where the page's relative URLs resolve
    DashboardRedirect,
    /// `POST /workflows/{job_id}/approve`: continue a job waiting for an approval
    Approve,
    /// `POST /workflows/{job_id}/reject`: end a job waiting for an approval
    Reject,
    /// `GET /workflows/{job_id}/ws`: a job's events over a WebSocket ([`ws`](super::ws))
    JobWebSocket,
    /// `GET /ws`: every job's events over a WebSocket
    AllWebSocket,
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Access {
    /// Anyone; limited per client address when a rate limit is configured.
    Public,
    /// Anyone, never rate limited (`/health`, for load balancers and probes; the dashboard's
    /// embedded files, a dozen of which make one page load).
    Unlimited,
    /// An API key with this scope (`admin` implies every scope).
    Key(Scope),
    /// Any valid API key, whatever its scopes (`/whoami`).
    AnyKey,
    /// An API key with this scope, unless the API serves the route publicly
    /// ([`ApiBuilder::public_metrics`](super::ApiBuilder::public_metrics)).
    Configurable(Scope),
    /// The platform's own signature, verified by the [`HookHandler`](super::HookHandler);
    /// limited per client address like [`Access::Public`].
    Signature,
}

/// One row of the route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RouteSpec {
    /// The path relative to where the host mounts the API, `{name}` for parameters, in the
    /// syntax both axum 0.8 and actix-web use.
    pub path: &'static str,
    /// The endpoint.
    pub route: Route,
    /// The methods it takes, in the order `Allow` lists them.
    pub methods: &'static [Method],
    /// Who may call it.
    pub access: Access,
}

impl RouteSpec {
    const fn new(
        path: &'static str,
        route: Route,
        methods: &'static [Method],
        access: Access,
    ) -> Self {
        Self {
            path,
            route,
            methods,
            access,
        }
    }

    /// Whether the route takes `method`.
    #[must_use]
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The methods as `Allow` and `Access-Control-Allow-Methods` list them (`GET, POST`).
    #[must_use]
    pub fn allow_header(&self) -> HeaderValue {
        let list: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
        HeaderValue::from_str(&list.join(", ")).unwrap_or_else(|_| HeaderValue::from_static("GET"))
    }

    /// The names of the path parameters, in order (`job_id`, `id`, `delivery_id`, `platform`).
    pub fn param_names(&self) -> impl Iterator<Item = &'static str> {
        self.path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
    }

    /// Matches a path relative to the mount point (`/workflows/x/status`) against this route's
    /// pattern, returning the raw (still percent-encoded) parameter values in order.
    #[must_use]
    pub fn match_path<'a>(&self, path: &'a str) -> Option<Vec<&'a str>> {
        let mut pattern = self.path.split('/');
        let mut given = path.split('/');
        let mut params = Vec::new();
        loop {
            match (pattern.next(), given.next()) {
                (None, None) => return Some(params),
                (Some(p), Some(g)) if p.starts_with('{') => {
                    if g.is_empty() {
                        return None;
                    }
                    params.push(g);
                }
                (Some(p), Some(g)) if p == g => {}
                _ => return None,
            }
        }
    }
}

impl Route {
    /// Whether the route speaks WebSocket: adapters hand its upgrade requests to
    /// [`Api::websocket`](super::Api::websocket) (other requests to [`Api::handle`](super::Api::handle),
    /// which answers `426 Upgrade Required` once the key is checked).
    #[must_use]
    pub const fn is_websocket(self) -> bool {
        matches!(self, Route::JobWebSocket | Route::AllWebSocket)
    }

    /// This route's row of [`ROUTES`].
    #[must_use]
    pub const fn spec(self) -> &'static RouteSpec {
        &ROUTES[self as usize]
    }
}

const GET: &[Method] = &[Method::GET];
const POST: &[Method] = &[Method::POST];

/// Every endpoint of the API, in the order of [`Route`]'s variants (checked at compile time).
pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(
        "/workflows/trigger",
        Route::Trigger,
        POST,
        Access::Key(Scope::Trigger),
    ),
    RouteSpec::new(
        "/workflows/available",
        Route::Available,
        GET,
        Access::Key(Scope::Read),
    ),
    RouteSpec::new(
        "/workflows/{job_id}/status",
        Route::Status,
        GET,
        Access::Key(Scope::Read),
    ),
    RouteSpec::new(
        "/workflows/{job_id}/cancel",
        Route::Cancel,
        POST,
        Access::Key(Scope::Cancel),
    ),
    RouteSpec::new(
        "/workflows/{job_id}/events",
        Route::Events,
        GET,
        Access::Key(Scope::Read),
    ),
    RouteSpec::new("/jobs", Route::Jobs, GET, Access::Key(Scope::Read)),
    RouteSpec::new(
        "/webhooks",
        Route::Webhooks,
        &[Method::GET, Method::POST],
        Access::Key(Scope::Admin),
    ),
    RouteSpec::new(
        "/webhooks/{id}",
        Route::Webhook,
        &[Method::GET, Method::PATCH, Method::DELETE],
        Access::Key(Scope::Admin),
    ),
    RouteSpec::new(
        "/webhooks/{id}/rotate-secret",
        Route::WebhookRotate,
        POST,
        Access::Key(Scope::Admin),
    ),
    RouteSpec::new(
        "/webhooks/{id}/deliveries",
        Route::WebhookDeliveries,
        GET,
        Access::Key(Scope::Admin),
    ),
    RouteSpec::new(
        "/webhooks/{id}/deliveries/{delivery_id}/retry",
        Route::WebhookRetry,
        POST,
        Access::Key(Scope::Admin),
    ),
    RouteSpec::new("/hooks/{platform}", Route::Hook, POST, Access::Signature),
    RouteSpec::new("/health", Route::Health, GET, Access::Unlimited),
    RouteSpec::new(
        "/status",
        Route::ServerStatus,
        GET,
        Access::Key(Scope::Read),
    ),
    RouteSpec::new(
        "/metrics",
        Route::Metrics,
        GET,
        Access::Configurable(Scope::Read),
    ),
    RouteSpec::new("/openapi.json", Route::OpenApi, GET, Access::Public),
    RouteSpec::new("/audit", Route::Audit, GET, Access::Key(Scope::Admin)),
    RouteSpec::new("/events", Route::AllEvents, GET, Access::Key(Scope::Read)),
    RouteSpec::new("/whoami", Route::Whoami, GET, Access::AnyKey),
    RouteSpec::new("/ui/", Route::Dashboard, GET, Access::Unlimited),
    RouteSpec::new("/ui/{asset}", Route::DashboardAsset, GET, Access::Unlimited),
    RouteSpec::new("/ui", Route::DashboardRedirect, GET, Access::Unlimited),
    RouteSpec::new(
        "/workflows/{job_id}/approve",
        Route::Approve,
        POST,
        Access::Key(Scope::Approve),
    ),
    RouteSpec::new(
        "/workflows/{job_id}/reject",
        Route::Reject,
        POST,
        Access::Key(Scope::Approve),
    ),
    RouteSpec::new(
        "/workflows/{job_id}/ws",
        Route::JobWebSocket,
        GET,
        Access::Key(Scope::Read),
    ),
    RouteSpec::new("/ws", Route::AllWebSocket, GET, Access::Key(Scope::Read)),
];

// `Route::spec` indexes the table by variant.
const _: () = {
    let mut i = 0;
    while i < ROUTES.len() {
        assert!(
            ROUTES[i].route as usize == i,
            "ROUTES is out of Route order"
        );
        i += 1;
    }
};

/// The route a path (relative to the mount point, without query) matches, with its raw
/// parameter values. Fixed segments win over parameters, as in axum and actix-web.
#[must_use]
pub fn match_route(path: &str) -> Option<(&'static RouteSpec, Vec<&str>)> {
    ROUTES
        .iter()
        .filter_map(|spec| spec.match_path(path).map(|params| (spec, params)))
        .min_by_key(|(_, params)| params.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_its_row_and_paths_match() {
        for spec in ROUTES {
            assert_eq!(spec.route.spec(), spec);
            assert!(!spec.methods.is_empty());
        }
        let (spec, params) = match_route("/workflows/trigger").unwrap();
        assert_eq!((spec.route, params.len()), (Route::Trigger, 0));
        let (spec, params) = match_route("/workflows/abc/status").unwrap();
        assert_eq!((spec.route, params), (Route::Status, vec!["abc"]));
        let (spec, params) = match_route("/webhooks/w/deliveries/d/retry").unwrap();
        assert_eq!((spec.route, params), (Route::WebhookRetry, vec!["w", "d"]));
        assert!(match_route("/workflows//status").is_none());
        assert!(match_route("/nope").is_none());
        assert!(match_route("/health/").is_none());
        let (spec, params) = match_route("/ui/").unwrap();
        assert_eq!((spec.route, params.len()), (Route::Dashboard, 0));
        let (spec, params) = match_route("/ui/app.js").unwrap();
        assert_eq!(
            (spec.route, params),
            (Route::DashboardAsset, vec!["app.js"])
        );
        assert_eq!(
            match_route("/ui").unwrap().0.route,
            Route::DashboardRedirect
        );
        assert!(match_route("/ui/a/b").is_none());
        let (spec, params) = match_route("/workflows/j/ws").unwrap();
        assert_eq!((spec.route, params), (Route::JobWebSocket, vec!["j"]));
        assert!(spec.route.is_websocket() && Route::AllWebSocket.is_websocket());
        assert_eq!(match_route("/ws").unwrap().0.route, Route::AllWebSocket);
        assert!(!Route::Events.is_websocket());
        assert_eq!(match_route("/events").unwrap().0.route, Route::AllEvents);
        assert_eq!(
            Route::Webhook.spec().allow_header(),
            HeaderValue::from_static("GET, PATCH, DELETE")
        );
        assert_eq!(
            Route::WebhookRetry.spec().param_names().collect::<Vec<_>>(),
            ["id", "delivery_id"]
        );
    }
}
