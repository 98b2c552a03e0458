//! [`CommandExecutor`]: runs an argument vector, streams its output lines, reports its exit code.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError,
    Health, LogStream,
};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::process::{self, Input, OutputLine, ProcessOptions, Supervision};
use crate::ConfigError;

/// How much standard output is kept as the result's `output` (the first MiB).
const MAX_OUTPUT: usize = 1 << 20;

/// Runs a command from an argument vector (never a shell) in the job's project directory.
///
/// The argument vector is the request's `command` (rendered by the engine), or else the
/// executor's own template whose `{{name}}` placeholders are filled from the request's
/// parameters; either way each element stays exactly one argument, so `; rm -rf ~` or `$(id)` in
/// a parameter reach the program literally. Each line of standard output and standard error is
/// an [`AgentEvent::Log`]; the result's `output` is standard output and `exit_code` the exit code
/// (128 + signal number for a child killed by a signal). A non-zero exit is an
/// [`ExecutorError::Failed`] unless [`CommandExecutorBuilder::allow_failure`] was set.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use aiwg_agents::CommandExecutor;
/// use aiwg_core::{AgentRequest, EventSink, Executor};
/// use tokio_util::sync::CancellationToken;
///
/// let exec = CommandExecutor::builder().build()?;
/// let req = AgentRequest::command(vec!["git".into(), "ls-files".into()], "/srv/projects/app");
/// let res = exec.execute(req, EventSink::discard(), CancellationToken::new()).await?;
/// println!("exit {:?}: {}", res.exit_code, res.output);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CommandExecutor {
    template: Option<Vec<String>>,
    sup: Supervision,
    allow_failure: bool,
}

/// Builds a [`CommandExecutor`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct CommandExecutorBuilder {
    template: Option<Vec<String>>,
    process: ProcessOptions,
    allow_failure: bool,
}

impl CommandExecutor {
    /// A builder with the defaults: no template, the default [`ProcessOptions`].
    pub fn builder() -> CommandExecutorBuilder {
        CommandExecutorBuilder::default()
    }
}

impl CommandExecutorBuilder {
    /// The argument vector used when a request carries no `command`; `{{param}}` placeholders
    /// are filled from the request's parameters.
    pub fn template<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.template = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Environment, watchdogs, limits and sandbox of the command's process.
    pub fn process(mut self, options: ProcessOptions) -> Self {
        self.process = options;
        self
    }

    /// A non-zero exit is a result, not an error.
    pub fn allow_failure(mut self, allow: bool) -> Self {
        self.allow_failure = allow;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<CommandExecutor, ConfigError> {
        if let Some(t) = &self.template {
            if t.first().is_none_or(String::is_empty) {
                return Err(ConfigError::new(
                    "template",
                    "the command template is empty",
                ));
            }
        }
        Ok(CommandExecutor {
            template: self.template,
            sup: self.process.check()?,
            allow_failure: self.allow_failure,
        })
    }
}

/// Fills `{{name}}` placeholders of one argument from `params`.
pub(crate) fn render_arg(arg: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        match params.get(name) {
            Some(v) => out.push_str(v),
            None => return Err(name.to_owned()),
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[async_trait]
impl Executor for CommandExecutor {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        let argv = match (&request.command, &self.template) {
            (Some(argv), _) => argv.clone(),
            (None, Some(t)) => t
                .iter()
                .map(|a| render_arg(a, &request.params))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|name| {
                    ExecutorError::Spawn(aiwg_core::BackendError::from(format!(
                        "the command template names the parameter `{name}`, which the job does not have"
                    )))
                })?,
            (None, None) => {
                return Err(ExecutorError::InvalidRequest(
                    aiwg_core::RequestError::EmptyCommand,
                ))
            }
        };
        let mut req = request;
        req.command = Some(argv.clone());
        req.validate()?;
        let program = PathBuf::from(&argv[0]);
        let mut output = String::new();
        let finished = process::run(
            &program,
            &argv[1..],
            &req.project_path,
            &self.sup,
            Input::Null,
            &cancel,
            req.timeout,
            |line| match line {
                OutputLine::Stdout(l) => {
                    if output.len() < MAX_OUTPUT {
                        output.push_str(&l);
                        output.push('\n');
                    }
                    events.emit(AgentEvent::Log {
                        stream: LogStream::Stdout,
                        line: l,
                    });
                }
                OutputLine::Stderr(l) => events.emit(AgentEvent::Log {
                    stream: LogStream::Stderr,
                    line: l,
                }),
            },
        )
        .await?;
        let code = finished.exit_code.unwrap_or(-1);
        if code != 0 && !self.allow_failure {
            let mut message = format!("{} exited with code {code}", argv[0]);
            if !finished.stderr_tail.is_empty() {
                message.push_str(": ");
                message.push_str(&finished.stderr_tail);
            }
            return Err(ExecutorError::Failed {
                message,
                exit_code: Some(code),
            });
        }
        Ok(AgentResult::text(output).with_exit_code(code))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true, false)
    }

    fn kind(&self) -> &'static str {
        "command"
    }

    async fn health(&self) -> Health {
        Health::healthy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_each_argument_alone() {
        let mut p = BTreeMap::new();
        p.insert("file".to_owned(), "a b; rm -rf ~".to_owned());
        assert_eq!(
            render_arg("--f={{ file }}", &p).unwrap(),
            "--f=a b; rm -rf ~"
        );
        assert_eq!(render_arg("{{missing}}", &p), Err("missing".to_owned()));
        assert_eq!(render_arg("{{open", &p).unwrap(), "{{open");
    }

    #[test]
    fn empty_templates_are_refused() {
        let err = CommandExecutor::builder()
            .template(Vec::<String>::new())
            .build()
            .unwrap_err();
        assert_eq!(err.key, "template");
    }
}
