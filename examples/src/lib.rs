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
//! - `--features test-util --bin mock_testing` — testing your code against aiwg with scripted and mock executors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::audit::AuditLog;
use aiwg_core::config::{Config, ConfigError, StorageKind};
use aiwg_core::dispatch::Dispatcher;
use aiwg_core::http::{Api, ApiKey, Scope};
use aiwg_core::{Engine, Executor, JobStore, MemoryStore};

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

/// A running aiwg: the pieces a server binary serves and shuts down. Its `Debug` output hides
/// the generated key.
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
    /// The message-broker consumers and publishers (`brokers:`), when configured.
    pub brokers: tokio::sync::Mutex<Option<aiwg_brokers::RunningBrokers>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("bind", &self.bind)
            .field(
                "generated_key",
                &self.generated_key.as_ref().map(|_| "<redacted>"),
            )
            .field("shutdown_grace", &self.shutdown_grace)
            .field("skipped", &self.skipped)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Stops taking work (brokers' triggers included), lets running jobs finish within the grace
    /// period, publishes their last events to the brokers (for at most 10 s more), then stops
    /// the dispatcher.
    pub async fn shutdown(&self) {
        let mut brokers = self.brokers.lock().await.take();
        if let Some(b) = brokers.as_mut() {
            b.stop_consuming().await;
        }
        self.engine.shutdown(self.shutdown_grace).await;
        if let Some(b) = brokers {
            b.shutdown_within(Duration::from_secs(10)).await;
        }
        self.dispatcher.shutdown().await;
    }
}

/// Builds every configured agent (typed, unknown keys refused; pools last; supervised
/// `opencode serve` servers started). Errors name the full key (`agents.sh.sandboxx`).
async fn build_agents(config: &Config) -> Result<aiwg_agents::config::BuiltAgents, ConfigError> {
    let agents = aiwg_agents::config::AgentsConfig::from_core(&config.agents)
        .map_err(|e| ConfigError::new(e.key, e.reason))?;
    for line in agents.sandbox_report() {
        tracing::info!("{line}");
    }
    agents.start().await.map_err(|e| {
        let mut reason = e.reason.clone();
        if let Some(source) = std::error::Error::source(&e) {
            reason = format!("{reason}: {source}");
        }
        ConfigError::new(e.key, reason)
    })
}

