//! Typed `agents:` configuration, and building every configured agent from it.
//!
//! Each entry of the `agents:` mapping names its `kind` and that kind's options; every kind has
//! a struct of its own that refuses unknown keys, so a typo such as `sandboxx: bwrap` stops the
//! server with `agents.<name>.sandboxx: unknown key` instead of being ignored. The process
//! options ([`ProcessConfig`]: `env`, `pass_env`, `idle_timeout`, `grace`, `limits`, `sandbox`,
//! …) sit next to the kind's own keys for `command`, `claude-code` and `codex`, and under `serve:` for a
//! supervised `opencode` server. Durations are humantime strings (`"30s"`, `"5m"`) or whole
//! seconds.
//!
//! ```yaml
//! agents:
//!   sh:     { kind: command, sandbox: bwrap, network: false, idle_timeout: 2m,
//!             hide: [/etc/aiwg/aiwg.yaml, /var/lib/aiwg] }
//!   claude: { kind: claude-code, path: claude, model: sonnet, permission_mode: acceptEdits,
//!             max_turns: 30, pass_env: [ANTHROPIC_API_KEY], sandbox: bwrap }
//!   codex:  { kind: codex, path: codex, model: gpt-5, base_url: "http://127.0.0.1:8080/v1",
//!             sandbox_mode: workspace-write, approval_policy: never, codex_home: /var/lib/aiwg/codex }
//!   oc:     { kind: opencode, url: "http://127.0.0.1:4096", password: "${OPENCODE_SERVER_PASSWORD}" }
//!   local:  { kind: opencode, model: anthropic/claude-sonnet-4-5,
//!             serve: { dir: /srv/app, sandbox: bwrap, pass_env: [ANTHROPIC_API_KEY] } }
//!   both:   { kind: pool, strategy: least-connections, members: [claude, { agent: oc, weight: 2 }] }
//! ```
//!
//! ```
//! use aiwg_agents::config::AgentsConfig;
//! use serde_json::json;
//!
//! let agents = AgentsConfig::from_value(&json!({
//!     "sh": {"kind": "command", "idle_timeout": "30s"},
//!     "pool": {"kind": "pool", "members": ["sh"]},
//! }))?;
//! let built = agents.build()?;
//! let names: Vec<&str> = built.executors.iter().map(|(n, _)| n.as_str()).collect();
//! assert_eq!(names, ["sh", "pool"]); // pools last, after their members
//!
//! let err = AgentsConfig::from_value(&json!({"sh": {"kind": "command", "sandboxx": "bwrap"}}))
//!     .unwrap_err();
//! assert_eq!(err.key, "agents.sh.sandboxx");
//! # Ok::<(), aiwg_agents::ConfigError>(())
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::Executor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::process::find_program;
use crate::{
    ClaudeCode, Codex, CommandExecutor, ConfigError, OpenCode, OpenCodeBuilder, OpenCodeServer,
    Pool, ProcessOptions, ResourceLimits, Sandbox, Strategy,
};

/// A duration: `"30s"`, `"5m"`, `"1h 30m"` (humantime) or whole seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(s)) => Ok(Some(Duration::from_secs(s))),
        Some(Raw::Text(t)) => {
            let t = t.trim();
            if let Ok(s) = t.parse::<u64>() {
                return Ok(Some(Duration::from_secs(s)));
            }
            humantime::parse_duration(t).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration `{t}` ({e}); use e.g. \"30s\", \"5m\" or seconds"
                ))
            })
        }
    }
}

/// `sandbox:` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SandboxConfig {
    /// No sandbox.
    #[default]
    None,
    /// bubblewrap ([`Sandbox::Bwrap`]).
    Bwrap,
    /// bubblewrap when `bwrap` is installed, none otherwise (what the example server's default
    /// configuration uses; the server says at start which it got).
    Auto,
}

impl SandboxConfig {
    /// `auto` resolved against this machine.
    #[must_use]
    pub fn resolve(self) -> SandboxConfig {
        match self {
            SandboxConfig::Auto if crate::process::find_program("bwrap").is_some() => {
                SandboxConfig::Bwrap
            }
            SandboxConfig::Auto => SandboxConfig::None,
            other => other,
        }
    }
}

/// `limits:` of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Address-space limit in bytes.
    pub address_space: Option<u64>,
    /// CPU-time limit in whole seconds.
    pub cpu_time: Option<u64>,
}

