//! Delivery de-duplication: a redelivered event maps to the job it created the first time and
//! starts nothing.
//!
//! [`DeliveryStore`] is shaped for a shared database as well as memory: [`claim`] is an atomic
//! insert-if-absent (`INSERT … ON CONFLICT DO NOTHING`), a pending claim carries a lease so a
//! crashed claimant does not block a redelivery forever, [`complete`] records the job id,
//! [`release`] forgets a claim whose submission failed (so a redelivery may try again), and
//! [`wait`] lets a concurrent duplicate wait for the first one's outcome (the default
//! implementation polls, the memory store is woken directly).
//!
//! [`claim`]: DeliveryStore::claim
//! [`complete`]: DeliveryStore::complete
//! [`release`]: DeliveryStore::release
//! [`wait`]: DeliveryStore::wait

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::util::deadline;
use aiwg_core::JobId;
use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::DeliveryStoreError;

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::PgDeliveryStore;

/// The state of a delivery key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// First time seen: the caller owns the claim and must [`complete`](DeliveryStore::complete)
    /// or [`release`](DeliveryStore::release) it.
    Fresh,
    /// Already handled: the job it created.
    Done(JobId),
    /// Another request with the same key is being handled right now.
    Pending,
}

/// Where seen delivery ids are kept.
#[async_trait]
pub trait DeliveryStore: Send + Sync {
    /// Atomically claims `key` unless it is known. A pending claim older than `lease` is taken
    /// over (its owner is presumed dead); a done key is kept for `ttl`.
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        ttl: Duration,
    ) -> Result<Claim, DeliveryStoreError>;

    /// Records the job created for a claimed key; the key is remembered for `ttl`.
    async fn complete(
        &self,
        key: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<(), DeliveryStoreError>;

    /// Forgets a claimed key (its submission failed).
    async fn release(&self, key: &str) -> Result<(), DeliveryStoreError>;

    /// The job recorded for `key`, if it is done.
    async fn get(&self, key: &str) -> Result<Option<JobId>, DeliveryStoreError>;

    /// Waits up to `timeout` for a pending `key` to settle; returns its job if it completed,
    /// `None` if it was released or is still pending. The default polls [`get`](Self::get).
    async fn wait(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<JobId>, DeliveryStoreError> {
        let deadline = deadline(Instant::now(), timeout);
        loop {
            if let Some(job) = self.get(key).await? {
                return Ok(Some(job));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep_until((Instant::now() + Duration::from_millis(50)).min(deadline))
                .await;
        }
    }
}

enum State {
    Pending { notify: Arc<Notify>, until: Instant },
    Done { job: JobId, until: Instant },
}

/// An in-memory [`DeliveryStore`] with a TTL per entry (one process only).
#[derive(Default)]
pub struct MemoryDeliveryStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Arc<str>, State>,
    /// Every key with the expiry it was given, in the order given. Each claim forgets the
    /// entries at the front that expired, so the store never holds much more than its TTL
    /// window and no claim walks the whole map. (Expiries are not strictly in order, as
    /// leases are shorter than TTLs; an entry waits at most for those ahead of it.)
    expiries: VecDeque<(Instant, Arc<str>)>,
}

impl Inner {
    /// Sets `key`'s state, noting its expiry; returns the state it replaces.
    fn set(&mut self, key: &str, state: State) -> Option<State> {
        let until = match &state {
            State::Pending { until, .. } | State::Done { until, .. } => *until,
        };
        let key: Arc<str> = match self.map.get_key_value(key) {
            Some((k, _)) => Arc::clone(k),
            None => Arc::from(key),
        };
        self.expiries.push_back((until, Arc::clone(&key)));
        self.map.insert(key, state)
    }

    /// Forgets what expired at the front of the expiry queue.
    fn purge(&mut self, now: Instant) {
        while let Some((until, _)) = self.expiries.front() {
            if *until > now {
                break;
            }
            let Some((_, key)) = self.expiries.pop_front() else {
                break;
            };
            // The key may have been set again since, with a later expiry: keep it then.
            let expired = self.map.get(&key).is_some_and(|s| match s {
                State::Pending { until, .. } | State::Done { until, .. } => *until <= now,
            });
            if expired {
                self.map.remove(&key);
            }
        }
    }
}

impl std::fmt::Debug for MemoryDeliveryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryDeliveryStore")
            .field("entries", &self.len())
            .finish()
    }
}

