//! The in-memory [`DispatchStore`]: everything behind one mutex, with indexes that let a claim
//! read only what it takes: each subscription's due deliveries in order, the first of each in
//! one ordered set, the leases by expiry and counted per subscription. A subscription at its
//! in-flight cap (or disabled) costs a claim one step however many of its deliveries wait.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::store::{
    Attempt, AttemptOutcome, AttemptTrigger, ClaimedDelivery, Delivery, DeliveryClaimRequest,
    DeliveryId, DeliveryLease, DeliveryState, DispatchStore, DispatchStoreError,
    DispatchStoreResult, EndpointFailure, FinishedAttempt, NewDelivery, RequeueOutcome,
};
use super::subscription::{Subscription, SubscriptionChange, SubscriptionId};
use crate::fast_hash::FastMap;

/// Subscriptions and deliveries in memory. Lost on restart; for tests and single-process hosts.
///
/// Open deliveries are always kept; finished ones (succeeded or failed) are kept up to a
/// retention per subscription (10 000 by default, see [`with_retention`](Self::with_retention)),
/// the oldest finished being dropped first, so a long-running process does not grow forever.
#[derive(Debug)]
pub struct MemoryDispatchStore {
    state: Mutex<State>,
    retention: usize,
}

impl Default for MemoryDispatchStore {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            retention: 10_000,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Shared with the claims that carry them; a change copies on write.
    subs: BTreeMap<SubscriptionId, Arc<Subscription>>,
    rows: FastMap<DeliveryId, Row>,
    by_sub: FastMap<SubscriptionId, BTreeSet<DeliveryId>>,
    /// Open, unleased deliveries of each subscription by due time (no empty sets).
    due: FastMap<SubscriptionId, BTreeSet<(DateTime<Utc>, DeliveryId)>>,
    /// The first of each subscription's `due` set: a claim merges the subscriptions' queues
    /// in due order through it.
    heads: BTreeSet<(DateTime<Utc>, DeliveryId, SubscriptionId)>,
    /// Deliveries under a lease (expired or not).
    leased: FastMap<DeliveryId, Lease>,
    /// The leases by expiry.
    expiries: BTreeSet<(DateTime<Utc>, DeliveryId)>,
    /// Leased deliveries per subscription (no zero counts).
    in_flight: FastMap<SubscriptionId, usize>,
    /// Finished deliveries per subscription in the order they finished, with the sequence
    /// number of that finish (a redelivered one finishes again under a new number).
    finished: FastMap<SubscriptionId, VecDeque<(u64, DeliveryId)>>,
    finish_seq: u64,
}

/// What the store keeps of a lease: what fences it and when it ends (the owner is the
/// claimer's to know).
#[derive(Debug, Clone, Copy)]
struct Lease {
    token: Uuid,
    expires_at: DateTime<Utc>,
}

#[derive(Debug)]
struct Row {
    /// The delivery, its `payload` left empty: the body is `payload`, shared with the other
    /// deliveries of the event and with claims (see [`Row::view`]).
    delivery: Delivery,
    payload: Arc<str>,
    manual: bool,
    finished_seq: Option<u64>,
}

impl Row {
    /// The delivery as the log shows it, body included.
    fn view(&self) -> Delivery {
        Delivery {
            payload: self.payload.to_string(),
            ..self.delivery.clone()
        }
    }
}

