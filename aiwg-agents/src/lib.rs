//! Executors for aiwg: the programs that actually do a job's work.
//!
//! Every type here implements [`aiwg_core::Executor`]: it receives an
//! [`AgentRequest`](aiwg_core::AgentRequest) (a prompt or an argument vector, a project
//! directory, a timeout, an optional session to resume), streams
//! [`AgentEvent`](aiwg_core::AgentEvent)s into an [`EventSink`](aiwg_core::EventSink) while it
//! runs, stops when its [`CancellationToken`](tokio_util::sync::CancellationToken) fires, and
//! returns an [`AgentResult`](aiwg_core::AgentResult) (or an
//! [`ExecutorError`](aiwg_core::ExecutorError)). Register them by name in an
//! [`ExecutorRegistry`](aiwg_core::ExecutorRegistry); a workflow step names the one it uses.
//!
//! | type | feature | runs |
//! |---|---|---|
//! | [`ClaudeCode`] | `claude-code` | the Claude Code CLI, `claude -p … --output-format stream-json` |
//! | [`Codex`] | `codex` | the OpenAI Codex CLI, `codex exec --json` |
//! | [`OpenCode`] | `opencode` | a session on an `opencode serve` server, over HTTP and SSE |
//! | [`CommandExecutor`] | `command` | a plain argument vector (`git ls-files`, a test runner) |
//! | [`Pool`] | `pool` | one of several executors: round-robin, least-connections, weighted |
//!
//! # 1. Run a command
//!
//! The simplest executor runs an argument vector in the project directory. Each element is one
//! argument, never parsed by a shell: a parameter such as `; rm -rf ~` is just text.
//!
//! ```
//! # #[cfg(feature = "command")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use aiwg_agents::CommandExecutor;
//! use aiwg_core::{AgentEvent, AgentRequest, EventSink, Executor};
//! use tokio_util::sync::CancellationToken;
//!
//! let exec = CommandExecutor::builder().build()?;
//! let dir = std::env::temp_dir();
//! let (events, mut rx) = EventSink::channel();
//! let req = AgentRequest::command(vec!["echo".into(), "; rm -rf ~".into()], &dir);
//! let result = exec.execute(req, events, CancellationToken::new()).await?;
//! assert_eq!(result.output, "; rm -rf ~\n");
//! assert_eq!(result.exit_code, Some(0));
//! assert!(matches!(rx.recv().await, Some(AgentEvent::Log { .. })));
//! # Ok(()) }
//! # #[cfg(not(feature = "command"))]
//! # fn main() {}
//! ```
//!
//! # 2. Run Claude Code
//!
//! [`ClaudeCode`] starts the CLI with an argument vector (the prompt after `--`, or on standard
//! input when it is longer than [`MAX_ARGV_PROMPT`]), in its own process group, with an
//! environment scrubbed to an allow-list ([`DEFAULT_ENV_ALLOW_LIST`]) plus what you name: the
//! server's API keys and webhook secrets never reach it. Its `stream-json` output is parsed line
//! by line as it arrives ([`stream_json`]). How the process runs — environment, idle watchdog,
//! grace period, resource limits, sandbox — is one [`ProcessOptions`] value, the same for every
//! process-based executor.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use aiwg_agents::{ClaudeCode, ProcessOptions};
//! use aiwg_core::{AgentRequest, EventSink, Executor};
//! use tokio_util::sync::CancellationToken;
//!
//! let claude = ClaudeCode::builder()
//!     .binary("/usr/local/bin/claude")
//!     .permission_mode("acceptEdits")
//!     .max_turns(20)
//!     .process(
//!         ProcessOptions::new()
//!             .pass_env("ANTHROPIC_API_KEY") // named explicitly, so it is passed on
//!             .idle_timeout(Duration::from_secs(300)),
//!     )
//!     .build()?;
//! let first = claude
//!     .execute(AgentRequest::new("Draft the fix", "/srv/app"), EventSink::discard(), CancellationToken::new())
//!     .await?;
//! // A `resume: true` step continues the session the first one ended in.
//! let session = first.session_id.clone().unwrap_or_default();
//! let second = claude
//!     .execute(
//!         AgentRequest::new("Now review it for security", "/srv/app").with_resume(session),
//!         EventSink::discard(),
//!         CancellationToken::new(),
//!     )
//!     .await?;
//! println!("{} ({:?} USD)", second.output, second.cost_usd);
//! # Ok(()) }
//! ```
//!
//! Cancelling the token, the request's timeout and the idle watchdog all stop the run the same
//! way: `SIGTERM` to the child's process group and to the groups of everything it started,
//! `SIGKILL` after the grace period, and `execute` returns only when every process is gone.
//! Processes are told apart by pid *and* start time, so a recycled pid is never signalled, and
//! `/proc` is read on tokio's blocking pool.
//!
//! No agent outlives the server either: every child starts under util-linux
//! `setpriv --pdeathsig KILL`, so the kernel kills it when the server dies, even by `kill -9`
//! ([`ProcessOptions::die_with_server`]). The kernel sends that signal when the *thread* that
//! started the child ends; executors start children from the task that runs them, on a tokio
//! worker thread, which lives as long as the runtime (so do not call `execute` from
//! `spawn_blocking`). The signal reaches the agent process only: what an *unsandboxed* agent
//! started, detached or not, outlives a `kill -9` of the server until a server starts again on
//! the same host (a sandbox's children do not: its PID namespace dies as a whole; a normal stop
//! or shutdown kills them everywhere, detached or not: every process of a run carries a mark in
//! its environment, [`RUN_MARK_ENV`], by which the processes that left the tree are found too).
//! The mark names the run's server (pid, start time, pid namespace): the first process-based
//! executor a server builds stops every process whose mark names a server that is gone
//! ([`stop_leftovers_of_dead_servers`]). A
//! server should also make itself non-dumpable at start
//! (`nix::sys::prctl::set_dumpable(false)`, as the example server does) so that an unsandboxed
//! child cannot read `/proc/<server>/environ` or attach a debugger to it (unless it is root).
//!
//! [`Codex`] runs the OpenAI Codex CLI (`codex exec --json`) the same way, under the same
//! [`ProcessOptions`]; its JSONL events are mapped by [`codex_json`], a step with
//! `resume_session` continues the thread (`codex exec resume`), and its model provider is either
//! aiwg's [`base_url`](CodexBuilder::base_url) or the `config.toml` in its
//! [`codex_home`](CodexBuilder::codex_home):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use aiwg_agents::Codex;
//! use aiwg_core::{AgentRequest, EventSink, Executor};
//! use tokio_util::sync::CancellationToken;
//!
//! let codex = Codex::builder()
//!     .base_url("http://127.0.0.1:8080/v1")
//!     .model("gpt-5")
//!     .approval_policy("never")
//!     .sandbox_mode("workspace-write")
//!     .codex_home("/var/lib/aiwg/codex")
//!     .build()?;
//! let first = codex
//!     .execute(AgentRequest::new("Fix the test", "/srv/app"), EventSink::discard(), CancellationToken::new())
//!     .await?;
//! let thread = first.session_id.unwrap_or_default();
//! let review = AgentRequest::new("Review your fix", "/srv/app").with_resume(thread);
//! codex.execute(review, EventSink::discard(), CancellationToken::new()).await?;
//! # Ok(()) }
//! ```
//!
//! # 3. Sandbox an agent
//!
//! With [`Sandbox::Bwrap`] the child runs under bubblewrap (`bwrap`, Debian package
//! `bubblewrap`):
//!
//! - new PID, IPC and UTS namespaces: it sees only its own processes, so neither the server's
//!   `/proc/<pid>/environ` nor any other process is visible;
//! - the whole system read-only (`--ro-bind / /`), a fresh `/dev` and `/proc`;
//! - writable: the project directory and a per-run temporary directory that is its `HOME` and
//!   `TMPDIR`, removed after the run (so a `resume: true` step of a sandboxed Claude Code agent
//!   does not find the previous step's session files);
//! - the environment is exactly the allow-list plus what you named (bwrap itself is started with
//!   that environment and nothing else, so the values never appear on a command line), no
//!   capabilities, a new session (no terminal injection), and the sandbox dies with its parent;
//! - the network stays, unless [`ProcessOptions::network`] is `false` (`--unshare-net`).
//!
//! The rest of the system is visible read-only, the server's files included: name the server's
//! configuration file and data directory in [`ProcessOptions::hide`] (`hide:` in the
//! configuration) and the sandbox sees them empty.
//!
//! ```no_run
//! # fn demo() -> Result<(), aiwg_agents::ConfigError> {
//! use aiwg_agents::{CommandExecutor, ProcessOptions, Sandbox};
//!
//! // A config error naming `sandbox` when bwrap is not installed.
//! let offline = CommandExecutor::builder()
//!     .process(
//!         ProcessOptions::new()
//!             .sandbox(Sandbox::Bwrap)
//!             .network(false)
//!             .hide("/etc/aiwg/aiwg.yaml"),
//!     )
//!     .build()?;
//! # Ok(()) }
//! ```
//!
//! # 4. Talk to OpenCode
//!
//! [`OpenCode`] drives an `opencode serve` server: it creates (or resumes) a session in the
//! project directory, sends the prompt asynchronously and follows the server's event stream
//! until the session is idle. [`OpenCodeServer`] can start and supervise a local server; a
//! client that owns it ([`OpenCodeServer::into_client`], or a `serve:` section in the
//! configuration) starts a new one when the old one died, and no client of a supervised server
//! sends anything (its password least of all) to the port of a server process that is gone.
//!
//! # 5. Balance over several backends
//!
//! [`Pool`] puts several executors behind one name, with a circuit breaker per member whose
//! state shows in [`Executor::health`](aiwg_core::Executor::health).
//!
//! # 6. Build the agents from configuration
//!
//! With the `config` feature (on by default), [`config::AgentsConfig`] reads the `agents:`
//! section of a configuration file into one typed struct per kind that refuses unknown keys
//! (`agents.sh.sandboxx: unknown key`), and [`config::AgentsConfig::build`] makes every
//! executor, pools last, reporting the agents it had to skip (a `claude` binary that is not
//! installed):
//!
//! ```
//! # fn main() -> Result<(), aiwg_agents::ConfigError> {
//! use aiwg_agents::config::AgentsConfig;
//!
//! let agents = AgentsConfig::from_value(&serde_json::json!({
//!     "sh": {"kind": "command", "idle_timeout": "2m", "grace": "1s"},
//!     "claude": {"kind": "claude-code", "path": "/nonexistent/claude", "model": "sonnet"},
//! }))?;
//! let built = agents.build()?;
//! assert_eq!(built.executors.len(), 1);
//! assert!(built.skipped[0].contains("claude"));
//! # Ok(()) }
//! ```
//!
//! # Errors
//!
//! Builders refuse bad options with a [`ConfigError`] naming the key. Backend failures are
//! [`AgentError`]s that keep their cause (an `io::Error`, a `reqwest::Error`, a
//! `serde_json::Error`); compare their [`AgentError::kind`]. Executors return
//! [`ExecutorError`](aiwg_core::ExecutorError)s, into which an `AgentError` turns with its whole
//! chain of causes in the message. No error and no `Debug` output carries a secret: passwords
//! and environment values are redacted.
//!
//! # Testing
//!
//! With the `test-util` feature, [`testing::FakeAnthropic`] is a scripted Anthropic Messages API
//! server on loopback that the real `claude` and `opencode` programs can talk to, and
//! [`testing::FakeResponses`] a scripted OpenAI Responses API server for the real `codex`.

