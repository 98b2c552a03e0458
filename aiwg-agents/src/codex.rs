//! [`Codex`]: the OpenAI Codex CLI in `exec --json` mode.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError,
    Health, LogStream,
};
use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::codex_json::{parse_line, CodexOutcome};
use crate::process::{self, Input, OutputLine, ProcessOptions, Supervision};
use crate::{ConfigError, MAX_ARGV_PROMPT};

/// The environment variable naming the `codex` binary when the builder is not given a path.
pub const CODEX_PATH_ENV: &str = "AIWG_CODEX_PATH";

/// The variable that carries [`CodexBuilder::api_key`] to the CLI (the configured provider's
/// `env_key`).
pub const CODEX_API_KEY_ENV: &str = "AIWG_CODEX_API_KEY";

/// The name of the model provider aiwg configures when it is given a
/// [`base_url`](CodexBuilder::base_url).
pub const CODEX_PROVIDER: &str = "aiwg";

/// `sandbox_mode` values the CLI knows.
const SANDBOX_MODES: &[&str] = &["read-only", "workspace-write", "danger-full-access"];
/// `approval_policy` values the CLI knows.
const APPROVAL_POLICIES: &[&str] = &["untrusted", "on-failure", "on-request", "never"];

/// Runs `codex exec --json [options] -- <prompt>` in the job's project directory and turns its
/// JSONL events into [`AgentEvent`]s as they arrive (see [`codex_json`](crate::codex_json)).
///
/// Everything configurable is passed as `-c key=value` overrides (TOML values, quoted by aiwg),
/// so the same options apply to a new thread and to `codex exec resume`: the model, the CLI's
/// own `sandbox_mode` and `approval_policy`, and — with [`base_url`](CodexBuilder::base_url) —
/// a model provider named `aiwg` speaking the Responses API at that URL. Without a base URL the
/// provider comes from `config.toml` in `CODEX_HOME` ([`codex_home`](CodexBuilder::codex_home),
/// else `$HOME/.codex`).
///
/// The prompt is passed after `--`, so text starting with `-` can never become an option; a
/// prompt longer than [`MAX_ARGV_PROMPT`] bytes goes to the CLI's standard input (`-`). A
/// request with `resume_session` runs `codex exec resume -- <thread id> <prompt>`; the result's
/// session is the thread id of the run. A run whose turn failed, that reported an error, or that
/// exits without `turn.completed` is an [`ExecutorError::Failed`] with codex's message or the
/// tail of its standard error. Cancel, timeouts, the idle watchdog, process groups, death with
/// the server and the bubblewrap sandbox are those of every process-based executor
/// ([`ProcessOptions`]).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use aiwg_agents::{Codex, ProcessOptions};
/// use aiwg_core::{AgentRequest, EventSink, Executor};
/// use tokio_util::sync::CancellationToken;
///
/// let codex = Codex::builder()
///     .model("gpt-5")
///     .base_url("http://127.0.0.1:8080/v1")
///     .sandbox_mode("workspace-write")
///     .approval_policy("never")
///     .codex_home("/var/lib/aiwg/codex")
///     .build()?;
/// let result = codex
///     .execute(
///         AgentRequest::new("Fix the failing test", "/srv/projects/app"),
///         EventSink::discard(),
///         CancellationToken::new(),
///     )
///     .await?;
/// println!("{} (thread {:?})", result.output, result.session_id);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Codex {
    binary: PathBuf,
    args: Vec<String>,
    sup: Supervision,
}

/// Builds a [`Codex`] executor.
#[derive(Clone, Default)]
#[must_use]
pub struct CodexBuilder {
    binary: Option<PathBuf>,
    model: Option<String>,
    sandbox_mode: Option<String>,
    approval_policy: Option<String>,
    base_url: Option<String>,
    api_key: Option<String>,
    codex_home: Option<PathBuf>,
    skip_git_repo_check: Option<bool>,
    config: BTreeMap<String, Value>,
    process: ProcessOptions,
}

impl std::fmt::Debug for CodexBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodexBuilder")
            .field("binary", &self.binary)
            .field("model", &self.model)
            .field("sandbox_mode", &self.sandbox_mode)
            .field("approval_policy", &self.approval_policy)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("codex_home", &self.codex_home)
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .field("process", &self.process)
            .finish_non_exhaustive()
    }
}

/// A TOML basic string (JSON's string escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A TOML value for a `-c` override.
fn toml_value(key: &str, v: &Value) -> Result<String, ConfigError> {
    Ok(match v {
        Value::String(s) => toml_string(s),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) => {
            let parts: Result<Vec<String>, ConfigError> =
                items.iter().map(|i| toml_value(key, i)).collect();
            format!("[{}]", parts?.join(", "))
        }
        Value::Null | Value::Object(_) => {
            return Err(ConfigError::new(
                "config",
                format!("`{key}`: a string, number, boolean or list is expected"),
            ))
        }
    })
}

