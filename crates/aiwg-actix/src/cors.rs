//! CORS from [`Api::cors_origins`](aiwg_core::http::Api::cors_origins), the same policy as the
//! axum router's: the listed origins (or any, for `*`), the API's methods and request headers.
//! Requests from other origins are answered as usual, without CORS headers (the browser
//! enforces the policy), exactly as the axum router does.

use actix_cors::Cors;
use actix_web::http::{header, Method};

/// The CORS middleware for one resource.
pub(crate) fn cors(origins: &[String]) -> Cors {
    let mut cors = Cors::default()
        .allowed_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("last-event-id"),
        ]);
    if origins.iter().any(|o| o == "*") {
        return cors.allow_any_origin().send_wildcard();
    }
    for origin in origins {
        // An origin actix-cors cannot parse would fail the whole app at start-up; the axum
        // router skips such entries, and so do we.
        if origin.parse::<actix_web::http::Uri>().is_ok() {
            cors = cors.allowed_origin(origin);
        }
    }
    cors
}
