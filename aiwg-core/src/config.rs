//! Configuration: the YAML file of the example server (see the README), `${VAR}` expansion, environment overrides, and
//! errors that name the key.
//!
//! ```
//! use aiwg_core::config::Config;
//!
//! let yaml = r#"
//! server: { bind: "127.0.0.1:3100", body_limit: "512KiB" }
//! engine: { workers: 2, default_timeout: "2m" }
//! agents:
//!   sh: { kind: command }
//! workflows:
//!   repo-files:
//!     description: List the files of the project
//!     steps:
//!       - { name: list, agent: sh, command: ["git", "ls-files"] }
//! "#;
//! let config = Config::from_yaml_with_env(yaml, |_| None).unwrap();
//! assert_eq!(config.server.body_limit_bytes().unwrap(), 512 * 1024);
//! assert_eq!(config.workflows()[0].name, "repo-files");
//!
//! let err = Config::from_yaml_with_env("engine: { workers: many }", |_| None).unwrap_err();
//! assert!(err.to_string().contains("engine.workers"));
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::dispatch::DispatchConfig;
use crate::http::{ApiKey, RateLimit, Scope};
use crate::workflow::Workflow;

/// A configuration error, naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error at `{key}`: {reason}")]
pub struct ConfigError {
    /// The key path (`engine.workers`), or `(file)` for the whole document.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl ConfigError {
    /// An error at `key`.
    #[must_use]
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Deserializes one section of the configuration (`at` is its key, e.g. `triggers`, or empty
/// for the whole file) with errors that name the full key of what is wrong: a value of the
/// wrong type names its key (`engine.workers`), an unknown key names itself
/// (`agents.sbx.sandboxx: unknown key`). Sections owned by other crates (agents, triggers)
/// are typed there and read through this.
///
/// ```
/// #[derive(serde::Deserialize, Debug)]
/// #[serde(deny_unknown_fields)]
/// struct Sandbox { sandbox: String }
///
/// let err = aiwg_core::config::section::<Sandbox>(
///     "agents.sbx",
///     serde_json::json!({ "sandboxx": "bwrap" }),
/// )
/// .unwrap_err();
/// assert_eq!(err.key, "agents.sbx.sandboxx");
/// assert!(err.reason.starts_with("unknown key"), "{}", err.reason);
/// ```
pub fn section<T: serde::de::DeserializeOwned>(at: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let mut key = match (at.is_empty(), path == ".") {
            (true, true) => String::new(),
            (true, false) => path,
            (false, true) => at.to_owned(),
            (false, false) => format!("{at}.{path}"),
        };
        let reason = e.into_inner().to_string();
        // serde reports an unknown field at its parent; name the field itself.
        if let Some(rest) = reason.strip_prefix("unknown field `") {
            if let Some((field, expected)) = rest.split_once('`') {
                if key != field && !key.ends_with(&format!(".{field}")) {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(field);
                }
                let expected = expected.trim_start_matches(", ");
                return ConfigError::new(key, format!("unknown key ({expected})"));
            }
        }
        ConfigError::new(
            if key.is_empty() { "(file)".into() } else { key },
            without_value(&reason),
        )
    })
}

/// serde's "invalid type: integer `12345…`, expected a string" without the value: the value may
/// be a secret written without quotes (a numeric token), and errors never carry one.
fn without_value(reason: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        let Some(rest) = reason.strip_prefix(prefix) else {
            continue;
        };
        let Some(open) = rest.find(['`', '"']) else {
            continue;
        };
        let quote = rest[open..].chars().next().unwrap_or('`');
        let Some(close) = rest.rfind(quote).filter(|c| *c > open) else {
            continue;
        };
        return format!("{prefix}{}{}", rest[..open].trim_end(), &rest[close + 1..]);
    }
    reason.to_owned()
}

/// `server:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address (default `127.0.0.1:3100`).
    pub bind: String,
    /// CORS origins (`*` for any).
    pub cors_origins: Vec<String>,
    /// Largest request body (`"1MiB"`, `"64KB"`, or bytes).
    pub body_limit: Value,
    /// Proxies (CIDRs, `10.0.0.0/8`, or addresses) whose `X-Forwarded-For` / `Forwarded` is
    /// believed for the client's address; nobody's by default.
    pub trusted_proxies: Vec<String>,
    /// The header those proxies write the client's address in: `x-forwarded-for` (default)
    /// or `forwarded`. Only it is read.
    pub forwarded_header: crate::http::ForwardedHeader,
    /// Where clients reach the API from outside (`https://ci.example.com/aiwg`): tracking
    /// comments on forges link to `{public_url}/workflows/{id}/status`.
    pub public_url: Option<String>,
    /// Serve the dashboard at `ui/` (default true; see
    /// [`ApiBuilder::dashboard`](crate::http::ApiBuilder::dashboard)).
    pub dashboard: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:3100".into(),
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            forwarded_header: crate::http::ForwardedHeader::default(),
            body_limit: Value::String("1MiB".into()),
            public_url: None,
            dashboard: true,
        }
    }
}

