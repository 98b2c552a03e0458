//! # aiwg-core
//!
//! The engine behind aiwg: jobs, workflows, executors, stores, events.
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

pub mod config;
pub mod dispatch;
pub mod engine;
pub mod event;
pub mod http;
pub mod executor;
pub mod job;
pub mod policy;
pub mod request;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod util;
pub mod workflow;

pub use engine::{Engine, EngineBuilder, EngineError, JobObserver, SubmitError};
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
pub use policy::{PolicyError, ProjectPolicy};
pub use request::JobRequest;
pub use store::{JobStore, MemoryStore};
pub use workflow::{ParamError, Parameter, Step, Workflow, WorkflowCatalog, WorkflowError};
