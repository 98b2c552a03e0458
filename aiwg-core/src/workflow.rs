//! Workflows (named, parameterised lists of agent steps), the catalog that holds them, and the
//! template language of their prompts.
//!
//! Templates know exactly these placeholders and evaluate nothing else: `{{guidance}}`,
//! `{{project_path}}`, `{{<parameter>}}`, `{{trigger.<field>}}` and `{{steps.<name>.output}}`.
//! Substituted values are never scanned again, so a guidance containing `{{x}}` stays literal.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::TriggerInfo;

/// A parameter a workflow accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
}

impl Parameter {
    /// An optional parameter with no default.
    #[must_use]
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            required: false,
            default: None,
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
        }
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
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(err("timeout must be greater than zero".into()));
        }
        let mut params = HashSet::new();
        for p in &self.parameters {
            if !valid_name(&p.name) || p.name == "guidance" && p.required {
                return Err(err(format!("parameter `{}` has an invalid name", p.name)));
            }
            if !params.insert(p.name.as_str()) {
                return Err(err(format!("parameter `{}` is declared twice", p.name)));
            }
        }
        let mut earlier: HashSet<&str> = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
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
                        _ if ph.starts_with("steps.") => ph
                            .strip_prefix("steps.")
                            .and_then(|r| r.strip_suffix(".output"))
                            .is_some_and(|s| earlier.contains(s)),
                        other => params.contains(other),
                    };
                    if !ok {
                        return Err(err(format!(
                            "step `{}` uses `{{{{{ph}}}}}`, which is neither a parameter, guidance, project_path, trigger.<field> nor the output of an earlier step",
                            step.name
                        )));
                    }
                }
            }
            if !earlier.insert(step.name.as_str()) {
                return Err(err(format!("step `{}` is declared twice", step.name)));
            }
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
}

/// A template with unbalanced braces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template has an unclosed `{{{{` at byte {0}")]
pub struct TemplateError(pub usize);

/// The placeholder names of a template, in order.
fn placeholders(template: &str) -> Result<impl Iterator<Item = &str>, TemplateError> {
    let mut found = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError(offset + start))?;
        found.push(after[..end].trim());
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    Ok(found.into_iter())
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
}

/// Fills a template in one pass. Unknown placeholders and missing values render as empty text;
/// [`Workflow::validate`] refuses unknown placeholders before any job runs.
pub fn render(template: &str, ctx: &TemplateContext<'_>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError(offset + start))?;
        let name = after[..end].trim();
        let value: Option<String> = match name {
            "guidance" => ctx.guidance.map(str::to_owned),
            "project_path" => Some(ctx.project_path.to_owned()),
            _ => {
                if let Some(field) = name.strip_prefix("trigger.") {
                    ctx.trigger.field(field)
                } else if let Some(step) = name
                    .strip_prefix("steps.")
                    .and_then(|r| r.strip_suffix(".output"))
                {
                    ctx.step_outputs.get(step).cloned()
                } else {
                    ctx.params.get(name).cloned()
                }
            }
        };
        out.push_str(value.as_deref().unwrap_or(""));
        let consumed = start + 2 + end + 2;
        offset += consumed;
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The workflows a server offers. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct WorkflowCatalog {
    inner: Arc<BTreeMap<String, Arc<Workflow>>>,
}

impl WorkflowCatalog {
    /// Validates every workflow and builds the catalog.
    pub fn new(workflows: impl IntoIterator<Item = Workflow>) -> Result<Self, WorkflowError> {
        let mut map = BTreeMap::new();
        for wf in workflows {
            wf.validate()?;
            if map.contains_key(&wf.name) {
                return Err(WorkflowError::Duplicate(wf.name));
            }
            map.insert(wf.name.clone(), Arc::new(wf));
        }
        Ok(Self {
            inner: Arc::new(map),
        })
    }

    /// The workflow called `name`.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<Workflow>> {
        self.inner.get(name).cloned()
    }

    /// All workflows, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Workflow>> {
        self.inner.values()
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
        };
        let s = render(&wf().steps[0].prompt.clone().unwrap(), &ctx).unwrap();
        assert_eq!(
            s,
            "Do fix $(rm -rf /) on {{guidance}} #2 in /srv/p for org/repo"
        );
        assert_eq!(render("a {{x", &ctx), Err(TemplateError(2)));
    }
}
