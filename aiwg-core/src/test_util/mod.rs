//! Test support (feature `test-util`): a [`ScriptedExecutor`] that plays a script instead of
//! running an agent, `MockExecutor` (mockall) re-exported, and the store conformance
//! suites: [`job_store_suite`] for every [`JobStore`](crate::JobStore), [`dispatch_store_suite`]
//! for every [`DispatchStore`](crate::dispatch::DispatchStore), [`audit_store_suite`] for every
//! [`AuditStore`](crate::audit::AuditStore) (the fourth, for inbound
//! de-duplication stores, is `aiwg_webhook::testing::dedup_store_suite`).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use aiwg_core::{Engine, JobRequest, JobStatus, Step, Workflow};
//! use aiwg_core::test_util::ScriptedExecutor;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // Fails once, then succeeds: with two attempts the job completes on the second.
//! let flaky = ScriptedExecutor::succeeding("ok").fail_times(1);
//! let engine = Engine::builder()
//!     .executor("flaky", Arc::new(flaky.clone()))
//!     .workflow(Workflow::new("w").with_max_attempts(2).step(Step::prompt("s", "flaky", "go")))
//!     .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
//!     .poll_interval(Duration::from_millis(5))
//!     .build()
//!     .unwrap();
//! let job = engine.submit(JobRequest::new("w")).await.unwrap();
//! let job = engine.wait(job.id, Duration::from_secs(10)).await.unwrap();
//! assert_eq!(job.status, JobStatus::Completed);
//! assert_eq!(job.attempt, 2);
//! assert_eq!(flaky.calls(), 2);
//! # }
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::executor::MockExecutor;
use crate::executor::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError, Health,
};

mod audit_store_suite;
// Its WebSocket client comes with the `test-util` feature, not with this crate's own tests.
#[cfg(feature = "test-util")]
pub mod conformance;
mod dispatch_store_suite;
mod job_store_suite;
pub mod jwt;
mod metrics_capture;
pub use audit_store_suite::audit_store_suite;
pub use dispatch_store_suite::dispatch_store_suite;
pub use job_store_suite::{job_store_suite, sample_job};
pub use metrics_capture::MetricsCapture;

/// The names of one of a job's [`Progress`](crate::Progress) lists, as text, for assertions:
/// `assert_eq!(step_names(&job.progress.completed), ["draft"])`.
#[must_use]
pub fn step_names(list: &[Arc<str>]) -> Vec<&str> {
    list.iter().map(|s| &**s).collect()
}

#[derive(Default)]
struct Shared {
    calls: AtomicUsize,
    cancelled: AtomicUsize,
    finished: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    requests: Mutex<Vec<AgentRequest>>,
    started: Notify,
    stopped: Notify,
}

#[derive(Clone)]
enum Behaviour {
    Succeed,
    Hang,
}

/// An [`Executor`] that plays a script: emits events, waits, fails a number of times, succeeds
/// or hangs until cancelled — and records what it was asked. Clones share their records.
#[derive(Clone)]
pub struct ScriptedExecutor {
    output: String,
    session: Option<String>,
    cost: Option<(f64, crate::Usage)>,
    events: Vec<AgentEvent>,
    delay: Duration,
    fail_times: usize,
    fail_error: ExecutorError,
    behaviour: Behaviour,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ScriptedExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedExecutor")
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl ScriptedExecutor {
    /// Succeeds at once with `output`.
    #[must_use]
    pub fn succeeding(output: impl Into<String>) -> Self {
        Self {
            output: output.into(),
            session: None,
            cost: None,
            events: Vec::new(),
            delay: Duration::ZERO,
            fail_times: 0,
            fail_error: ExecutorError::failed("scripted failure"),
            behaviour: Behaviour::Succeed,
            shared: Arc::default(),
        }
    }

    /// Never returns until cancelled (then returns [`ExecutorError::Cancelled`]).
    #[must_use]
    pub fn hanging() -> Self {
        Self {
            behaviour: Behaviour::Hang,
            ..Self::succeeding("")
        }
    }

    /// Emits `event` before finishing (in order).
    #[must_use]
    pub fn emit(mut self, event: AgentEvent) -> Self {
        self.events.push(event);
        self
    }

    /// Takes `delay` before answering (cancellation still stops it at once).
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Fails the first `n` calls.
    #[must_use]
    pub fn fail_times(mut self, n: usize) -> Self {
        self.fail_times = n;
        self
    }

    /// The error of scripted failures (default: a retryable `Failed`).
    #[must_use]
    pub fn fail_with(mut self, error: ExecutorError) -> Self {
        self.fail_error = error;
        self
    }

    /// Reports `session` as the session id.
    #[must_use]
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Reports a cost and usage.
    #[must_use]
    pub fn cost(mut self, usd: f64, usage: crate::Usage) -> Self {
        self.cost = Some((usd, usage));
        self
    }

    /// Calls so far.
    #[must_use]
    pub fn calls(&self) -> usize {
        self.shared.calls.load(Ordering::SeqCst)
    }

    /// Calls that ended because the token was cancelled.
    #[must_use]
    pub fn cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Calls that returned (any outcome).
    #[must_use]
    pub fn finished(&self) -> usize {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Calls running now.
    #[must_use]
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// The most calls that ran at once.
    #[must_use]
    pub fn max_running(&self) -> usize {
        self.shared.max_running.load(Ordering::SeqCst)
    }

    /// Every request received, in order.
    #[must_use]
    pub fn requests(&self) -> Vec<AgentRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits (up to `timeout`) until at least `n` calls have started.
    pub async fn wait_started(&self, n: usize, timeout: Duration) -> bool {
        Self::wait_for(&self.shared.started, || self.calls() >= n, timeout).await
    }

    /// Waits (up to `timeout`) until at least `n` calls were stopped by their token.
    pub async fn wait_cancelled(&self, n: usize, timeout: Duration) -> bool {
        Self::wait_for(&self.shared.stopped, || self.cancelled() >= n, timeout).await
    }

    async fn wait_for(notify: &Notify, done: impl Fn() -> bool, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            loop {
                let notified = notify.notified();
                if done() {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }
}

struct RunningGuard<'a>(&'a Shared);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Executor for ScriptedExecutor {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let s = &*self.shared;
        s.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        let call = s.calls.fetch_add(1, Ordering::SeqCst);
        let now = s.running.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_running.fetch_max(now, Ordering::SeqCst);
        let _guard = RunningGuard(s);
        s.started.notify_waiters();
        for ev in &self.events {
            events.emit(ev.clone());
        }
        let wait = async {
            match self.behaviour {
                Behaviour::Hang => std::future::pending::<()>().await,
                // A zero delay must not touch the timer: `sleep(0)` waits for the next tick.
                Behaviour::Succeed if self.delay.is_zero() => {}
                Behaviour::Succeed => tokio::time::sleep(self.delay).await,
            }
        };
        tokio::select! {
            () = wait => {}
            () = cancel.cancelled() => {
                s.cancelled.fetch_add(1, Ordering::SeqCst);
                s.stopped.notify_waiters();
                return Err(ExecutorError::Cancelled);
            }
        }
        if call < self.fail_times {
            return Err(self.fail_error.clone());
        }
        let mut result = AgentResult::text(self.output.clone());
        result.session_id.clone_from(&self.session);
        if let Some((usd, usage)) = self.cost {
            result = result.with_cost(usd, usage);
        }
        Ok(result)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, self.cost.is_some())
    }

    fn kind(&self) -> &'static str {
        "scripted"
    }

    async fn health(&self) -> Health {
        Health::healthy()
    }
}
