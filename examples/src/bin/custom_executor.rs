//! Writing an executor for your own backend, registering it, and running a two-step workflow
//! whose second step resumes the first one's session.
//!
//! ```text
//! cargo run -p aiwg-examples --bin custom_executor
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, Engine, EventSink, Executor,
    ExecutorError, Health, JobRequest, Step, Usage, Workflow,
};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// A pretend remote agent: "thinks" for a moment per word, honours cancellation, keeps sessions.
#[derive(Default)]
struct WordCounter {
    sessions: AtomicU64,
}

#[async_trait]
impl Executor for WordCounter {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let session = request
            .resume_session
            .clone()
            .unwrap_or_else(|| format!("wc-{}", self.sessions.fetch_add(1, Ordering::Relaxed)));
        events.emit(AgentEvent::Init {
            session_id: Some(session.clone()),
            model: None,
            tools: vec![],
        });
        let words = request.prompt.split_whitespace().count();
        for i in 0..words {
            tokio::select! {
                () = cancel.cancelled() => return Err(ExecutorError::Cancelled),
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            events.emit(AgentEvent::Text {
                text: format!("word {}", i + 1),
            });
        }
        Ok(AgentResult::text(format!("{words} words"))
            .with_session(session)
            .with_cost(0.0, Usage::new(words as u64, 1)))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(true, true, true)
    }

    fn kind(&self) -> &'static str {
        "word-counter"
    }

    async fn health(&self) -> Health {
        Health::healthy()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::builder()
        .executor("wc", Arc::new(WordCounter::default()))
        .workflow(
            Workflow::new("count")
                .step(Step::prompt("first", "wc", "{{guidance}}"))
                .step(Step::prompt("again", "wc", "You said: {{steps.first.output}}").resuming()),
        )
        .build()?;
    let job = engine
        .submit(JobRequest::new("count").guidance("one two three four"))
        .await?;
    let job = engine.wait(job.id, Duration::from_secs(10)).await?;
    let result = job.result.expect("a result");
    println!("status: {}", job.status);
    for step in &result.steps {
        println!(
            "{}: {} (session {:?})",
            step.name, step.output, step.session_id
        );
    }
    assert_eq!(
        result.steps[0].session_id, result.steps[1].session_id,
        "the second step resumed"
    );
    engine.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
