//! The config-driven aiwg server on axum.
//!
//! ```text
//! cargo run -p aiwg-examples --bin server                      # embedded defaults
//! cargo run -p aiwg-examples --bin server -- --config aiwg.yaml
//! AIWG_CONFIG=aiwg.yaml cargo run -p aiwg-examples --bin server
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use aiwg_examples::cli;
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator (the default `jemalloc` feature; see
/// `examples/Cargo.toml`). A host's own binary makes this choice for itself.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    cli::make_non_dumpable();
    if let Some(code) = cli::helper_command() {
        return code;
    }
    cli::init_tracing();
    let (source, config) = match cli::load_config("server") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("aiwg: {e}");
            return ExitCode::from(2);
        }
    };
    let app = match aiwg_examples::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("aiwg: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&app.bind).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aiwg: cannot listen on {}: {e}", app.bind);
            return ExitCode::from(2);
        }
    };
    let addr = listener
        .local_addr()
        .map_or(app.bind.clone(), |a| a.to_string());
    cli::print_banner(&app, &addr, "axum", &source);

    let stop = CancellationToken::new();
    let server_stop = stop.clone();
    // Paths outside the API get its 404 problem document, not an empty body.
    let fallback = app.api.clone();
    let router = aiwg_axum::router(app.api.clone()).fallback(move || {
        let res = aiwg_axum::not_found(&fallback);
        async move { res }
    });
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { server_stop.cancelled().await })
        .await
    });
    cli::shutdown_signal().await;
    println!(
        "aiwg: shutting down (running jobs get {:?})",
        app.shutdown_grace
    );
    // Jobs first: their event streams end with their terminal events, then connections close.
    app.shutdown().await;
    stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .is_err()
    {
        tracing::warn!("open connections did not close within 5 s");
    }
    println!("aiwg: stopped");
    ExitCode::SUCCESS
}
