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
//! [`ClaudeCode`] starts the CLI with an argument vector (the prompt after `--`), in its own
//! process group, with an environment scrubbed to an allow-list ([`DEFAULT_ENV_ALLOW_LIST`])
//! plus what you name: the server's API keys and webhook secrets never reach it. Its
//! `stream-json` output is parsed line by line as it arrives ([`stream_json`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use aiwg_agents::ClaudeCode;
//! use aiwg_core::{AgentRequest, EventSink, Executor};
//! use tokio_util::sync::CancellationToken;
//!
//! let claude = ClaudeCode::builder()
//!     .binary("/usr/local/bin/claude")
//!     .permission_mode("acceptEdits")
//!     .max_turns(20)
//!     .pass_env("ANTHROPIC_API_KEY") // named explicitly, so it is passed on
//!     .idle_timeout(Duration::from_secs(300))
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
//!
//! # 3. Talk to OpenCode
//!
//! [`OpenCode`] drives an `opencode serve` server: it creates (or resumes) a session in the
//! project directory, sends the prompt asynchronously and follows the server's event stream
//! until the session is idle. [`OpenCodeServer`] can start and supervise a local server.
//!
//! # 4. Balance over several backends
//!
//! [`Pool`] puts several executors behind one name, with a circuit breaker per member whose
//! state shows in [`Executor::health`](aiwg_core::Executor::health).
//!
//! # Testing
//!
//! With the `test-util` feature, [`testing::FakeAnthropic`] is a scripted Anthropic Messages API
//! server on loopback that the real `claude` and `opencode` programs can talk to.

pub mod stream_json;

#[cfg(feature = "process")]
mod process;
#[cfg(feature = "process")]
pub use process::{process_alive, ResourceLimits, DEFAULT_ENV_ALLOW_LIST};

#[cfg(feature = "claude-code")]
mod claude;
#[cfg(feature = "claude-code")]
pub use claude::{ClaudeCode, ClaudeCodeBuilder, CLAUDE_PATH_ENV};

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

/// A configuration value an executor builder refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid executor configuration `{key}`: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The configuration key.
    pub key: &'static str,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    #[allow(dead_code)] // unused when no executor feature is enabled
    pub(crate) fn new(key: &'static str, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}