impl MemoryDispatchStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps at most `finished` succeeded or failed deliveries per subscription (at least 1).
    #[must_use]
    pub fn with_retention(mut self, finished: usize) -> Self {
        self.retention = finished.max(1);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every method updates in an
        // order that keeps the indexes valid), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    /// Makes `id` of `sub` due at `at`.
    fn due_insert(&mut self, sub: SubscriptionId, at: DateTime<Utc>, id: DeliveryId) {
        let queue = self.due.entry(sub).or_default();
        let head = queue.first().copied();
        queue.insert((at, id));
        if queue.first().copied() != head {
            if let Some((h_at, h_id)) = head {
                self.heads.remove(&(h_at, h_id, sub));
            }
            self.heads.insert((at, id, sub));
        }
    }

    /// Takes `id` of `sub` out of the due index.
    fn due_remove(&mut self, sub: SubscriptionId, at: DateTime<Utc>, id: DeliveryId) {
        let Some(queue) = self.due.get_mut(&sub) else {
            return;
        };
        if !queue.remove(&(at, id)) {
            return;
        }
        if self.heads.remove(&(at, id, sub)) {
            if let Some(&(n_at, n_id)) = queue.first() {
                self.heads.insert((n_at, n_id, sub));
            }
        }
        if queue.is_empty() {
            self.due.remove(&sub);
        }
    }

    /// Puts `lease` on its delivery, of `sub`.
    fn lease_insert(&mut self, sub: SubscriptionId, lease: &DeliveryLease) {
        let id = lease.delivery_id;
        self.expiries.insert((lease.expires_at, id));
        *self.in_flight.entry(sub).or_default() += 1;
        let kept = Lease {
            token: lease.token,
            expires_at: lease.expires_at,
        };
        if let Some(old) = self.leased.insert(id, kept) {
            // Not reached: a delivery is leased only from the due index.
            self.expiries.remove(&(old.expires_at, id));
            self.lease_uncount(sub);
        }
    }

    /// Takes the lease off `id`.
    fn lease_remove(&mut self, id: DeliveryId) {
        let Some(lease) = self.leased.remove(&id) else {
            return;
        };
        self.expiries.remove(&(lease.expires_at, id));
        if let Some(sub) = self.rows.get(&id).map(|r| r.delivery.subscription_id) {
            self.lease_uncount(sub);
        }
    }

    fn lease_uncount(&mut self, sub: SubscriptionId) {
        if let Some(n) = self.in_flight.get_mut(&sub) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&sub);
            }
        }
    }

    /// Puts a delivery whose lease was taken off back in the due index, if it is open.
    fn due_again(&mut self, id: DeliveryId) {
        if let Some((sub, at)) = self.rows.get(&id).and_then(|r| {
            r.delivery
                .next_attempt_at
                .map(|at| (r.delivery.subscription_id, at))
        }) {
            self.due_insert(sub, at, id);
        }
    }

    /// Records that `id` finished and drops the oldest finished deliveries past `retention`.
    fn finished(&mut self, sub: SubscriptionId, id: DeliveryId, retention: usize) {
        self.finish_seq += 1;
        let seq = self.finish_seq;
        if let Some(row) = self.rows.get_mut(&id) {
            row.finished_seq = Some(seq);
        }
        let Self {
            rows,
            by_sub,
            finished,
            ..
        } = self;
        let queue = finished.entry(sub).or_default();
        queue.push_back((seq, id));
        while queue.len() > retention {
            let Some((seq, old)) = queue.pop_front() else {
                break;
            };
            // Only if it is still that finish (not redelivered and open or finished again).
            let current = rows
                .get(&old)
                .is_some_and(|r| r.finished_seq == Some(seq) && !r.delivery.state.is_open());
            if current {
                rows.remove(&old);
                if let Some(ids) = by_sub.get_mut(&sub) {
                    ids.remove(&old);
                }
            }
        }
    }

    fn check_lease(&self, lease: &DeliveryLease) -> DispatchStoreResult<()> {
        match self.leased.get(&lease.delivery_id) {
            Some(held) if held.token == lease.token => Ok(()),
            _ => Err(DispatchStoreError::LeaseLost),
        }
    }

    /// Records `attempt` under `lease` and moves the delivery to `outcome`.
    fn finish(
        &mut self,
        lease: &DeliveryLease,
        attempt: &Attempt,
        outcome: AttemptOutcome,
        retention: usize,
    ) -> DispatchStoreResult<()> {
        self.check_lease(lease)?;
        self.lease_remove(lease.delivery_id);
        let Some(row) = self.rows.get_mut(&lease.delivery_id) else {
            return Err(DispatchStoreError::LeaseLost);
        };
        let d = &mut row.delivery;
        // Most deliveries are attempted once and then kept, up to the retention, with their
        // log: room for one attempt, not the four a first push would make room for.
        if d.attempts.capacity() == 0 {
            d.attempts.reserve_exact(1);
        }
        d.attempts.push(attempt.clone());
        if attempt.trigger == AttemptTrigger::Scheduled {
            d.scheduled_attempts = d.scheduled_attempts.saturating_add(1);
        }
        row.manual = false;
        let sub = d.subscription_id;
        match outcome {
            AttemptOutcome::Succeeded | AttemptOutcome::Failed => {
                d.state = if outcome == AttemptOutcome::Succeeded {
                    DeliveryState::Succeeded
                } else {
                    DeliveryState::Failed
                };
                d.next_attempt_at = None;
                self.finished(sub, lease.delivery_id, retention);
            }
            AttemptOutcome::Retry { at } => {
                d.state = DeliveryState::Retrying;
                d.next_attempt_at = Some(at);
                self.due_insert(sub, at, lease.delivery_id);
            }
        }
        Ok(())
    }
}