impl ServerConfig {
    /// The trusted proxies, parsed.
    pub fn trusted_proxies(&self) -> Result<Vec<crate::dispatch::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.parse().map_err(|e: crate::dispatch::DispatchError| {
                    ConfigError::new(format!("server.trusted_proxies[{i}]"), e.to_string())
                })
            })
            .collect()
    }

    /// Whether `bind` is a loopback address (`127.0.0.1`, `[::1]`, `localhost`).
    #[must_use]
    pub fn loopback_only(&self) -> bool {
        let host = self
            .bind
            .rsplit_once(':')
            .map_or(self.bind.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The body limit in bytes.
    pub fn body_limit_bytes(&self) -> Result<usize, ConfigError> {
        let err = |r: &str| ConfigError::new("server.body_limit", r);
        match &self.body_limit {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| err("must be a positive number of bytes")),
            Value::String(s) => parse_size(s).map_err(|e| err(&e)),
            _ => Err(err("must be a size like \"1MiB\"")),
        }
    }
}

/// Parses `"1MiB"`, `"512KB"`, `"100"` into bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" => 1024,
        "mb" | "m" => 1_000_000,
        "mib" => 1024 * 1024,
        "gb" | "g" => 1_000_000_000,
        "gib" => 1024 * 1024 * 1024,
        other => return Err(format!("unknown size unit `{other}`")),
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("`{s}` is out of range"))
}

/// Shown for a secret in `Debug` output.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A section's names only (its values may hold secrets: tokens, passwords, signing keys).
fn names(v: &Value) -> Vec<&str> {
    v.as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default()
}

/// One API key in `auth.api_keys`. Its `Debug` output hides the key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key's name.
    pub name: String,
    /// The secret (usually `${AIWG_API_KEY}`); empty means "not configured".
    #[serde(default)]
    pub key: Option<String>,
    /// The hex SHA-256 of the secret, instead of `key`.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Scopes.
    pub scopes: Vec<Scope>,
}

/// `auth:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys.
    pub api_keys: Vec<KeyConfig>,
    /// Rate limit per key and per client address.
    pub rate_limit: Option<RateLimit>,
    /// Serve `/metrics` without a key.
    pub public_metrics: bool,
    /// JWT / OIDC bearer tokens beside the keys.
    pub jwt: Option<JwtConfig>,
}

/// `auth.jwt`: `{ issuer, audience, jwks_url | public_keys, scopes_claim, leeway }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` tokens must carry, exactly.
    pub issuer: String,
    /// The value `aud` must contain.
    pub audience: String,
    /// The identity provider's JWKS document (its `jwks_uri`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Public keys in PEM (RSA, EC P-256, Ed25519), instead of or beside `jwks_url`.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// The claim holding the scopes (default `scope`).
    #[serde(default)]
    pub scopes_claim: Option<String>,
    /// Clock skew allowed on `exp` and `nbf` (default `60s`).
    #[serde(default, with = "crate::util::opt_duration")]
    pub leeway: Option<Duration>,
}

impl JwtConfig {
    /// The verifier this section describes; errors name the key at fault.
    pub fn verifier(&self) -> Result<crate::http::JwtVerifier, ConfigError> {
        use crate::http::{JwtConfigError, JwtVerifier};
        let err = |e: JwtConfigError| {
            let key = match &e {
                JwtConfigError::Empty(k) => format!("auth.jwt.{k}"),
                JwtConfigError::NoKeys => "auth.jwt".into(),
                JwtConfigError::Url(_) => "auth.jwt.jwks_url".into(),
                JwtConfigError::Pem(i) => format!("auth.jwt.public_keys[{i}]"),
                JwtConfigError::Leeway(_) => "auth.jwt.leeway".into(),
            };
            ConfigError::new(key, e.to_string())
        };
        let mut b = JwtVerifier::builder(&self.issuer, &self.audience);
        if let Some(url) = self.jwks_url.as_deref().filter(|u| !u.is_empty()) {
            b = b.jwks_url(url).map_err(err)?;
        }
        for pem in &self.public_keys {
            b = b.public_key_pem(pem).map_err(err)?;
        }
        if let Some(claim) = &self.scopes_claim {
            b = b.scopes_claim(claim.clone());
        }
        if let Some(leeway) = self.leeway {
            b = b.leeway(leeway);
        }
        b.build().map_err(err)
    }
}

impl AuthConfig {
    /// The usable keys (keys whose secret expanded to nothing are skipped).
    pub fn keys(&self) -> Result<Vec<ApiKey>, ConfigError> {
        let mut out = Vec::new();
        for (i, k) in self.api_keys.iter().enumerate() {
            let at = |f: &str| format!("auth.api_keys[{i}].{f}");
            let key = match (k.key.as_deref().filter(|s| !s.is_empty()), &k.key_sha256) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        at("key"),
                        "give `key` or `key_sha256`, not both",
                    ))
                }
                (Some(secret), None) => ApiKey::plain(&k.name, secret, k.scopes.clone()),
                (None, Some(hash)) => ApiKey::sha256(&k.name, hash, k.scopes.clone()),
                (None, None) => continue,
            };
            out.push(key.map_err(|e| ConfigError::new(at("key"), e.to_string()))?);
        }
        Ok(out)
    }
}

/// One mapping rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// A regex that must match the whole key.
    pub pattern: String,
    /// The path (relative to the root), `$1` for captures.
    pub path: String,
}