/// The process options shared by `command`, `claude-code` and a supervised `opencode` server
/// (see [`ProcessOptions`]).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ProcessConfig {
    /// Variables set in the child's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Variables the child inherits from the server, on top of the allow-list.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Replaces the default allow-list of inherited variables.
    pub env_allow_list: Option<Vec<String>>,
    /// Stop a run that printed nothing for this long.
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Time between `SIGTERM` and `SIGKILL`.
    #[serde(default, deserialize_with = "duration")]
    pub grace: Option<Duration>,
    /// Resource limits.
    pub limits: Option<LimitsConfig>,
    /// `none` (default), `bwrap`, or `auto` (bwrap when installed).
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Kill the child with the server (`setpriv --pdeathsig KILL`; default `true`).
    pub die_with_server: Option<bool>,
    /// Paths a sandboxed child must not see (emptied): the server's configuration file, its
    /// data directory… Needs `sandbox: bwrap`.
    #[serde(default)]
    pub hide: Vec<PathBuf>,
}

impl std::fmt::Debug for ProcessConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the names of `env`: the values may be secrets.
        f.debug_struct("ProcessConfig")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("pass_env", &self.pass_env)
            .field("env_allow_list", &self.env_allow_list)
            .field("idle_timeout", &self.idle_timeout)
            .field("grace", &self.grace)
            .field("limits", &self.limits)
            .field("sandbox", &self.sandbox)
            .field("die_with_server", &self.die_with_server)
            .field("hide", &self.hide)
            .finish()
    }
}

impl ProcessConfig {
    /// The builder options these settings describe.
    pub fn options(&self) -> ProcessOptions {
        let mut o = ProcessOptions::new();
        if let Some(list) = &self.env_allow_list {
            o = o.env_allow_list(list.iter().cloned());
        }
        for name in &self.pass_env {
            o = o.pass_env(name.clone());
        }
        o = o.envs(self.env.clone());
        if let Some(d) = self.idle_timeout {
            o = o.idle_timeout(d);
        }
        if let Some(d) = self.grace {
            o = o.grace(d);
        }
        if let Some(l) = &self.limits {
            let mut r = ResourceLimits::new();
            if let Some(b) = l.address_space {
                r = r.address_space(b);
            }
            if let Some(s) = l.cpu_time {
                r = r.cpu_time(s);
            }
            o = o.limits(r);
        }
        if self.sandbox.resolve() == SandboxConfig::Bwrap {
            o = o.sandbox(Sandbox::Bwrap);
        }
        if let Some(d) = self.die_with_server {
            o = o.die_with_server(d);
        }
        for p in &self.hide {
            o = o.hide(p.clone());
        }
        o
    }
}

/// `kind: command`, plus the [`ProcessConfig`] keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CommandConfig {
    /// The argument vector for steps that carry no `command` (`{{param}}` placeholders).
    pub command: Option<Vec<String>>,
    /// A non-zero exit is a result, not an error.
    #[serde(default)]
    pub allow_failure: bool,
    /// Parameters whose value may start an argument of `command` with `-` (e.g. one whose
    /// `pattern` admits `--verbose`); any other such value refuses the run.
    #[serde(default)]
    pub allow_option_params: Vec<String>,
    /// `false` cuts a sandboxed command off the network (`bwrap --unshare-net`).
    pub network: Option<bool>,
}

/// `kind: claude-code`, plus the [`ProcessConfig`] keys.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClaudeCodeConfig {
    /// The `claude` binary (a path, or a name looked up on `PATH`; default `claude`). When it
    /// is not found the agent is skipped, not an error.
    pub path: Option<String>,
    /// `--model`.
    pub model: Option<String>,
    /// `--permission-mode`.
    pub permission_mode: Option<String>,
    /// `--allowedTools`.
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// `--disallowedTools`.
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    /// `--max-turns`.
    pub max_turns: Option<u32>,
    /// `--max-budget-usd`.
    pub max_budget_usd: Option<f64>,
    /// `--append-system-prompt`.
    pub append_system_prompt: Option<String>,
    /// `--mcp-config`.
    pub mcp_config: Option<String>,
}

/// `kind: codex`, plus the [`ProcessConfig`] keys (see [`Codex`]).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CodexConfig {
    /// The `codex` binary (a path, or a name looked up on `PATH`; default `AIWG_CODEX_PATH`,
    /// else `codex`). When it is not found the agent is skipped, not an error.
    pub path: Option<String>,
    /// The model.
    pub model: Option<String>,
    /// The CLI's own sandbox: `read-only`, `workspace-write`, `danger-full-access`.
    pub sandbox_mode: Option<String>,
    /// `untrusted`, `on-failure`, `on-request`, `never`.
    pub approval_policy: Option<String>,
    /// A Responses-API server (`http://host:port/v1`) used as the model provider; without it
    /// the provider comes from `config.toml` in `CODEX_HOME`.
    pub base_url: Option<String>,
    /// The API key for `base_url`. Never printed.
    pub api_key: Option<String>,
    /// The CLI's home (`CODEX_HOME`), created when missing, writable in the sandbox.
    pub codex_home: Option<PathBuf>,
    /// `--skip-git-repo-check` (default `true`).
    pub skip_git_repo_check: Option<bool>,
    /// Further `-c key=value` overrides.
    #[serde(default)]
    pub config: BTreeMap<String, Value>,
}

