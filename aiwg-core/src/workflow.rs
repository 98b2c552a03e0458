//! Workflows (named, parameterised lists of agent steps), the catalog that holds them, and the
//! template language of their prompts.
//!
//! Templates know exactly these placeholders and evaluate nothing else: `{{guidance}}`,
//! `{{project_path}}`, `{{<parameter>}}`, `{{trigger.<field>}}` and `{{steps.<name>.output}}`.
//! Substituted values are never scanned again, so a guidance containing `{{x}}` stays literal.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::TriggerInfo;

/// The longest parameter value accepted when a parameter sets no `max_length`: 1 KiB.
pub const DEFAULT_PARAM_MAX_LENGTH: usize = 1024;

/// A parameter a workflow accepts, and what its values may be.
///
/// Every value given by a trigger is checked before a job is created: at most `max_length`
/// bytes (default [`DEFAULT_PARAM_MAX_LENGTH`]), no control characters, one of `choices` when
/// set, matching `pattern` as a whole when set, and never starting with `-` unless the
/// `pattern` admits it — so a value can never turn into an option of the command it is
/// passed to (`git log {{rev}}` with `rev = --output=/etc/x`).
///
/// ```
/// use std::collections::BTreeMap;
/// use aiwg_core::{Parameter, Step, Workflow, ParamError};
///
/// let wf = Workflow::new("log")
///     .param(Parameter::new("rev").with_default("HEAD").with_pattern(r"[A-Za-z0-9._/~^-]+"))
///     .step(Step::command("log", "sh", ["git", "log", "-1", "{{rev}}"]));
/// let given = |v: &str| BTreeMap::from([("rev".to_owned(), v.to_owned())]);
/// assert_eq!(wf.resolve_params(&given("main~2")).unwrap()["rev"], "main~2");
/// let err = wf.resolve_params(&given("--output=/tmp/x")).unwrap_err();
/// assert!(matches!(err, ParamError::Invalid { ref name, .. } if name == "rev"));
/// ```
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Parameter {
    /// Its name (`[A-Za-z_][A-Za-z0-9_-]*`).
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Whether a trigger must give it (a parameter with a default never is).
    #[serde(default)]
    pub required: bool,
    /// The value used when a trigger gives none.
    #[serde(default)]
    pub default: Option<String>,
    /// A regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// The values accepted (any, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// The longest value accepted, in bytes (default [`DEFAULT_PARAM_MAX_LENGTH`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// `pattern`, compiled once (anchored at both ends).
    #[serde(skip)]
    #[schema(ignore)]
    compiled: OnceLock<Result<regex::Regex, String>>,
}

impl PartialEq for Parameter {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.description == other.description
            && self.required == other.required
            && self.default == other.default
            && self.pattern == other.pattern
            && self.choices == other.choices
            && self.max_length == other.max_length
    }
}

impl Eq for Parameter {}

impl Parameter {
    /// An optional parameter with no default.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            required: false,
            default: None,
            pattern: None,
            choices: Vec::new(),
            max_length: None,
            compiled: OnceLock::new(),
        }
    }

    /// Makes it required.
    #[must_use]
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    /// Gives it a default.
    #[must_use]
    pub fn with_default(mut self, value: impl Into<String>) -> Self {
        self.default = Some(value.into());
        self
    }

    /// Sets its description.
    #[must_use]
    pub fn describe(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Values must match `pattern` as a whole.
    #[must_use]
    pub fn with_pattern(mut self, pattern: impl Into<String>) -> Self {
        self.pattern = Some(pattern.into());
        self.compiled = OnceLock::new();
        self
    }

    /// Values must be one of `choices`.
    #[must_use]
    pub fn with_choices<I, S>(mut self, choices: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.choices = choices.into_iter().map(Into::into).collect();
        self
    }

    /// Values may be at most `bytes` long.
    #[must_use]
    pub fn with_max_length(mut self, bytes: usize) -> Self {
        self.max_length = Some(bytes);
        self
    }

    fn regex(&self) -> Option<&Result<regex::Regex, String>> {
        let pattern = self.pattern.as_ref()?;
        Some(self.compiled.get_or_init(|| {
            regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                .size_limit(1 << 20)
                .build()
                .map_err(|e| e.to_string())
        }))
    }

    /// Checks one value; the error says why it was refused (never repeating the value).
    pub fn check(&self, value: &str) -> Result<(), String> {
        let max = self.max_length.unwrap_or(DEFAULT_PARAM_MAX_LENGTH);
        if value.len() > max {
            return Err(format!("is {} bytes long; the limit is {max}", value.len()));
        }
        if value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return Err("contains a control character".into());
        }
        if !self.choices.is_empty() && !self.choices.iter().any(|c| c == value) {
            return Err(format!("must be one of: {}", self.choices.join(", ")));
        }
        match self.regex() {
            Some(Ok(re)) if !re.is_match(value) => {
                Err("does not match the parameter's pattern".into())
            }
            Some(Err(e)) => Err(format!("has an invalid pattern: {e}")),
            Some(Ok(_)) => Ok(()),
            None if value.starts_with('-') => Err(
                "starts with `-` (a value may not look like an option; set a `pattern` that admits it)"
                    .into(),
            ),
            None => Ok(()),
        }
    }
}

