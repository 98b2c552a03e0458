//! Testing code that uses aiwg without any agent: a mockall `MockExecutor` with expectations,
//! and a `ScriptedExecutor` that fails once, so the retry path runs too.
//!
//! ```text
//! cargo run -p aiwg-examples --features test-util --bin mock_testing
//! ```

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::{MockExecutor, ScriptedExecutor};
use aiwg_core::{AgentResult, Capabilities, Engine, Health, JobRequest, JobStatus, Step, Workflow};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. mockall: assert on the exact request the engine sends.
    let mut mock = MockExecutor::new();
    mock.expect_execute()
        .withf(|req, _, _| req.prompt == "Fix the flaky test in src/lib.rs")
        .times(1)
        .returning(|_, _, _| Ok(AgentResult::text("fixed").with_exit_code(0)));
    mock.expect_capabilities().returning(Capabilities::default);
    mock.expect_kind().return_const("mock");
    mock.expect_health().returning(Health::healthy);

    // 2. A scripted agent that fails once, then succeeds.
    let flaky = ScriptedExecutor::succeeding("ok on the second try").fail_times(1);

    let engine = Engine::builder()
        .executor("mock", Arc::new(mock))
        .executor("flaky", Arc::new(flaky.clone()))
        .workflow(Workflow::new("fix").step(Step::prompt("fix", "mock", "Fix {{guidance}}")))
        .workflow(
            Workflow::new("retry")
                .with_max_attempts(2)
                .step(Step::prompt("go", "flaky", "go")),
        )
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()?;

    let fix = engine
        .submit(JobRequest::new("fix").guidance("the flaky test in src/lib.rs"))
        .await?;
    let fix = engine.wait(fix.id, Duration::from_secs(5)).await?;
    assert_eq!(fix.status, JobStatus::Completed);
    println!(
        "fix: {} -> {:?}",
        fix.status,
        fix.result.as_ref().map(|r| &r.summary)
    );

    let retry = engine.submit(JobRequest::new("retry")).await?;
    let retry = engine.wait(retry.id, Duration::from_secs(5)).await?;
    assert_eq!(
        (retry.status, retry.attempt, flaky.calls()),
        (JobStatus::Completed, 2, 2)
    );
    println!("retry: {} after {} attempts", retry.status, retry.attempt);
    engine.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