impl std::fmt::Debug for CodexConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodexConfig")
            .field("path", &self.path)
            .field("model", &self.model)
            .field("sandbox_mode", &self.sandbox_mode)
            .field("approval_policy", &self.approval_policy)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("codex_home", &self.codex_home)
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// `serve:` of an `opencode` agent: aiwg starts `opencode serve` itself, supervises it (the
/// [`ProcessConfig`] keys sit next to these, `sandbox` among them) and talks to it; the server
/// is killed with the agent. Needs [`AgentsConfig::start`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ServeConfig {
    /// The `opencode` binary (default: `AIWG_OPENCODE_PATH`, else `opencode` on `PATH`). When it
    /// is not found the agent is skipped, not an error.
    pub binary: Option<String>,
    /// The server's working directory, where it reads `opencode.json` (required).
    pub dir: PathBuf,
    /// The port (default: any free one).
    pub port: Option<u16>,
    /// How long the server may take to answer.
    #[serde(default, deserialize_with = "duration")]
    pub startup_timeout: Option<Duration>,
}

/// `kind: opencode`: a client of an `opencode serve` server, which aiwg starts itself when the
/// entry has a `serve:` section ([`ServeConfig`]).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OpenCodeConfig {
    /// The server (default `http://127.0.0.1:4096`).
    pub url: Option<String>,
    /// Basic-auth password (`OPENCODE_SERVER_PASSWORD` on the server). Never printed.
    pub password: Option<String>,
    /// Basic-auth user (default `opencode`).
    pub username: Option<String>,
    /// `provider/model`.
    pub model: Option<String>,
    /// The OpenCode agent (`build`, `plan`, …).
    pub agent: Option<String>,
    /// Abort a session silent for this long.
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// How long to wait for an aborted session to go idle.
    #[serde(default, deserialize_with = "duration")]
    pub abort_wait: Option<Duration>,
    /// Connect timeout of the HTTP calls.
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
}

impl std::fmt::Debug for OpenCodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCodeConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username)
            .field("model", &self.model)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// A pool member: a name, or `{ agent, weight }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum MemberConfig {
    /// `claude` (weight 1).
    Name(String),
    /// `{ agent: claude, weight: 3 }`.
    Weighted(WeightedMember),
}

/// `{ agent, weight }`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WeightedMember {
    /// The member agent.
    pub agent: String,
    /// Its weight (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `strategy:` of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StrategyConfig {
    /// [`Strategy::RoundRobin`].
    #[default]
    RoundRobin,
    /// [`Strategy::LeastConnections`].
    LeastConnections,
    /// [`Strategy::Weighted`].
    Weighted,
}

/// `kind: pool`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PoolConfig {
    /// The members (other agents).
    #[serde(default)]
    pub members: Vec<MemberConfig>,
    /// How a member is picked.
    #[serde(default)]
    pub strategy: StrategyConfig,
    /// Failures in a row that open a member's circuit.
    pub failure_threshold: Option<u32>,
    /// How long an open circuit stays open.
    #[serde(default, deserialize_with = "duration")]
    pub cool_down: Option<Duration>,
}

/// One entry of `agents:`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AgentConfig {
    /// `kind: command`.
    Command(CommandConfig, ProcessConfig),
    /// `kind: claude-code`.
    ClaudeCode(ClaudeCodeConfig, ProcessConfig),
    /// `kind: codex`.
    Codex(CodexConfig, ProcessConfig),
    /// `kind: opencode`, with its `serve:` section if it has one.
    OpenCode(OpenCodeConfig, Option<(ServeConfig, ProcessConfig)>),
    /// `kind: pool`.
    Pool(PoolConfig),
}

