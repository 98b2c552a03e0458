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
use aiwg_core::config::Config;

fn config_source() -> Result<(String, Config), String> {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::var("AIWG_CONFIG").ok().filter(|p| !p.is_empty());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => path = Some(args.next().ok_or("--config needs a path")?),
            a if a.starts_with("--config=") => path = Some(a["--config=".len()..].to_owned()),
            "--help" | "-h" => {
                println!("usage: actix_server [--config PATH]   (or AIWG_CONFIG=PATH)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}` (try --help)")),
        }
    }
    match path {
        Some(p) => Config::from_file(std::path::Path::new(&p))
            .map(|c| (p, c))
            .map_err(|e| e.to_string()),
        None => Config::from_yaml(aiwg_examples::DEFAULT_CONFIG)
            .map(|c| ("(embedded defaults)".to_owned(), c))
            .map_err(|e| e.to_string()),
    }
}

async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

// actix-web's `HttpServer` runs its workers on threads of their own; the engine, the
// dispatcher and the signal handling run on this tokio runtime.
#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let (source, config) = match config_source() {
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
    for s in &app.skipped {
        tracing::warn!("{s}");
    }
    let aiwg = aiwg_actix::configure(app.api.clone());
    let server = match HttpServer::new(move || App::new().configure(aiwg.clone()))
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
    println!("aiwg (actix-web) listening on http://{addr} (config: {source})");
    let key_hint = match &app.generated_key {
        Some(k) => {
            println!("development API key (admin): {k}");
            k.clone()
        }
        None => "$AIWG_API_KEY".to_owned(),
    };
    let workflows: Vec<String> = app
        .engine
        .catalog()
        .iter()
        .map(|w| w.name.clone())
        .collect();
    println!("workflows: {}", workflows.join(", "));
    if let Some(demo) = workflows
        .iter()
        .find(|w| *w == "repo-files")
        .or(workflows.first())
    {
        println!(
            "try: curl -s -X POST http://{addr}/workflows/trigger -H 'Authorization: Bearer {key_hint}' -H 'Content-Type: application/json' -d '{{\"workflow\":\"{demo}\",\"async\":false}}'"
        );
    }

    let server = server.run();
    let handle = server.handle();
    let running = tokio::spawn(server);
    signal().await;
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
