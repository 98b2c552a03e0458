//! The pool's strategies, health checks and circuit breakers, with mock members.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_agents::{Pool, Strategy};
use aiwg_core::{
    AgentRequest, AgentResult, Capabilities, CircuitState, EventSink, Executor, ExecutorError,
    Health, MockExecutor,
};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// A mock that answers its own name, counting calls.
fn named(name: &'static str, calls: Arc<AtomicUsize>) -> Arc<dyn Executor> {
    let mut m = MockExecutor::new();
    m.expect_execute().returning(move |_, _, _| {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(AgentResult::text(name))
    });
    m.expect_health().returning(Health::healthy);
    m.expect_capabilities()
        .returning(|| Capabilities::new(true, true, false));
    Arc::new(m)
}

/// A mock that fails its first `fail_first` calls, then succeeds.
fn flaky(fail_first: usize, calls: Arc<AtomicUsize>) -> Arc<dyn Executor> {
    let mut m = MockExecutor::new();
    m.expect_execute().returning(move |_, _, _| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        if n < fail_first {
            Err(ExecutorError::failed("backend down"))
        } else {
            Ok(AgentResult::text("flaky"))
        }
    });
    m.expect_health().returning(Health::healthy);
    Arc::new(m)
}

fn req() -> AgentRequest {
    AgentRequest::new("work", "/tmp")
}

async fn call(pool: &Pool) -> Result<String, ExecutorError> {
    pool.execute(req(), EventSink::discard(), CancellationToken::new())
        .await
        .map(|r| r.output)
}

fn counters(n: usize) -> Vec<Arc<AtomicUsize>> {
    (0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect()
}

#[tokio::test]
async fn round_robin_takes_turns() {
    let c = counters(3);
    let pool = Pool::builder()
        .member("a", named("a", c[0].clone()), 1)
        .member("b", named("b", c[1].clone()), 1)
        .member("c", named("c", c[2].clone()), 1)
        .build()
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(call(&pool).await.unwrap());
    }
    assert_eq!(order, ["a", "b", "c", "a", "b", "c"]);
    assert_eq!(pool.kind(), "pool");
    assert_eq!(pool.capabilities(), Capabilities::new(true, true, false));
}

#[tokio::test]
async fn weighted_follows_the_weights_smoothly() {
    let c = counters(2);
    let pool = Pool::builder()
        .strategy(Strategy::Weighted)
        .member("a", named("a", c[0].clone()), 3)
        .member("b", named("b", c[1].clone()), 1)
        .build()
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..8 {
        order.push(call(&pool).await.unwrap());
    }
    assert_eq!(c[0].load(Ordering::SeqCst), 6);
    assert_eq!(c[1].load(Ordering::SeqCst), 2);
    // Smooth: b is not starved to the end of a cycle.
    assert_eq!(order[..4], ["a", "a", "b", "a"]);
}

/// A member whose runs wait until released.
struct Gate {
    release: CancellationToken,
    started: Arc<AtomicUsize>,
}

#[async_trait]
impl Executor for Gate {
    async fn execute(
        &self,
        _request: AgentRequest,
        _events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            () = self.release.cancelled() => Ok(AgentResult::text("gate")),
            () = cancel.cancelled() => Err(ExecutorError::Cancelled),
        }
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
    fn kind(&self) -> &'static str {
        "gate"
    }
    async fn health(&self) -> Health {
        Health::healthy()
    }
}

