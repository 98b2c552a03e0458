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
    // The burst of failures is answered 401, then the address is told to wait.
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(statuses[19], 429, "{statuses:?}");
    // Far more verified deliveries than the burst, from the platform's address: all accepted.
    for _ in 0..50 {
        assert_eq!(api.handle(delivery(platform, "good")).await.status, 202);
    }
    // A verified delivery from the blocked address still goes through: a platform shares its
    // address with whatever else sends from there (another project's stale webhook on the
    // same forge), and a delivery refused with 429 is lost. Its forgeries are still refused.
    assert_eq!(api.handle(delivery(attacker, "good")).await.status, 202);
    assert_eq!(api.handle(delivery(attacker, "forged")).await.status, 429);
}

/// An IPv6 client is counted by its /64: a fresh address of the block for every failed key
/// does not reset its budget. IPv4 addresses, and IPv4-mapped IPv6 ones, count one by one.
#[tokio::test]
async fn an_ipv6_client_is_counted_by_its_64() {
    let engine = Engine::builder()
        .executor("a", Arc::new(ScriptedExecutor::succeeding("ok")))
        .build()
        .unwrap();
    let api = Api::builder(engine)
        .rate_limit(RateLimit {
            per_minute: 60,
            burst: 2,
        })
        .hooks(Arc::new(Signed))
        .build()
        .unwrap();
    let v6 = |n: u16| {
        let mut h = HeaderMap::new();
        h.insert("x-signature", "forged".parse().unwrap());
        ApiRequest::new(Route::Hook, Method::POST)
            .with_params(vec!["github".into()])
            .with_headers(h)
            .with_peer(Some(IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, 0, 7, n, n, n, n,
            ))))
    };
    let mut statuses = Vec::new();
    for n in 1..=6 {
        statuses.push(api.handle(v6(n)).await.status.as_u16());
    }
    assert_eq!(statuses[..2], [401, 401], "{statuses:?}");
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    // Another /64 has its own budget.
    let mut other = v6(1);
    other.peer = Some(IpAddr::V6(std::net::Ipv6Addr::new(
        0x2001, 0xdb8, 0, 8, 1, 1, 1, 1,
    )));
    assert_eq!(api.handle(other).await.status, 401);
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
    // Hops with ports (Azure Application Gateway, IIS ARR append them).
    let ported = headers(&[(
        "x-forwarded-for",
        "1.1.1.1, 203.0.113.5:4711, [10.1.1.1]:80",
    )]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &ported),
        Some(ip("203.0.113.5"))
    );
    // A hop that is not an address ends the walk: what lies beyond it may be the client's
    // own; the nearest trusted proxy is taken instead.
    let hidden = headers(&[("x-forwarded-for", "198.51.100.99, _hidden, 10.1.1.1")]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &hidden),
        Some(ip("10.1.1.1"))
    );
    // Nothing usable: the proxy itself.
    let junk = headers(&[("x-forwarded-for", "unknown, nonsense")]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &junk),
        Some(ip("10.0.0.2"))
    );
    // Only the proxies' header is read: a proxy that writes `Forwarded` passes the client's
    // own `X-Forwarded-For` through, and the other way round.
    let fwd = headers(&[
        (
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=https, for=10.2.2.2",
        ),
        ("x-forwarded-for", "198.51.100.99"),
    ]);
    assert_eq!(
        api.client_address(Some(ip("10.0.0.2")), &fwd),
        Some(ip("198.51.100.99")),
        "by default, X-Forwarded-For"
    );
    let engine = Engine::builder()
        .executor("a", Arc::new(ScriptedExecutor::succeeding("ok")))
        .build()
        .unwrap();
    let behind_forwarded = Api::builder(engine)
        .trusted_proxies(vec!["10.0.0.0/8".parse().unwrap()])
        .forwarded_header(aiwg_core::http::ForwardedHeader::Forwarded)
        .build()
        .unwrap();
    assert_eq!(
        behind_forwarded.client_address(Some(ip("10.0.0.2")), &fwd),
        Some(ip("2001:db8::1")),
        "`Forwarded`, with quoting, ports and IPv6"
    );
    assert_eq!(
        behind_forwarded.client_address(Some(ip("10.0.0.2")), &xff),
        Some(ip("10.0.0.2")),
        "X-Forwarded-For is not read"
    );
}
