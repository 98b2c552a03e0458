//! # aiwg-core
//!
//! The engine behind aiwg: jobs, workflows, executors, stores, events.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod dispatch;
pub mod event;
pub mod executor;
pub mod job;
pub mod request;
pub mod util;
pub mod workflow;

pub use event::{JobEvent, JobEventKind};
#[cfg(any(test, feature = "test-util"))]
pub use executor::MockExecutor;
pub use executor::{
    AgentEvent, AgentRequest, AgentResult, BackendHealth, Capabilities, CircuitState, EventSink,
    Executor, ExecutorError, ExecutorRegistry, Health, LogStream, RequestError, Usage,
};
pub use job::{
    Job, JobError, JobId, JobResult, JobStatus, Progress, StatusChange, StepResult, TriggerInfo,
};
pub use request::JobRequest;
pub use workflow::{ParamError, Parameter, Step, Workflow, WorkflowCatalog, WorkflowError};
