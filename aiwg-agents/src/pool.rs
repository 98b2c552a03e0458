//! [`Pool`]: several executors behind one name, with load balancing, health checks and a
//! circuit breaker per member.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::{
    AgentRequest, AgentResult, BackendHealth, Capabilities, CircuitState, EventSink, Executor,
    ExecutorError, Health,
};
use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ConfigError;

/// How a [`Pool`] picks a member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Each available member in turn.
    #[default]
    RoundRobin,
    /// The available member with the fewest runs in flight (ties in turn).
    LeastConnections,
    /// In proportion to the members' weights (smooth weighted round-robin, as nginx does).
    Weighted,
}

#[derive(Debug)]
struct Breaker {
    state: CircuitState,
    failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

struct Member {
    name: String,
    exec: Arc<dyn Executor>,
    weight: u32,
    in_flight: AtomicUsize,
    state: Mutex<MemberState>,
}

struct MemberState {
    breaker: Breaker,
    healthy: bool,
    current_weight: i64,
}

/// Several executors behind one name.
///
/// A run goes to one member chosen by the [`Strategy`] among those that are available: last
/// health check passed (members start healthy) and circuit not open. A member's circuit opens
/// after `failure_threshold` consecutive failed runs (cancelled runs and invalid requests do not
/// count); after `cool_down` one probe run is let through (half-open): success closes the
/// circuit, failure opens it again. [`Executor::health`] checks every member and reports each
/// one's circuit. With no member available a run fails with [`ExecutorError::Unavailable`].
///
/// ```
/// use std::sync::Arc;
/// use aiwg_agents::{CommandExecutor, Pool, Strategy};
///
/// let a = Arc::new(CommandExecutor::builder().build()?);
/// let b = Arc::new(CommandExecutor::builder().build()?);
/// let pool = Pool::builder()
///     .strategy(Strategy::Weighted)
///     .member("a", a, 3)
///     .member("b", b, 1)
///     .failure_threshold(3)
///     .cool_down(std::time::Duration::from_secs(30))
///     .build()?;
/// assert_eq!(pool.member_names(), ["a", "b"]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    members: Vec<Member>,
    strategy: Strategy,
    failure_threshold: u32,
    cool_down: Duration,
    next: AtomicUsize,
    pick_lock: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("members", &self.member_names())
            .field("strategy", &self.inner.strategy)
            .finish()
    }
}

/// Builds a [`Pool`].
#[must_use]
pub struct PoolBuilder {
    members: Vec<(String, Arc<dyn Executor>, u32)>,
    strategy: Strategy,
    failure_threshold: u32,
    cool_down: Duration,
}

impl Pool {
    /// A builder: round-robin, circuit opening after 5 failures, 30 s cool-down.
    pub fn builder() -> PoolBuilder {
        PoolBuilder {
            members: Vec::new(),
            strategy: Strategy::RoundRobin,
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }

    /// The members' names, in order.
    #[must_use]
    pub fn member_names(&self) -> Vec<String> {
        self.inner.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The circuit state of `member` now.
    #[must_use]
    pub fn circuit(&self, member: &str) -> Option<CircuitState> {
        let m = self.inner.members.iter().find(|m| m.name == member)?;
        let mut st = m.state.lock().unwrap_or_else(|e| e.into_inner());
        Some(self.inner.refresh(&mut st.breaker))
    }

    /// Runs every member's health check and records the answers.
    pub async fn check_health(&self) -> Vec<BackendHealth> {
        let checks = self.inner.members.iter().map(|m| async move {
            let h = m.exec.health().await;
            let mut st = m.state.lock().unwrap_or_else(|e| e.into_inner());
            st.healthy = h.healthy;
            let circuit = self.inner.refresh(&mut st.breaker);
            BackendHealth::new(m.name.clone(), h.healthy, circuit)
        });
        futures_util::future::join_all(checks).await
    }

    /// Checks health every `every` in the background until the returned guard is dropped.
    #[must_use = "health checks stop when the guard is dropped"]
    pub fn spawn_health_checks(&self, every: Duration) -> HealthChecks {
        let pool = self.clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => { pool.check_health().await; }
                }
            }
        });
        HealthChecks { stop }
    }
}

