//! [`ClaudeCode`]: the Claude Code CLI in print mode with `stream-json` output.

use std::path::PathBuf;

use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError,
    Health, LogStream,
};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::process::{self, Input, OutputLine, ProcessOptions, Supervision};
use crate::stream_json::{parse_line, ClaudeResult};
use crate::ConfigError;

/// The environment variable naming the `claude` binary when the builder is not given a path.
pub const CLAUDE_PATH_ENV: &str = "AIWG_CLAUDE_PATH";

use crate::process::MAX_ARGV_PROMPT;

/// Runs `claude -p --output-format stream-json --verbose [options] -- <prompt>` in the job's
/// project directory and turns its output into [`AgentEvent`]s as it arrives.
///
/// The prompt is passed after `--`, so text starting with `-` can never become an option; a
/// prompt longer than [`MAX_ARGV_PROMPT`] bytes is written to the CLI's standard input instead
/// (`claude -p` reads its prompt from there when none is given). A
/// request with `resume_session` adds `--resume <id>`; the result carries the session id the
/// CLI reports (which may differ from the one resumed). A run whose `result` line reports an
/// error, or that exits without one, is an [`ExecutorError::Failed`] carrying the CLI's message
/// or the tail of its standard error.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use aiwg_agents::{ClaudeCode, ProcessOptions};
/// use aiwg_core::{AgentRequest, EventSink, Executor};
/// use tokio_util::sync::CancellationToken;
/// use std::time::Duration;
///
/// let claude = ClaudeCode::builder()
///     .model("sonnet")
///     .permission_mode("acceptEdits")
///     .allowed_tools(["Read", "Write"])
///     .max_turns(30)
///     .process(ProcessOptions::new().idle_timeout(Duration::from_secs(120)))
///     .build()?;
/// let (events, mut rx) = EventSink::channel();
/// let run = claude.execute(
///     AgentRequest::new("Fix the failing test", "/srv/projects/app"),
///     events,
///     CancellationToken::new(),
/// );
/// let result = run.await?;
/// while let Ok(ev) = rx.try_recv() {
///     println!("{ev:?}");
/// }
/// println!("{} (session {:?}, ${:?})", result.output, result.session_id, result.cost_usd);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClaudeCode {
    binary: PathBuf,
    args: Vec<String>,
    /// The agent's own `max_budget_usd`: a run gets the smaller of it and what is left of the
    /// job's cap.
    max_budget_usd: Option<f64>,
    sup: Supervision,
}

/// Builds a [`ClaudeCode`] executor.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct ClaudeCodeBuilder {
    binary: Option<PathBuf>,
    model: Option<String>,
    permission_mode: Option<String>,
    allowed_tools: Vec<String>,
    disallowed_tools: Vec<String>,
    max_turns: Option<u32>,
    max_budget_usd: Option<f64>,
    append_system_prompt: Option<String>,
    mcp_config: Option<String>,
    process: ProcessOptions,
}

impl ClaudeCode {
    /// A builder with the defaults: the binary from `AIWG_CLAUDE_PATH` or `claude` on the
    /// `PATH`, no extra options, the default [`ProcessOptions`].
    pub fn builder() -> ClaudeCodeBuilder {
        ClaudeCodeBuilder::default()
    }

    /// The arguments before the prompt (for a request without resume; the budget and output
    /// schema flags are added per request).
    pub fn base_args(&self) -> &[String] {
        &self.args
    }