#[tokio::test]
async fn least_connections_avoids_the_busy_member() {
    let release = CancellationToken::new();
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Gate {
        release: release.clone(),
        started: started.clone(),
    });
    let c = counters(1);
    let pool = Pool::builder()
        .strategy(Strategy::LeastConnections)
        .member("slow", gate, 1)
        .member("fast", named("fast", c[0].clone()), 1)
        .build()
        .unwrap();
    let p = pool.clone();
    let slow_run = tokio::spawn(async move { call(&p).await });
    // Wait until the first run occupies the slow member.
    tokio::time::timeout(Duration::from_secs(10), async {
        while started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    for _ in 0..5 {
        assert_eq!(call(&pool).await.unwrap(), "fast");
    }
    assert_eq!(started.load(Ordering::SeqCst), 1);
    release.cancel();
    assert_eq!(slow_run.await.unwrap().unwrap(), "gate");
    // With both idle again, ties are broken in turn: the slow member is used again.
    let mut outputs = Vec::new();
    for _ in 0..2 {
        outputs.push(call(&pool).await.unwrap());
    }
    outputs.sort();
    assert_eq!(outputs, ["fast", "gate"]);
}

fn states(h: &Health) -> BTreeMap<String, (bool, CircuitState)> {
    h.backends
        .iter()
        .map(|b| (b.name.clone(), (b.healthy, b.circuit)))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_failures_and_recovers_through_a_probe() {
    let c = counters(2);
    let pool = Pool::builder()
        .member("a", flaky(2, c[0].clone()), 1)
        .member("b", named("b", c[1].clone()), 1)
        .failure_threshold(2)
        .cool_down(Duration::from_secs(30))
        .build()
        .unwrap();
    assert!(call(&pool).await.is_err()); // a fails (1)
    assert_eq!(call(&pool).await.unwrap(), "b");
    assert_eq!(pool.circuit("a"), Some(CircuitState::Closed));
    assert!(call(&pool).await.is_err()); // a fails (2): open
    assert_eq!(pool.circuit("a"), Some(CircuitState::Open));
    for _ in 0..4 {
        assert_eq!(call(&pool).await.unwrap(), "b");
    }
    assert_eq!(c[0].load(Ordering::SeqCst), 2, "an open member got calls");
    let h = pool.health().await;
    assert!(h.healthy);
    assert_eq!(h.circuit, Some(CircuitState::Closed));
    assert_eq!(states(&h)["a"], (true, CircuitState::Open));
    assert_eq!(states(&h)["b"], (true, CircuitState::Closed));

    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(pool.circuit("a"), Some(CircuitState::HalfOpen));
    // The next calls include the probe to a, which now succeeds and closes the circuit.
    let mut outputs = Vec::new();
    for _ in 0..2 {
        outputs.push(call(&pool).await.unwrap());
    }
    assert!(outputs.contains(&"flaky".to_owned()), "{outputs:?}");
    assert_eq!(pool.circuit("a"), Some(CircuitState::Closed));
    assert_eq!(
        states(&pool.health().await)["a"],
        (true, CircuitState::Closed)
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_with_every_circuit_open_the_pool_is_unavailable() {
    let c = counters(1);
    let pool = Pool::builder()
        .member("only", flaky(usize::MAX, c[0].clone()), 1)
        .failure_threshold(1)
        .cool_down(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Failed { .. })
    ));
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Unavailable(_))
    ));
    let h = pool.health().await;
    assert!(!h.healthy);
    assert_eq!(h.circuit, Some(CircuitState::Open));
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(pool.circuit("only"), Some(CircuitState::HalfOpen));
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Failed { .. })
    )); // the probe
    assert_eq!(pool.circuit("only"), Some(CircuitState::Open));
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Unavailable(_))
    ));
    assert_eq!(c[0].load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_one_probe_through_at_a_time() {
    let release = CancellationToken::new();
    let started = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    // Fails once (opening the circuit), then its runs wait at the gate.
    struct FailThenGate {
        calls: Arc<AtomicUsize>,
        gate: Gate,
    }
    #[async_trait]
    impl Executor for FailThenGate {
        async fn execute(
            &self,
            r: AgentRequest,
            e: EventSink,
            c: CancellationToken,
        ) -> Result<AgentResult, ExecutorError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(ExecutorError::failed("down"));
            }
            self.gate.execute(r, e, c).await
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        fn kind(&self) -> &'static str {
            "x"
        }
        async fn health(&self) -> Health {
            Health::healthy()
        }
    }
    let member = Arc::new(FailThenGate {
        calls,
        gate: Gate {
            release: release.clone(),
            started: started.clone(),
        },
    });
    let pool = Pool::builder()
        .member("m", member, 1)
        .failure_threshold(1)
        .cool_down(Duration::from_secs(5))
        .build()
        .unwrap();
    assert!(call(&pool).await.is_err());
    tokio::time::advance(Duration::from_secs(6)).await;
    let p = pool.clone();
    let probe = tokio::spawn(async move { call(&p).await });
    while started.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // While the probe runs, nothing else gets through.
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Unavailable(_))
    ));
    release.cancel();
    assert_eq!(probe.await.unwrap().unwrap(), "gate");
    assert_eq!(pool.circuit("m"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn unhealthy_members_are_skipped_after_a_health_check() {
    let c = counters(2);
    let sick_calls = c[0].clone();
    let mut sick = MockExecutor::new();
    sick.expect_health()
        .returning(|| Health::unhealthy("disk full"));
    sick.expect_execute().returning(move |_, _, _| {
        sick_calls.fetch_add(1, Ordering::SeqCst);
        Ok(AgentResult::text("sick"))
    });
    let pool = Pool::builder()
        .member("sick", Arc::new(sick), 1)
        .member("ok", named("ok", c[1].clone()), 1)
        .build()
        .unwrap();
    let h = pool.health().await;
    assert!(h.healthy);
    assert_eq!(states(&h)["sick"], (false, CircuitState::Closed));
    for _ in 0..4 {
        assert_eq!(call(&pool).await.unwrap(), "ok");
    }
    assert_eq!(c[0].load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn background_health_checks_update_the_members() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let h2 = healthy.clone();
    let mut m = MockExecutor::new();
    m.expect_health().returning(move || {
        if h2.load(Ordering::SeqCst) {
            Health::healthy()
        } else {
            Health::unhealthy("down")
        }
    });
    m.expect_execute()
        .returning(|_, _, _| Ok(AgentResult::text("m")));
    let pool = Pool::builder().member("m", Arc::new(m), 1).build().unwrap();
    let checks = pool.spawn_health_checks(Duration::from_secs(1));
    assert_eq!(call(&pool).await.unwrap(), "m");
    healthy.store(false, Ordering::SeqCst);
    // Let the checker run (paused time advances automatically when idle).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(matches!(
        call(&pool).await,
        Err(ExecutorError::Unavailable(_))
    ));
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(call(&pool).await.unwrap(), "m");
    drop(checks);
}

#[tokio::test]
async fn cancelled_runs_do_not_count_as_failures() {
    let mut m = MockExecutor::new();
    m.expect_execute()
        .returning(|_, _, _| Err(ExecutorError::Cancelled));
    m.expect_health().returning(Health::healthy);
    let pool = Pool::builder()
        .member("m", Arc::new(m), 1)
        .failure_threshold(1)
        .build()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(call(&pool).await.unwrap_err().kind(), "cancelled");
    }
    assert_eq!(pool.circuit("m"), Some(CircuitState::Closed));
}

#[test]
fn bad_pools_are_refused() {
    assert_eq!(Pool::builder().build().unwrap_err().key, "members");
    let m: Arc<dyn Executor> = Arc::new(MockExecutor::new());
    assert_eq!(
        Pool::builder()
            .member("a", m.clone(), 0)
            .build()
            .unwrap_err()
            .key,
        "weight"
    );
    assert_eq!(
        Pool::builder()
            .member("a", m.clone(), 1)
            .member("a", m, 1)
            .build()
            .unwrap_err()
            .key,
        "members"
    );
}
