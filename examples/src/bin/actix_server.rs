//! The config-driven aiwg server on actix-web: the same configuration, engine, agents, hooks and
//! dispatcher as `--bin server` (built by [`aiwg_examples::build`]), served by `aiwg-actix`.
//!
//! ```text
//! cargo run -p aiwg-examples --bin actix_server                      # embedded defaults
//! cargo run -p aiwg-examples --bin actix_server -- --config aiwg.yaml
//! AIWG_CONFIG=aiwg.yaml cargo run -p aiwg-examples --bin actix_server
//! ```

use std::process::ExitCode;

use actix_web::{App, HttpServer};
use aiwg_examples::cli;

/// jemalloc rather than the system allocator (the default `jemalloc` feature; see
/// `examples/Cargo.toml`). A host's own binary makes this choice for itself.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// actix-web's `HttpServer` runs its workers on threads of their own; the engine, the
// dispatcher and the signal handling run on this tokio runtime.
#[tokio::main]
async fn main() -> ExitCode {
    cli::make_non_dumpable();
    if let Some(code) = cli::helper_command() {
        return code;
    }
    cli::init_tracing();
    let (source, config) = match cli::load_config("actix_server") {
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
    let aiwg = aiwg_actix::configure(app.api.clone());
    // Paths outside the API get its 404 problem document, not an empty body.
    let fallback = app.api.clone();
    let server = match HttpServer::new(move || {
        let fallback = fallback.clone();
        App::new()
            .configure(aiwg.clone())
            .default_service(actix_web::web::to(move || {
                let res = aiwg_actix::not_found(&fallback);
                async move { res }
            }))
    })
    .disable_signals()
    .shutdown_timeout(5)
    .bind(&app.bind)
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aiwg: cannot listen on {}: {e}", app.bind);
            return ExitCode::from(2);
        }
    };
    let addr = server
        .addrs()
        .first()
        .map_or(app.bind.clone(), ToString::to_string);
    cli::print_banner(&app, &addr, "actix-web", &source);

    let server = server.run();
    let handle = server.handle();
    let running = tokio::spawn(server);
    cli::shutdown_signal().await;
    println!(
        "aiwg: shutting down (running jobs get {:?})",
        app.shutdown_grace
    );
    app.shutdown().await;
    // Graceful: open connections get the shutdown timeout (5 s) to finish.
    handle.stop(true).await;
    if let Ok(Err(e)) = running.await {
        tracing::warn!("server: {e}");
    }
    println!("aiwg: stopped");
    ExitCode::SUCCESS
}