/// Builds everything from `config` on the current tokio runtime.
pub async fn build(config: &Config) -> Result<App, AppError> {
    let agents = build_agents(config).await?;
    let mut skipped = agents.skipped;
    let built: BTreeMap<String, Arc<dyn Executor>> = agents.executors.into_iter().collect();
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
    if let Some(ws) = &config.projects.workspace {
        if let Some(settings) = ws.settings()? {
            builder = builder.workspace(settings);
        }
    }

    let storage = Storage::open(config).await?;
    builder = builder
        .store(storage.jobs(&config.storage.retention))
        .audit(storage.audit(&config.storage.retention));

    let dispatcher = storage
        .dispatch(Dispatcher::builder().config(&config.webhooks))
        .build()
        .map_err(|e| ConfigError::new("webhooks", e.to_string()))?;
    dispatcher
        .start()
        .map_err(|e| AppError::Start(e.to_string()))?;
    builder = builder.observer(Arc::new(dispatcher.clone()));
    // Jobs answer where they were asked: a tracking comment on the forges whose sections have
    // API access, the outcome in the Slack or Discord conversation.
    let triggers: Option<aiwg_webhook::TriggersConfig> = if config.triggers.is_null() {
        None
    } else {
        Some(aiwg_core::config::section(
            "triggers",
            config.triggers.clone(),
        )?)
    };
    let replies = aiwg_webhook::PlatformReplies::builder()
        .build()
        .map_err(|e| AppError::Start(e.to_string()))?;
    let mut tracker = aiwg_webhook::Tracker::builder().chat(replies);
    if let Some(t) = &triggers {
        for client in t
            .forge_clients()
            .map_err(|e| ConfigError::new("triggers", e.to_string()))?
        {
            tracker = tracker.forge(client);
        }
    }
    if let Some(url) = &config.server.public_url {
        tracker = tracker.status_base(url.clone());
    }
    let tracker = storage.tracking(tracker).build();
    builder = builder.observer(Arc::new(tracker));
    // Message brokers: every job event is published (observer); triggers are consumed once the
    // engine runs. A broker without its cargo feature is a config error naming it.
    let brokers_config = aiwg_brokers::BrokersConfig::from_value(config.brokers.clone())?;
    let brokers = if brokers_config.is_empty() {
        None
    } else {
        let b = aiwg_brokers::Brokers::new(brokers_config).map_err(|e| match e {
            aiwg_brokers::BrokerError::Config(c) => AppError::Config(c),
            other => AppError::Start(other.to_string()),
        })?;
        builder = builder.observer(b.observer());
        Some(b)
    };
    let engine = builder.build().map_err(|e| {
        // Named by the key the setting comes from, as the file's own errors are.
        let key = match &e {
            aiwg_core::engine::BuildError::Setting {
                key: "workspace", ..
            } => "projects.workspace".to_owned(),
            aiwg_core::engine::BuildError::Setting { key, .. } => format!("engine.{key}"),
            aiwg_core::engine::BuildError::Workflow(aiwg_core::WorkflowError::Invalid {
                workflow,
                ..
            }) => format!("workflows.{workflow}"),
            _ => "workflows".to_owned(),
        };
        ConfigError::new(key, e.to_string())
    })?;
    storage.listen(&engine).await?;
    storage.purge_on_schedule(&config.storage.retention);
    let brokers = match brokers {
        Some(b) => Some(b.start(engine.clone()).await.map_err(|e| {
            let mut reason = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                reason = format!("{reason}: {source}");
            }
            AppError::Start(reason)
        })?),
        None => None,
    };

    let mut keys = config.auth.keys()?;
    let mut generated_key = None;
    // A server that takes JWTs needs no generated key.
    if keys.is_empty() && config.auth.jwt.is_none() {
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
        .trusted_proxies(config.server.trusted_proxies()?)
        .forwarded_header(config.server.forwarded_header)
        .public_metrics(config.auth.public_metrics)
        .dashboard(config.server.dashboard)
        .dispatcher(dispatcher.clone());
    if let Some(limit) = config.auth.rate_limit {
        api = api.rate_limit(limit);
    }
    if let Some(jwt) = &config.auth.jwt {
        api = api.jwt(jwt.verifier()?);
    }
    if let Some(triggers) = triggers {
        let hooks = storage
            .dedupe(aiwg_webhook::Hooks::builder(triggers, engine.clone()))
            .build()
            .map_err(|e| ConfigError::new("triggers", e.to_string()))?;
        api = api.hooks(Arc::new(hooks));
    }
    let api = api.build().map_err(|e| {
        // The API names its settings by their configuration keys where they have one.
        let key = match &e {
            aiwg_core::http::ApiError::Setting { key, .. } if key.contains('.') => *key,
            _ => "server",
        };
        ConfigError::new(key, e.to_string())
    })?;
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
        brokers: tokio::sync::Mutex::new(brokers),
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
        audit: Arc<aiwg_core::audit::PgAuditStore>,
        tracking: aiwg_webhook::tracking::PgTrackingStore,
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
                // Secrets (subscription secrets, chat reply credentials) are sealed before
                // they reach the database; without a key the server does not start.
                let keyring = aiwg_core::secrets::SecretKeyring::from_env()
                    .map_err(|e| start(&e))?
                    .ok_or_else(|| start(&aiwg_core::secrets::SecretError::NoKey))?;
                // One pool for jobs, the outbox and de-duplication; each concept runs its own
                // migrations.
                let jobs = aiwg_core::store::PgStore::connect(url)
                    .await
                    .map_err(|e| start(&e))?
                    .with_keyring(keyring.clone());
                let outbox = aiwg_core::dispatch::PgDispatchStore::from_pool(jobs.pool().clone())
                    .await
                    .map_err(|e| start(&e))?
                    .with_keyring(keyring);
                outbox.migrate().await.map_err(|e| start(&e))?;
                // Secrets stored in the clear by an older version, or under a key that is no
                // longer the first of AIWG_SECRET_KEY, are sealed again with the current one.
                let resealed = outbox.reseal_secrets().await.map_err(|e| start(&e))?;
                if resealed > 0 {
                    tracing::info!(
                        subscriptions = resealed,
                        "sealed subscription secrets with the current key"
                    );
                }
                let dedup = aiwg_webhook::PgDeliveryStore::new(jobs.pool().clone());
                dedup.migrate().await.map_err(|e| start(&e))?;
                let audit = aiwg_core::audit::PgAuditStore::new(jobs.pool().clone());
                audit.migrate().await.map_err(|e| start(&e))?;
                let tracking = aiwg_webhook::tracking::PgTrackingStore::new(jobs.pool().clone());
                tracking.migrate().await.map_err(|e| start(&e))?;
                Ok(Storage::Postgres {
                    jobs: Arc::new(jobs),
                    outbox: Arc::new(outbox),
                    dedup,
                    audit: Arc::new(audit),
                    tracking,
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

    fn jobs(&self, retention: &aiwg_core::config::RetentionConfig) -> Arc<dyn JobStore> {
        match self {
            Storage::Memory => Arc::new(MemoryStore::with_retention(retention.memory())),
            #[cfg(feature = "postgres")]
            Storage::Postgres { jobs, .. } => Arc::clone(jobs) as Arc<dyn JobStore>,
        }
    }

    fn audit(&self, retention: &aiwg_core::config::RetentionConfig) -> AuditLog {
        match self {
            Storage::Memory => AuditLog::new(Arc::new(
                aiwg_core::audit::MemoryAuditStore::with_retention(retention.audit_memory()),
            )),
            #[cfg(feature = "postgres")]
            Storage::Postgres { audit, .. } => {
                AuditLog::new(Arc::clone(audit) as Arc<dyn aiwg_core::audit::AuditStore>)
            }
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

    fn tracking(&self, builder: aiwg_webhook::TrackerBuilder) -> aiwg_webhook::TrackerBuilder {
        match self {
            Storage::Memory => builder,
            #[cfg(feature = "postgres")]
            Storage::Postgres { tracking, .. } => builder.store(Arc::new(tracking.clone())),
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

    /// PostgreSQL keeps everything until purged: every `purge_every`, finished jobs older than
    /// `finished_for` go with their events, finished deliveries too, and expired
    /// de-duplication keys. Any instance may purge; concurrent purges are harmless. (The
    /// memory store forgets by itself.)
    fn purge_on_schedule(&self, retention: &aiwg_core::config::RetentionConfig) {
        match self {
            Storage::Memory => {
                let _ = retention;
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres {
                jobs,
                outbox,
                dedup,
                audit,
                tracking,
            } => {
                let (jobs, outbox, dedup) = (Arc::clone(jobs), Arc::clone(outbox), dedup.clone());
                let (audit, tracking) = (Arc::clone(audit), tracking.clone());
                let keep = retention.finished_for();
                let keep_audit = retention.audit_for();
                let every = retention.purge_every();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        // A retention of "forever" (any number of seconds is accepted)
                        // purges nothing; `now - MAX` would panic and end this task for good.
                        let before = aiwg_core::util::earlier(chrono::Utc::now(), keep);
                        let jobs_gone = jobs.purge_finished(before).await;
                        let deliveries_gone = outbox.purge_finished(before).await;
                        let keys_gone = dedup.purge().await;
                        let audit_before = aiwg_core::util::earlier(chrono::Utc::now(), keep_audit);
                        let audit_gone =
                            aiwg_core::audit::AuditStore::purge(&*audit, audit_before).await;
                        if let Err(e) = tracking.purge(before).await {
                            tracing::warn!(error = %e, "could not purge tracking comments");
                        }
                        match (jobs_gone, deliveries_gone, keys_gone, audit_gone) {
                            (Ok(j), Ok(d), Ok(k), Ok(a)) => tracing::info!(
                                jobs = j,
                                deliveries = d,
                                dedup_keys = k,
                                audit_entries = a,
                                "purged finished jobs, deliveries, expired keys and old audit entries"
                            ),
                            (j, d, k, a) => tracing::warn!(
                                jobs = ?j.err(),
                                deliveries = ?d.err(),
                                dedup_keys = ?k.err(),
                                audit_entries = ?a.err(),
                                "a purge failed; retrying at the next one"
                            ),
                        }
                    }
                });
            }
        }
    }
}

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine setting the file's parser accepts but the engine refuses is named by its key.
    #[tokio::test]
    async fn an_engine_setting_the_engine_refuses_is_named_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = format!(
            "projects: {{ root: \"{}\" }}\nengine: {{ lease_ttl: 10ms }}",
            dir.path().display()
        );
        let config = Config::from_yaml_with_env(&yaml, |_| None).unwrap();
        match build(&config).await {
            Err(AppError::Config(e)) => assert_eq!(e.key, "engine.lease_ttl", "{e}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a lease of 10 ms was accepted"),
        }
        let yaml = format!(
            "projects: {{ root: \"{}\" }}\nauth: {{ rate_limit: {{ per_minute: 0, burst: 1 }} }}",
            dir.path().display()
        );
        let config = Config::from_yaml_with_env(&yaml, |_| None).unwrap();
        match build(&config).await {
            Err(AppError::Config(e)) => assert_eq!(e.key, "auth.rate_limit", "{e}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a rate limit of 0 a minute was accepted"),
        }
    }
}
