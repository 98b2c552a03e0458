//! Platform deliveries and rate limits: only failed verifications count against an address, so
//! a flood of forged deliveries is cut off at its own address while verified deliveries from
//! another address keep going through.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use aiwg_core::http::{Api, ApiRequest, ApiResponse, HookHandler, RateLimit, Route};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::Engine;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

/// Accepts a delivery signed `good`, refuses every other one as a bad signature.
struct Signed;

#[async_trait]
impl HookHandler for Signed {
    async fn handle(&self, _platform: &str, headers: &HeaderMap, _body: Bytes) -> ApiResponse {
        if headers.get("x-signature").is_some_and(|v| v == "good") {
            ApiResponse::empty(StatusCode::ACCEPTED)
        } else {
            ApiResponse::empty(StatusCode::UNAUTHORIZED)
        }
    }
}

fn delivery(peer: [u8; 4], signature: &str) -> ApiRequest {
    let mut headers = HeaderMap::new();
    headers.insert("x-signature", signature.parse().unwrap());
    ApiRequest::new(Route::Hook, Method::POST)
        .with_params(vec!["github".into()])
        .with_headers(headers)
        .with_peer(Some(IpAddr::V4(Ipv4Addr::from(peer))))
}

#[tokio::test]
async fn forged_floods_are_cut_off_and_verified_deliveries_are_not() {
    let engine = Engine::builder()
        .executor("a", Arc::new(ScriptedExecutor::succeeding("ok")))
        .build()
        .unwrap();
    let api = Api::builder(engine)
        .rate_limit(RateLimit {
            per_minute: 60,
            burst: 5,
        })
        .hooks(Arc::new(Signed))
        .build()
        .unwrap();
    let attacker = [203, 0, 113, 9];
    let platform = [140, 82, 112, 1];
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            api.handle(delivery(attacker, "forged"))
                .await
                .status
                .as_u16(),
        );
    }
    // The burst of failures is answered 401, then the address is refused before any check.
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses[19], 429, "{statuses:?}");
    // Far more verified deliveries than the burst, from the platform's address: all accepted.
    for _ in 0..50 {
        assert_eq!(api.handle(delivery(platform, "good")).await.status, 202);
    }
    // The attacker stays blocked even with a valid signature until its wait is over.
    assert_eq!(api.handle(delivery(attacker, "good")).await.status, 429);
}

/// `X-Forwarded-For` / `Forwarded` are believed only from trusted proxies, and then the last
/// address that is not a trusted proxy is the client.
#[tokio::test]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
    let engine = Engine::builder()
        .executor("a", Arc::new(ScriptedExecutor::succeeding("ok")))
        .build()
        .unwrap();
    let api = Api::builder(engine)
        .trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()])
        .build()
        .unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let headers = |pairs: &[(&'static str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    };
    let xff = headers(&[("x-forwarded-for", "198.51.100.7, 203.0.113.5, 10.1.1.1")]);
    // From a trusted proxy: the last untrusted hop.
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &xff),
        Some(ip("203.0.113.5"))
    );
    // From anyone else: the headers are ignored.
    assert_eq!(
        api.client_address(Some(ip("192.0.2.1")), &xff),
        Some(ip("192.0.2.1"))
    );
    // `Forwarded`, with quoting, ports and IPv6.
    let fwd = headers(&[(
        "forwarded",
        "for=\"[2001:db8::1]:4711\";proto=https, for=10.2.2.2",
    )]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &fwd),
        Some(ip("2001:db8::1"))
    );
    // Nothing usable: the proxy itself.
    let junk = headers(&[("x-forwarded-for", "unknown, nonsense")]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &junk),
        Some(ip("10.0.0.2"))
    );
}
