//! The baseline of the out-of-process HTTP load runs (`scripts/http_load.sh`): a server that
//! does nothing but read the request body and answer the bytes the aiwg example server answers
//! on the same paths, on the same framework, runtime shape and allocator.
//!
//! ```text
//! bare_server axum  127.0.0.1:3201
//! bare_server actix 127.0.0.1:3202
//! ```
//!
//! Paths: `POST /hooks/github` → `202` and a GitHub-shaped answer, `POST /workflows/trigger` →
//! `202` and a trigger answer (same shape and length as aiwg's). Stops on SIGINT/SIGTERM.

use std::process::ExitCode;

/// The allocator the example servers use (their default `jemalloc` feature), so the two sides
/// differ only in what they do with a request.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `POST /workflows/trigger` answers (the shape and size of aiwg's answer).
const TRIGGER_ANSWER: &str = r#"{"job_id":"01a2011d-0a50-72f9-9aee-afd3b7f83d39","status":"queued","estimated_duration":null,"status_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/status","events_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/events"}"#;
/// What `POST /hooks/github` answers (the shape and size of aiwg's answer).
const GITHUB_ANSWER: &str = r#"{"job_id":"01a2011d-0a50-72f9-9aee-afd3b7f83d39","status":"queued","status_url":"/workflows/01a2011d-0a50-72f9-9aee-afd3b7f83d39/status"}"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("usage: bare_server axum|actix ADDR");
        return ExitCode::from(2);
    };
    let result = match kind.as_str() {
        "axum" => axum_server(addr),
        "actix" => actix_server(addr),
        other => Err(format!("unknown server kind `{other}` (axum, actix)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_server: {e}");
            ExitCode::from(2)
        }
    }
}

fn axum_server(addr: &str) -> Result<(), String> {
    use axum::http::StatusCode;
    use axum::routing::post;
    let json = [("content-type", "application/json")];
    let app = axum::Router::new()
        .route(
            "/hooks/github",
            post(move |_body: axum::body::Bytes| async move {
                (StatusCode::ACCEPTED, json, GITHUB_ANSWER)
            }),
        )
        .route(
            "/workflows/trigger",
            post(move |_body: axum::body::Bytes| async move {
                (StatusCode::ACCEPTED, json, TRIGGER_ANSWER)
            }),
        );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!("bare axum server on {addr}");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(|e| e.to_string())
    })
}

fn actix_server(addr: &str) -> Result<(), String> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let sys = actix_web::rt::System::new();
    sys.block_on(async move {
        let server = HttpServer::new(|| {
            App::new()
                .route(
                    "/hooks/github",
                    web::post().to(|_body: web::Bytes| async {
                        HttpResponse::Accepted()
                            .content_type("application/json")
                            .body(GITHUB_ANSWER)
                    }),
                )
                .route(
                    "/workflows/trigger",
                    web::post().to(|_body: web::Bytes| async {
                        HttpResponse::Accepted()
                            .content_type("application/json")
                            .body(TRIGGER_ANSWER)
                    }),
                )
        })
        .bind(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        println!("bare actix-web server on {addr}");
        server.run().await.map_err(|e| e.to_string())
    })
}