/// `projects:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectsConfig {
    /// The root jobs must stay inside. Required when the server listens beyond loopback;
    /// a loopback-only server without one uses the current directory.
    pub root: Option<String>,
    /// More roots.
    pub extra_roots: Vec<String>,
    /// Mapping rules, first match wins.
    pub mapping: Vec<MappingConfig>,
    /// Paths refused even inside the root.
    pub forbidden_paths: Vec<String>,
    /// Jobs about pull requests run in a worktree at the request's head.
    pub workspace: Option<WorkspaceConfig>,
}

/// `projects.workspace`: `{ kind: worktree, cache: <dir>, keep_failed_for: 1h,
/// credentials: { github.com: "${GITHUB_TOKEN}" }, protocols: [https] }`. Its `Debug` output
/// hides the credentials.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    /// `worktree` (or `none`: jobs run in the project directory).
    pub kind: String,
    /// Where mirrors and worktrees live.
    #[serde(default)]
    pub cache: Option<String>,
    /// How long a failed job's worktree is kept (default `1h`).
    #[serde(default, with = "crate::util::opt_duration")]
    pub keep_failed_for: Option<Duration>,
    /// Tokens per host, for private repositories.
    #[serde(default)]
    pub credentials: BTreeMap<String, String>,
    /// URL schemes git may fetch (default `[https]`).
    #[serde(default)]
    pub protocols: Option<Vec<String>>,
}

impl WorkspaceConfig {
    /// The engine's settings; `None` for `kind: none`.
    ///
    /// # Errors
    /// [`ConfigError`] naming `projects.workspace.kind` or `.cache`.
    pub fn settings(&self) -> Result<Option<crate::workspace::WorkspaceSettings>, ConfigError> {
        match self.kind.as_str() {
            "none" => Ok(None),
            "worktree" => {
                let cache = self
                    .cache
                    .as_deref()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| {
                        ConfigError::new(
                            "projects.workspace.cache",
                            "is required with kind: worktree",
                        )
                    })?;
                let mut s = crate::workspace::WorkspaceSettings::new(cache);
                if let Some(d) = self.keep_failed_for {
                    s = s.keep_failed_for(d);
                }
                for (host, token) in &self.credentials {
                    s = s.credential(host.clone(), token.clone());
                }
                if let Some(p) = &self.protocols {
                    s = s.protocols(p.clone());
                }
                Ok(Some(s))
            }
            other => Err(ConfigError::new(
                "projects.workspace.kind",
                format!("`{other}` is not a workspace kind (worktree, none)"),
            )),
        }
    }
}

impl ProjectsConfig {
    /// The policy.
    pub fn policy(&self) -> Result<crate::ProjectPolicy, ConfigError> {
        let mut b = crate::ProjectPolicy::builder();
        let root = self
            .root
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or(".");
        b = b.root(root);
        for r in &self.extra_roots {
            b = b.root(r);
        }
        for f in &self.forbidden_paths {
            b = b.forbid(f);
        }
        for m in &self.mapping {
            b = b.map(&m.pattern, &m.path);
        }
        b.build().map_err(|e| {
            let at = match &e {
                crate::policy::PolicyError::ForbiddenNotAbsolute(f) => self
                    .forbidden_paths
                    .iter()
                    .position(|p| p == f)
                    .map_or("projects.forbidden_paths".into(), |i| {
                        format!("projects.forbidden_paths[{i}]")
                    }),
                _ => "projects".into(),
            };
            ConfigError::new(at, e.to_string())
        })
    }
}

/// `engine:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Workers (default 4).
    pub workers: usize,
    /// Queue capacity (default 1000).
    pub queue_capacity: usize,
    /// Jobs at once per project (default 1).
    pub per_project_concurrency: usize,
    /// Timeout of workflows without one (default 5 m).
    #[serde(with = "crate::util::opt_duration")]
    pub default_timeout: Option<Duration>,
    /// Lease duration (default 30 s).
    #[serde(with = "crate::util::opt_duration")]
    pub lease_ttl: Option<Duration>,
    /// First retry delay (default 2 s).
    #[serde(with = "crate::util::opt_duration")]
    pub retry_base: Option<Duration>,
    /// Longest retry delay (default 5 m).
    #[serde(with = "crate::util::opt_duration")]
    pub retry_max: Option<Duration>,
    /// Grace period for running jobs at shutdown (default 30 s).
    #[serde(with = "crate::util::opt_duration")]
    pub shutdown_grace: Option<Duration>,
    /// Agent output one job may produce (`"16MiB"`, the default, or bytes); past it output is
    /// dropped and one `output_truncated` event recorded.
    #[serde(deserialize_with = "opt_size")]
    pub max_output_bytes: Option<usize>,
    /// The longest text or log line kept of agent output (default `"64KiB"`).
    #[serde(deserialize_with = "opt_size")]
    pub max_line_bytes: Option<usize>,
    /// How long a job waits for an approval when its workflow does not say (default 24 h).
    #[serde(with = "crate::util::opt_duration")]
    pub approval_timeout: Option<Duration>,
    /// Whether this instance starts the jobs of workflows' `schedules` (default `true`).
    pub schedules: bool,
}

