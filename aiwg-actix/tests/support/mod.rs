//! Serving an [`Api`] with actix-web (and with axum, for comparisons) on loopback.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use actix_web::{web, App, HttpResponse, HttpServer};
use aiwg_core::http::Api;
use aiwg_core::test_util::conformance::{Serve, Served};

/// The actix-web adapter in an `HttpServer` with one worker; under a prefix, inside a host app
/// with a route of its own at `/`.
pub struct Actix;

impl Serve for Actix {
    fn serve(&self, api: Api, prefix: &str) -> Pin<Box<dyn Future<Output = Served> + Send + '_>> {
        let prefix = prefix.to_owned();
        Box::pin(async move {
            let aiwg = aiwg_actix::configure(api);
            let scope = prefix.clone();
            let server = HttpServer::new(move || {
                let app = App::new();
                if scope.is_empty() {
                    app.configure(aiwg.clone())
                } else {
                    app.route(
                        "/",
                        web::get().to(|| async { HttpResponse::Ok().body("host app") }),
                    )
                    .service(web::scope(&scope).configure(aiwg.clone()))
                }
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(1)
            .bind(("127.0.0.1", 0))
            .expect("bind");
            let addr = server.addrs()[0];
            let server = server.run();
            let handle = server.handle();
            tokio::spawn(server);
            Served::new(format!("http://{addr}{prefix}"), move || {
                drop(handle.stop(false));
            })
        })
    }
}

/// The axum router, served like the axum adapter's own conformance test does.
pub struct Axum;

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
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
            Served::new(format!("http://{addr}{prefix}"), move || {
                let _ = stop.send(());
            })
        })
    }
}
