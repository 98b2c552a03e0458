//! A store with hooks (over the memory store, or any other) for tests that need the store to
//! misbehave at one precise point:
//! heartbeats that fail as in a database outage, a lease sweep or a step's start that waits
//! until the test lets it go (a slow round trip at a chosen moment), outcomes held until the
//! test opens a gate, or a step's start that finds the lease lost. It counts the claims made
//! (and what each brought), and can make every claim a slow round trip.
//! Everything else is the store's underneath.

#![allow(unreachable_pub)]
// Each test binary holding this module uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::store::{
    CancelOutcome, ClaimRequest, Claimed, Created, Finish, Heartbeat, JobPage, JobQuery, Lease,
    NewJob, QueueCounts, StoreError,
};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{
    EngineBuilder, Job, JobEvent, JobEventKind, JobId, JobStore, MemoryStore, ProjectPolicy, Step,
    Workflow,
};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

/// An engine on `store` running workflow `w`, one step `s` on executor `a` (`agent`), in
/// projects under `root`; the caller adds what its test needs.
pub fn engine_on(store: &Arc<HookedStore>, agent: &ScriptedExecutor, root: &Path) -> EngineBuilder {
    aiwg_core::Engine::builder()
        .store(store.clone())
        .executor("a", Arc::new(agent.clone()))
        .workflow(Workflow::new("w").step(Step::prompt("s", "a", "go")))
        .policy(ProjectPolicy::builder().root(root).build().unwrap())
}