pub mod stream_json;

mod error;
pub use error::{AgentError, AgentErrorKind, ConfigError};

#[cfg(feature = "config")]
pub mod config;

#[cfg(feature = "process")]
mod process;
#[cfg(feature = "process")]
pub use process::{
    process_alive, stop_leftovers_of_dead_servers, ProcessOptions, ResourceLimits, Sandbox,
    DEFAULT_ENV_ALLOW_LIST, MAX_ARGV_PROMPT, RUN_MARK_ENV,
};

#[cfg(feature = "claude-code")]
mod claude;
#[cfg(feature = "claude-code")]
pub use claude::{ClaudeCode, ClaudeCodeBuilder, CLAUDE_PATH_ENV};

pub mod codex_json;

#[cfg(feature = "codex")]
mod codex;
#[cfg(feature = "codex")]
pub use codex::{Codex, CodexBuilder, CODEX_API_KEY_ENV, CODEX_PATH_ENV, CODEX_PROVIDER};

#[cfg(feature = "command")]
mod command;
#[cfg(feature = "command")]
pub use command::{CommandExecutor, CommandExecutorBuilder};

#[cfg(feature = "opencode")]
mod opencode;
#[cfg(feature = "opencode")]
pub use opencode::{
    OpenCode, OpenCodeBuilder, OpenCodeServer, OpenCodeServerBuilder, OPENCODE_PATH_ENV,
};

#[cfg(feature = "pool")]
mod pool;
#[cfg(feature = "pool")]
pub use pool::{HealthChecks, Pool, PoolBuilder, Strategy};

#[cfg(feature = "test-util")]
pub mod testing;