impl AgentConfig {
    /// The `kind:` value.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            AgentConfig::Command(..) => "command",
            AgentConfig::ClaudeCode(..) => "claude-code",
            AgentConfig::Codex(..) => "codex",
            AgentConfig::OpenCode(..) => "opencode",
            AgentConfig::Pool(_) => "pool",
        }
    }

    /// Reads the entry `agents.<name>` (`kind` and the kind's keys).
    pub fn from_value(name: &str, value: &Value) -> Result<Self, ConfigError> {
        let at = format!("agents.{name}");
        let Value::Object(map) = value else {
            return Err(ConfigError::new(at, "must be a mapping with a `kind`"));
        };
        let mut map = map.clone();
        let kind = match map.remove("kind") {
            Some(Value::String(k)) => k,
            Some(_) => return Err(ConfigError::new(format!("{at}.kind"), "must be a string")),
            None => return Err(ConfigError::new(format!("{at}.kind"), "missing")),
        };
        let with_process = |own: &'static [&'static str]| {
            let (process, rest) = split(map.clone(), own, field_names::<ProcessConfig>(), &at)?;
            Ok::<_, ConfigError>((rest, read::<ProcessConfig>(process, &at)?))
        };
        Ok(match kind.as_str() {
            "command" => {
                let (rest, p) = with_process(field_names::<CommandConfig>())?;
                let c: CommandConfig = read(rest, &at)?;
                if c.network == Some(false) && p.sandbox.resolve() != SandboxConfig::Bwrap {
                    return Err(ConfigError::new(
                        format!("{at}.network"),
                        "`network: false` needs `sandbox: bwrap`",
                    ));
                }
                AgentConfig::Command(c, p)
            }
            "claude-code" => {
                let (rest, p) = with_process(field_names::<ClaudeCodeConfig>())?;
                AgentConfig::ClaudeCode(read(rest, &at)?, p)
            }
            "codex" => {
                let (rest, p) = with_process(field_names::<CodexConfig>())?;
                AgentConfig::Codex(read(rest, &at)?, p)
            }
            "opencode" => {
                let serve = map.remove("serve");
                let (_, rest) = split(map, field_names::<OpenCodeConfig>(), &[], &at)?;
                let client: OpenCodeConfig = read(rest, &at)?;
                let serve = match serve {
                    None | Some(Value::Null) => None,
                    Some(Value::Object(m)) => {
                        let at = format!("{at}.serve");
                        if client.url.as_deref().is_some_and(|u| !u.is_empty()) {
                            return Err(ConfigError::new(
                                at.clone(),
                                "give either `url` (a running server) or `serve` (aiwg starts one)",
                            ));
                        }
                        let (process, own) = split(
                            m,
                            field_names::<ServeConfig>(),
                            field_names::<ProcessConfig>(),
                            &at,
                        )?;
                        Some((read(own, &at)?, read(process, &at)?))
                    }
                    Some(_) => {
                        return Err(ConfigError::new(format!("{at}.serve"), "must be a mapping"))
                    }
                };
                AgentConfig::OpenCode(client, serve)
            }
            "pool" => {
                let (_, rest) = split(map, field_names::<PoolConfig>(), &[], &at)?;
                AgentConfig::Pool(read(rest, &at)?)
            }
            other => {
                return Err(ConfigError::new(
                    format!("{at}.kind"),
                    format!(
                        "unknown agent kind `{other}` (command, claude-code, codex, opencode, pool)"
                    ),
                ))
            }
        })
    }
}

/// Splits `map` into the keys of `second` and the keys of `own`; any other key is an error
/// naming it.
fn split(
    map: Map<String, Value>,
    own: &[&str],
    second: &[&str],
    at: &str,
) -> Result<(Value, Value), ConfigError> {
    let mut a = Map::new();
    let mut b = Map::new();
    for (k, v) in map {
        if own.contains(&k.as_str()) {
            b.insert(k, v);
        } else if second.contains(&k.as_str()) {
            a.insert(k, v);
        } else {
            let mut known: Vec<&str> = own.iter().chain(second).copied().collect();
            known.sort_unstable();
            return Err(ConfigError::new(
                format!("{at}.{k}"),
                format!("unknown key (expected kind, {})", known.join(", ")),
            ));
        }
    }
    Ok((Value::Object(a), Value::Object(b)))
}

/// Deserializes `value` as `T`; an error names the full key (`agents.x.limits.cpu_time`).
fn read<T: DeserializeOwned>(value: Value, at: &str) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let mut key = if path == "." {
            at.to_owned()
        } else {
            format!("{at}.{path}")
        };
        if let Some(rest) = message.strip_prefix("missing field `") {
            if let Some(name) = rest.split('`').next() {
                return ConfigError::new(format!("{key}.{name}"), "missing").with_source(inner);
            }
        }
        if let Some(rest) = message.strip_prefix("unknown field `") {
            // The path already ends with the key; make sure it does.
            if let Some(name) = rest.split('`').next() {
                if !key.ends_with(&format!(".{name}")) {
                    key = format!("{key}.{name}");
                }
                return ConfigError::new(key, "unknown key").with_source(inner);
            }
        }
        // serde quotes the offending value ("invalid type: integer `1234`"): never for a value
        // that may be a secret.
        let secret = path == "password" || path == "api_key" || path.starts_with("env.");
        if secret {
            return ConfigError::new(key, "invalid value (a string is expected)");
        }
        ConfigError::new(key, message).with_source(inner)
    })
}

/// The field names a derived `Deserialize` struct declares (what `deny_unknown_fields` admits).
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Names<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Names<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("names only"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Names(&mut names));
    names
}