/// A size as bytes or text (`"16MiB"`).
fn opt_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("must be a positive number of bytes")),
        Some(Value::String(s)) => parse_size(&s).map(Some).map_err(serde::de::Error::custom),
        Some(_) => Err(serde::de::Error::custom("must be a size like \"16MiB\"")),
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            queue_capacity: 1000,
            per_project_concurrency: 1,
            default_timeout: None,
            lease_ttl: None,
            retry_base: None,
            retry_max: None,
            shutdown_grace: None,
            max_output_bytes: None,
            max_line_bytes: None,
            approval_timeout: None,
            schedules: true,
        }
    }
}

impl EngineConfig {
    /// Applies these settings to an engine builder.
    pub fn apply(&self, mut b: crate::EngineBuilder) -> crate::EngineBuilder {
        b = b
            .workers(self.workers)
            .queue_capacity(self.queue_capacity)
            .per_project_concurrency(self.per_project_concurrency);
        if let Some(t) = self.default_timeout {
            b = b.default_timeout(t);
        }
        if let Some(t) = self.lease_ttl {
            b = b.lease_ttl(t);
        }
        if let Some(n) = self.max_output_bytes {
            b = b.max_output_bytes(n);
        }
        if let Some(n) = self.max_line_bytes {
            b = b.max_line_bytes(n);
        }
        if let Some(t) = self.approval_timeout {
            b = b.approval_timeout(t);
        }
        b = b.run_schedules(self.schedules);
        if self.retry_base.is_some() || self.retry_max.is_some() {
            b = b.retry_backoff(
                self.retry_base.unwrap_or(Duration::from_secs(2)),
                self.retry_max.unwrap_or(Duration::from_secs(300)),
            );
        }
        b
    }
}

/// `storage:`. Its `Debug` output hides the URL (it may carry a password).
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// `memory` (default) or `postgres`.
    pub kind: StorageKind,
    /// The database URL for `postgres`.
    pub url: Option<String>,
    /// How long and how many finished jobs are kept.
    pub retention: RetentionConfig,
}

/// `storage.retention`: finished jobs are forgotten after `finished_for` (default `24h`); the
/// memory store also keeps at most `max_finished` (default 10 000). The audit trail keeps
/// entries for `audit_for` (default `30d`; in memory at most `max_audit`, default 100 000).
/// PostgreSQL purges finished jobs with their events, finished deliveries, expired
/// de-duplication keys and old audit entries every `purge_every` (default `1h`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long finished jobs are kept.
    #[serde(with = "crate::util::opt_duration")]
    pub finished_for: Option<Duration>,
    /// How many finished jobs the memory store keeps.
    pub max_finished: usize,
    /// How often PostgreSQL is purged.
    #[serde(with = "crate::util::opt_duration")]
    pub purge_every: Option<Duration>,
    /// How long audit entries are kept.
    #[serde(with = "crate::util::opt_duration")]
    pub audit_for: Option<Duration>,
    /// How many audit entries the memory store keeps.
    pub max_audit: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            finished_for: None,
            max_finished: 10_000,
            purge_every: None,
            audit_for: None,
            max_audit: 100_000,
        }
    }
}

impl RetentionConfig {
    /// The memory store's retention.
    #[must_use]
    pub fn memory(&self) -> crate::store::Retention {
        crate::store::Retention {
            finished_for: self.finished_for(),
            max_finished: self.max_finished,
        }
    }

    /// How long finished jobs are kept (default 24 h).
    #[must_use]
    pub fn finished_for(&self) -> Duration {
        self.finished_for.unwrap_or(Duration::from_secs(24 * 3600))
    }

    /// How long audit entries are kept (default 30 days).
    #[must_use]
    pub fn audit_for(&self) -> Duration {
        self.audit_for
            .unwrap_or(Duration::from_secs(30 * 24 * 3600))
    }

    /// The memory audit store's retention.
    #[must_use]
    pub fn audit_memory(&self) -> crate::audit::AuditRetention {
        crate::audit::AuditRetention::new(self.audit_for(), self.max_audit)
    }

    /// How often PostgreSQL is purged (default 1 h).
    #[must_use]
    pub fn purge_every(&self) -> Duration {
        self.purge_every.unwrap_or(Duration::from_secs(3600))
    }
}

/// Where jobs are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// In memory.
    #[default]
    Memory,
    /// PostgreSQL.
    Postgres,
}

/// One agent in `agents:`: its kind and the kind's own options. Its `Debug` output names the
/// options without their values (a password, an API key, an environment).
#[derive(Clone, Deserialize)]
pub struct AgentConfig {
    /// `claude-code`, `opencode`, `command`, `pool`, or a kind the host registers.
    pub kind: String,
    /// Everything else, interpreted by the agent kind.
    #[serde(flatten)]
    pub options: BTreeMap<String, Value>,
}