fn check_option(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.starts_with('-') {
        return Err(ConfigError::new(key, "must not be empty or start with '-'"));
    }
    Ok(())
}

impl Codex {
    /// A builder with the defaults: the binary from `AIWG_CODEX_PATH` or `codex` on the `PATH`,
    /// `--skip-git-repo-check`, nothing else, the default [`ProcessOptions`].
    pub fn builder() -> CodexBuilder {
        CodexBuilder::default()
    }

    /// The arguments before the prompt (for a request without resume).
    #[must_use]
    pub fn base_args(&self) -> &[String] {
        &self.args
    }

    /// The arguments for `request`, and what the CLI reads on its standard input.
    fn argv(&self, request: &AgentRequest) -> Result<(Vec<String>, Input), ExecutorError> {
        let mut argv = self.args.clone();
        if let Some(thread) = &request.resume_session {
            if thread.is_empty()
                || thread.starts_with('-')
                || !thread
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ExecutorError::Spawn(aiwg_core::BackendError::from(
                    "the thread to resume is not a valid thread id",
                )));
            }
            argv.push("resume".into());
            argv.push("--".into());
            argv.push(thread.clone());
        } else {
            argv.push("--".into());
        }
        if request.prompt.len() > MAX_ARGV_PROMPT {
            argv.push("-".into());
            return Ok((argv, Input::Bytes(request.prompt.clone().into_bytes())));
        }
        argv.push(request.prompt.clone());
        Ok((argv, Input::Null))
    }
}

impl CodexBuilder {
    /// The `codex` binary.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The model (`-c model="…"`).
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// The CLI's own sandbox for the commands the model runs: `read-only`, `workspace-write`
    /// or `danger-full-access` (`-c sandbox_mode=…`). Under aiwg's bubblewrap sandbox
    /// ([`Sandbox::Bwrap`](crate::Sandbox::Bwrap)) the CLI cannot start its own (nested)
    /// sandbox; use `danger-full-access` there, the outer sandbox being the boundary.
    pub fn sandbox_mode(mut self, mode: impl Into<String>) -> Self {
        self.sandbox_mode = Some(mode.into());
        self
    }

    /// When the CLI asks before running a command: `untrusted`, `on-failure`, `on-request` or
    /// `never` (`-c approval_policy=…`). Nobody answers in a job, so `never` is the useful one.
    pub fn approval_policy(mut self, policy: impl Into<String>) -> Self {
        self.approval_policy = Some(policy.into());
        self
    }

    /// Points the CLI at a Responses-API server (`http://host:port/v1`): a model provider
    /// named `aiwg` with this `base_url` and `wire_api = "responses"` is configured and chosen.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    /// The API key for the [`base_url`](Self::base_url) provider: handed to the CLI in the
    /// environment variable [`CODEX_API_KEY_ENV`] (never on the command line). Never printed.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// The CLI's home (`CODEX_HOME`: `config.toml`, and the sessions a resumed step needs);
    /// created when missing, and writable inside aiwg's sandbox. Default: `$HOME/.codex` of
    /// the child (a per-run folder under `sandbox: bwrap`, so nothing to resume there).
    pub fn codex_home(mut self, dir: impl Into<PathBuf>) -> Self {
        self.codex_home = Some(dir.into());
        self
    }

    /// `--skip-git-repo-check` (default `true`: a project need not be a git repository).
    pub fn skip_git_repo_check(mut self, skip: bool) -> Self {
        self.skip_git_repo_check = Some(skip);
        self
    }