/// Stops a pool's background health checks when dropped.
#[derive(Debug)]
pub struct HealthChecks {
    stop: CancellationToken,
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl PoolBuilder {
    /// The strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Adds a member with a weight (used by [`Strategy::Weighted`]; at least 1).
    pub fn member(mut self, name: impl Into<String>, exec: Arc<dyn Executor>, weight: u32) -> Self {
        self.members.push((name.into(), exec, weight));
        self
    }

    /// Consecutive failures that open a member's circuit (at least 1).
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// How long an open circuit stays open before a probe.
    pub fn cool_down(mut self, d: Duration) -> Self {
        self.cool_down = d;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Pool, ConfigError> {
        if self.members.is_empty() {
            return Err(ConfigError::new(
                "members",
                "a pool needs at least one member",
            ));
        }
        if self.failure_threshold == 0 {
            return Err(ConfigError::new("failure_threshold", "must be at least 1"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (name, _, weight) in &self.members {
            if !names.insert(name.clone()) {
                return Err(ConfigError::new("members", "member names must be unique"));
            }
            if *weight == 0 {
                return Err(ConfigError::new("weight", "weights must be at least 1"));
            }
        }
        Ok(Pool {
            inner: Arc::new(PoolInner {
                members: self
                    .members
                    .into_iter()
                    .map(|(name, exec, weight)| Member {
                        name,
                        exec,
                        weight,
                        in_flight: AtomicUsize::new(0),
                        state: Mutex::new(MemberState {
                            breaker: Breaker {
                                state: CircuitState::Closed,
                                failures: 0,
                                opened_at: None,
                                probe_in_flight: false,
                            },
                            healthy: true,
                            current_weight: 0,
                        }),
                    })
                    .collect(),
                strategy: self.strategy,
                failure_threshold: self.failure_threshold,
                cool_down: self.cool_down,
                next: AtomicUsize::new(0),
                pick_lock: Mutex::new(()),
            }),
        })
    }
}

impl PoolInner {
    /// Moves an open circuit whose cool-down passed to half-open; returns the state.
    fn refresh(&self, b: &mut Breaker) -> CircuitState {
        if b.state == CircuitState::Open
            && b.opened_at.is_some_and(|t| t.elapsed() >= self.cool_down)
        {
            b.state = CircuitState::HalfOpen;
            b.probe_in_flight = false;
        }
        b.state
    }

    /// Whether the member can take a run now (without reserving it).
    fn available(&self, m: &Member) -> bool {
        let mut st = m.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.healthy {
            return false;
        }
        match self.refresh(&mut st.breaker) {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => !st.breaker.probe_in_flight,
            CircuitState::Open => false,
        }
    }

    /// Picks a member and reserves it (in-flight count, half-open probe).
    fn pick(&self) -> Option<usize> {
        let _guard = self.pick_lock.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.members.len();
        let avail: Vec<usize> = (0..n)
            .filter(|&i| self.available(&self.members[i]))
            .collect();
        if avail.is_empty() {
            return None;
        }
        let chosen = match self.strategy {
            Strategy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                // The first available member at or after the turn.
                (0..n)
                    .map(|k| (start + k) % n)
                    .find(|i| avail.contains(i))?
            }
            Strategy::LeastConnections => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let mut order: Vec<usize> = (0..n).map(|k| (start + k) % n).collect();
                order.retain(|i| avail.contains(i));
                order
                    .into_iter()
                    .min_by_key(|&i| self.members[i].in_flight.load(Ordering::Relaxed))?
            }
            Strategy::Weighted => {
                let total: i64 = avail
                    .iter()
                    .map(|&i| i64::from(self.members[i].weight))
                    .sum();
                let mut best: Option<(usize, i64)> = None;
                for &i in &avail {
                    let mut st = self.members[i]
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    st.current_weight += i64::from(self.members[i].weight);
                    if best.is_none_or(|(_, w)| st.current_weight > w) {
                        best = Some((i, st.current_weight));
                    }
                }
                let (i, _) = best?;
                let mut st = self.members[i]
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                st.current_weight -= total;
                i
            }
        };
        let m = &self.members[chosen];
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut st = m.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.breaker.state == CircuitState::HalfOpen {
            st.breaker.probe_in_flight = true;
        }
        Some(chosen)
    }

    fn record(&self, i: usize, outcome: Option<bool>) {
        let m = &self.members[i];
        m.in_flight.fetch_sub(1, Ordering::Relaxed);
        let mut st = m.state.lock().unwrap_or_else(|e| e.into_inner());
        let b = &mut st.breaker;
        match outcome {
            // Neither success nor failure (cancelled, invalid request): a probe may run again.
            None => b.probe_in_flight = false,
            Some(true) => {
                b.state = CircuitState::Closed;
                b.failures = 0;
                b.opened_at = None;
                b.probe_in_flight = false;
            }
            Some(false) => {
                b.failures = b.failures.saturating_add(1);
                if b.state == CircuitState::HalfOpen || b.failures >= self.failure_threshold {
                    if b.state != CircuitState::Open {
                        tracing::warn!(member = %m.name, failures = b.failures, "circuit opened");
                    }
                    b.state = CircuitState::Open;
                    b.opened_at = Some(Instant::now());
                }
                b.probe_in_flight = false;
            }
        }
    }
}

/// Releases a reservation if the run's future is dropped.
struct Reservation<'a> {
    pool: &'a PoolInner,
    index: usize,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.record(self.index, None);
        }
    }
}

