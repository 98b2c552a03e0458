//! Requests per second through the trigger path (`POST /workflows/trigger`, no-op scripted
//! executor) served by the actix-web adapter, beside a bare actix-web handler that reads the body
//! and answers the same 202 JSON; the same pair for axum. One client (reqwest, keep-alive
//! pool), the same concurrency and batch for all four, on loopback. The client runs on a tokio
//! runtime of its own; the engines and the axum servers on a second one (2 threads); actix-web
//! runs its 2 workers on threads of its own.
//!
//! `cargo bench -p aiwg-benches --bench http_actix` — criterion reports each as elements/s
//! (one element = one request); the ratio is adapter throughput / bare throughput.

#![allow(missing_docs)] // criterion_group! generates an undocumented function

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_core::http::{Api, ApiKey, Scope};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, Step, Workflow};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 2_000;
const CONCURRENCY: usize = 16;
const KEY: &str = "bench-trigger-key-0123456789";
const BODY: &str = r#"{"workflow":"noop"}"#;
/// What the trigger path answers (same shape and size as a real answer).
const ANSWER: &str = r#"{"job_id":"01a2011d-0a50-72f9-9aee-afd3b7f83d39","status":"queued","estimated_duration":null,"status_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/status","events_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/events"}"#;

fn api() -> Api {
    let engine = Engine::builder()
        .executor("noop", Arc::new(ScriptedExecutor::succeeding("")))
        .workflow(Workflow::new("noop").step(Step::prompt("run", "noop", "x")))
        .workers(2)
        .queue_capacity(10_000_000)
        .build()
        .expect("engine");
    Api::builder(engine)
        .key(ApiKey::plain("bench", KEY, vec![Scope::Trigger]).expect("key"))
        .build()
        .expect("api")
}

fn actix_server(aiwg: bool) -> String {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let api = aiwg.then(api);
    let server = HttpServer::new(move || {
        let app = App::new();
        match &api {
            Some(api) => app.configure(aiwg_actix::configure(api.clone())),
            None => app.route(
                "/workflows/trigger",
                web::post().to(|_body: web::Bytes| async {
                    HttpResponse::Accepted()
                        .content_type("application/json")
                        .body(ANSWER)
                }),
            ),
        }
    })
    .workers(2)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let addr = server.addrs()[0];
    tokio::spawn(server.run());
    format!("http://{addr}/workflows/trigger")
}

async fn axum_server(aiwg: bool) -> String {
    let app = if aiwg {
        aiwg_axum::router(api())
    } else {
        axum::Router::new().route(
            "/workflows/trigger",
            axum::routing::post(|_body: axum::body::Bytes| async {
                (
                    axum::http::StatusCode::ACCEPTED,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    ANSWER,
                )
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    format!("http://{addr}/workflows/trigger")
}

/// `BATCH` triggers from `CONCURRENCY` concurrent senders; every answer must be a 202.
async fn batch(client: &reqwest::Client, url: &str) -> Duration {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::with_capacity(CONCURRENCY);
    for _ in 0..CONCURRENCY {
        let (client, url, next) = (client.clone(), url.to_owned(), next.clone());
        senders.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < BATCH {
                let res = client
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(BODY)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(res.status().as_u16(), 202);
                res.bytes().await.expect("body");
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("client");
    let targets = server_rt.block_on(async {
        vec![
            ("actix_bare", actix_server(false)),
            ("actix_aiwg_trigger", actix_server(true)),
            ("axum_bare", axum_server(false).await),
            ("axum_aiwg_trigger", axum_server(true).await),
        ]
    });
    let mut group = c.benchmark_group("http_trigger");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    for (name, url) in &targets {
        group.bench_function(*name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += batch(&client, &url).await;
                    }
                    total
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