#[async_trait]
impl DispatchStore for MemoryDispatchStore {
    async fn insert_subscription(&self, sub: &Subscription) -> DispatchStoreResult<()> {
        let mut st = self.lock();
        if st.subs.contains_key(&sub.id) {
            return Err(DispatchStoreError::Duplicate);
        }
        st.subs.insert(sub.id, Arc::new(sub.clone()));
        Ok(())
    }

    async fn subscription(&self, id: SubscriptionId) -> DispatchStoreResult<Option<Subscription>> {
        Ok(self.lock().subs.get(&id).map(|s| Subscription::clone(s)))
    }

    async fn subscriptions(&self) -> DispatchStoreResult<Vec<Subscription>> {
        let st = self.lock();
        let mut all: Vec<_> = st.subs.values().map(|s| Subscription::clone(s)).collect();
        all.sort_by_key(|s| (s.created_at, s.id));
        Ok(all)
    }

    async fn subscribers(&self, event_type: &str) -> DispatchStoreResult<Vec<SubscriptionId>> {
        let st = self.lock();
        let mut matching: Vec<_> = st
            .subs
            .values()
            .filter(|s| s.enabled && s.matches(event_type))
            .map(|s| (s.created_at, s.id))
            .collect();
        matching.sort_unstable();
        Ok(matching.into_iter().map(|(_, id)| id).collect())
    }

    async fn update_subscription(
        &self,
        id: SubscriptionId,
        change: &SubscriptionChange,
    ) -> DispatchStoreResult<Option<Subscription>> {
        let mut st = self.lock();
        Ok(st.subs.get_mut(&id).map(|sub| {
            let sub = Arc::make_mut(sub);
            change.apply(sub);
            sub.clone()
        }))
    }

    async fn delete_subscription(&self, id: SubscriptionId) -> DispatchStoreResult<bool> {
        let mut st = self.lock();
        if st.subs.remove(&id).is_none() {
            return Ok(false);
        }
        st.finished.remove(&id);
        if let Some(&(at, did)) = st.due.remove(&id).as_ref().and_then(BTreeSet::first) {
            st.heads.remove(&(at, did, id));
        }
        for did in st.by_sub.remove(&id).unwrap_or_default() {
            st.lease_remove(did);
            st.rows.remove(&did);
        }
        Ok(true)
    }

