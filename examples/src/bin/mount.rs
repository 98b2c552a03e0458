//! aiwg nested under `/aiwg` in an app that has routes and state of its own.
//!
//! ```text
//! cargo run -p aiwg-examples --bin mount
//! curl http://127.0.0.1:3200/              # the host app
//! curl http://127.0.0.1:3200/aiwg/health   # aiwg
//! # the dashboard: http://127.0.0.1:3200/aiwg/ui/
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aiwg_agents::CommandExecutor;
use aiwg_core::http::{Api, ApiKey, Scope};
use aiwg_core::{Engine, ProjectPolicy, Step, Workflow};
use axum::extract::State;
use axum::routing::get;
use axum::Router;

#[derive(Clone, Default)]
struct AppState {
    hits: Arc<AtomicU64>,
}

async fn home(State(state): State<AppState>) -> String {
    let n = state.hits.fetch_add(1, Ordering::Relaxed) + 1;
    format!("my service, visit {n}; aiwg lives under /aiwg\n")
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::builder()
        .executor("sh", Arc::new(CommandExecutor::builder().build()?))
        .workflow(
            Workflow::new("repo-files")
                .describe("List the files git tracks")
                .step(Step::command("list", "sh", ["git", "ls-files"])),
        )
        .policy(ProjectPolicy::builder().root(".").build()?)
        .build()?;
    let key =
        std::env::var("AIWG_API_KEY").unwrap_or_else(|_| "mount-example-key-change-me".into());
    let api = Api::builder(engine.clone())
        .key(ApiKey::plain("example", &key, vec![Scope::Admin])?)
        .dashboard(true)
        .build()?;

    // The host's router has its own state type; aiwg's router adapts to it.
    let app = Router::new()
        .route("/", get(home))
        .nest("/aiwg", aiwg_axum::router(api))
        .with_state(AppState::default());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3200").await?;
    println!(
        "host app on http://{}/ , aiwg on /aiwg, its dashboard on /aiwg/ui/ (key: {key})",
        listener.local_addr()?
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    engine.shutdown(std::time::Duration::from_secs(10)).await;
    Ok(())
}