/// One agent run of a workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Its name, unique in the workflow.
    pub name: String,
    /// The executor to run it; `None` means the registry's default.
    #[serde(default)]
    pub agent: Option<String>,
    /// The prompt template (agent steps).
    #[serde(default)]
    pub prompt: Option<String>,
    /// The argument-vector template (command steps): each element is rendered on its own and
    /// stays one argument.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// A per-step timeout.
    #[serde(default, with = "crate::util::opt_duration")]
    pub timeout: Option<Duration>,
    /// Continue the previous step's agent session.
    #[serde(default)]
    pub resume: bool,
    /// `required`: the job pauses before this step (`awaiting_approval`) until someone with
    /// the `approve` scope (or an allowed forge user) approves it.
    #[serde(default)]
    pub approval: ApprovalGate,
    /// A JSON Schema the step's answer must satisfy: passed to agents that can enforce it
    /// (claude-code's `--json-schema`), then checked here; the parsed answer is the step's
    /// `structured` result, and `{{steps.<name>.structured.<field>}}` reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<serde_json::Value>,
}

/// Whether a step waits for a human before it runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ApprovalGate {
    /// It runs when its turn comes.
    #[default]
    None,
    /// The job pauses before it until approved.
    Required,
}

impl Step {
    /// A prompt step run by `agent`.
    #[must_use]
    pub fn prompt(
        name: impl Into<String>,
        agent: impl Into<String>,
        prompt: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            agent: Some(agent.into()),
            prompt: Some(prompt.into()),
            command: None,
            timeout: None,
            resume: false,
            approval: ApprovalGate::None,
            output_schema: None,
        }
    }

    /// A command step run by `agent`.
    #[must_use]
    pub fn command<I, S>(name: impl Into<String>, agent: impl Into<String>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            name: name.into(),
            agent: Some(agent.into()),
            prompt: None,
            command: Some(argv.into_iter().map(Into::into).collect()),
            timeout: None,
            resume: false,
            approval: ApprovalGate::None,
            output_schema: None,
        }
    }

    /// Sets a per-step timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Marks the step as continuing the previous step's session.
    #[must_use]
    pub fn resuming(mut self) -> Self {
        self.resume = true;
        self
    }

    /// Makes the job wait for an approval before this step.
    #[must_use]
    pub fn requiring_approval(mut self) -> Self {
        self.approval = ApprovalGate::Required;
        self
    }

    /// Sets the JSON Schema its answer must satisfy.
    #[must_use]
    pub fn with_output_schema(mut self, schema: serde_json::Value) -> Self {
        self.output_schema = Some(schema);
        self
    }
}

/// A named workflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Its name (the catalog key).
    #[serde(default)]
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Parameters it accepts.
    #[serde(default)]
    pub parameters: Vec<Parameter>,
    /// Steps, run in order.
    pub steps: Vec<Step>,
    /// Whole-job timeout (the engine default when absent).
    #[serde(default, with = "crate::util::opt_duration")]
    pub timeout: Option<Duration>,
    /// Attempts before dead letter (default 1).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Default priority of its jobs (default 0).
    #[serde(default)]
    pub priority: Option<i32>,
    /// At most one job of a group runs at a time (GitHub Actions' `concurrency`).
    #[serde(default)]
    pub concurrency: Option<Concurrency>,
    /// Where its pull-request jobs run, overriding `projects.workspace`: `worktree` (needs the
    /// engine's workspace settings) or `none` (the project directory).
    #[serde(default)]
    pub workspace: Option<WorkspaceMode>,
    /// The spending cap of one job in US dollars: claude-code steps get what is left
    /// (`--max-budget-usd`), and no step starts once the job's cost reached it (the job ends
    /// `failed`, kind `budget_exceeded`, keeping every finished step's result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// How long a job waits for an approval before it ends `cancelled` (kind
    /// `approval_timeout`); default 24 hours.
    #[serde(default, with = "crate::util::opt_duration")]
    pub approval_timeout: Option<Duration>,
    /// Runs on a timer: one job per tick of each schedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<crate::schedule::Schedule>,
}