    /// The arguments for `request`, and what the CLI reads on its standard input.
    fn argv(&self, request: &AgentRequest) -> Result<(Vec<String>, Input), ExecutorError> {
        let mut argv = self.args.clone();
        if let Some(session) = &request.resume_session {
            if session.is_empty()
                || session.starts_with('-')
                || !session
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ExecutorError::Spawn(aiwg_core::BackendError::from(
                    "the session to resume is not a valid session id",
                )));
            }
            argv.push("--resume".into());
            argv.push(session.clone());
        }
        let cap = match (self.max_budget_usd, request.max_budget_usd) {
            // What is left of the job's cap; a smaller cap of the agent's own config stays. A
            // cap already spent still has to stop the CLI at its first turn.
            (own, Some(left)) => Some(own.map_or(left, |c| c.min(left)).max(0.000_001)),
            (own, None) => own,
        };
        if let Some(cap) = cap {
            argv.push(format!("--max-budget-usd={cap}"));
        }
        if let Some(schema) = &request.output_schema {
            argv.push(format!("--json-schema={schema}"));
        }
        if request.prompt.len() > MAX_ARGV_PROMPT {
            return Ok((argv, Input::Bytes(request.prompt.clone().into_bytes())));
        }
        argv.push("--".into());
        argv.push(request.prompt.clone());
        Ok((argv, Input::Null))
    }
}

fn check_tool(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.starts_with('-') || name.contains(',') {
        return Err(ConfigError::new(
            "allowed_tools",
            "a tool name is empty, starts with '-' or contains ','",
        ));
    }
    Ok(())
}

fn check_option(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.starts_with('-') {
        return Err(ConfigError::new(key, "must not be empty or start with '-'"));
    }
    Ok(())
}

impl ClaudeCodeBuilder {
    /// The `claude` binary.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// `--model`.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// `--permission-mode` (`default`, `acceptEdits`, `plan`, `bypassPermissions`, …).
    pub fn permission_mode(mut self, mode: impl Into<String>) -> Self {
        self.permission_mode = Some(mode.into());
        self
    }

    /// `--allowedTools`.
    pub fn allowed_tools<I, S>(mut self, tools: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_tools = tools.into_iter().map(Into::into).collect();
        self
    }

    /// `--disallowedTools`.
    pub fn disallowed_tools<I, S>(mut self, tools: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.disallowed_tools = tools.into_iter().map(Into::into).collect();
        self
    }

    /// `--max-turns`.
    pub fn max_turns(mut self, turns: u32) -> Self {
        self.max_turns = Some(turns);
        self
    }

    /// `--max-budget-usd`.
    pub fn max_budget_usd(mut self, usd: f64) -> Self {
        self.max_budget_usd = Some(usd);
        self
    }

    /// `--append-system-prompt`.
    pub fn append_system_prompt(mut self, text: impl Into<String>) -> Self {
        self.append_system_prompt = Some(text.into());
        self
    }

    /// `--mcp-config` (a file path or a JSON string).
    pub fn mcp_config(mut self, config: impl Into<String>) -> Self {
        self.mcp_config = Some(config.into());
        self
    }

    /// Environment, watchdogs, limits and sandbox of the CLI's process.
    pub fn process(mut self, options: ProcessOptions) -> Self {
        self.process = options;
        self
    }

