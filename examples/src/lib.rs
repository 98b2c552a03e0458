//! # aiwg-examples
//!
//! Runnable programs that show aiwg end to end, and the small library behind them that turns a
//! [`Config`] into a running engine, API, dispatcher and platform hooks:
//!
//! - `cargo run -p aiwg-examples --bin server` — the config-driven server (the README's main
//!   command). Without `--config` it uses `examples/config/default.yaml`, whose demo workflows
//!   run plain commands over the project folder, so they need no API key.
//! - `--bin actix_server` — the same server on actix-web (`aiwg-actix`).
//! - `--bin mount` — aiwg nested under `/aiwg` in an app with routes and state of its own.
//! - `--bin custom_executor` — writing an [`Executor`] for your own backend.
//! - `--bin mock_testing` — testing your code against aiwg with scripted and mock executors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aiwg_agents::{ClaudeCode, CommandExecutor, OpenCode, Pool, Strategy};
use aiwg_core::config::{AgentConfig, Config, ConfigError, StorageKind};
use aiwg_core::dispatch::Dispatcher;
use aiwg_core::http::{Api, ApiKey, Scope};
use aiwg_core::{Engine, Executor, JobStore, MemoryStore};
use serde_json::Value;

pub mod cli;

/// The default configuration of the example server.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.yaml");

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The configuration is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something failed while starting.
    #[error("{0}")]
    Start(String),
}

/// A running aiwg: the pieces a server binary serves and shuts down.
#[derive(Debug)]
pub struct App {
    /// The HTTP API (mount it with `aiwg_axum::router` or `aiwg_actix::configure`).
    pub api: Api,
    /// The engine.
    pub engine: Engine,
    /// The outbound webhook dispatcher.
    pub dispatcher: Dispatcher,
    /// Where to listen.
    pub bind: String,
    /// The development API key generated because none was configured (print it once).
    pub generated_key: Option<String>,
    /// How long running jobs get at shutdown.
    pub shutdown_grace: Duration,
    /// Agents and workflows left out, with the reason (e.g. `claude` not installed).
    pub skipped: Vec<String>,
}

impl App {
    /// Stops taking work, lets running jobs finish within the grace period, then stops the
    /// dispatcher.
    pub async fn shutdown(&self) {
        self.engine.shutdown(self.shutdown_grace).await;
        self.dispatcher.shutdown().await;
    }
}

fn opt_str<'a>(o: &'a BTreeMap<String, Value>, k: &str) -> Option<&'a str> {
    o.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn opt_strs(o: &BTreeMap<String, Value>, k: &str) -> Vec<String> {
    o.get(k)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn opt_env(o: &BTreeMap<String, Value>) -> Vec<(String, String)> {
    o.get("env")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

fn opt_duration(
    o: &BTreeMap<String, Value>,
    k: &str,
    at: &str,
) -> Result<Option<Duration>, ConfigError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_u64().map(Duration::from_secs)),
        Some(Value::String(s)) => aiwg_core::util::parse_duration(s)
            .map(Some)
            .map_err(|e| ConfigError::new(format!("{at}.{k}"), e)),
        Some(_) => Err(ConfigError::new(
            format!("{at}.{k}"),
            "must be a duration like \"30s\"",
        )),
    }
}