impl MemoryDeliveryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys are held (expired ones included until the next claim).
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no key is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl DeliveryStore for MemoryDeliveryStore {
    async fn claim(
        &self,
        key: &str,
        lease: Duration,
        _ttl: Duration,
    ) -> Result<Claim, DeliveryStoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.purge(now);
        let claim = match inner.map.get(key) {
            Some(State::Done { job, until }) if *until > now => Claim::Done(*job),
            Some(State::Pending { until, .. }) if *until > now => Claim::Pending,
            _ => Claim::Fresh,
        };
        if claim == Claim::Fresh {
            let notify = Arc::new(Notify::new());
            if let Some(State::Pending { notify: old, .. }) = inner.set(
                key,
                State::Pending {
                    notify,
                    until: deadline(now, lease),
                },
            ) {
                old.notify_waiters();
            }
        }
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &str,
        job: JobId,
        ttl: Duration,
    ) -> Result<(), DeliveryStoreError> {
        let until = deadline(Instant::now(), ttl);
        let old = self.lock().set(key, State::Done { job, until });
        if let Some(State::Pending { notify, .. }) = old {
            notify.notify_waiters();
        }
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<(), DeliveryStoreError> {
        let mut inner = self.lock();
        if let Some(State::Pending { notify, .. }) = inner.map.get(key) {
            notify.notify_waiters();
            inner.map.remove(key);
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<JobId>, DeliveryStoreError> {
        let now = Instant::now();
        Ok(match self.lock().map.get(key) {
            Some(State::Done { job, until }) if *until > now => Some(*job),
            _ => None,
        })
    }

    async fn wait(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<JobId>, DeliveryStoreError> {
        let deadline = deadline(Instant::now(), timeout);
        loop {
            let notify = {
                let inner = self.lock();
                match inner.map.get(key) {
                    Some(State::Done { job, .. }) => return Ok(Some(*job)),
                    Some(State::Pending { notify, .. }) => Arc::clone(notify),
                    None => return Ok(None),
                }
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check: the state may have changed before we registered.
            {
                let inner = self.lock();
                match inner.map.get(key) {
                    Some(State::Done { job, .. }) => return Ok(Some(*job)),
                    Some(State::Pending { notify: n, .. }) if Arc::ptr_eq(n, &notify) => {}
                    Some(State::Pending { .. }) => continue,
                    None => return Ok(None),
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// The behaviour every [`DeliveryStore`] must have, as one async check a store's tests call
/// (feature `test-util`). Keys are prefixed with `prefix` so runs against a shared database do
/// not collide. Panics on the first deviation.
#[cfg(any(test, feature = "test-util"))]
pub async fn dedup_store_suite(store: Arc<dyn DeliveryStore>, prefix: &str) {
    let lease = Duration::from_secs(60);
    let ttl = Duration::from_secs(3600);
    let key = |k: &str| format!("{prefix}{k}");

    // First claim wins; a second sees it pending; completion makes it done.
    assert_eq!(
        store.claim(&key("a"), lease, ttl).await.unwrap(),
        Claim::Fresh,
        "first claim"
    );
    assert_eq!(
        store.claim(&key("a"), lease, ttl).await.unwrap(),
        Claim::Pending,
        "second claim"
    );
    assert_eq!(
        store.get(&key("a")).await.unwrap(),
        None,
        "pending is not done"
    );
    let job = JobId::new();
    store.complete(&key("a"), job, ttl).await.expect("complete");
    assert_eq!(
        store.claim(&key("a"), lease, ttl).await.unwrap(),
        Claim::Done(job),
        "replay"
    );
    assert_eq!(store.get(&key("a")).await.unwrap(), Some(job), "get");
    assert_eq!(
        store.wait(&key("a"), Duration::ZERO).await.unwrap(),
        Some(job),
        "wait on done"
    );

    // Released claims can be claimed again.
    assert_eq!(
        store.claim(&key("b"), lease, ttl).await.unwrap(),
        Claim::Fresh
    );
    store.release(&key("b")).await.expect("release");
    assert_eq!(
        store.claim(&key("b"), lease, ttl).await.unwrap(),
        Claim::Fresh,
        "after release"
    );
    store.release(&key("b")).await.expect("release");
    assert_eq!(store.get(&key("b")).await.unwrap(), None);

    // A waiter sees the completion.
    assert_eq!(
        store.claim(&key("c"), lease, ttl).await.unwrap(),
        Claim::Fresh
    );
    let waiter = {
        let store = Arc::clone(&store);
        let k = key("c");
        tokio::spawn(async move { store.wait(&k, Duration::from_secs(30)).await })
    };
    let job = JobId::new();
    store.complete(&key("c"), job, ttl).await.expect("complete");
    assert_eq!(waiter.await.expect("joins").unwrap(), Some(job), "waiter");

    // Concurrent claims: exactly one wins.
    let claims = futures_join_all(
        (0..16)
            .map(|_| {
                let store = Arc::clone(&store);
                let k = key("d");
                tokio::spawn(async move { store.claim(&k, lease, ttl).await })
            })
            .collect(),
    )
    .await;
    let fresh = claims
        .iter()
        .filter(|c| matches!(c, Ok(Claim::Fresh)))
        .count();
    assert_eq!(fresh, 1, "exactly one concurrent claim wins: {claims:?}");

    // Keys are independent.
    assert_eq!(
        store.claim(&key("e"), lease, ttl).await.unwrap(),
        Claim::Fresh
    );
    assert!(store.get(&key("a")).await.unwrap().is_some());
}

#[cfg(any(test, feature = "test-util"))]
async fn futures_join_all(
    handles: Vec<tokio::task::JoinHandle<Result<Claim, DeliveryStoreError>>>,
) -> Vec<Result<Claim, DeliveryStoreError>> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("joins"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_and_expiry() {
        let s = MemoryDeliveryStore::new();
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Pending);
        let job = JobId::new();
        s.complete("k", job, TTL).await.expect("complete");
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Done(job));
        assert_eq!(s.get("k").await.unwrap(), Some(job));
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert_eq!(s.get("k").await.unwrap(), None);
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
    }

    /// A lease, a TTL and a wait meant as "forever" (configuration accepts `u64::MAX`
    /// seconds) keep the key that long: nothing overflows the clock.
    #[tokio::test(start_paused = true)]
    async fn durations_past_the_clocks_range_mean_forever() {
        let s = MemoryDeliveryStore::new();
        let forever = Duration::MAX;
        assert_eq!(s.claim("k", forever, forever).await.unwrap(), Claim::Fresh);
        let job = JobId::new();
        s.complete("k", job, forever).await.expect("complete");
        tokio::time::advance(Duration::from_secs(10 * 365 * 86_400)).await;
        assert_eq!(s.wait("k", forever).await.unwrap(), Some(job));
        assert_eq!(
            s.claim("k", forever, forever).await.unwrap(),
            Claim::Done(job)
        );
        assert_eq!(s.claim("l", forever, forever).await.unwrap(), Claim::Fresh);
        assert_eq!(
            s.claim("l", forever, forever).await.unwrap(),
            Claim::Pending
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_pending_claim_is_taken_over_and_release_forgets() {
        let s = MemoryDeliveryStore::new();
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        s.release("k").await.expect("release");
        assert!(s.is_empty());
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_is_woken_by_complete_and_times_out_otherwise() {
        let s = Arc::new(MemoryDeliveryStore::new());
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        let waiter = {
            let s = Arc::clone(&s);
            tokio::spawn(async move { s.wait("k", Duration::from_secs(3600)).await })
        };
        tokio::task::yield_now().await;
        let job = JobId::new();
        s.complete("k", job, TTL).await.expect("complete");
        assert_eq!(waiter.await.expect("joins").unwrap(), Some(job));

        assert_eq!(s.claim("other", LEASE, TTL).await.unwrap(), Claim::Fresh);
        assert_eq!(s.wait("other", Duration::from_secs(5)).await.unwrap(), None);
        assert_eq!(
            s.wait("unknown", Duration::from_secs(5)).await.unwrap(),
            None
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_passes_the_suite() {
        dedup_store_suite(Arc::new(MemoryDeliveryStore::new()), "suite:").await;
    }

    #[tokio::test(start_paused = true)]
    async fn purge_drops_expired_entries() {
        let s = MemoryDeliveryStore::new();
        for i in 0..10 {
            s.complete(&format!("old{i}"), JobId::new(), Duration::from_secs(1))
                .await
                .expect("complete");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        // The next claim forgets every expired entry.
        s.claim("new", LEASE, TTL).await.expect("claim");
        assert_eq!(s.len(), 1);
        assert_eq!(s.lock().expiries.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_set_again_outlives_its_first_expiry() {
        let s = MemoryDeliveryStore::new();
        // Pending for a lease, then done for the TTL: its first expiry passes, it stays.
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        let job = JobId::new();
        s.complete("k", job, TTL).await.unwrap();
        tokio::time::advance(LEASE + Duration::from_secs(1)).await;
        assert_eq!(s.claim("other", LEASE, TTL).await.unwrap(), Claim::Fresh);
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Done(job));
        tokio::time::advance(TTL).await;
        assert_eq!(s.claim("k", LEASE, TTL).await.unwrap(), Claim::Fresh);
        // Only the fresh claim of "k" is left: "other" and the old entries are gone.
        assert_eq!(s.len(), 1);
    }
}
