//! The dashboard's files, embedded in the crate (see [the module docs](super#the-dashboard)).
//!
//! Plain HTML, CSS and JavaScript modules under `assets/`, included at compile time: nothing
//! is built, nothing is fetched at run time. Every answer carries a strict
//! Content-Security-Policy — scripts, styles and connections only from the page's own origin,
//! no inline code, no frames, no forms posting anywhere, and Trusted Types, so the browser
//! itself refuses any attempt to insert markup from a string — plus `nosniff` and
//! `no-referrer`. The page's URLs are relative, so it works wherever the router is mounted.

use bytes::Bytes;
use http::header::{HeaderName, CACHE_CONTROL, CONTENT_SECURITY_POLICY, LOCATION};
use http::{HeaderValue, StatusCode};

use super::{ApiResponse, Problem};

/// The policy of every dashboard answer.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!("assets/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the dashboard; `index.html` is also the page at `ui/`.
static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("login.js", JS),
    asset!("jobs.js", JS),
    asset!("job.js", JS),
    asset!("workflows.js", JS),
    asset!("webhooks.js", JS),
    asset!("status.js", JS),
];

/// The names `ui/{asset}` serves (for the OpenAPI document).
pub(crate) fn asset_names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.name)
}

/// The content types `ui/{asset}` answers with (for the OpenAPI document).
pub(crate) fn content_types() -> Vec<&'static str> {
    let mut types: Vec<&'static str> = ASSETS.iter().map(|a| a.content_type).collect();
    types.sort_unstable();
    types.dedup();
    types
}

/// Adds the headers every dashboard answer carries.
fn secure(mut res: ApiResponse) -> ApiResponse {
    let h = &mut res.headers;
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    // Small files: always revalidated, so a new version shows at once.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

fn serve(asset: &Asset) -> ApiResponse {
    secure(ApiResponse::bytes(
        StatusCode::OK,
        asset.content_type,
        Bytes::from_static(asset.body),
    ))
}

/// `GET /ui/`: the page.
pub(crate) fn page() -> ApiResponse {
    serve(&ASSETS[0])
}

/// `GET /ui/{asset}`: one file, or 404.
pub(crate) fn asset(name: &str) -> Result<ApiResponse, Problem> {
    ASSETS
        .iter()
        .find(|a| a.name == name)
        .map(serve)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "the dashboard has no such file",
            )
        })
}

/// `GET /ui`: to `ui/` (relative, so it holds under any mount point), where the page's
/// relative URLs resolve inside `ui/`.
pub(crate) fn redirect() -> ApiResponse {
    secure(ApiResponse::empty(StatusCode::PERMANENT_REDIRECT))
        .header(LOCATION, HeaderValue::from_static("ui/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_with_its_type_and_the_policy() {
        for a in ASSETS {
            let res = asset(a.name).unwrap();
            assert_eq!(res.status, StatusCode::OK);
            assert_eq!(res.headers["content-type"], a.content_type);
            assert_eq!(res.headers["content-security-policy"], CSP);
            assert_eq!(res.headers["x-content-type-options"], "nosniff");
            assert!(!a.body.is_empty(), "{}", a.name);
        }
        assert_eq!(asset("nope.js").unwrap_err().status(), 404);
        assert_eq!(asset("../mod.rs").unwrap_err().status(), 404);
    }

    /// The page's own rules: relative URLs only, no inline script or style, and no sink that
    /// turns a string into markup or code in any script.
    #[test]
    fn the_files_keep_to_the_policy() {
        let text = |a: &Asset| std::str::from_utf8(a.body).unwrap();
        let index = text(&ASSETS[0]);
        assert!(index.contains(r#"<script type="module" src="app.js"></script>"#));
        assert!(!index.contains("style="), "inline style in index.html");
        assert!(!index.contains("src=\"/") && !index.contains("href=\"/"));
        assert!(!index.contains("http://") && !index.contains("https://"));
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            let js = text(a);
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "setTimeout(\"",
                ".style.",
                "localStorage",
                "EventSource",
            ] {
                assert!(!js.contains(sink), "{} uses {sink}", a.name);
            }
            // Only modules of its own, by relative URL.
            for part in js.split(" from '").skip(1) {
                assert!(part.starts_with("./"), "{} imports {part:.40}", a.name);
            }
            assert!(!js.contains("import("), "{} imports dynamically", a.name);
        }
        // Every module the scripts import is served.
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            for part in text(a).split("from './").skip(1) {
                let name = &part[..part.find('\'').unwrap()];
                assert!(
                    ASSETS.iter().any(|b| b.name == name),
                    "{} imports {name}",
                    a.name
                );
            }
        }
    }
}