/// The whole `agents:` mapping, by name.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct AgentsConfig {
    /// The agents, by name.
    pub agents: BTreeMap<String, AgentConfig>,
}

/// What [`AgentsConfig::build`] made.
#[derive(Clone)]
#[non_exhaustive]
pub struct BuiltAgents {
    /// The executors, by name: every non-pool agent (by name), then the pools.
    pub executors: Vec<(String, Arc<dyn Executor>)>,
    /// Agents left out and why (e.g. `claude` is not installed).
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for BuiltAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltAgents")
            .field(
                "executors",
                &self.executors.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl AgentsConfig {
    /// One line per process-based agent saying how it runs: sandboxed by bubblewrap, or not
    /// (and, for `sandbox: auto`, why not). For the server to say at start.
    #[must_use]
    pub fn sandbox_report(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, agent) in &self.agents {
            let process = match agent {
                AgentConfig::Command(_, p)
                | AgentConfig::ClaudeCode(_, p)
                | AgentConfig::Codex(_, p) => p,
                AgentConfig::OpenCode(_, Some((_, p))) => p,
                AgentConfig::OpenCode(_, None) | AgentConfig::Pool(_) => continue,
            };
            out.push(match (process.sandbox, process.sandbox.resolve()) {
                (_, SandboxConfig::Bwrap) => {
                    format!("agent `{name}`: sandboxed by bubblewrap")
                }
                (SandboxConfig::Auto, _) => format!(
                    "agent `{name}`: `sandbox: auto` but bwrap is not installed: not sandboxed"
                ),
                _ => format!("agent `{name}`: not sandboxed"),
            });
        }
        out
    }

    /// Reads the `agents:` mapping (a JSON object of `name: { kind, … }`).
    pub fn from_value(value: &Value) -> Result<Self, ConfigError> {
        match value {
            Value::Null => Ok(Self::default()),
            Value::Object(map) => Self::from_entries(map.iter().map(|(k, v)| (k.as_str(), v))),
            _ => Err(ConfigError::new(
                "agents",
                "must be a mapping of names to agents",
            )),
        }
    }

    /// Reads `(name, entry)` pairs.
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a Value)>,
    ) -> Result<Self, ConfigError> {
        let mut agents = BTreeMap::new();
        for (name, v) in entries {
            agents.insert(name.to_owned(), AgentConfig::from_value(name, v)?);
        }
        Ok(Self { agents })
    }

    /// Reads the loosely typed `agents:` of [`aiwg_core::config::Config`].
    pub fn from_core(
        agents: &BTreeMap<String, aiwg_core::config::AgentConfig>,
    ) -> Result<Self, ConfigError> {
        let mut out = BTreeMap::new();
        for (name, a) in agents {
            let mut map: Map<String, Value> = a
                .options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            map.insert("kind".into(), Value::String(a.kind.clone()));
            out.insert(
                name.clone(),
                AgentConfig::from_value(name, &Value::Object(map))?,
            );
        }
        Ok(Self { agents: out })
    }

    /// Builds every agent: the others first, then the pools (whose members must be agents of
    /// this configuration). A `claude-code` agent whose binary is missing is skipped with the
    /// reason, and so is a pool with a skipped member; everything else wrong is an error naming
    /// the key (`agents.sbx.sandbox` when `bwrap` is not installed, …). An `opencode` agent with
    /// `serve:` needs [`start`](Self::start) instead.
    pub fn build(&self) -> Result<BuiltAgents, ConfigError> {
        self.assemble(BTreeMap::new(), Vec::new())
    }

    /// Like [`build`](Self::build), and first starts the `opencode serve` servers of the
    /// `opencode` agents that have a `serve:` section (skipped with the reason when the binary
    /// is missing). A server that does not come up is an error at `agents.<name>.serve`; the
    /// servers already started are stopped again when building fails.
    pub async fn start(&self) -> Result<BuiltAgents, ConfigError> {
        let mut started = BTreeMap::new();
        let mut skipped = Vec::new();
        for (name, cfg) in &self.agents {
            let AgentConfig::OpenCode(client, Some((serve, process))) = cfg else {
                continue;
            };
            let at = format!("agents.{name}.serve");
            let binary = serve
                .binary
                .clone()
                .filter(|b| !b.is_empty())
                .or_else(|| {
                    std::env::var(crate::OPENCODE_PATH_ENV)
                        .ok()
                        .filter(|b| !b.is_empty())
                })
                .unwrap_or_else(|| "opencode".to_owned());
            let Some(binary) = find_program(&binary) else {
                skipped.push((
                    name.clone(),
                    format!("agent `{name}` (opencode) skipped: `{binary}` was not found (set AIWG_OPENCODE_PATH)"),
                ));
                continue;
            };
            let mut b = OpenCodeServer::builder(&serve.dir)
                .binary(binary)
                .process(process.options());
            if let Some(p) = serve.port {
                b = b.port(p);
            }
            if let Some(t) = serve.startup_timeout {
                b = b.startup_timeout(t);
            }
            if let Some(p) = client.password.as_deref().filter(|p| !p.is_empty()) {
                b = b.password(p);
            }
            let server = b.start().await.map_err(|e| match e {
                crate::AgentError::Config(c) => c.within(&at),
                other => {
                    ConfigError::new(at.clone(), "the server did not start").with_source(other)
                }
            })?;
            let exec = opencode(client, server.into_client())
                .map_err(|e| e.within(&format!("agents.{name}")))?;
            started.insert(name.clone(), Arc::new(exec) as Arc<dyn Executor>);
        }
        self.assemble(started, skipped)
    }

    fn assemble(
        &self,
        mut started: BTreeMap<String, Arc<dyn Executor>>,
        pre_skipped: Vec<(String, String)>,
    ) -> Result<BuiltAgents, ConfigError> {
        let mut executors: Vec<(String, Arc<dyn Executor>)> = Vec::new();
        let mut skipped = Vec::new();
        let mut skipped_names: Vec<&str> = Vec::new();
        let (pools, plain): (Vec<_>, Vec<_>) = self
            .agents
            .iter()
            .partition(|(_, a)| matches!(a, AgentConfig::Pool(_)));
        for (name, cfg) in plain.into_iter().chain(pools) {
            let at = format!("agents.{name}");
            let exec: Arc<dyn Executor> = match cfg {
                AgentConfig::Command(c, p) => {
                    let mut opts = p.options();
                    if let Some(n) = c.network {
                        opts = opts.network(n);
                    }
                    let mut b = CommandExecutor::builder()
                        .process(opts)
                        .allow_failure(c.allow_failure);
                    if let Some(t) = &c.command {
                        b = b.template(t.iter().cloned());
                    }
                    for name in &c.allow_option_params {
                        b = b.allow_option_param(name.clone());
                    }
                    Arc::new(b.build().map_err(|e| e.within(&at))?)
                }
                AgentConfig::ClaudeCode(c, p) => {
                    let path = c
                        .path
                        .as_deref()
                        .filter(|p| !p.is_empty())
                        .unwrap_or("claude");
                    let Some(binary) = find_program(path) else {
                        skipped.push(format!(
                            "agent `{name}` (claude-code) skipped: `{path}` was not found (set AIWG_CLAUDE_PATH)"
                        ));
                        skipped_names.push(name);
                        continue;
                    };
                    Arc::new(claude(c, binary, p.options()).map_err(|e| e.within(&at))?)
                }
                AgentConfig::Codex(c, p) => {
                    let path = c
                        .path
                        .clone()
                        .filter(|p| !p.is_empty())
                        .or_else(|| {
                            std::env::var(crate::CODEX_PATH_ENV)
                                .ok()
                                .filter(|p| !p.is_empty())
                        })
                        .unwrap_or_else(|| "codex".to_owned());
                    let Some(binary) = find_program(&path) else {
                        skipped.push(format!(
                            "agent `{name}` (codex) skipped: `{path}` was not found (set AIWG_CODEX_PATH)"
                        ));
                        skipped_names.push(name);
                        continue;
                    };
                    Arc::new(codex(c, binary, p.options()).map_err(|e| e.within(&at))?)
                }
                AgentConfig::OpenCode(_, Some(_)) => {
                    if let Some((_, reason)) = pre_skipped.iter().find(|(n, _)| n == name) {
                        skipped.push(reason.clone());
                        skipped_names.push(name);
                        continue;
                    }
                    started.remove(name).ok_or_else(|| {
                        ConfigError::new(
                            format!("{at}.serve"),
                            "a supervised server is started by `AgentsConfig::start`, not `build`",
                        )
                    })?
                }
                AgentConfig::OpenCode(c, None) => {
                    let url = c
                        .url
                        .as_deref()
                        .filter(|u| !u.is_empty())
                        .unwrap_or("http://127.0.0.1:4096");
                    let mut b = OpenCode::builder(url);
                    if let Some(p) = &c.password {
                        b = b.password(p.clone());
                    }
                    Arc::new(opencode(c, b).map_err(|e| e.within(&at))?)
                }
                AgentConfig::Pool(c) => {
                    let mut b = Pool::builder().strategy(match c.strategy {
                        StrategyConfig::RoundRobin => Strategy::RoundRobin,
                        StrategyConfig::LeastConnections => Strategy::LeastConnections,
                        StrategyConfig::Weighted => Strategy::Weighted,
                    });
                    if c.members.is_empty() {
                        return Err(ConfigError::new(
                            format!("{at}.members"),
                            "a pool needs members",
                        ));
                    }
                    if let Some(n) = c.failure_threshold {
                        b = b.failure_threshold(n);
                    }
                    if let Some(d) = c.cool_down {
                        b = b.cool_down(d);
                    }
                    let mut unavailable = None;
                    for (i, m) in c.members.iter().enumerate() {
                        let (member, weight) = match m {
                            MemberConfig::Name(n) => (n.as_str(), 1),
                            MemberConfig::Weighted(w) => (w.agent.as_str(), w.weight),
                        };
                        if skipped_names.contains(&member) {
                            unavailable = Some(member.to_owned());
                            break;
                        }
                        let Some((_, exec)) = executors.iter().find(|(n, _)| n == member) else {
                            return Err(ConfigError::new(
                                format!("{at}.members[{i}]"),
                                format!(
                                    "`{member}` is not an agent of this configuration (a pool may name \
                                     another pool only if that one comes first by name)"
                                ),
                            ));
                        };
                        b = b.member(member, Arc::clone(exec), weight);
                    }
                    if let Some(member) = unavailable {
                        skipped.push(format!(
                            "agent `{name}` (pool) skipped: its member `{member}` is unavailable"
                        ));
                        skipped_names.push(name);
                        continue;
                    }
                    Arc::new(b.build().map_err(|e| e.within(&at))?)
                }
            };
            executors.push((name.clone(), exec));
        }
        Ok(BuiltAgents { executors, skipped })
    }
}