/// Finds `name` on `PATH` (or checks an explicit path).
fn find_binary(name: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(name);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// Builds one executor from its `agents:` entry. `Ok(None)` means "not available here" (the
/// reason is in the error string of the second element).
fn build_agent(
    name: &str,
    cfg: &AgentConfig,
    built: &BTreeMap<String, Arc<dyn Executor>>,
) -> Result<Result<Arc<dyn Executor>, String>, ConfigError> {
    let at = format!("agents.{name}");
    let o = &cfg.options;
    let bad = |e: aiwg_agents::ConfigError| ConfigError::new(format!("{at}.{}", e.key), e.reason);
    match cfg.kind.as_str() {
        "command" => {
            let mut b = CommandExecutor::builder();
            for (k, v) in opt_env(o) {
                b = b.env(k, v);
            }
            if let Some(d) = opt_duration(o, "idle_timeout", &at)? {
                b = b.idle_timeout(d);
            }
            if let Some(allow) = o.get("allow_failure").and_then(Value::as_bool) {
                b = b.allow_failure(allow);
            }
            let argv = opt_strs(o, "command");
            if !argv.is_empty() {
                b = b.template(argv);
            }
            Ok(Ok(Arc::new(b.build().map_err(bad)?)))
        }
        "claude-code" => {
            let path = opt_str(o, "path").unwrap_or("claude");
            let Some(binary) = find_binary(path) else {
                return Ok(Err(format!(
                    "agent `{name}` (claude-code) skipped: `{path}` was not found (set AIWG_CLAUDE_PATH)"
                )));
            };
            let mut b = ClaudeCode::builder().binary(binary);
            if let Some(m) = opt_str(o, "model") {
                b = b.model(m);
            }
            if let Some(m) = opt_str(o, "permission_mode") {
                b = b.permission_mode(m);
            }
            let allowed = opt_strs(o, "allowed_tools");
            if !allowed.is_empty() {
                b = b.allowed_tools(allowed);
            }
            let disallowed = opt_strs(o, "disallowed_tools");
            if !disallowed.is_empty() {
                b = b.disallowed_tools(disallowed);
            }
            if let Some(n) = o.get("max_turns").and_then(Value::as_u64) {
                b = b.max_turns(
                    u32::try_from(n)
                        .map_err(|_| ConfigError::new(format!("{at}.max_turns"), "too large"))?,
                );
            }
            if let Some(n) = o.get("max_budget_usd").and_then(Value::as_f64) {
                b = b.max_budget_usd(n);
            }
            if let Some(s) = opt_str(o, "append_system_prompt") {
                b = b.append_system_prompt(s);
            }
            if let Some(s) = opt_str(o, "mcp_config") {
                b = b.mcp_config(s);
            }
            for (k, v) in opt_env(o) {
                b = b.env(k, v);
            }
            for k in opt_strs(o, "pass_env") {
                b = b.pass_env(k);
            }
            if let Some(d) = opt_duration(o, "idle_timeout", &at)? {
                b = b.idle_timeout(d);
            }
            Ok(Ok(Arc::new(b.build().map_err(bad)?)))
        }
        "opencode" => {
            let url = opt_str(o, "url").unwrap_or("http://127.0.0.1:4096");
            let mut b = OpenCode::builder(url);
            if let Some(p) = opt_str(o, "password") {
                b = b.password(p);
            }
            if let Some(m) = opt_str(o, "model") {
                b = b.model(m);
            }
            if let Some(d) = opt_duration(o, "idle_timeout", &at)? {
                b = b.idle_timeout(d);
            }
            Ok(Ok(Arc::new(b.build().map_err(bad)?)))
        }
        "pool" => {
            let strategy = match opt_str(o, "strategy").unwrap_or("round-robin") {
                "round-robin" => Strategy::RoundRobin,
                "least-connections" => Strategy::LeastConnections,
                "weighted" => Strategy::Weighted,
                other => {
                    return Err(ConfigError::new(
                        format!("{at}.strategy"),
                        format!(
                            "unknown strategy `{other}` (round-robin, least-connections, weighted)"
                        ),
                    ))
                }
            };
            let mut b = Pool::builder().strategy(strategy);
            let members = o
                .get("members")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if members.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.members"),
                    "a pool needs members",
                ));
            }
            for (i, m) in members.iter().enumerate() {
                let (member, weight) = match m {
                    Value::String(s) => (s.clone(), 1),
                    Value::Object(obj) => (
                        obj.get("agent")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        obj.get("weight").and_then(Value::as_u64).unwrap_or(1) as u32,
                    ),
                    _ => (String::new(), 1),
                };
                let Some(exec) = built.get(&member) else {
                    return Err(ConfigError::new(
                        format!("{at}.members[{i}]"),
                        format!("`{member}` is not an agent defined before the pool"),
                    ));
                };
                b = b.member(member, Arc::clone(exec), weight);
            }
            Ok(Ok(Arc::new(b.build().map_err(bad)?)))
        }
        other => Err(ConfigError::new(
            format!("{at}.kind"),
            format!("unknown agent kind `{other}` (claude-code, opencode, command, pool)"),
        )),
    }
}

