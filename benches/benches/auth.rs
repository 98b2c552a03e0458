//! What a JWT costs per request beside an API key: `GET /whoami` answered by the [`Api`] in
//! process (no socket), authenticated with an API key (SHA-256 and constant-time compares) and
//! with RS256, ES256 and EdDSA tokens verified against a JWKS served on loopback (fetched once,
//! then cached).
//!
//! Each kind of token is measured twice: a new token on every request (`first_use`: each is
//! verified whole, signature and claims, as every request was before the verifier kept the
//! tokens it verified), and one token sent on every request, as a client holding a token does
//! (answered from the verified tokens after its first use). Prints
//! `ratio auth_<alg>_first_use_vs_key` and `ratio auth_<alg>_vs_key` (key time / token time):
//! 1.0 means a token costs what a key costs; lower means it costs more.
//!
//! `cargo bench -p aiwg-benches --bench auth` (`AIWG_AUTH_ROUNDS`, default 2000 a kind; a
//! quarter of that for new tokens, each signed before the clock starts)

use std::time::{Duration, Instant};

use aiwg_core::http::{Api, ApiKey, ApiRequest, JwtVerifier, Route, Scope};
use aiwg_core::test_util::jwt::{JwksServer, KeyKind, TestIssuer, AUDIENCE, ISSUER};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, Step, Workflow};
use http::Method;
use serde_json::json;

const KEY: &str = "bench-api-key-0123456789";

fn request(token: &str) -> ApiRequest {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header"),
    );
    ApiRequest::new(Route::Whoami, Method::GET).with_headers(headers)
}

async fn per_request(api: &Api, token: &str, rounds: u32) -> Duration {
    // Warm up (and fetch the JWKS once).
    for _ in 0..50 {
        assert_eq!(api.handle(request(token)).await.status, 200);
    }
    let start = Instant::now();
    for _ in 0..rounds {
        let res = api.handle(request(token)).await;
        assert_eq!(res.status, 200);
    }
    start.elapsed() / rounds
}

/// Each of `tokens` once.
async fn per_new_token(api: &Api, tokens: &[String]) -> Duration {
    let start = Instant::now();
    for token in tokens {
        let res = api.handle(request(token)).await;
        assert_eq!(res.status, 200);
    }
    start.elapsed() / u32::try_from(tokens.len()).expect("count")
}

fn main() {
    let rounds: u32 = std::env::var("AIWG_AUTH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let issuer = TestIssuer::generate();
        let jwks = JwksServer::start(json!({"keys": [
            issuer.jwk(KeyKind::Rsa, "rsa"),
            issuer.jwk(KeyKind::Ec, "ec"),
            issuer.jwk(KeyKind::Ed, "ed"),
        ]}))
        .await;
        let engine = Engine::builder()
            .executor(
                "echo",
                std::sync::Arc::new(ScriptedExecutor::succeeding("ok")),
            )
            .workflow(Workflow::new("w").step(Step::prompt("s", "echo", "hi")))
            .build()
            .expect("engine");
        let api = Api::builder(engine)
            .key(ApiKey::plain("bench", KEY, vec![Scope::Read]).expect("key"))
            // A realistic number of configured keys: each is compared on every request.
            .keys((0..4).map(|i| {
                ApiKey::plain(
                    format!("k{i}"),
                    &format!("other-key-{i}-0123456789"),
                    vec![Scope::Read],
                )
                .expect("key")
            }))
            .jwt(
                JwtVerifier::builder(ISSUER, AUDIENCE)
                    .jwks_url(jwks.url())
                    .expect("url")
                    .build()
                    .expect("verifier"),
            )
            .build()
            .expect("api");
        let key = per_request(&api, KEY, rounds).await;
        println!("auth api_key: {:.1} µs/request", key.as_secs_f64() * 1e6);
        for (kind, kid, name) in [
            (KeyKind::Rsa, "rsa", "rs256"),
            (KeyKind::Ec, "ec", "es256"),
            (KeyKind::Ed, "ed", "eddsa"),
        ] {
            let fresh: Vec<String> = (0..(rounds / 4).max(1))
                .map(|i| {
                    let mut claims = issuer.claims("bench", "read");
                    claims["jti"] = json!(format!("{name}-{i}"));
                    issuer.sign(kind, Some(kid), &claims)
                })
                .collect();
            let t = per_new_token(&api, &fresh).await;
            println!(
                "auth {name}, a new token each request: {:.1} µs/request",
                t.as_secs_f64() * 1e6
            );
            println!(
                "ratio auth_{name}_first_use_vs_key {:.3}",
                key.as_secs_f64() / t.as_secs_f64()
            );
            let token = issuer.sign(kind, Some(kid), &issuer.claims("bench", "read"));
            let t = per_request(&api, &token, rounds).await;
            println!(
                "auth {name}, one token: {:.1} µs/request",
                t.as_secs_f64() * 1e6
            );
            println!(
                "ratio auth_{name}_vs_key {:.3}",
                key.as_secs_f64() / t.as_secs_f64()
            );
        }
        assert_eq!(jwks.hits(), 1, "the JWKS was fetched once");
    });
}