    /// Checks the options and fixes the argument vector.
    pub fn build(self) -> Result<ClaudeCode, ConfigError> {
        let binary = self
            .binary
            .or_else(|| std::env::var_os(CLAUDE_PATH_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("claude"));
        if binary.as_os_str().is_empty() {
            return Err(ConfigError::new("path", "the claude binary path is empty"));
        }
        let mut args: Vec<String> = ["-p", "--output-format", "stream-json", "--verbose"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        if let Some(m) = self.model {
            check_option("model", &m)?;
            args.extend(["--model".into(), m]);
        }
        if let Some(m) = self.permission_mode {
            check_option("permission_mode", &m)?;
            args.extend(["--permission-mode".into(), m]);
        }
        if !self.allowed_tools.is_empty() {
            for t in &self.allowed_tools {
                check_tool(t)?;
            }
            args.extend(["--allowedTools".into(), self.allowed_tools.join(",")]);
        }
        if !self.disallowed_tools.is_empty() {
            for t in &self.disallowed_tools {
                check_tool(t).map_err(|_| {
                    ConfigError::new(
                        "disallowed_tools",
                        "a tool name is empty, starts with '-' or contains ','",
                    )
                })?;
            }
            args.extend(["--disallowedTools".into(), self.disallowed_tools.join(",")]);
        }
        if let Some(n) = self.max_turns {
            if n == 0 {
                return Err(ConfigError::new("max_turns", "must be at least 1"));
            }
            args.extend(["--max-turns".into(), n.to_string()]);
        }
        if let Some(b) = self.max_budget_usd {
            if !(b.is_finite() && b > 0.0) {
                return Err(ConfigError::new(
                    "max_budget_usd",
                    "must be a positive number",
                ));
            }
        }
        if let Some(p) = self.append_system_prompt {
            // `--flag=value` keeps a value starting with '-' a value.
            args.push(format!("--append-system-prompt={p}"));
        }
        if let Some(c) = self.mcp_config {
            check_option("mcp_config", &c)?;
            args.push(format!("--mcp-config={c}"));
        }
        let sup = self.process.check()?;
        Ok(ClaudeCode {
            binary,
            args,
            max_budget_usd: self.max_budget_usd,
            sup,
        })
    }
}

#[async_trait]
impl Executor for ClaudeCode {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let (argv, input) = self.argv(&request)?;
        let mut final_result: Option<ClaudeResult> = None;
        let mut last_session: Option<String> = None;
        let mut texts = TextTail::default();
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
                    if parsed.session_id.is_some() {
                        last_session = parsed.session_id;
                    }
                    for ev in parsed.events {
                        if let AgentEvent::Text { text } = &ev {
                            texts.push(text);
                        }
                        events.emit(ev);
                    }
                    if parsed.result.is_some() {
                        final_result = parsed.result;
                    }
                }
                OutputLine::Stderr(l) => events.emit(AgentEvent::Log {
                    stream: LogStream::Stderr,
                    line: l,
                }),
            },
        )
        .await?;
        let Some(res) = final_result else {
            let mut message = format!(
                "claude exited (code {}) without a result line",
                finished
                    .exit_code
                    .map_or_else(|| "unknown".to_owned(), |c| c.to_string())
            );
            if !finished.stderr_tail.is_empty() {
                message.push_str("; stderr: ");
                message.push_str(&finished.stderr_tail);
            }
            return Err(ExecutorError::Failed {
                message,
                exit_code: finished.exit_code,
            });
        };
        let limit = match res.subtype.as_str() {
            "error_max_turns" => Some(aiwg_core::AgentLimit::Turns),
            "error_max_budget_usd" => Some(aiwg_core::AgentLimit::Budget),
            _ => None,
        };
        if let Some(limit) = limit {
            // The work done up to the limit is kept, with the session to resume it.
            let mut partial =
                AgentResult::text(res.result.clone().unwrap_or_else(|| texts.joined()));
            partial.session_id = res.session_id.clone().or(last_session);
            partial.cost_usd = res.total_cost_usd;
            partial.usage = res.usage;
            partial.num_turns = res.num_turns;
            partial.exit_code = finished.exit_code;
            return Err(ExecutorError::Limit {
                limit,
                partial: Box::new(partial),
            });
        }
        // The model never produced an answer matching `--json-schema`: the engine's own check
        // fails the step (`invalid_output`) with the text it wrote instead.
        let no_structured = res.subtype == "error_max_structured_output_retries";
        if !res.is_success() && !no_structured {
            let mut message = format!("claude reported {}", res.subtype);
            if let Some(text) = res.result.as_deref().filter(|t| !t.is_empty()) {
                message.push_str(": ");
                message.push_str(text);
            } else if !finished.stderr_tail.is_empty() {
                message.push_str("; stderr: ");
                message.push_str(&finished.stderr_tail);
            }
            return Err(ExecutorError::Failed {
                message,
                exit_code: finished.exit_code,
            });
        }
        let mut out = AgentResult::text(res.result.unwrap_or_else(|| texts.joined()));
        out.session_id = res.session_id.or(last_session);
        out.cost_usd = res.total_cost_usd;
        out.usage = res.usage;
        out.num_turns = res.num_turns;
        out.exit_code = finished.exit_code;
        out.structured = res.structured_output;
        Ok(out)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, true)
    }

    fn kind(&self) -> &'static str {
        "claude-code"
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

/// The most text of a run kept for an answer that its result line does not carry.
const TEXT_KEPT_BYTES: usize = 4 * 1024 * 1024;

