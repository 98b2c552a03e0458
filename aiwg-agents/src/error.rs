//! The crate's errors: [`ConfigError`] (a configuration value refused) and [`AgentError`] (a
//! backend failure that keeps its cause).

use std::error::Error as StdError;

use aiwg_core::ExecutorError;

/// A configuration value an executor builder or [`AgentsConfig`](crate::config::AgentsConfig)
/// refused. `key` names the option: relative (`model`) from a builder, the full path
/// (`agents.claude.model`) from the configuration. Never contains a secret value.
#[derive(Debug, thiserror::Error)]
#[error("invalid executor configuration `{key}`: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The configuration key.
    pub key: String,
    /// Why it was refused.
    pub reason: String,
    /// The underlying error, when there is one.
    #[source]
    pub source: Option<Box<dyn StdError + Send + Sync>>,
}

impl ConfigError {
    /// A refusal of `key` for `reason`.
    #[must_use]
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
            source: None,
        }
    }

    /// The same error with its cause attached.
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The same error with `prefix.` put in front of its key (`model` → `agents.claude.model`).
    #[must_use]
    pub fn within(mut self, prefix: &str) -> Self {
        self.key = if self.key.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{}", self.key)
        };
        self
    }
}

/// What kind of [`AgentError`] it is, for tests and metrics (compare this, not the error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AgentErrorKind {
    /// A program could not be started.
    Spawn,
    /// Waiting for a child failed.
    Wait,
    /// The child exited before it could be tracked.
    ExitedEarly,
    /// The sandbox's temporary directory could not be made.
    RunDir,
    /// An HTTP server could not be reached.
    Connect,
    /// An HTTP answer could not be read.
    Read,
    /// An answer was not the JSON expected.
    Json,
    /// The options were refused.
    Config,
    /// A supervised server did not come up.
    Server,
}

/// A backend failure with its cause (`source()`): an [`std::io::Error`] from starting or
/// waiting for a process, a `reqwest::Error` talking to a server, a [`serde_json::Error`]
/// reading its answer. Executors return [`ExecutorError`]s; an `AgentError` turns into one
/// (`Spawn` or `Protocol`) whose message carries the whole chain of causes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A program could not be started.
    #[error("could not start `{program}`")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for a child failed.
    #[error("waiting for the child failed")]
    Wait(#[source] std::io::Error),
    /// The child exited before its pid could be read.
    #[error("the child exited before it could be tracked")]
    ExitedEarly,
    /// The sandbox's temporary directory could not be made.
    #[error("cannot create the run's temporary directory")]
    RunDir(#[source] std::io::Error),
    /// An HTTP server could not be reached.
    #[cfg(feature = "opencode")]
    #[error("cannot reach {url}")]
    Connect {
        /// The server's base URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// An HTTP answer could not be read.
    #[cfg(feature = "opencode")]
    #[error("reading the answer of {url} failed")]
    Read {
        /// The server's base URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// An answer was not the JSON expected.
    #[error("{what} is not valid JSON")]
    Json {
        /// What was read.
        what: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The options were refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A supervised server did not come up (it was stopped again).
    #[error("{0}")]
    Server(String),
}

impl AgentError {
    /// The kind, for comparisons.
    #[must_use]
    pub fn kind(&self) -> AgentErrorKind {
        match self {
            AgentError::Spawn { .. } => AgentErrorKind::Spawn,
            AgentError::Wait(_) => AgentErrorKind::Wait,
            AgentError::ExitedEarly => AgentErrorKind::ExitedEarly,
            AgentError::RunDir(_) => AgentErrorKind::RunDir,
            #[cfg(feature = "opencode")]
            AgentError::Connect { .. } => AgentErrorKind::Connect,
            #[cfg(feature = "opencode")]
            AgentError::Read { .. } => AgentErrorKind::Read,
            AgentError::Json { .. } => AgentErrorKind::Json,
            AgentError::Config(_) => AgentErrorKind::Config,
            AgentError::Server(_) => AgentErrorKind::Server,
        }
    }
}

impl From<AgentError> for ExecutorError {
    fn from(e: AgentError) -> Self {
        // The cause is kept as the executor error's source (its text is shown with it).
        let protocol = matches!(e.kind(), AgentErrorKind::Read | AgentErrorKind::Json);
        let e = aiwg_core::BackendError::from_source(e);
        if protocol {
            ExecutorError::Protocol(e)
        } else {
            ExecutorError::Spawn(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_kept_and_shown_in_the_executor_error() {
        let e = AgentError::Spawn {
            program: "nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(e.kind(), AgentErrorKind::Spawn);
        assert!(e.source().is_some());
        let ex = ExecutorError::from(e);
        assert_eq!(ex.kind(), "spawn_failed");
        assert!(ex.to_string().contains("not found"), "{ex}");
        // The cause stays reachable as the executor error's source, down to the io error.
        let mut depth = 0;
        let mut cur = StdError::source(&ex);
        while let Some(c) = cur {
            depth += 1;
            cur = c.source();
        }
        assert!(depth >= 2, "{depth}");
    }

    #[test]
    fn config_errors_get_their_full_key() {
        let e = ConfigError::new("model", "bad").within("agents.claude");
        assert_eq!(e.key, "agents.claude.model");
        assert!(e.source().is_none());
    }
}