/// A workflow's choice of workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// A worktree at the pull request's head.
    Worktree,
    /// The project directory.
    None,
}

/// A workflow's concurrency group: `{ group: "{{trigger.repo}}#{{trigger.pr}}", on_conflict:
/// queue | cancel_running | replace_queued }`. The group is rendered from the job's trigger
/// and parameters when it is submitted; jobs whose group renders empty belong to none. At most
/// one job of a group runs at a time, across every instance sharing a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// The group's template.
    pub group: String,
    /// What a new job does when its group is busy (default `queue`).
    #[serde(default)]
    pub on_conflict: OnConflict,
}

/// What a new job does when its concurrency group is busy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Wait behind the running and queued jobs of the group.
    #[default]
    Queue,
    /// Cancel the group's running job (and replace its queued ones); run next.
    CancelRunning,
    /// Replace the group's queued jobs (cancelled with reason `replaced`); the running one
    /// finishes first.
    ReplaceQueued,
}

impl Workflow {
    /// An empty workflow called `name`.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            parameters: Vec::new(),
            steps: Vec::new(),
            timeout: None,
            max_attempts: None,
            priority: None,
            concurrency: None,
            workspace: None,
            max_budget_usd: None,
            approval_timeout: None,
            schedules: Vec::new(),
        }
    }

    /// Sets the spending cap of one job, in US dollars.
    #[must_use]
    pub fn with_max_budget_usd(mut self, usd: f64) -> Self {
        self.max_budget_usd = Some(usd);
        self
    }

    /// Sets how long a job waits for an approval.
    #[must_use]
    pub fn with_approval_timeout(mut self, t: Duration) -> Self {
        self.approval_timeout = Some(t);
        self
    }

    /// Adds a schedule.
    #[must_use]
    pub fn with_schedule(mut self, schedule: crate::schedule::Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Sets where its pull-request jobs run.
    #[must_use]
    pub fn with_workspace(mut self, mode: WorkspaceMode) -> Self {
        self.workspace = Some(mode);
        self
    }

    /// Sets the concurrency group.
    #[must_use]
    pub fn with_concurrency(mut self, group: impl Into<String>, on_conflict: OnConflict) -> Self {
        self.concurrency = Some(Concurrency {
            group: group.into(),
            on_conflict,
        });
        self
    }

    /// Sets the description.
    #[must_use]
    pub fn describe(mut self, text: impl Into<String>) -> Self {
        self.description = text.into();
        self
    }

    /// Adds a parameter.
    #[must_use]
    pub fn param(mut self, p: Parameter) -> Self {
        self.parameters.push(p);
        self
    }

    /// Adds a step.
    #[must_use]
    pub fn step(mut self, s: Step) -> Self {
        self.steps.push(s);
        self
    }

    /// Sets the whole-job timeout.
    #[must_use]
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Sets the number of attempts.
    #[must_use]
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Sets the default priority.
    #[must_use]
    pub fn with_priority(mut self, p: i32) -> Self {
        self.priority = Some(p);
        self
    }

    /// The step names, in order.
    #[must_use]
    pub fn step_names(&self) -> Vec<String> {
        self.steps.iter().map(|s| s.name.clone()).collect()
    }

    /// Whether a command step starts an argument with `{{guidance}}` (a guidance starting with
    /// `-` would then reach the program as an option).
    pub(crate) fn guidance_leads_an_argument(&self) -> bool {
        self.steps
            .iter()
            .filter_map(|s| s.command.as_ref())
            .flatten()
            .any(|a| leading_placeholder(a) == Some("guidance"))
    }

    /// Checks the workflow on its own: names, steps, templates.
    pub fn validate(&self) -> Result<(), WorkflowError> {
        let wf = &self.name;
        let err = |reason: String| WorkflowError::Invalid {
            workflow: wf.clone(),
            reason,
        };
        if !valid_name(wf) {
            return Err(err(
                "the name must be 1-100 characters of letters, digits, `_`, `-` or `.`".into(),
            ));
        }
        if self.steps.is_empty() {
            return Err(err("it has no steps".into()));
        }
        if self.max_attempts == Some(0) {
            return Err(err("max_attempts must be at least 1".into()));
        }
        if self
            .timeout
            .is_some_and(|t| t.is_zero() || t > crate::executor::MAX_TIMEOUT)
        {
            // An agent's request may not last longer (`MAX_TIMEOUT`): a longer job's first
            // step would fail.
            return Err(err("timeout must be between 1 ms and 30 days".into()));
        }
        if self
            .max_budget_usd
            .is_some_and(|b| !b.is_finite() || b <= 0.0)
        {
            return Err(err("max_budget_usd must be a positive number".into()));
        }
        if self.approval_timeout.is_some_and(|t| t.is_zero()) {
            return Err(err("approval_timeout must be greater than zero".into()));
        }
        for (i, schedule) in self.schedules.iter().enumerate() {
            schedule
                .validate()
                .map_err(|why| err(format!("schedule {}: {why}", i + 1)))?;
        }
        let mut params = HashSet::new();
        for p in &self.parameters {
            if !valid_name(&p.name) || p.name == "guidance" && p.required {
                return Err(err(format!("parameter `{}` has an invalid name", p.name)));
            }
            if !params.insert(p.name.as_str()) {
                return Err(err(format!("parameter `{}` is declared twice", p.name)));
            }
            if let Some(Err(e)) = p.regex() {
                return Err(err(format!(
                    "parameter `{}` has an invalid pattern: {e}",
                    p.name
                )));
            }
            if let Some(d) = &p.default {
                p.check(d)
                    .map_err(|why| err(format!("the default of parameter `{}` {why}", p.name)))?;
            }
        }
        let mut earlier: HashSet<&str> = HashSet::new();
        let mut structured: HashSet<&str> = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            if let Some(schema) = &step.output_schema {
                jsonschema::validator_for(schema).map_err(|e| {
                    err(format!(
                        "step `{}` has an invalid output_schema: {e}",
                        step.name
                    ))
                })?;
            }
            if !valid_name(&step.name) {
                return Err(err(format!(
                    "step {} has an invalid name `{}`",
                    i + 1,
                    step.name
                )));
            }
            match (&step.prompt, &step.command) {
                (Some(_), Some(_)) => {
                    return Err(err(format!(
                        "step `{}` has both a prompt and a command",
                        step.name
                    )))
                }
                (None, None) => {
                    return Err(err(format!(
                        "step `{}` has neither a prompt nor a command",
                        step.name
                    )))
                }
                (None, Some(argv)) if argv.is_empty() => {
                    return Err(err(format!("step `{}` has an empty command", step.name)))
                }
                _ => {}
            }
            if step.resume && i == 0 {
                return Err(err(format!(
                    "step `{}` resumes but has no previous step",
                    step.name
                )));
            }
            if step.timeout.is_some_and(|t| t.is_zero()) {
                return Err(err(format!("step `{}` has a zero timeout", step.name)));
            }
            let templates = step.prompt.iter().chain(step.command.iter().flatten());
            for t in templates {
                for ph in placeholders(t).map_err(|e| err(format!("step `{}`: {e}", step.name)))? {
                    let ok = match ph {
                        "guidance" | "project_path" => true,
                        _ if ph.starts_with("trigger.") => ph.len() > "trigger.".len(),
                        _ if ph.starts_with("steps.") => match step_placeholder(ph) {
                            Some((s, None)) => earlier.contains(s),
                            Some((s, Some(_))) => structured.contains(s),
                            None => false,
                        },
                        other => params.contains(other),
                    };
                    if !ok {
                        return Err(err(format!(
                            "step `{}` uses `{{{{{ph}}}}}`, which is neither a parameter, guidance, project_path, trigger.<field>, the output of an earlier step nor a field of an earlier step's structured output (which needs an output_schema)",
                            step.name
                        )));
                    }
                }
            }
            if !earlier.insert(step.name.as_str()) {
                return Err(err(format!("step `{}` is declared twice", step.name)));
            }
            if step.output_schema.is_some() {
                structured.insert(step.name.as_str());
            }
        }
        // A schedule's job is submitted as any other: what submit would refuse at every tick
        // (a missing parameter, a guidance that looks like an option) is refused here, once,
        // as is an expression that never fires (30 February).
        for (i, schedule) in self.schedules.iter().enumerate() {
            let at = |why: String| err(format!("schedule {}: {why}", i + 1));
            self.resolve_params(&schedule.params)
                .map_err(|e| at(e.to_string()))?;
            if let Some(g) = &schedule.guidance {
                self.check_guidance(g).map_err(at)?;
            }
            if schedule.next_after(chrono::Utc::now()).is_none() {
                return Err(at(format!("cron `{}` never fires", schedule.cron)));
            }
        }
        Ok(())
    }

    /// Why `guidance` cannot be a job's of this workflow: too long, a NUL byte, or a leading
    /// `-` where a command step starts an argument with it.
    pub(crate) fn check_guidance(&self, g: &str) -> Result<(), String> {
        if g.len() > crate::engine::MAX_GUIDANCE_BYTES {
            return Err(format!(
                "guidance is {} bytes; the limit is {}",
                g.len(),
                crate::engine::MAX_GUIDANCE_BYTES
            ));
        }
        if g.contains('\0') {
            return Err("guidance contains a NUL byte".into());
        }
        if g.starts_with('-') && self.guidance_leads_an_argument() {
            return Err(format!(
                "guidance starts with `-`, and workflow `{}` passes it to a command at the \
                 start of an argument: it may not look like an option",
                self.name
            ));
        }
        Ok(())
    }

    /// Applies defaults and checks `given` against the declared parameters.
    pub fn resolve_params(
        &self,
        given: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, ParamError> {
        if let Some(unknown) = given
            .keys()
            .find(|k| !self.parameters.iter().any(|p| &p.name == *k))
        {
            return Err(ParamError::Unknown {
                name: unknown.clone(),
                expected: self.parameters.iter().map(|p| p.name.clone()).collect(),
            });
        }
        let mut out = BTreeMap::new();
        for p in &self.parameters {
            match (given.get(&p.name), &p.default) {
                (Some(v), _) => {
                    p.check(v).map_err(|reason| ParamError::Invalid {
                        name: p.name.clone(),
                        reason,
                    })?;
                    out.insert(p.name.clone(), v.clone());
                }
                (None, Some(d)) => {
                    out.insert(p.name.clone(), d.clone());
                }
                (None, None) if p.required => {
                    return Err(ParamError::Missing {
                        name: p.name.clone(),
                    })
                }
                (None, None) => {}
            }
        }
        Ok(out)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A workflow definition that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkflowError {
    /// The definition is inconsistent.
    #[error("workflow `{workflow}` is invalid: {reason}")]
    Invalid {
        /// The workflow.
        workflow: String,
        /// What is wrong.
        reason: String,
    },
    /// Two workflows share a name.
    #[error("workflow `{0}` is defined twice")]
    Duplicate(String),
    /// A step names an agent that is not registered.
    #[error("workflow `{workflow}` step `{step}` uses agent `{agent}`, which is not registered")]
    UnknownAgent {
        /// The workflow.
        workflow: String,
        /// The step.
        step: String,
        /// The agent named.
        agent: String,
    },
}

/// Parameters a trigger gave that do not fit the workflow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    /// A parameter the workflow does not declare.
    #[error("unknown parameter `{name}` (the workflow accepts: {})", if expected.is_empty() { "none".to_owned() } else { expected.join(", ") })]
    Unknown {
        /// The parameter given.
        name: String,
        /// The declared ones.
        expected: Vec<String>,
    },
    /// A required parameter with no value.
    #[error("missing required parameter `{name}`")]
    Missing {
        /// The parameter.
        name: String,
    },
    /// A value the parameter does not accept (too long, not a choice, not matching its pattern,
    /// looking like an option).
    #[error("parameter `{name}` {reason}")]
    Invalid {
        /// The parameter.
        name: String,
        /// Why (never repeating the value).
        reason: String,
    },
}

/// A template with unbalanced braces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template has an unclosed `{{{{` at byte {0}")]
pub struct TemplateError(pub usize);

/// The placeholder an argument template starts with (`{{guidance}} and more` → `guidance`),
/// if it starts with one.
pub(crate) fn leading_placeholder(template: &str) -> Option<&str> {
    match Pieces::of(template).next() {
        Some(Ok(("", name))) => name,
        _ => None,
    }
}

/// Whether a command argument rendered from `template` starts with `-` because of a value put
/// into it, not because its author wrote a flag: the argument would reach the program as an
/// option made of user text (a guidance, a forge's field, an agent's output). A parameter's
/// value is exempt: it was checked when the job was submitted, where a value starting with
/// `-` needs a `pattern` that admits it.
pub(crate) fn looks_like_an_injected_option(
    template: &str,
    rendered: &str,
    params: &BTreeMap<String, String>,
) -> bool {
    if !rendered.starts_with('-') || template.starts_with('-') {
        return false;
    }
    !leading_placeholder(template)
        .and_then(|name| params.get(name))
        .is_some_and(|value| value.starts_with('-'))
}

/// The placeholder names of a template, in order.
fn placeholders(template: &str) -> Result<impl Iterator<Item = &str>, TemplateError> {
    let names = Pieces::of(template)
        .filter_map(|piece| piece.map(|(_, name)| name).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(names.into_iter())
}

/// A template split at its placeholders: the text before each with the placeholder's name
/// (trimmed), then the text after the last with no name. An unclosed `{{` ends it with an
/// error. What [`render`] fills and [`placeholders`] lists, read the same way.
struct Pieces<'a> {
    rest: &'a str,
    /// Where `rest` starts in the template.
    offset: usize,
    done: bool,
}

impl<'a> Pieces<'a> {
    fn of(template: &'a str) -> Self {
        Self {
            rest: template,
            offset: 0,
            done: false,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Result<(&'a str, Option<&'a str>), TemplateError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let Some(start) = find_doubled(self.rest, '{') else {
            self.done = true;
            return Some(Ok((self.rest, None)));
        };
        let after = &self.rest[start + 2..];
        let Some(end) = find_doubled(after, '}') else {
            self.done = true;
            return Some(Err(TemplateError(self.offset + start)));
        };
        let piece = (&self.rest[..start], Some(after[..end].trim()));
        let consumed = start + 2 + end + 2;
        self.offset += consumed;
        self.rest = &self.rest[consumed..];
        Some(Ok(piece))
    }
}

/// The values a template can see.
#[derive(Debug, Clone, Copy)]
pub struct TemplateContext<'a> {
    /// `{{guidance}}`.
    pub guidance: Option<&'a str>,
    /// `{{project_path}}`.
    pub project_path: &'a str,
    /// `{{<parameter>}}`.
    pub params: &'a BTreeMap<String, String>,
    /// `{{trigger.<field>}}`.
    pub trigger: &'a TriggerInfo,
    /// `{{steps.<name>.output}}`.
    pub step_outputs: &'a BTreeMap<String, String>,
    /// `{{steps.<name>.structured.<field>}}`: the steps' structured answers.
    pub step_structured: &'a BTreeMap<String, serde_json::Value>,
}

/// `steps.<name>.output` → `(name, None)`; `steps.<name>.structured.<path>` →
/// `(name, Some(path))`.
fn step_placeholder(ph: &str) -> Option<(&str, Option<&str>)> {
    let rest = ph.strip_prefix("steps.")?;
    if let Some(step) = rest.strip_suffix(".output") {
        return Some((step, None));
    }
    let (step, path) = rest.split_once(".structured.")?;
    (!path.is_empty() && !step.is_empty()).then_some((step, Some(path)))
}

/// The value at a dotted `path` (`a.b.0`) of `value`, as template text: strings as they are,
/// anything else as JSON.
fn structured_field(value: &serde_json::Value, path: &str) -> Option<String> {
    let mut v = value;
    for key in path.split('.') {
        v = match v {
            serde_json::Value::Object(m) => m.get(key)?,
            serde_json::Value::Array(a) => a.get(key.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// Fills a template in one pass. Unknown placeholders and missing values render as empty text;
/// [`Workflow::validate`] refuses unknown placeholders before any job runs.
pub fn render(template: &str, ctx: &TemplateContext<'_>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for piece in Pieces::of(template) {
        let (text, name) = piece?;
        out.push_str(text);
        let Some(name) = name else { continue };
        let value: Option<String> = match name {
            "guidance" => ctx.guidance.map(str::to_owned),
            "project_path" => Some(ctx.project_path.to_owned()),
            _ => {
                if let Some(field) = name.strip_prefix("trigger.") {
                    ctx.trigger.field(field)
                } else if let Some((step, path)) = step_placeholder(name) {
                    match path {
                        None => ctx.step_outputs.get(step).cloned(),
                        Some(path) => ctx
                            .step_structured
                            .get(step)
                            .and_then(|v| structured_field(v, path)),
                    }
                } else {
                    ctx.params.get(name).cloned()
                }
            }
        };
        out.push_str(value.as_deref().unwrap_or(""));
    }
    Ok(out)
}

/// Where `c` first occurs twice in a row in `text` (`c` is ASCII): what `text.find("{{")` finds,
/// by a search for one byte (`memchr`) instead of a substring searcher set up at every call.
fn find_doubled(text: &str, c: char) -> Option<usize> {
    debug_assert!(c.is_ascii());
    let mut from = 0;
    while let Some(i) = text[from..].find(c) {
        let at = from + i;
        // `c` is one byte, so `at + 1` is a character boundary.
        if text[at + 1..].starts_with(c) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// The workflows a server offers. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct WorkflowCatalog {
    /// By name; a job holds its workflow's name as the key here (see [`Job::workflow`]).
    ///
    /// [`Job::workflow`]: crate::Job::workflow
    inner: Arc<BTreeMap<Arc<str>, Cataloged>>,
}

/// A workflow as the catalog keeps it: with its step names, shared by the jobs of the
/// workflow (their [`Progress`](crate::Progress)).
#[derive(Debug)]
struct Cataloged {
    workflow: Arc<Workflow>,
    steps: Box<[Arc<str>]>,
}

/// A workflow of the catalog with what its jobs share: its name and its step names.
pub(crate) struct Named<'a> {
    pub(crate) name: Arc<str>,
    pub(crate) workflow: Arc<Workflow>,
    pub(crate) steps: &'a [Arc<str>],
}

impl WorkflowCatalog {
    /// Validates every workflow and builds the catalog.
    pub fn new(workflows: impl IntoIterator<Item = Workflow>) -> Result<Self, WorkflowError> {
        let mut map = BTreeMap::new();
        for wf in workflows {
            wf.validate()?;
            if map.contains_key(wf.name.as_str()) {
                return Err(WorkflowError::Duplicate(wf.name));
            }
            let steps = wf
                .steps
                .iter()
                .map(|s| Arc::from(s.name.as_str()))
                .collect();
            map.insert(
                Arc::from(wf.name.as_str()),
                Cataloged {
                    workflow: Arc::new(wf),
                    steps,
                },
            );
        }
        Ok(Self {
            inner: Arc::new(map),
        })
    }

    /// The workflow called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<Workflow>> {
        self.inner.get(name).map(|c| Arc::clone(&c.workflow))
    }

    /// The workflow called `name` with its name and its step names as the catalog holds them,
    /// shared by the jobs of the workflow.
    pub(crate) fn get_named(&self, name: &str) -> Option<Named<'_>> {
        self.inner.get_key_value(name).map(|(n, c)| Named {
            name: Arc::clone(n),
            workflow: Arc::clone(&c.workflow),
            steps: &c.steps,
        })
    }

    /// All workflows, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workflow>> {
        self.inner.values().map(|c| &c.workflow)
    }

    /// How many there are.
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf() -> Workflow {
        Workflow::new("review")
            .param(Parameter::new("iteration").with_default("1"))
            .param(Parameter::new("target").required())
            .step(Step::prompt("draft", "claude", "Do {{ guidance }} on {{target}} #{{iteration}} in {{project_path}} for {{trigger.repo}}"))
            .step(Step::prompt("review", "claude", "Review: {{steps.draft.output}}").resuming())
    }

    #[test]
    fn valid_workflow_passes() {
        wf().validate().unwrap();
        assert_eq!(WorkflowCatalog::new([wf()]).unwrap().len(), 1);
    }

    #[test]
    fn invalid_workflows_are_refused_with_reasons() {
        let cases: Vec<(Workflow, &str)> = vec![
            (Workflow::new("x"), "no steps"),
            (
                Workflow::new("bad name!").step(Step::prompt("a", "c", "p")),
                "name",
            ),
            (
                Workflow::new("x").step(Step::prompt("a", "c", "{{nope}}")),
                "{{nope}}",
            ),
            (
                Workflow::new("x")
                    .step(Step::prompt("a", "c", "{{steps.b.output}}"))
                    .step(Step::prompt("b", "c", "p")),
                "steps.b.output",
            ),
            (
                Workflow::new("x").step(Step::prompt("a", "c", "p").resuming()),
                "no previous step",
            ),
            (
                Workflow::new("x")
                    .step(Step::prompt("a", "c", "p"))
                    .step(Step::prompt("a", "c", "p")),
                "twice",
            ),
            (
                Workflow::new("x").step(Step::prompt("a", "c", "{{oops")),
                "unclosed",
            ),
            (
                Workflow::new("x")
                    .step(Step::prompt("a", "c", "p"))
                    .with_max_attempts(0),
                "max_attempts",
            ),
        ];
        for (w, needle) in cases {
            let e = w.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
        let dup = WorkflowCatalog::new([wf(), wf()]).unwrap_err();
        assert_eq!(dup, WorkflowError::Duplicate("review".into()));
    }

    #[test]
    fn params_are_resolved_with_distinct_errors() {
        let w = wf();
        let mut given = BTreeMap::new();
        assert_eq!(
            w.resolve_params(&given),
            Err(ParamError::Missing {
                name: "target".into()
            })
        );
        given.insert("target".into(), "api".into());
        let r = w.resolve_params(&given).unwrap();
        assert_eq!(r["iteration"], "1");
        assert_eq!(r["target"], "api");
        given.insert("bogus".into(), "1".into());
        assert!(
            matches!(w.resolve_params(&given), Err(ParamError::Unknown { name, .. }) if name == "bogus")
        );
    }

    #[test]
    fn parameter_values_are_checked() {
        let w = Workflow::new("w")
            .param(Parameter::new("rev").with_pattern(r"[A-Za-z0-9._/~^-]+"))
            .param(Parameter::new("level").with_choices(["low", "high"]))
            .param(Parameter::new("note").with_max_length(8))
            .param(Parameter::new("free"))
            .param(Parameter::new("flag").with_pattern("--[a-z]+"))
            .step(Step::command("s", "sh", ["git", "log", "{{rev}}"]));
        w.validate().unwrap();
        let check = |name: &str, value: &str| {
            let given = BTreeMap::from([(name.to_owned(), value.to_owned())]);
            w.resolve_params(&given).map(|_| ()).map_err(|e| match e {
                ParamError::Invalid { name, reason } => (name, reason),
                other => panic!("{other}"),
            })
        };
        // Accepted.
        assert_eq!(check("rev", "main~2"), Ok(()));
        assert_eq!(check("rev", "a-b"), Ok(()));
        assert_eq!(check("level", "high"), Ok(()));
        assert_eq!(check("note", "12345678"), Ok(()));
        assert_eq!(check("free", "any text, with spaces"), Ok(()));
        assert_eq!(
            check("flag", "--verbose"),
            Ok(()),
            "a pattern may admit a dash"
        );
        // Refused, each with the parameter's name and a reason that does not echo the value.
        for (name, value, why) in [
            ("rev", "--output=/tmp/x", "pattern"),
            ("rev", "main;rm", "pattern"),
            ("rev", "", "pattern"),
            ("level", "medium", "one of: low, high"),
            ("note", "123456789", "limit is 8"),
            ("free", "-x", "starts with `-`"),
            ("free", "--output=/etc/passwd", "starts with `-`"),
            ("free", "a\u{0}b", "control character"),
            (
                "free",
                &"x".repeat(DEFAULT_PARAM_MAX_LENGTH + 1),
                "limit is 1024",
            ),
            ("flag", "-v", "pattern"),
        ] {
            let (n, reason) = check(name, value).expect_err(value);
            assert_eq!(n, name);
            assert!(reason.contains(why), "{name}={value:?}: {reason}");
            if value.len() > 3 {
                assert!(!reason.contains(value), "{reason}");
            }
        }
        let err = w
            .resolve_params(&BTreeMap::from([("free".into(), "-x".into())]))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("parameter `free` starts with `-`"),
            "{err}"
        );
    }

    #[test]
    fn bad_patterns_and_defaults_are_workflow_errors() {
        let bad = Workflow::new("w")
            .param(Parameter::new("p").with_pattern("("))
            .step(Step::prompt("s", "a", "x"));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("invalid pattern"));
        let bad = Workflow::new("w")
            .param(Parameter::new("p").with_default("-rf"))
            .step(Step::prompt("s", "a", "x"));
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default of parameter `p`"));
        let ok: Workflow = serde_norway::from_str(
            "{ name: w, parameters: [{ name: p, pattern: '[a-z]+', choices: [a, b], max_length: 4 }], steps: [{ name: s, prompt: x }] }",
        )
        .unwrap();
        assert_eq!(ok.parameters[0].choices, ["a", "b"]);
        assert!(serde_norway::from_str::<Workflow>(
            "{ name: w, parameters: [{ name: p, patern: x }], steps: [{ name: s, prompt: x }] }"
        )
        .is_err());
    }

    #[test]
    fn render_fills_known_placeholders_once() {
        let mut params = BTreeMap::new();
        params.insert("target".to_owned(), "{{guidance}}".to_owned());
        params.insert("iteration".to_owned(), "2".to_owned());
        let mut trigger = TriggerInfo::new("github");
        trigger.repo = Some("org/repo".into());
        let outputs = BTreeMap::new();
        let ctx = TemplateContext {
            guidance: Some("fix $(rm -rf /)"),
            project_path: "/srv/p",
            params: &params,
            trigger: &trigger,
            step_outputs: &outputs,
            step_structured: &BTreeMap::new(),
        };
        let s = render(&wf().steps[0].prompt.clone().unwrap(), &ctx).unwrap();
        assert_eq!(
            s,
            "Do fix $(rm -rf /) on {{guidance}} #2 in /srv/p for org/repo"
        );
        assert_eq!(render("a {{x", &ctx), Err(TemplateError(2)));
        // Single braces are text; the first `{{` opens and the first `}}` after it closes.
        assert_eq!(
            render("a{b} {{{iteration}}} {{ iteration }}}", &ctx),
            Ok("a{b} } 2}".to_owned())
        );
        assert_eq!(render("{ {{iteration}", &ctx), Err(TemplateError(2)));
        assert_eq!(
            placeholders("{{{a}} {b} {{ c }}").map(Iterator::collect::<Vec<_>>),
            Ok(vec!["{a", "c"])
        );
    }
}