/// Builds everything from `config` on the current tokio runtime.
pub async fn build(config: &Config) -> Result<App, AppError> {
    let mut skipped = Vec::new();
    // Agents: pools last, so their members exist.
    let mut built: BTreeMap<String, Arc<dyn Executor>> = BTreeMap::new();
    let (pools, plain): (Vec<_>, Vec<_>) =
        config.agents.iter().partition(|(_, a)| a.kind == "pool");
    for (name, cfg) in plain.into_iter().chain(pools) {
        match build_agent(name, cfg, &built)? {
            Ok(exec) => {
                built.insert(name.clone(), exec);
            }
            Err(reason) => skipped.push(reason),
        }
    }
    let mut builder = config.engine.apply(Engine::builder());
    for (name, exec) in &built {
        builder = builder.executor(name.clone(), Arc::clone(exec));
    }
    for wf in config.workflows() {
        let missing = wf
            .steps
            .iter()
            .filter_map(|s| s.agent.as_ref())
            .find(|a| !built.contains_key(*a));
        match missing {
            Some(agent) => skipped.push(format!(
                "workflow `{}` skipped: agent `{agent}` is unavailable",
                wf.name
            )),
            None => builder = builder.workflow(wf),
        }
    }
    builder = builder.policy(config.projects.policy()?);

    let storage = Storage::open(config).await?;
    builder = builder.store(storage.jobs());

    let dispatcher = storage
        .dispatch(Dispatcher::builder().config(&config.webhooks))
        .build()
        .map_err(|e| ConfigError::new("webhooks", e.to_string()))?;
    dispatcher
        .start()
        .map_err(|e| AppError::Start(e.to_string()))?;
    builder = builder.observer(Arc::new(dispatcher.clone()));
    // Jobs started from Slack or Discord report their outcome back to the conversation.
    let replies = aiwg_webhook::PlatformReplies::builder()
        .build()
        .map_err(|e| AppError::Start(e.to_string()))?;
    builder = builder.observer(Arc::new(replies));
    let engine = builder
        .build()
        .map_err(|e| ConfigError::new("workflows", e.to_string()))?;
    storage.listen(&engine).await?;

    let mut keys = config.auth.keys()?;
    let mut generated_key = None;
    if keys.is_empty() {
        let secret = format!("aiwg_dev_{}", hex::encode(rand::random::<[u8; 24]>()));
        keys.push(
            ApiKey::plain("dev", &secret, vec![Scope::Admin])
                .map_err(|e| AppError::Start(e.to_string()))?,
        );
        generated_key = Some(secret);
    }
    let mut api = Api::builder(engine.clone())
        .keys(keys)
        .body_limit(config.server.body_limit_bytes()?)
        .cors_origins(config.server.cors_origins.clone())
        .public_metrics(config.auth.public_metrics)
        .dispatcher(dispatcher.clone());
    if let Some(limit) = config.auth.rate_limit {
        api = api.rate_limit(limit);
    }
    if !config.triggers.is_null() {
        let triggers: aiwg_webhook::TriggersConfig =
            aiwg_core::config::section("triggers", config.triggers.clone())?;
        let hooks = storage
            .dedupe(aiwg_webhook::Hooks::builder(triggers, engine.clone()))
            .build()
            .map_err(|e| ConfigError::new("triggers", e.to_string()))?;
        api = api.hooks(Arc::new(hooks));
    }
    let api = api
        .build()
        .map_err(|e| ConfigError::new("server", e.to_string()))?;
    Ok(App {
        api,
        engine,
        dispatcher,
        bind: config.server.bind.clone(),
        generated_key,
        shutdown_grace: config
            .engine
            .shutdown_grace
            .unwrap_or(Duration::from_secs(30)),
        skipped,
    })
}

