//! aiwg-axum passes the shared conformance suite over real HTTP on loopback.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use aiwg_core::http::Api;
use aiwg_core::test_util::conformance::{
    conformance_suite, websocket_client_that_stops_reading, Serve, Served,
};
use tokio_util::sync::CancellationToken;

struct Axum;

impl Serve for Axum {
    fn serve(&self, api: Api, prefix: &str) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        let prefix = prefix.to_owned();
        Box::pin(async move {
            let app = if prefix.is_empty() {
                aiwg_axum::router(api)
            } else {
                axum::Router::new()
                    .route("/", axum::routing::get(|| async { "host app" }))
                    .nest(&prefix, aiwg_axum::router(api))
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await
                .unwrap();
            });
            Served::new(format!("http://{addr}{prefix}"), move || stop.cancel())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_passes_the_conformance_suite() {
    conformance_suite(&Axum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_passes_the_hooks_suite() {
    aiwg_webhook::testing::hooks_suite(&Axum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_router_drops_a_websocket_client_that_stops_reading() {
    websocket_client_that_stops_reading(&Axum).await;
}