/// The latest texts of a run, at most [`TEXT_KEPT_BYTES`] of them (the oldest go first): the
/// answer when the result line has none, without keeping everything a long run wrote.
#[derive(Default)]
struct TextTail {
    texts: std::collections::VecDeque<String>,
    bytes: usize,
}

impl TextTail {
    fn push(&mut self, text: &str) {
        self.bytes += text.len();
        self.texts.push_back(text.to_owned());
        while self.bytes > TEXT_KEPT_BYTES && self.texts.len() > 1 {
            if let Some(old) = self.texts.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    fn joined(&self) -> String {
        let mut out = String::with_capacity(self.bytes + self.texts.len());
        for (i, t) in self.texts.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts are kept joined as they came, the oldest dropped past the bound, the latest always
    /// kept.
    #[test]
    fn the_texts_kept_are_the_latest_within_the_bound() {
        let mut tail = TextTail::default();
        tail.push("one");
        tail.push("two");
        assert_eq!(tail.joined(), "one\ntwo");
        let big = "x".repeat(TEXT_KEPT_BYTES / 2 + 1);
        tail.push(&big);
        tail.push(&big);
        assert_eq!(tail.joined(), big, "only the last fits");
        assert!(tail.bytes <= TEXT_KEPT_BYTES);
        let huge = "y".repeat(TEXT_KEPT_BYTES + 1);
        tail.push(&huge);
        assert_eq!(
            tail.joined(),
            huge,
            "the latest is kept even past the bound"
        );
    }

    #[test]
    fn options_become_arguments_and_the_prompt_follows_double_dash() {
        let c = ClaudeCode::builder()
            .binary("/bin/claude")
            .model("sonnet")
            .permission_mode("acceptEdits")
            .allowed_tools(["Read", "Write"])
            .disallowed_tools(["Bash"])
            .max_turns(3)
            .max_budget_usd(1.5)
            .append_system_prompt("-be brief")
            .build()
            .unwrap();
        let req = AgentRequest::new("--dangerously-skip-permissions", "/tmp").with_resume("abc-1");
        let (argv, input) = c.argv(&req).unwrap();
        assert!(matches!(input, Input::Null));
        let n = argv.len();
        assert_eq!(
            argv[n - 2..],
            ["--".to_owned(), "--dangerously-skip-permissions".to_owned()]
        );
        assert!(argv.windows(2).any(|w| w == ["--resume", "abc-1"]));
        assert!(argv
            .windows(2)
            .any(|w| w == ["--allowedTools", "Read,Write"]));
        assert!(argv.windows(2).any(|w| w == ["--max-turns", "3"]));
        assert!(argv.contains(&"--append-system-prompt=-be brief".to_owned()));
    }

    #[test]
    fn bad_options_and_sessions_are_refused() {
        assert_eq!(
            ClaudeCode::builder().model("--x").build().unwrap_err().key,
            "model"
        );
        assert_eq!(
            ClaudeCode::builder().max_turns(0).build().unwrap_err().key,
            "max_turns"
        );
        assert_eq!(
            ClaudeCode::builder()
                .allowed_tools(["a,b"])
                .build()
                .unwrap_err()
                .key,
            "allowed_tools"
        );
        let c = ClaudeCode::builder().binary("/bin/claude").build().unwrap();
        let req = AgentRequest::new("x", "/tmp").with_resume("--help");
        assert!(matches!(c.argv(&req), Err(ExecutorError::Spawn(_))));
    }

    #[test]
    fn a_prompt_too_long_for_argv_goes_to_stdin() {
        let c = ClaudeCode::builder().binary("/bin/claude").build().unwrap();
        let prompt = "-x".repeat(MAX_ARGV_PROMPT);
        let (argv, input) = c.argv(&AgentRequest::new(prompt.clone(), "/tmp")).unwrap();
        assert!(!argv.iter().any(|a| a == "--" || a.len() > 1000));
        match input {
            Input::Bytes(b) => assert_eq!(b, prompt.into_bytes()),
            Input::Null => panic!("the prompt must go to stdin"),
        }
    }
}