    /// Any other `-c key=value` override (`model_reasoning_effort`, …); the value is turned
    /// into TOML (string, number, boolean, list).
    pub fn config(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// Environment, watchdogs, limits and sandbox of the CLI's process.
    pub fn process(mut self, options: ProcessOptions) -> Self {
        self.process = options;
        self
    }

    /// Checks the options and fixes the argument vector.
    pub fn build(self) -> Result<Codex, ConfigError> {
        let binary = self
            .binary
            .or_else(|| std::env::var_os(CODEX_PATH_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("codex"));
        if binary.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "the codex binary path is empty"));
        }
        let mut args: Vec<String> = vec!["exec".into(), "--json".into()];
        if self.skip_git_repo_check.unwrap_or(true) {
            args.push("--skip-git-repo-check".into());
        }
        let mut overrides: Vec<(String, String)> = Vec::new();
        if let Some(m) = &self.model {
            check_option("model", m)?;
            overrides.push(("model".into(), toml_string(m)));
        }
        if let Some(m) = &self.sandbox_mode {
            if !SANDBOX_MODES.contains(&m.as_str()) {
                return Err(ConfigError::new(
                    "sandbox_mode",
                    format!("`{m}` is not one of {}", SANDBOX_MODES.join(", ")),
                ));
            }
            overrides.push(("sandbox_mode".into(), toml_string(m)));
        }
        if let Some(p) = &self.approval_policy {
            if !APPROVAL_POLICIES.contains(&p.as_str()) {
                return Err(ConfigError::new(
                    "approval_policy",
                    format!("`{p}` is not one of {}", APPROVAL_POLICIES.join(", ")),
                ));
            }
            overrides.push(("approval_policy".into(), toml_string(p)));
        }
        let mut process = self.process;
        if let Some(url) = &self.base_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new(
                    "base_url",
                    "must be an http:// or https:// URL",
                ));
            }
            let mut provider = format!(
                "{{ name = {}, base_url = {}, wire_api = \"responses\"",
                toml_string(CODEX_PROVIDER),
                toml_string(url)
            );
            if let Some(key) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
                provider.push_str(&format!(", env_key = {}", toml_string(CODEX_API_KEY_ENV)));
                process = process.env(CODEX_API_KEY_ENV, key);
            }
            provider.push_str(" }");
            overrides.push(("model_provider".into(), toml_string(CODEX_PROVIDER)));
            overrides.push((format!("model_providers.{CODEX_PROVIDER}"), provider));
        } else if self.api_key.is_some() {
            return Err(ConfigError::new("api_key", "`api_key` needs `base_url`"));
        }
        for (k, v) in &self.config {
            if k.is_empty()
                || k.starts_with(['-', '.'])
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                return Err(ConfigError::new(
                    "config",
                    format!("`{k}` is not a dotted configuration key"),
                ));
            }
            overrides.push((k.clone(), toml_value(k, v)?));
        }
        for (k, v) in overrides {
            args.push("-c".into());
            args.push(format!("{k}={v}"));
        }
        if let Some(home) = &self.codex_home {
            if !home.is_absolute() {
                return Err(ConfigError::new("codex_home", "must be an absolute path"));
            }
            std::fs::create_dir_all(home).map_err(|e| {
                ConfigError::new("codex_home", "the folder cannot be created").with_source(e)
            })?;
            process = process
                .env("CODEX_HOME", home.to_string_lossy())
                .writable(home.clone());
        }
        let sup = process.check()?;
        Ok(Codex { binary, args, sup })
    }
}