fn claude(
    c: &ClaudeCodeConfig,
    binary: PathBuf,
    process: ProcessOptions,
) -> Result<ClaudeCode, ConfigError> {
    let mut b = ClaudeCode::builder().binary(binary).process(process);
    if let Some(m) = &c.model {
        b = b.model(m.clone());
    }
    if let Some(m) = &c.permission_mode {
        b = b.permission_mode(m.clone());
    }
    if !c.allowed_tools.is_empty() {
        b = b.allowed_tools(c.allowed_tools.iter().cloned());
    }
    if !c.disallowed_tools.is_empty() {
        b = b.disallowed_tools(c.disallowed_tools.iter().cloned());
    }
    if let Some(n) = c.max_turns {
        b = b.max_turns(n);
    }
    if let Some(n) = c.max_budget_usd {
        b = b.max_budget_usd(n);
    }
    if let Some(s) = &c.append_system_prompt {
        b = b.append_system_prompt(s.clone());
    }
    if let Some(s) = &c.mcp_config {
        b = b.mcp_config(s.clone());
    }
    b.build()
}

fn codex(c: &CodexConfig, binary: PathBuf, process: ProcessOptions) -> Result<Codex, ConfigError> {
    let mut b = Codex::builder().binary(binary).process(process);
    if let Some(m) = &c.model {
        b = b.model(m.clone());
    }
    if let Some(m) = &c.sandbox_mode {
        b = b.sandbox_mode(m.clone());
    }
    if let Some(p) = &c.approval_policy {
        b = b.approval_policy(p.clone());
    }
    if let Some(u) = c.base_url.as_deref().filter(|u| !u.is_empty()) {
        b = b.base_url(u);
    }
    if let Some(k) = c.api_key.as_deref().filter(|k| !k.is_empty()) {
        b = b.api_key(k);
    }
    if let Some(h) = &c.codex_home {
        b = b.codex_home(h.clone());
    }
    if let Some(s) = c.skip_git_repo_check {
        b = b.skip_git_repo_check(s);
    }
    for (k, v) in &c.config {
        b = b.config(k.clone(), v.clone());
    }
    b.build()
}

