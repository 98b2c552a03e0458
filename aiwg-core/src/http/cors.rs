//! CORS, decided once for both routers: preflights are answered here, and answers to allowed
//! origins carry `Access-Control-Allow-Origin`. Requests from other origins are answered as
//! usual without CORS headers (the browser enforces the policy; non-browser clients that send
//! an `Origin` keep working). With no origins configured, nothing is added.

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use super::{Api, ApiResponse, RouteSpec};

const ALLOW_HEADERS: &str = "authorization, content-type, idempotency-key, last-event-id";
const EXPOSE_HEADERS: &str = "location, retry-after, www-authenticate, x-request-id";

/// The `Access-Control-Allow-Origin` value for this request, if its origin is allowed.
pub(super) fn allow_origin(api: &Api, headers: &HeaderMap) -> Option<HeaderValue> {
    let origins = api.cors_origins();
    if origins.is_empty() {
        return None;
    }
    let origin = headers.get(ORIGIN)?;
    if origins.iter().any(|o| o == "*") {
        return Some(HeaderValue::from_static("*"));
    }
    let text = origin.to_str().ok()?;
    origins.iter().any(|o| o == text).then(|| origin.clone())
}

/// Whether the request is a CORS preflight the API should answer itself.
pub(super) fn is_preflight(api: &Api, method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && !api.cors_origins().is_empty()
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// `204` with the policy for the route's methods; without allow headers when the origin is not
/// allowed.
pub(super) fn preflight(allow: Option<HeaderValue>, spec: &RouteSpec) -> ApiResponse {
    let mut res = ApiResponse::empty(StatusCode::NO_CONTENT);
    res.headers.insert(
        VARY,
        HeaderValue::from_static(
            "origin, access-control-request-method, access-control-request-headers",
        ),
    );
    if let Some(origin) = allow {
        res.headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        res.headers
            .insert(ACCESS_CONTROL_ALLOW_METHODS, spec.allow_header());
        res.headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        res.headers
            .insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    }
    res
}

/// Adds the CORS headers of an actual (non-preflight) answer.
pub(super) fn decorate(res: &mut ApiResponse, allow: Option<HeaderValue>, configured: bool) {
    if configured {
        res.headers.append(VARY, HeaderValue::from_static("origin"));
    }
    if let Some(origin) = allow {
        res.headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        res.headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
}