#[async_trait]
impl Executor for Codex {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let (argv, input) = self.argv(&request)?;
        let mut thread: Option<String> = None;
        let mut last_message: Option<String> = None;
        let mut outcome: Option<CodexOutcome> = None;
        let mut turns = 0u32;
        let finished = process::run(
            &self.binary,
            &argv,
            &request.project_path,
            &self.sup,
            input,
            &cancel,
            request.timeout,
            |line| match line {
                OutputLine::Stdout(l) => {
                    let parsed = parse_line(&l);
                    if parsed.thread_id.is_some() {
                        thread = parsed.thread_id;
                    }
                    if parsed.message.is_some() {
                        last_message = parsed.message;
                    }
                    for ev in parsed.events {
                        events.emit(ev);
                    }
                    if let Some(o) = parsed.outcome {
                        if matches!(o, CodexOutcome::Completed { .. }) {
                            turns += 1;
                        }
                        // A failure reported earlier in the run stays the outcome.
                        if !matches!(outcome, Some(CodexOutcome::Failed { .. })) {
                            outcome = Some(o);
                        }
                    }
                }
                OutputLine::Stderr(l) => events.emit(AgentEvent::Log {
                    stream: LogStream::Stderr,
                    line: l,
                }),
            },
        )
        .await?;
        let code = || {
            finished
                .exit_code
                .map_or_else(|| "unknown".to_owned(), |c| c.to_string())
        };
        let with_stderr = |mut message: String| {
            if !finished.stderr_tail.is_empty() {
                message.push_str("; stderr: ");
                message.push_str(&finished.stderr_tail);
            }
            message
        };
        let usage = match outcome {
            Some(CodexOutcome::Completed { usage }) if finished.exit_code == Some(0) => usage,
            Some(CodexOutcome::Completed { .. }) => {
                return Err(ExecutorError::Failed {
                    message: with_stderr(format!(
                        "codex exited with code {} after its turn completed",
                        code()
                    )),
                    exit_code: finished.exit_code,
                })
            }
            Some(CodexOutcome::Failed { message }) => {
                return Err(ExecutorError::Failed {
                    message: format!("codex reported an error: {message}"),
                    exit_code: finished.exit_code,
                })
            }
            None => {
                return Err(ExecutorError::Failed {
                    message: with_stderr(format!(
                        "codex exited (code {}) without completing its turn",
                        code()
                    )),
                    exit_code: finished.exit_code,
                })
            }
        };
        let mut out = AgentResult::text(last_message.unwrap_or_default());
        out.session_id = thread;
        out.usage = usage;
        out.num_turns = Some(turns);
        out.exit_code = finished.exit_code;
        Ok(out)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, false)
    }

    fn kind(&self) -> &'static str {
        "codex"
    }

    async fn health(&self) -> Health {
        let path = process::resolve_program(&self.binary);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Health::healthy(),
            Ok(_) => Health::unhealthy(format!("{} is not a file", path.display())),
            Err(e) => Health::unhealthy(format!("{}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_overrides_and_the_prompt_follows_double_dash() {
        let c = Codex::builder()
            .binary("/bin/codex")
            .model("gpt-5")
            .sandbox_mode("workspace-write")
            .approval_policy("never")
            .base_url("http://127.0.0.1:9/v1")
            .api_key("sk-secret-value")
            .config("model_reasoning_effort", "low")
            .config("stream_max_retries", 0)
            .build()
            .unwrap();
        let args = c.base_args();
        assert_eq!(args[..3], ["exec", "--json", "--skip-git-repo-check"]);
        for want in [
            r#"model="gpt-5""#,
            r#"sandbox_mode="workspace-write""#,
            r#"approval_policy="never""#,
            r#"model_provider="aiwg""#,
            r#"model_providers.aiwg={ name = "aiwg", base_url = "http://127.0.0.1:9/v1", wire_api = "responses", env_key = "AIWG_CODEX_API_KEY" }"#,
            r#"model_reasoning_effort="low""#,
            "stream_max_retries=0",
        ] {
            assert!(
                args.windows(2).any(|w| w[0] == "-c" && w[1] == want),
                "{want} missing in {args:?}"
            );
        }
        // The key travels in the environment only.
        assert!(!args.iter().any(|a| a.contains("sk-secret-value")));
        assert!(!format!("{c:?}").contains("sk-secret-value"));
        assert!(c
            .sup
            .child_env()
            .iter()
            .any(|(k, v)| k == CODEX_API_KEY_ENV && v == "sk-secret-value"));

        let req = AgentRequest::new("--dangerously-bypass-approvals-and-sandbox", "/tmp");
        let (argv, input) = c.argv(&req).unwrap();
        assert!(matches!(input, Input::Null));
        let n = argv.len();
        assert_eq!(
            argv[n - 2..],
            [
                "--".to_owned(),
                "--dangerously-bypass-approvals-and-sandbox".to_owned()
            ]
        );
        let req = AgentRequest::new("go on", "/tmp").with_resume("0199a-b");
        let (argv, _) = c.argv(&req).unwrap();
        assert_eq!(argv[argv.len() - 4..], ["resume", "--", "0199a-b", "go on"]);
    }

    #[test]
    fn bad_options_and_threads_are_refused() {
        let key = |b: CodexBuilder| b.build().unwrap_err().key;
        assert_eq!(key(Codex::builder().model("--x")), "model");
        assert_eq!(key(Codex::builder().sandbox_mode("yolo")), "sandbox_mode");
        assert_eq!(
            key(Codex::builder().approval_policy("always")),
            "approval_policy"
        );
        assert_eq!(key(Codex::builder().base_url("file:///x")), "base_url");
        assert_eq!(key(Codex::builder().api_key("k")), "api_key");
        assert_eq!(key(Codex::builder().config("--x", 1)), "config");
        assert_eq!(key(Codex::builder().codex_home("rel/dir")), "codex_home");
        let c = Codex::builder().binary("/bin/codex").build().unwrap();
        let req = AgentRequest::new("x", "/tmp").with_resume("--last");
        assert!(matches!(c.argv(&req), Err(ExecutorError::Spawn(_))));
    }

    #[test]
    fn a_prompt_too_long_for_argv_goes_to_stdin() {
        let c = Codex::builder().binary("/bin/codex").build().unwrap();
        let prompt = "-x".repeat(MAX_ARGV_PROMPT);
        let (argv, input) = c.argv(&AgentRequest::new(prompt.clone(), "/tmp")).unwrap();
        assert_eq!(argv[argv.len() - 2..], ["--", "-"]);
        match input {
            Input::Bytes(b) => assert_eq!(b, prompt.into_bytes()),
            Input::Null => panic!("the prompt must go to stdin"),
        }
    }
}