/// An observer that notes each event it is called with: its kind, and the job's status then.
#[derive(Default)]
pub struct Watching {
    seen: std::sync::Mutex<Vec<(&'static str, aiwg_core::JobStatus)>>,
}

impl Watching {
    /// What it was called with so far.
    pub fn seen(&self) -> Vec<(&'static str, aiwg_core::JobStatus)> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl aiwg_core::JobObserver for Watching {
    async fn on_event(&self, job: &aiwg_core::Job, event: &aiwg_core::JobEvent) {
        self.seen
            .lock()
            .unwrap()
            .push((event.kind.name(), job.status));
    }
}

/// The kinds of the events of a job whose one step ran and completed.
pub const ONE_STEP_RAN: [&str; 5] = [
    "status",
    "status",
    "step.started",
    "step.finished",
    "status",
];

/// See the module docs.
pub struct HookedStore {
    /// The store underneath, for reading and writing around the hooks.
    pub inner: Arc<dyn JobStore>,
    /// While set, heartbeats fail with a backend error.
    pub down: AtomicBool,
    /// When set, the next lease sweep notifies `sweep_entered` and waits for `sweep_release`.
    pub hold_next_sweep: AtomicBool,
    /// Notified when a held sweep starts.
    pub sweep_entered: Notify,
    /// Lets a held sweep go on.
    pub sweep_release: Notify,
    /// When set, the next `StepStarted` append notifies `start_entered` and waits for
    /// `start_release`.
    pub hold_next_start: AtomicBool,
    /// Notified when a held start is being written.
    pub start_entered: Notify,
    /// Lets a held start go on.
    pub start_release: Notify,
    /// While set, `StepStarted` appends answer [`StoreError::LeaseLost`].
    pub lose_starts: AtomicBool,
    /// When set, the held start (see `hold_next_start`) answers [`StoreError::LeaseLost`] once
    /// it is let go.
    pub lose_held_start: AtomicBool,
    /// Claims made (`claim` and `claim_many` calls).
    pub claims: AtomicUsize,
    /// Claims answered, whatever they took.
    pub claims_answered: AtomicUsize,
    /// Notified when a claim was answered.
    pub claim_answered: Notify,
    /// When set, the next `create` returns only after a claim took a job (as a submitter
    /// descheduled between its insert and what follows would).
    pub hold_next_create_until_claimed: AtomicBool,
    /// Notified when a claim took a job.
    pub claimed: Notify,
    /// When set, the next claim (`claim_many`), once the store took its jobs, notifies
    /// `claim_entered` and answers only when `claim_release` is notified (a claim on its way
    /// back from the database).
    pub hold_next_claim: AtomicBool,
    /// Notified when a held claim took its jobs.
    pub claim_entered: Notify,
    /// Lets a held claim answer.
    pub claim_release: Notify,
    /// When set, every claim answers only after this long (a database's round trip).
    pub claim_round_trip: std::sync::Mutex<Option<Duration>>,
    /// How many jobs each answered claim brought, in order.
    pub claim_sizes: std::sync::Mutex<Vec<usize>>,
    /// While `false` (closed), every outcome (`finish`) waits for it to be `true` (open).
    pub outcome_gate: tokio::sync::watch::Sender<bool>,
    /// Outcomes waiting at the closed gate now.
    pub outcomes_held: AtomicUsize,
    /// Notified when an outcome reaches the closed gate.
    pub outcome_held: Notify,
    /// Writes of agent events (`append` of one, `append_many` of any number) so far.
    pub agent_writes: AtomicUsize,
}

impl Default for HookedStore {
    /// Hooks over a [`MemoryStore`].
    fn default() -> Self {
        Self::over(Arc::new(MemoryStore::new()))
    }
}

impl HookedStore {
    /// Hooks over `inner`.
    pub fn over(inner: Arc<dyn JobStore>) -> Self {
        Self {
            inner,
            down: AtomicBool::default(),
            hold_next_sweep: AtomicBool::default(),
            sweep_entered: Notify::new(),
            sweep_release: Notify::new(),
            hold_next_start: AtomicBool::default(),
            start_entered: Notify::new(),
            start_release: Notify::new(),
            lose_starts: AtomicBool::default(),
            lose_held_start: AtomicBool::default(),
            claims: AtomicUsize::default(),
            claims_answered: AtomicUsize::default(),
            claim_answered: Notify::new(),
            hold_next_create_until_claimed: AtomicBool::default(),
            claimed: Notify::new(),
            hold_next_claim: AtomicBool::default(),
            claim_entered: Notify::new(),
            claim_release: Notify::new(),
            claim_round_trip: std::sync::Mutex::default(),
            claim_sizes: std::sync::Mutex::default(),
            outcome_gate: tokio::sync::watch::Sender::new(true),
            outcomes_held: AtomicUsize::default(),
            outcome_held: Notify::new(),
            agent_writes: AtomicUsize::default(),
        }
    }

    /// The kinds of job `id`'s events so far, in order.
    pub async fn kinds(&self, id: JobId) -> Vec<&'static str> {
        let events = self.inner.events(id, 0).await.unwrap();
        events.iter().map(|e| e.kind.name()).collect()
    }

    /// Waits (up to a minute) until `n` outcomes wait at the closed gate.
    pub async fn wait_outcomes_held(&self, n: usize) {
        reaches(
            &self.outcomes_held,
            &self.outcome_held,
            n,
            "the outcomes reached the gate",
        )
        .await;
    }

    /// Waits (up to a minute) until at least `n` claims were answered.
    pub async fn wait_claims(&self, n: usize) {
        reaches(
            &self.claims_answered,
            &self.claim_answered,
            n,
            "the claims were answered",
        )
        .await;
    }