/// The configured storage: memory, or one PostgreSQL pool shared by the job store, the
/// dispatcher's outbox and the cross-instance notifications.
enum Storage {
    Memory,
    #[cfg(feature = "postgres")]
    Postgres {
        jobs: Arc<aiwg_core::store::PgStore>,
        outbox: Arc<aiwg_core::dispatch::PgDispatchStore>,
        dedup: aiwg_webhook::PgDeliveryStore,
    },
}

impl Storage {
    async fn open(config: &Config) -> Result<Self, AppError> {
        match config.storage.kind {
            StorageKind::Memory => Ok(Storage::Memory),
            #[cfg(feature = "postgres")]
            StorageKind::Postgres => {
                let url = config.storage.url.as_deref().unwrap_or_default();
                let start = |e: &dyn std::fmt::Display| AppError::Start(format!("storage: {e}"));
                // One pool for jobs, the outbox and de-duplication; each concept runs its own
                // migrations.
                let jobs = aiwg_core::store::PgStore::connect(url)
                    .await
                    .map_err(|e| start(&e))?;
                let outbox = aiwg_core::dispatch::PgDispatchStore::from_pool(jobs.pool().clone())
                    .await
                    .map_err(|e| start(&e))?;
                outbox.migrate().await.map_err(|e| start(&e))?;
                let dedup = aiwg_webhook::PgDeliveryStore::new(jobs.pool().clone());
                dedup.migrate().await.map_err(|e| start(&e))?;
                Ok(Storage::Postgres {
                    jobs: Arc::new(jobs),
                    outbox: Arc::new(outbox),
                    dedup,
                })
            }
            #[cfg(not(feature = "postgres"))]
            StorageKind::Postgres => Err(ConfigError::new(
                "storage.kind",
                "this build has no PostgreSQL support (build with `--features postgres`)",
            )
            .into()),
        }
    }

    fn jobs(&self) -> Arc<dyn JobStore> {
        match self {
            Storage::Memory => Arc::new(MemoryStore::new()),
            #[cfg(feature = "postgres")]
            Storage::Postgres { jobs, .. } => Arc::clone(jobs) as Arc<dyn JobStore>,
        }
    }

    fn dispatch(
        &self,
        builder: aiwg_core::dispatch::DispatcherBuilder,
    ) -> aiwg_core::dispatch::DispatcherBuilder {
        match self {
            Storage::Memory => builder,
            #[cfg(feature = "postgres")]
            Storage::Postgres { outbox, .. } => {
                builder.store(Arc::clone(outbox) as Arc<dyn aiwg_core::dispatch::DispatchStore>)
            }
        }
    }

    fn dedupe(&self, builder: aiwg_webhook::HooksBuilder) -> aiwg_webhook::HooksBuilder {
        match self {
            Storage::Memory => builder,
            #[cfg(feature = "postgres")]
            Storage::Postgres { dedup, .. } => builder.delivery_store(Arc::new(dedup.clone())),
        }
    }

    async fn listen(&self, engine: &Engine) -> Result<(), AppError> {
        match self {
            Storage::Memory => {
                let _ = engine;
                Ok(())
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres { jobs, .. } => jobs
                .listen(engine.cluster_listener())
                .await
                .map(drop)
                .map_err(|e| AppError::Start(format!("storage: {e}"))),
        }
    }
}

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