/// The whole configuration. Its `Debug` output carries no secret: keys, credentials, the
/// database URL and agents' options are hidden, and of `triggers` and `brokers` only the
/// section names are shown.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `server:`.
    pub server: ServerConfig,
    /// `auth:`.
    pub auth: AuthConfig,
    /// `projects:`.
    pub projects: ProjectsConfig,
    /// `engine:`.
    pub engine: EngineConfig,
    /// `storage:`.
    pub storage: StorageConfig,
    /// `agents:`, by name (in file order is not kept; the default agent is the first by name
    /// unless steps name one).
    pub agents: BTreeMap<String, AgentConfig>,
    /// `workflows:`, by name.
    pub workflows: BTreeMap<String, Workflow>,
    /// `triggers:` (read by `aiwg-webhook`).
    pub triggers: Value,
    /// `webhooks:` (the outbound dispatcher).
    pub webhooks: DispatchConfig,
    /// `brokers:` (`nats`, `amqp`, `redis`; read by `aiwg-brokers`).
    pub brokers: Value,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig")
            .field("name", &self.name)
            .field("key", &self.key.as_ref().map(|_| Redacted))
            .field("key_sha256", &self.key_sha256)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl std::fmt::Debug for WorkspaceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: BTreeMap<&str, Redacted> = self
            .credentials
            .keys()
            .map(|h| (h.as_str(), Redacted))
            .collect();
        f.debug_struct("WorkspaceConfig")
            .field("kind", &self.kind)
            .field("cache", &self.cache)
            .field("keep_failed_for", &self.keep_failed_for)
            .field("credentials", &hosts)
            .field("protocols", &self.protocols)
            .finish()
    }
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageConfig")
            .field("kind", &self.kind)
            .field("url", &self.url.as_ref().map(|_| Redacted))
            .field("retention", &self.retention)
            .finish()
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<&str> = self.options.keys().map(String::as_str).collect();
        f.debug_struct("AgentConfig")
            .field("kind", &self.kind)
            .field("options", &options)
            .finish()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &self.server)
            .field("auth", &self.auth)
            .field("projects", &self.projects)
            .field("engine", &self.engine)
            .field("storage", &self.storage)
            .field("agents", &self.agents)
            .field("workflows", &self.workflows)
            .field("triggers", &names(&self.triggers))
            .field("webhooks", &self.webhooks)
            .field("brokers", &names(&self.brokers))
            .finish()
    }
}

impl Config {
    /// Parses YAML, expanding `${VAR}` from the process environment and applying the
    /// environment overrides.
    pub fn from_yaml(yaml: &str) -> Result<Self, ConfigError> {
        Self::from_yaml_with_env(yaml, |k| std::env::var(k).ok())
    }

    /// Like [`from_yaml`](Self::from_yaml) with an explicit environment (for tests).
    pub fn from_yaml_with_env(
        yaml: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw: Value = if yaml.trim().is_empty() {
            Value::Object(Default::default())
        } else {
            // Read once as YAML's own value, whose maps refuse a key given twice (`duplicate
            // entry with key "projects" at line 9`): read into JSON's, the last one would
            // silently win, dropping the first's settings (its forbidden paths, say).
            serde_norway::from_str::<serde_norway::Value>(yaml)
                .map_err(|e| ConfigError::new("(file)", e.to_string()))?;
            serde_norway::from_str(yaml).map_err(|e| ConfigError::new("(file)", e.to_string()))?
        };
        if raw.is_null() {
            raw = Value::Object(Default::default());
        }
        expand(&mut raw, &env, "")?;
        let mut config: Config = section("", raw)?;
        config.apply_env(&env)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_yaml(&text)
    }