    fn answered(&self) {
        self.claims_answered.fetch_add(1, Ordering::SeqCst);
        self.claim_answered.notify_waiters();
    }
}

#[async_trait]
impl JobStore for HookedStore {
    async fn create(&self, new: NewJob) -> Result<Created, StoreError> {
        if self
            .hold_next_create_until_claimed
            .swap(false, Ordering::SeqCst)
        {
            let claimed = self.claimed.notified();
            let created = self.inner.create(new).await;
            claimed.await;
            return created;
        }
        self.inner.create(new).await
    }
    async fn create_many(&self, new: Vec<NewJob>) -> Vec<Result<Created, StoreError>> {
        self.inner.create_many(new).await
    }
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, query: &JobQuery) -> Result<JobPage, StoreError> {
        self.inner.list(query).await
    }
    async fn claim(&self, request: &ClaimRequest) -> Result<Option<Claimed>, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let claimed = self.inner.claim(request).await;
        self.answered();
        if matches!(claimed, Ok(Some(_))) {
            self.claimed.notify_waiters();
        }
        claimed
    }
    async fn claim_many(
        &self,
        request: &ClaimRequest,
        max: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        let claimed = self.inner.claim_many(request, max).await;
        let round_trip = *self.claim_round_trip.lock().unwrap();
        if let Some(round_trip) = round_trip {
            tokio::time::sleep(round_trip).await;
        }
        self.claim_sizes
            .lock()
            .unwrap()
            .push(claimed.as_ref().map_or(0, Vec::len));
        if self.hold_next_claim.swap(false, Ordering::SeqCst) {
            let released = self.claim_release.notified();
            self.claim_entered.notify_one();
            released.await;
        }
        self.answered();
        if claimed.as_ref().is_ok_and(|c| !c.is_empty()) {
            self.claimed.notify_waiters();
        }
        claimed
    }
    async fn heartbeat(&self, lease: &Lease, ttl: Duration) -> Result<Heartbeat, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::backend("the database is unreachable"));
        }
        self.inner.heartbeat(lease, ttl).await
    }
    async fn append(&self, lease: &Lease, kind: JobEventKind) -> Result<JobEvent, StoreError> {
        if matches!(kind, JobEventKind::StepStarted { .. }) {
            if self.hold_next_start.swap(false, Ordering::SeqCst) {
                let released = self.start_release.notified();
                self.start_entered.notify_one();
                released.await;
                if self.lose_held_start.swap(false, Ordering::SeqCst) {
                    return Err(StoreError::LeaseLost(lease.job_id));
                }
            }
            if self.lose_starts.load(Ordering::SeqCst) {
                return Err(StoreError::LeaseLost(lease.job_id));
            }
        }
        if matches!(kind, JobEventKind::Agent { .. }) {
            self.agent_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.append(lease, kind).await
    }
    async fn append_many(
        &self,
        lease: &Lease,
        kinds: Vec<JobEventKind>,
    ) -> Result<Vec<Arc<JobEvent>>, StoreError> {
        self.agent_writes.fetch_add(1, Ordering::SeqCst);
        self.inner.append_many(lease, kinds).await
    }
    async fn finish(&self, lease: &Lease, finish: Finish) -> Result<(Job, JobEvent), StoreError> {
        let mut gate = self.outcome_gate.subscribe();
        if !*gate.borrow_and_update() {
            self.outcomes_held.fetch_add(1, Ordering::SeqCst);
            self.outcome_held.notify_waiters();
            let _ = gate.wait_for(|open| *open).await;
            self.outcomes_held.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner.finish(lease, finish).await
    }
    async fn request_cancel(&self, id: JobId, reason: &str) -> Result<CancelOutcome, StoreError> {
        self.inner.request_cancel(id, reason).await
    }
    async fn events(&self, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError> {
        self.inner.events(id, after).await
    }
    async fn recover_expired(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(Job, JobEvent)>, StoreError> {
        if self.hold_next_sweep.swap(false, Ordering::SeqCst) {
            let released = self.sweep_release.notified();
            self.sweep_entered.notify_one();
            released.await;
        }
        self.inner.recover_expired(now).await
    }
    async fn counts(&self) -> Result<QueueCounts, StoreError> {
        self.inner.counts().await
    }
}

/// Waits (up to a minute) until `count`, which `changed` is notified of (`notify_waiters`),
/// reaches `n`; panics with `what` otherwise.
async fn reaches(count: &AtomicUsize, changed: &Notify, n: usize, what: &str) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if count.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    })
    .await
    .expect(what);
}