#[async_trait]
impl Executor for Pool {
    async fn execute(
        &self,
        request: AgentRequest,
        events: EventSink,
        cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        request.validate()?;
        let Some(index) = self.inner.pick() else {
            return Err(ExecutorError::Unavailable(
                "no pool member is available (unhealthy or circuit open)".into(),
            ));
        };
        let mut res = Reservation {
            pool: &self.inner,
            index,
            done: false,
        };
        let out = self.inner.members[index]
            .exec
            .execute(request, events, cancel)
            .await;
        let outcome = match &out {
            Ok(_) => Some(true),
            Err(ExecutorError::Cancelled | ExecutorError::InvalidRequest(_)) => None,
            Err(_) => Some(false),
        };
        res.done = true;
        self.inner.record(index, outcome);
        out
    }

    fn capabilities(&self) -> Capabilities {
        // What every member can do.
        let all: Vec<Capabilities> = self
            .inner
            .members
            .iter()
            .map(|m| m.exec.capabilities())
            .collect();
        Capabilities::new(
            all.iter().all(|c| c.resume),
            all.iter().all(|c| c.streaming),
            all.iter().all(|c| c.cost),
        )
    }

    fn kind(&self) -> &'static str {
        "pool"
    }

    async fn health(&self) -> Health {
        let backends = self.check_health().await;
        let usable = backends
            .iter()
            .filter(|b| b.healthy && b.circuit != CircuitState::Open)
            .count();
        let circuit = if backends.iter().any(|b| b.circuit == CircuitState::Closed) {
            CircuitState::Closed
        } else if backends.iter().any(|b| b.circuit == CircuitState::HalfOpen) {
            CircuitState::HalfOpen
        } else {
            CircuitState::Open
        };
        let h = if usable > 0 {
            Health::healthy()
        } else {
            Health::unhealthy("no pool member is available")
        };
        h.with_backends(circuit, backends)
    }
}