/// Applies the client options of `c` (all but `url` and `password`) to `b`.
fn opencode(c: &OpenCodeConfig, mut b: OpenCodeBuilder) -> Result<OpenCode, ConfigError> {
    if let Some(u) = c.username.as_deref().filter(|u| !u.is_empty()) {
        b = b.username(u);
    }
    if let Some(m) = c.model.as_deref().filter(|m| !m.is_empty()) {
        b = b.model(m);
    }
    if let Some(a) = c.agent.as_deref().filter(|a| !a.is_empty()) {
        b = b.agent(a);
    }
    if let Some(d) = c.idle_timeout {
        b = b.idle_timeout(d);
    }
    if let Some(d) = c.abort_wait {
        b = b.abort_wait(d);
    }
    if let Some(d) = c.connect_timeout {
        b = b.connect_timeout(d);
    }
    b.build()
}

#[cfg(test)]
mod tests {

    #[test]
    fn sandbox_auto_means_bwrap_exactly_when_it_is_installed() {
        let installed = crate::process::find_program("bwrap").is_some();
        let want = if installed {
            SandboxConfig::Bwrap
        } else {
            SandboxConfig::None
        };
        assert_eq!(SandboxConfig::Auto.resolve(), want);
        assert_eq!(SandboxConfig::None.resolve(), SandboxConfig::None);
        let cfg = AgentsConfig::from_value(&serde_json::json!({
            "sh": { "kind": "command", "sandbox": "auto" },
            "cl": { "kind": "claude-code" }
        }))
        .unwrap();
        let report = cfg.sandbox_report();
        assert_eq!(report.len(), 2);
        assert!(report.contains(&"agent `cl`: not sandboxed".to_owned()));
        assert_eq!(
            report
                .iter()
                .any(|l| l == "agent `sh`: sandboxed by bubblewrap"),
            installed,
            "{report:?}"
        );
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn a_codex_entry_is_typed_and_its_key_stays_secret() {
        let a = AgentConfig::from_value(
            "cx",
            &json!({"kind": "codex", "model": "gpt-5", "base_url": "http://127.0.0.1:1/v1",
                "api_key": "hunter2-hunter2", "sandbox_mode": "workspace-write",
                "approval_policy": "never", "idle_timeout": "2m", "config": {"model_reasoning_effort": "low"}}),
        )
        .unwrap();
        assert_eq!(a.kind(), "codex");
        assert!(!format!("{a:?}").contains("hunter2"));
        let AgentConfig::Codex(c, p) = &a else {
            panic!()
        };
        assert_eq!(c.sandbox_mode.as_deref(), Some("workspace-write"));
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(120)));
        let err = AgentConfig::from_value("cx", &json!({"kind": "codex", "sandbox_modee": "x"}))
            .unwrap_err();
        assert_eq!(err.key, "agents.cx.sandbox_modee");
        let err = AgentConfig::from_value("cx", &json!({"kind": "codex", "api_key": 98765431}))
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("98765431"));
        // A bad value is refused when building, naming the full key.
        let cfg = AgentsConfig::from_value(&json!({
            "cx": {"kind": "codex", "path": "/bin/sh", "approval_policy": "sometimes"}
        }))
        .unwrap();
        assert_eq!(cfg.build().unwrap_err().key, "agents.cx.approval_policy");
        // A missing binary skips the agent.
        let cfg = AgentsConfig::from_value(&json!({
            "cx": {"kind": "codex", "path": "/nonexistent/codex"}
        }))
        .unwrap();
        let built = cfg.build().unwrap();
        assert!(built.executors.is_empty());
        assert!(built.skipped[0].contains("codex"), "{:?}", built.skipped);
    }

    #[test]
    fn field_names_are_read_from_the_derived_impls() {
        assert!(field_names::<ProcessConfig>().contains(&"sandbox"));
        assert!(field_names::<CommandConfig>().contains(&"allow_failure"));
        assert!(field_names::<CommandConfig>().contains(&"allow_option_params"));
        assert!(field_names::<PoolConfig>().contains(&"members"));
    }

    #[test]
    fn durations_are_humantime_or_seconds() {
        let a = AgentConfig::from_value(
            "x",
            &json!({"kind": "command", "idle_timeout": "1m 30s", "grace": 2}),
        )
        .unwrap();
        let AgentConfig::Command(_, p) = a else {
            panic!()
        };
        assert_eq!(p.idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(p.grace, Some(Duration::from_secs(2)));
        let err =
            AgentConfig::from_value("x", &json!({"kind": "command", "grace": "soon"})).unwrap_err();
        assert_eq!(err.key, "agents.x.grace");
    }

    #[test]
    fn nested_unknown_keys_are_named() {
        let err = AgentConfig::from_value("x", &json!({"kind": "command", "limits": {"cpu": 3}}))
            .unwrap_err();
        assert_eq!(err.key, "agents.x.limits.cpu");
        assert_eq!(err.reason, "unknown key");
    }

    #[test]
    fn secrets_stay_out_of_error_messages() {
        for entry in [
            json!({"kind": "opencode", "password": 98765431}),
            json!({"kind": "command", "env": {"TOKEN": 98765431}}),
        ] {
            let err = AgentConfig::from_value("x", &entry).unwrap_err();
            let all = format!("{err} {err:?}");
            assert!(!all.contains("98765431"), "{all}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let a = AgentConfig::from_value(
            "oc",
            &json!({"kind": "opencode", "password": "hunter2-hunter2"}),
        )
        .unwrap();
        assert!(!format!("{a:?}").contains("hunter2"));
        let c = AgentConfig::from_value(
            "c",
            &json!({"kind": "command", "env": {"TOKEN": "hunter2-hunter2"}}),
        )
        .unwrap();
        let AgentConfig::Command(_, p) = c else {
            panic!()
        };
        assert!(!format!("{:?}", p.options()).contains("hunter2"));
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