    fn apply_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(port) = env("AIWG_API_PORT").filter(|p| !p.is_empty()) {
            let port: u16 = port
                .parse()
                .map_err(|_| ConfigError::new("AIWG_API_PORT", "must be a port number"))?;
            let host = self
                .server
                .bind
                .rsplit_once(':')
                .map_or("127.0.0.1", |(h, _)| h)
                .to_owned();
            self.server.bind = format!("{host}:{port}");
        }
        if let Some(key) = env("AIWG_API_KEY").filter(|k| !k.is_empty()) {
            if !self
                .auth
                .api_keys
                .iter()
                .any(|k| k.key.as_deref().is_some_and(|s| !s.is_empty()))
            {
                self.auth.api_keys.push(KeyConfig {
                    name: "default".into(),
                    key: Some(key),
                    key_sha256: None,
                    scopes: vec![Scope::Admin],
                });
            }
        }
        if let Some(root) = env("AIWG_PROJECT_ROOT").filter(|r| !r.is_empty()) {
            if self.projects.root.as_deref().is_none_or(str::is_empty) {
                self.projects.root = Some(root);
            }
        }
        if let Some(url) = env("AIWG_DATABASE_URL").filter(|u| !u.is_empty()) {
            if self.storage.url.as_deref().is_none_or(str::is_empty) {
                self.storage.url = Some(url);
            }
        }
        if let Some(path) = env("AIWG_CLAUDE_PATH").filter(|p| !p.is_empty()) {
            for a in self.agents.values_mut().filter(|a| a.kind == "claude-code") {
                let empty = a
                    .options
                    .get("path")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty);
                if empty {
                    a.options.insert("path".into(), Value::String(path.clone()));
                }
            }
        }
        for (var, platform, field) in [
            ("GITHUB_WEBHOOK_SECRET", "github", "secret"),
            ("SLACK_SIGNING_SECRET", "slack", "signing_secret"),
            ("DISCORD_PUBLIC_KEY", "discord", "public_key"),
        ] {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                if !self.triggers.is_object() {
                    self.triggers = Value::Object(Default::default());
                }
                let t = self
                    .triggers
                    .as_object_mut()
                    .and_then(|m| {
                        m.entry(platform)
                            .or_insert_with(|| Value::Object(Default::default()))
                            .as_object_mut()
                    })
                    .ok_or_else(|| {
                        ConfigError::new(format!("triggers.{platform}"), "must be a mapping")
                    })?;
                let empty = t
                    .get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty);
                if empty {
                    t.insert(field.into(), Value::String(v));
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.server.body_limit_bytes()?;
        self.server.trusted_proxies()?;
        // Without a root the working directory would be one (`/` under a service manager):
        // acceptable only for a server nobody else can reach.
        if self.projects.root.as_deref().is_none_or(str::is_empty) && !self.server.loopback_only() {
            return Err(ConfigError::new(
                "projects.root",
                format!(
                    "required when the server listens beyond loopback (server.bind is `{}`); \
                     set it (or AIWG_PROJECT_ROOT) to the folder that holds the projects",
                    self.server.bind
                ),
            ));
        }
        let keys = self.auth.keys()?;
        if let Some(jwt) = &self.auth.jwt {
            jwt.verifier()?;
        }
        // Beyond loopback a key whose variable is unset is a mistake to refuse, not a key to
        // skip: the server would otherwise run without it (or, the example server, with a
        // generated admin key printed to its log).
        if !self.server.loopback_only() {
            if let Some(i) =
                self.auth.api_keys.iter().position(|k| {
                    k.key.as_deref().is_none_or(str::is_empty) && k.key_sha256.is_none()
                })
            {
                return Err(ConfigError::new(
                    format!("auth.api_keys[{i}].key"),
                    "empty (is its variable set?); a server that listens beyond loopback does \
                     not start without a key it was given",
                ));
            }
            if keys.is_empty() && self.auth.jwt.is_none() {
                return Err(ConfigError::new(
                    "auth.api_keys",
                    format!(
                        "a server that listens beyond loopback (server.bind is `{}`) needs an API \
                         key or auth.jwt",
                        self.server.bind
                    ),
                ));
            }
        }
        if self.engine.workers == 0 {
            return Err(ConfigError::new("engine.workers", "must be at least 1"));
        }
        if self.storage.retention.purge_every().is_zero() {
            return Err(ConfigError::new(
                "storage.retention.purge_every",
                "must be longer than 0 (a purge every instant is no period)",
            ));
        }
        if self.engine.queue_capacity == 0 {
            return Err(ConfigError::new(
                "engine.queue_capacity",
                "must be at least 1",
            ));
        }
        if self.engine.per_project_concurrency == 0 {
            return Err(ConfigError::new(
                "engine.per_project_concurrency",
                "must be at least 1",
            ));
        }
        if self.storage.kind == StorageKind::Postgres
            && self.storage.url.as_deref().is_none_or(str::is_empty)
        {
            return Err(ConfigError::new(
                "storage.url",
                "postgres storage needs a url (or AIWG_DATABASE_URL)",
            ));
        }
        for wf in self.workflows() {
            wf.validate()
                .map_err(|e| ConfigError::new(format!("workflows.{}", wf.name), e.to_string()))?;
            for (i, step) in wf.steps.iter().enumerate() {
                if let Some(agent) = &step.agent {
                    if !self.agents.contains_key(agent) {
                        return Err(ConfigError::new(
                            format!("workflows.{}.steps[{i}].agent", wf.name),
                            format!("agent `{agent}` is not defined under `agents`"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The workflows with their names filled in from the keys.
    #[must_use]
    pub fn workflows(&self) -> Vec<Workflow> {
        self.workflows
            .iter()
            .map(|(name, w)| {
                let mut w = w.clone();
                w.name.clone_from(name);
                w
            })
            .collect()
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in every string value.
fn expand(
    v: &mut Value,
    env: &impl Fn(&str) -> Option<String>,
    path: &str,
) -> Result<(), ConfigError> {
    match v {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after.find('}').ok_or_else(|| {
                    ConfigError::new(path.trim_start_matches('.'), "unclosed `${`")
                })?;
                let expr = &after[..end];
                let (name, default) = match expr.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (expr, None),
                };
                let value = env(name)
                    .filter(|v| !v.is_empty())
                    .or(default.map(str::to_owned));
                out.push_str(value.as_deref().unwrap_or(""));
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand(item, env, &format!("{path}[{i}]"))?;
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                expand(item, env, &format!("{path}.{k}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN: &str = r#"
server:   { bind: "127.0.0.1:3100", cors_origins: [], body_limit: "1MiB" }
auth:     { api_keys: [ { name: ci, key: "${AIWG_API_KEY}", scopes: [trigger, read] } ],
            rate_limit: { per_minute: 100, burst: 20 } }
projects: { root: "${AIWG_PROJECT_ROOT}", mapping: [ { pattern: "org/repo", path: "repo" } ],
            forbidden_paths: ["/etc", "~/.ssh"] }
engine:   { workers: 4, queue_capacity: 1000, per_project_concurrency: 1, default_timeout: "5m" }
storage:  { kind: memory }
agents:
  claude: { kind: claude-code, path: "${AIWG_CLAUDE_PATH}", model: sonnet,
            permission_mode: acceptEdits, allowed_tools: [], max_turns: 30, env: { } }
  oc:     { kind: opencode, url: "http://127.0.0.1:4096", password: "${OPENCODE_SERVER_PASSWORD}" }
  sh:     { kind: command }
workflows:
  repo-files:
    description: List the files of the project
    steps:
      - { name: list, agent: sh, command: ["git", "ls-files"] }
  flow-security-review-cycle:
    description: Security validation workflow
    parameters: [ { name: guidance }, { name: iteration, default: "1" } ]
    timeout: 10m
    max_attempts: 2
    steps:
      - { name: primary-draft,   agent: claude, prompt: "draft {{guidance}}" }
      - { name: security-review, agent: claude, prompt: "review", resume: true }
triggers:
  github:  { secret: "${GITHUB_WEBHOOK_SECRET}", mention: "@aiwg", allowed_associations: [OWNER, MEMBER, COLLABORATOR] }
  slack:   { signing_secret: "${SLACK_SIGNING_SECRET}", command: "/aiwg" }
webhooks: { retry: long, workers: 10, allow_private_targets: false }
"#;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_design_example_parses_with_expansion_and_overrides() {
        let c = Config::from_yaml_with_env(
            DESIGN,
            env(&[
                ("AIWG_API_KEY", "a-very-long-api-key-123"),
                ("AIWG_CLAUDE_PATH", "/opt/claude"),
                ("AIWG_API_PORT", "4000"),
                ("GITHUB_WEBHOOK_SECRET", "gh-secret"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:4000");
        assert_eq!(c.auth.keys().unwrap().len(), 1);
        assert_eq!(c.agents["claude"].options["path"], "/opt/claude");
        assert_eq!(c.triggers["github"]["secret"], "gh-secret");
        assert_eq!(c.workflows().len(), 2);
        assert_eq!(c.workflows()[0].name, "flow-security-review-cycle");
        assert_eq!(c.workflows()[0].timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.engine.default_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.webhooks.workers, Some(10));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("engine: { workers: many }", "engine.workers"),
            ("engine: { workers: 0 }", "engine.workers"),
            ("server: { body_limit: \"1 parsec\" }", "server.body_limit"),
            ("server: { forwarded_header: x-real-ip }", "server.forwarded_header"),
            ("servr: {}", "servr"),
            ("storage: { kind: postgres }", "storage.url"),
            ("auth: { api_keys: [ { name: x, key: short, scopes: [read] } ] }", "auth.api_keys[0].key"),
            ("agents: { sh: { kind: command } }\nworkflows: { w: { steps: [ { name: s, agent: nope, prompt: p } ] } }", "workflows.w.steps[0].agent"),
            ("workflows: { w: { steps: [] } }", "workflows.w"),
            ("projects: { root: \"${X\" }", "projects.root"),
            ("engine: { default_timeout: soon }", "engine.default_timeout"),
            ("auth: { rate_limit: { per_minute: 100, burst: 20, per_addr: 5 } }", "auth.rate_limit.per_addr"),
            ("projects: { forbidden_paths: [/etc] }\nprojects: {}", "(file)"),
            ("storage: { retention: { purge_every: 0s } }", "storage.retention.purge_every"),
            ("agents: { sh: { kind: command } }\nworkflows: { w: { parameters: [ { name: scope, required: true } ], schedules: [ { cron: \"0 3 * * *\" } ], steps: [ { name: s, agent: sh, command: [echo, \"{{scope}}\"] } ] } }", "workflows.w"),
            ("agents: { sh: { kind: command } }\nworkflows: { w: { schedules: [ { cron: \"0 0 30 2 *\" } ], steps: [ { name: s, agent: sh, command: [echo] } ] } }", "workflows.w"),
            ("agents: { sh: { kind: command } }\nworkflows: { w: { schedules: [ { cron: \"0 3 * * *\", guidance: \"--force\" } ], steps: [ { name: s, agent: sh, command: [echo, \"{{guidance}}\"] } ] } }", "workflows.w"),
            ("workflows: { w: { steps: [ { name: s, prompt: p } ], steps: [] } }", "(file)"),
            ("auth: { jwt: { issuer: i, audience: a } }", "auth.jwt"),
            ("auth: { jwt: { issuer: i, audience: a, jwks_url: \"ftp://x\" } }", "auth.jwt.jwks_url"),
            ("auth: { jwt: { issuer: i, audience: a, public_keys: [nope] } }", "auth.jwt.public_keys[0]"),
            ("auth: { jwt: { issuer: \"\", audience: a, jwks_url: \"http://127.0.0.1/k\" } }", "auth.jwt.issuer"),
            ("auth: { jwt: { issuer: i, audience: a, jwks_url: \"http://127.0.0.1/k\", leeway: soon } }", "auth.jwt.leeway"),
            ("auth: { jwt: { issuer: i, audience: a, jwks_url: \"http://127.0.0.1/k\", leeway: 400d } }", "auth.jwt.leeway"),
            ("auth: { jwt: { issuer: i, audience: a, jwks_uri: \"http://127.0.0.1/k\" } }", "auth.jwt.jwks_uri"),
            (": : :", "(file)"),
        ];
        for (yaml, key) in cases {
            let e = Config::from_yaml_with_env(yaml, |_| None).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
            if yaml.contains("schedules") {
                assert!(e.to_string().contains("schedule 1:"), "{e}");
            }
        }
        let e = Config::from_yaml_with_env(
            "projects: { forbidden_paths: [/etc] }\nprojects: {}",
            |_| None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("duplicate entry with key \"projects\""),
            "{e}"
        );
    }

    #[test]
    fn a_misplaced_value_is_not_repeated_in_the_error() {
        // An unquoted numeric key is an integer where a string belongs.
        let e = Config::from_yaml_with_env(
            "auth: { api_keys: [ { name: a, key: 9876543210987654321, scopes: [read] } ] }",
            |_| None,
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.api_keys[0].key");
        assert!(!e.to_string().contains("9876543210987654321"), "{e}");
        assert!(
            e.to_string().contains("invalid type: integer, expected"),
            "{e}"
        );
        let e =
            Config::from_yaml_with_env("engine: { workers: \"s3cr3t\" }", |_| None).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }

    #[test]
    fn debug_output_carries_no_secret() {
        let yaml = r#"
auth: { api_keys: [ { name: ci, key: "sk-api-key-0123456789", scopes: [admin] } ] }
projects: { workspace: { kind: worktree, cache: /tmp/c, credentials: { github.com: "ghp_token_s3cr3t" } } }
storage: { kind: postgres, url: "postgres://u:db-pa55word@h/db" }
agents: { oc: { kind: opencode, url: "http://127.0.0.1:4096", password: "oc-pa55word" } }
triggers: { github: { secret: "hook-s3cr3t" } }
brokers: { amqp: { url: "amqp://guest:amqp-pa55@h/%2f", queue: q } }
"#;
        let c = Config::from_yaml_with_env(yaml, |_| None).unwrap();
        let shown = format!("{c:?}");
        for secret in [
            "sk-api-key-0123456789",
            "ghp_token_s3cr3t",
            "db-pa55word",
            "oc-pa55word",
            "hook-s3cr3t",
            "amqp-pa55",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        // What is not secret is still there to debug with.
        for name in [
            "ci",
            "github.com",
            "/tmp/c",
            "opencode",
            "password",
            "github",
            "amqp",
        ] {
            assert!(shown.contains(name), "{name} missing from {shown}");
        }
        let settings = c
            .projects
            .workspace
            .as_ref()
            .unwrap()
            .settings()
            .unwrap()
            .unwrap();
        let shown = format!("{settings:?}");
        assert!(
            !shown.contains("ghp_token_s3cr3t") && shown.contains("github.com"),
            "{shown}"
        );
    }

    #[test]
    fn a_forbidden_path_that_protects_nothing_is_named() {
        let root = tempfile::tempdir().unwrap();
        let yaml = format!(
            "projects: {{ root: \"{}\", forbidden_paths: [/etc, secrets] }}",
            root.path().display()
        );
        let c = Config::from_yaml_with_env(&yaml, |_| None).unwrap();
        let e = c.projects.policy().unwrap_err();
        assert_eq!(e.key, "projects.forbidden_paths[1]", "{e}");
    }

    #[test]
    fn a_server_beyond_loopback_needs_a_project_root() {
        let e =
            Config::from_yaml_with_env("server: { bind: \"0.0.0.0:3100\" }", |_| None).unwrap_err();
        assert_eq!(e.key, "projects.root");
        let e = Config::from_yaml_with_env(
            "server: { bind: \"0.0.0.0:3100\" }\nprojects: { root: \"${AIWG_PROJECT_ROOT}\" }",
            |_| None,
        )
        .unwrap_err();
        assert_eq!(e.key, "projects.root", "an empty root is no root");
        for bind in ["127.0.0.1:3100", "[::1]:3100", "localhost:3100"] {
            let yaml = format!("server: {{ bind: \"{bind}\" }}");
            assert!(
                Config::from_yaml_with_env(&yaml, |_| None).is_ok(),
                "{bind}"
            );
        }
        assert!(Config::from_yaml_with_env(
            "server: { bind: \"0.0.0.0:3100\" }\nprojects: { root: /srv }\nauth: { api_keys: [ { name: a, key: 0123456789abcdef, scopes: [read] } ] }",
            |_| None
        )
        .is_ok());
    }

    #[test]
    fn unset_variables_expand_to_nothing_or_their_default() {
        let keyed = "\nauth: { api_keys: [ { name: a, key: \"${NOPE}\", scopes: [admin] } ] }";
        let c = Config::from_yaml_with_env(
            &format!("server: {{ bind: \"${{HOST:-127.0.0.1}}:${{PORT:-9}}\" }}{keyed}"),
            |_| None,
        )
        .unwrap();
        assert_eq!(c.server.bind, "127.0.0.1:9");
        assert!(
            c.auth.keys().unwrap().is_empty(),
            "an empty key is not a key"
        );
        // Beyond loopback it is refused, and so is a server left without any key.
        let e = Config::from_yaml_with_env(
            &format!("server: {{ bind: \"0.0.0.0:9\" }}\nprojects: {{ root: /srv }}{keyed}"),
            |_| None,
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.api_keys[0].key", "{e}");
        let e = Config::from_yaml_with_env(
            "server: { bind: \"0.0.0.0:9\" }\nprojects: { root: /srv }",
            |_| None,
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.api_keys", "{e}");
        assert_eq!(parse_size("64KB").unwrap(), 64_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert!(parse_size("0").is_err());
    }
}
