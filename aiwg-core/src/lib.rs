//! # aiwg-core
//!
//! The engine behind aiwg. A host service turns outside events into **jobs** — a named
//! [`Workflow`] of agent steps run in a project directory by an [`Executor`] — and this crate
//! stores them, schedules them, runs them, records everything that happens, and tells whoever
//! listens. The HTTP routers (`aiwg-axum`, `aiwg-actix`), the platform webhooks
//! (`aiwg-webhook`) and the agents (`aiwg-agents`) are thin layers over what is here.
//!
//! The pipeline, in the order a job goes through it:
//!
//! 1. **Request** — everything starts as a [`JobRequest`]: a workflow name, parameters,
//!    guidance, a project path or key, an optional idempotency key, and [`TriggerInfo`] saying
//!    who asked and from where.
//! 2. **Validation** — [`Engine::submit`] checks the request against the [`WorkflowCatalog`]
//!    (unknown or missing [`Parameter`]s are distinct [`ParamError`]s) and the
//!    [`ProjectPolicy`] (the project must resolve, symlinks followed, inside a configured root;
//!    each refusal is its own [`PolicyError`]).
//! 3. **Storage** — the job is written to a [`JobStore`] ([`MemoryStore`], or `PgStore` with the
//!    `postgres` feature) in status `queued`. Every change from here on is a [`JobEvent`] with a
//!    per-job sequence number, and statuses move only through the one transition table of
//!    [`JobStatus::can_transition_to`].
//! 4. **Scheduling** — a pool of workers claims jobs (highest priority first, FIFO within a
//!    priority, a per-project concurrency limit) under a **lease**; heartbeats extend it, and
//!    every write is fenced by it, so a worker that lost its lease can never overwrite the job.
//! 5. **Execution** — each [`Step`]'s template is rendered (`{{guidance}}`, parameters,
//!    `{{trigger.repo}}`, `{{steps.<name>.output}}`, nothing else) into an [`AgentRequest`] and
//!    run by the step's executor from the [`ExecutorRegistry`]. The executor streams
//!    [`AgentEvent`]s and honours a cancellation token; step and job timeouts, cancels and
//!    shutdown all arrive through it.
//! 6. **Outcome** — success, or a failure retried with exponential backoff and jitter until
//!    `max_attempts`, then dead letter; or `cancelled` / `timed_out`.
//! 7. **Publication** — every event goes to live subscribers ([`Engine::subscribe`] replays a
//!    job's history, then follows it to its end) and to [`JobObserver`]s such as the outbound
//!    webhook [`dispatch::Dispatcher`], which signs and retries deliveries (Standard Webhooks).
//!
//! Around it: [`http`] decides every status code, header and body of the HTTP API for both
//! routers; [`audit`] records every trigger attempt, accepted or refused, for `GET /audit`;
//! [`config`] reads the YAML configuration; `test_util` (feature `test-util`) has the
//! [`ScriptedExecutor`](test_util::ScriptedExecutor), mockall's `MockExecutor`, and the store and
//! HTTP conformance suites.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use aiwg_core::test_util::ScriptedExecutor;
//! use aiwg_core::{Engine, JobRequest, JobStatus, Parameter, Step, Workflow};
//! use futures_util::StreamExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // An executor (here scripted; in production aiwg-agents' ClaudeCode, OpenCode, …).
//! let agent = ScriptedExecutor::succeeding("looks good").session("ses-1");
//!
//! // A workflow with a parameter and two steps, the second resuming the first's session.
//! let review = Workflow::new("review")
//!     .param(Parameter::new("focus").with_default("security"))
//!     .step(Step::prompt("draft", "claude", "Review {{focus}}: {{guidance}}"))
//!     .step(Step::prompt("check", "claude", "Double-check: {{steps.draft.output}}").resuming())
//!     .with_max_attempts(2);
//!
//! let engine = Engine::builder().executor("claude", Arc::new(agent.clone())).workflow(review).build()?;
//!
//! // Submit, follow the events, read the result.
//! let job = engine.submit(JobRequest::new("review").guidance("the login flow")).await?;
//! let events: Vec<_> = engine.subscribe(job.id, 0).await?.collect().await;
//! assert!(events.last().unwrap().is_terminal());
//!
//! let job = engine.get(job.id).await?;
//! assert_eq!(job.status, JobStatus::Completed);
//! assert_eq!(job.result.unwrap().steps.len(), 2);
//! assert_eq!(agent.requests()[0].prompt, "Review security: the login flow");
//! assert_eq!(agent.requests()[1].resume_session.as_deref(), Some("ses-1"));
//! engine.shutdown(Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod audit;
pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod engine;
mod error;
pub mod event;
pub mod executor;
mod fast_hash;
mod future_slot;
pub mod http;
pub mod job;
pub mod policy;
pub mod request;
pub mod schedule;
pub mod secrets;
pub mod store;
mod tally;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
mod timestamp;
pub mod util;
pub mod workflow;
pub mod workspace;

pub use engine::{Engine, EngineBuilder, EngineError, JobObserver, Submission, SubmitError};
pub use error::BackendError;
pub use event::{JobEvent, JobEventKind};
#[cfg(any(test, feature = "test-util"))]
pub use executor::MockExecutor;
pub use executor::{
    AgentEvent, AgentLimit, AgentRequest, AgentResult, BackendHealth, Capabilities, CircuitState,
    EventSink, Executor, ExecutorError, ExecutorRegistry, Health, LogStream, RequestError, Usage,
};
pub use job::{
    Approval, ApprovalDecision, Job, JobError, JobId, JobResult, JobStatus, Progress,
    ReplyCredentials, StatusChange, StepResult, TriggerInfo,
};
pub use policy::{PolicyError, ProjectPolicy};
pub use request::JobRequest;
pub use store::{JobStore, MemoryStore};
pub use workflow::{
    Concurrency, OnConflict, ParamError, Parameter, Step, Workflow, WorkflowCatalog, WorkflowError,
    WorkspaceMode,
};