    async fn endpoint_failed(
        &self,
        id: SubscriptionId,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<Option<EndpointFailure>> {
        let mut st = self.lock();
        Ok(st.subs.get_mut(&id).map(|sub| {
            let sub = Arc::make_mut(sub);
            let since = *sub.failing_since.get_or_insert(at);
            sub.consecutive_failures = sub.consecutive_failures.saturating_add(1);
            EndpointFailure {
                failing_since: since,
                consecutive_failures: sub.consecutive_failures,
            }
        }))
    }

    async fn endpoint_succeeded(&self, id: SubscriptionId) -> DispatchStoreResult<()> {
        if let Some(sub) = self.lock().subs.get_mut(&id) {
            let sub = Arc::make_mut(sub);
            sub.failing_since = None;
            sub.consecutive_failures = 0;
        }
        Ok(())
    }

    async fn disable_subscription(
        &self,
        id: SubscriptionId,
        reason: &str,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<bool> {
        let mut st = self.lock();
        match st.subs.get_mut(&id) {
            Some(sub) if sub.enabled => {
                let sub = Arc::make_mut(sub);
                sub.enabled = false;
                sub.disabled_reason = Some(reason.to_owned());
                sub.updated_at = at;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn enqueue(&self, deliveries: &[NewDelivery]) -> DispatchStoreResult<()> {
        let mut st = self.lock();
        for d in deliveries {
            if st.rows.contains_key(&d.id) {
                return Err(DispatchStoreError::Duplicate);
            }
        }
        for d in deliveries {
            let delivery = Delivery {
                id: d.id,
                subscription_id: d.subscription_id,
                event_type: d.event_type.clone(),
                payload: String::new(),
                state: DeliveryState::Pending,
                created_at: d.created_at,
                next_attempt_at: Some(d.created_at),
                scheduled_attempts: 0,
                attempts: Vec::new(),
            };
            st.due_insert(d.subscription_id, d.created_at, d.id);
            st.by_sub.entry(d.subscription_id).or_default().insert(d.id);
            st.rows.insert(
                d.id,
                Row {
                    delivery,
                    payload: d.payload.clone(),
                    manual: false,
                    finished_seq: None,
                },
            );
        }
        Ok(())
    }

    async fn claim_due(
        &self,
        req: &DeliveryClaimRequest,
    ) -> DispatchStoreResult<Vec<ClaimedDelivery>> {
        let mut guard = self.lock();
        let st = &mut *guard;
        // Expired leases go back to the due index.
        while let Some(&(at, id)) = st.expiries.first() {
            if at > req.now {
                break;
            }
            st.lease_remove(id);
            st.due_again(id);
        }
        let expires_at = crate::util::later(req.now, req.lease_for);
        let mut out = Vec::new();
        // The subscriptions' queues merged in due order: `passed` is the last head passed over
        // (its subscription disabled or at its cap); heads before it are not looked at again.
        let mut passed: Option<(DateTime<Utc>, DeliveryId, SubscriptionId)> = None;
        while out.len() < req.limit {
            let head = match passed {
                None => st.heads.first(),
                Some(p) => st
                    .heads
                    .range((Bound::Excluded(p), Bound::Unbounded))
                    .next(),
            };
            let Some(&head @ (at, id, sid)) = head else {
                break;
            };
            if at > req.now {
                break;
            }
            let open = st.subs.get(&sid).is_some_and(|s| s.enabled)
                && st.in_flight.get(&sid).copied().unwrap_or(0) < req.per_subscription_cap;
            if !open {
                passed = Some(head);
                continue;
            }
            // The subscription's next delivery becomes its head, after this one.
            st.due_remove(sid, at, id);
            let lease = DeliveryLease {
                delivery_id: id,
                token: Uuid::now_v7(),
                owner: req.owner.clone(),
                expires_at,
            };
            st.lease_insert(sid, &lease);
            let row = &st.rows[&id];
            let sub = &st.subs[&sid];
            out.push(ClaimedDelivery {
                lease,
                id,
                event_type: row.delivery.event_type.clone(),
                payload: row.payload.clone(),
                scheduled_attempts: row.delivery.scheduled_attempts,
                trigger: if row.manual {
                    AttemptTrigger::Manual
                } else {
                    AttemptTrigger::Scheduled
                },
                subscription: sub.clone(),
            });
        }
        Ok(out)
    }

    async fn finish_attempt(
        &self,
        lease: &DeliveryLease,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> DispatchStoreResult<()> {
        self.lock().finish(lease, attempt, outcome, self.retention)
    }

    async fn finish_attempts(&self, batch: &[FinishedAttempt]) -> DispatchStoreResult<Vec<bool>> {
        let mut st = self.lock();
        Ok(batch
            .iter()
            .map(|f| {
                st.finish(&f.lease, &f.attempt, f.outcome, self.retention)
                    .is_ok()
            })
            .collect())
    }

    async fn release(&self, lease: &DeliveryLease) -> DispatchStoreResult<()> {
        let mut st = self.lock();
        st.check_lease(lease)?;
        st.lease_remove(lease.delivery_id);
        st.due_again(lease.delivery_id);
        Ok(())
    }

    async fn delivery(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
    ) -> DispatchStoreResult<Option<Delivery>> {
        Ok(self
            .lock()
            .rows
            .get(&id)
            .filter(|r| r.delivery.subscription_id == subscription)
            .map(Row::view))
    }

    async fn deliveries(
        &self,
        subscription: SubscriptionId,
        limit: usize,
        before: Option<DeliveryId>,
    ) -> DispatchStoreResult<Vec<Delivery>> {
        let st = self.lock();
        let Some(ids) = st.by_sub.get(&subscription) else {
            return Ok(Vec::new());
        };
        let iter: Box<dyn Iterator<Item = &DeliveryId>> = match before {
            Some(b) => Box::new(ids.range(..b).rev()),
            None => Box::new(ids.iter().rev()),
        };
        Ok(iter
            .take(limit)
            .filter_map(|id| st.rows.get(id).map(Row::view))
            .collect())
    }

    async fn requeue(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
        now: DateTime<Utc>,
    ) -> DispatchStoreResult<RequeueOutcome> {
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.rows.get(&id) {
            Some(r) if r.delivery.subscription_id == subscription => {}
            _ => return Ok(RequeueOutcome::NotFound),
        }
        if let Some(l) = st.leased.get(&id) {
            if l.expires_at > now {
                return Ok(RequeueOutcome::InFlight);
            }
            st.lease_remove(id);
        }
        let Some(row) = st.rows.get_mut(&id) else {
            return Ok(RequeueOutcome::NotFound);
        };
        let previous = row.delivery.next_attempt_at;
        row.manual = true;
        row.finished_seq = None;
        row.delivery.state = DeliveryState::Pending;
        row.delivery.next_attempt_at = Some(now);
        if let Some(at) = previous {
            st.due_remove(subscription, at, id);
        }
        st.due_insert(subscription, now, id);
        Ok(RequeueOutcome::Requeued)
    }

    async fn pending_count(&self) -> DispatchStoreResult<usize> {
        Ok(self
            .lock()
            .rows
            .values()
            .filter(|r| r.delivery.state.is_open())
            .count())
    }

    async fn next_due_at(&self) -> DispatchStoreResult<Option<DateTime<Utc>>> {
        let st = self.lock();
        let due = st
            .heads
            .iter()
            .find(|(_, _, sub)| st.subs.get(sub).is_some_and(|s| s.enabled))
            .map(|(at, _, _)| *at);
        let lease = st.expiries.first().map(|(at, _)| *at);
        Ok(match (due, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::dispatch::sign::SigningSecret;

    #[tokio::test]
    async fn finished_deliveries_beyond_the_retention_are_dropped() {
        let store = MemoryDispatchStore::new().with_retention(3);
        let now = Utc::now();
        let sub = Subscription::new(
            "http://x/",
            vec!["*".into()],
            None,
            SigningSecret::generate(),
            now,
        );
        store.insert_subscription(&sub).await.unwrap();
        let batch: Vec<_> = (0..6)
            .map(|_| NewDelivery::new(sub.id, "job.queued", "{}", now))
            .collect();
        store.enqueue(&batch).await.unwrap();
        let attempt = Attempt {
            status_code: 200,
            duration_ms: 1,
            response_body: String::new(),
            error: None,
            at: now,
            trigger: AttemptTrigger::Scheduled,
        };
        let req = DeliveryClaimRequest::new(now, 10, "t", Duration::from_secs(30), 100);
        let claimed = store.claim_due(&req).await.unwrap();
        // Five finish, one stays open.
        for c in &claimed[..5] {
            store
                .finish_attempt(&c.lease, &attempt, AttemptOutcome::Succeeded)
                .await
                .unwrap();
        }
        let ids: Vec<_> = store
            .deliveries(sub.id, 100, None)
            .await
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect();
        assert_eq!(ids.len(), 4, "3 finished kept + 1 open");
        let kept = {
            let st = store.lock();
            let attempts = &st.rows[&claimed[4].id].delivery.attempts;
            (attempts.len(), attempts.capacity())
        };
        assert_eq!(
            kept,
            (1, 1),
            "a delivery attempted once keeps room for one attempt"
        );
        assert!(
            ids.contains(&claimed[5].id),
            "open deliveries are never dropped"
        );
        assert!(!ids.contains(&claimed[0].id) && !ids.contains(&claimed[1].id));
        // A redelivered one is not dropped because of its earlier finish.
        assert_eq!(
            store.requeue(sub.id, claimed[2].id, now).await.unwrap(),
            RequeueOutcome::Requeued
        );
        store
            .finish_attempt(&claimed[5].lease, &attempt, AttemptOutcome::Failed)
            .await
            .unwrap();
        assert!(store
            .delivery(sub.id, claimed[2].id)
            .await
            .unwrap()
            .is_some());
        assert_eq!(store.pending_count().await.unwrap(), 1);
    }

    /// Within one claim, a subscription that reaches its cap is passed over and the claim goes
    /// on with the next due deliveries of the others, in due order across subscriptions.
    #[tokio::test]
    async fn a_claim_merges_the_subscriptions_queues_in_due_order_past_full_ones() {
        let store = MemoryDispatchStore::new();
        let now = Utc::now();
        let sub = || {
            Subscription::new(
                "http://x/",
                vec!["*".into()],
                None,
                SigningSecret::generate(),
                now,
            )
        };
        let (a, b, c) = (sub(), sub(), sub());
        for s in [&a, &b, &c] {
            store.insert_subscription(s).await.unwrap();
        }
        let at = |s: &Subscription, secs: i64| {
            NewDelivery::new(
                s.id,
                "job.queued",
                "{}",
                now + chrono::Duration::seconds(secs),
            )
        };
        // a: 0..100 s; b: 50, 150, 250 s; c: 200 s.
        let a_ids: Vec<_> = (0..100).map(|i| at(&a, i)).collect();
        let b_ids = vec![at(&b, 50), at(&b, 150), at(&b, 250)];
        let c_ids = vec![at(&c, 200)];
        for batch in [&c_ids, &b_ids, &a_ids] {
            store.enqueue(batch).await.unwrap();
        }
        let req = DeliveryClaimRequest::new(
            now + chrono::Duration::seconds(300),
            8,
            "t",
            Duration::from_secs(30),
            2,
        );
        let got: Vec<_> = store
            .claim_due(&req)
            .await
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(
            got,
            vec![
                a_ids[0].id,
                a_ids[1].id,
                b_ids[0].id,
                b_ids[1].id,
                c_ids[0].id
            ],
            "a's two earliest, b's two, c's one, in due order; nothing more under the cap"
        );
        // Nothing more while those are in flight.
        let held = store.claim_due(&req).await.unwrap();
        assert!(held.is_empty());
        assert_eq!(
            store.next_due_at().await.unwrap(),
            Some(now + chrono::Duration::seconds(2)),
            "a's next, waiting for room"
        );
    }

    #[tokio::test]
    async fn memory_store_passes_the_suite() {
        crate::test_util::dispatch_store_suite(|| async {
            Arc::new(MemoryDispatchStore::new()) as Arc<dyn DispatchStore>
        })
        .await;
    }
}
