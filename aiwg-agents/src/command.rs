//! [`CommandExecutor`]: runs an argument vector, streams its output lines, reports its exit code.

use std::collections::{BTreeMap, BTreeSet};
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
/// a parameter reach the program literally. A parameter value may not turn an argument of the
/// executor's own template into an option either: a run whose value would start an argument
/// with `-` (`{{file}}` given `--exec=…`), or whose value holds a NUL byte, is refused before
/// anything starts, with an error naming the parameter (never its value), unless the parameter
/// was named with [`CommandExecutorBuilder::allow_option_param`]. A value inside an argument
/// (`--name={{name}}`) may start with `-`. (The engine checks the arguments it renders itself,
/// a step's `command`, the same way.) Each line of standard output and standard error is
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
    option_params: BTreeSet<String>,
}

/// Builds a [`CommandExecutor`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct CommandExecutorBuilder {
    template: Option<Vec<String>>,
    process: ProcessOptions,
    allow_failure: bool,
    option_params: BTreeSet<String>,
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

    /// Lets the parameter `name` start an argument of the template with `-` (e.g. a workflow
    /// parameter whose `pattern` admits `--verbose`, checked by the engine). Any other
    /// parameter whose value would start an argument with `-` refuses the run.
    pub fn allow_option_param(mut self, name: impl Into<String>) -> Self {
        self.option_params.insert(name.into());
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
            option_params: self.option_params,
        })
    }
}

/// Why an argument of the template could not be rendered: the parameter's name, and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RenderError {
    /// The request has no such parameter.
    Missing(String),
    /// The value would start the argument with `-`.
    LeadingDash(String),
    /// The value holds a NUL byte.
    Nul(String),
}

impl RenderError {
    fn into_executor_error(self, template: &str) -> ExecutorError {
        // The value is never repeated: it is user text, and may be anything.
        let name = match &self {
            RenderError::Missing(n) | RenderError::LeadingDash(n) | RenderError::Nul(n) => {
                n.clone()
            }
        };
        let reason = match self {
            RenderError::Missing(name) => format!(
                "the command template names the parameter `{name}`, which the job does not have"
            ),
            RenderError::LeadingDash(name) => format!(
                "the parameter `{name}` starts with `-`, and the command template's argument \
                 `{template}` starts with it: a value may not look like an option"
            ),
            RenderError::Nul(name) => {
                format!("the parameter `{name}` contains a NUL byte")
            }
        };
        // Not retried: the same request would be refused again.
        ExecutorError::InvalidRequest(aiwg_core::RequestError::Param { name, reason })
    }
}

/// Fills `{{name}}` placeholders of one argument from `params`. A value that would start the
/// argument with `-` is refused unless its parameter is in `option_params`; a value with a NUL
/// byte is refused.
pub(crate) fn render_arg(
    arg: &str,
    params: &BTreeMap<String, String>,
    option_params: &BTreeSet<String>,
) -> Result<String, RenderError> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        let Some(v) = params.get(name) else {
            return Err(RenderError::Missing(name.to_owned()));
        };
        if v.contains('\0') {
            return Err(RenderError::Nul(name.to_owned()));
        }
        // Nothing before it (literal text or an earlier value): this value starts the argument.
        if out.is_empty() && v.starts_with('-') && !option_params.contains(name) {
            return Err(RenderError::LeadingDash(name.to_owned()));
        }
        out.push_str(v);
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
                .map(|a| {
                    render_arg(a, &request.params, &self.option_params)
                        .map_err(|e| e.into_executor_error(a))
                })
                .collect::<Result<Vec<_>, _>>()?,
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
        let none = BTreeSet::new();
        assert_eq!(
            render_arg("--f={{ file }}", &p, &none).unwrap(),
            "--f=a b; rm -rf ~"
        );
        assert_eq!(
            render_arg("{{missing}}", &p, &none),
            Err(RenderError::Missing("missing".to_owned()))
        );
        assert_eq!(render_arg("{{open", &p, &none).unwrap(), "{{open");
    }

    /// A value that starts an argument may not start with `-` (an empty value before it does
    /// not make it a middle); inside an argument it may; a NUL byte is refused anywhere.
    #[test]
    fn a_value_starting_an_argument_may_not_be_an_option() {
        let mut p = BTreeMap::new();
        p.insert("x".to_owned(), "--exec=id".to_owned());
        p.insert("empty".to_owned(), String::new());
        p.insert("nul".to_owned(), "a\0b".to_owned());
        let none = BTreeSet::new();
        let dash = |n: &str| Err(RenderError::LeadingDash(n.to_owned()));
        assert_eq!(render_arg("{{x}}", &p, &none), dash("x"));
        assert_eq!(render_arg("{{ x }} tail", &p, &none), dash("x"));
        assert_eq!(render_arg("{{empty}}{{x}}", &p, &none), dash("x"));
        assert_eq!(
            render_arg("--name={{x}}", &p, &none).unwrap(),
            "--name=--exec=id"
        );
        assert_eq!(render_arg("a{{x}}", &p, &none).unwrap(), "a--exec=id");
        assert_eq!(
            render_arg("--n={{nul}}", &p, &none),
            Err(RenderError::Nul("nul".to_owned()))
        );
        let allowed = BTreeSet::from(["x".to_owned()]);
        assert_eq!(render_arg("{{x}}", &p, &allowed).unwrap(), "--exec=id");
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
