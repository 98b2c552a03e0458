//! The subscription and delivery store: the trait, its records, and (behind `test-util`) the
//! conformance suite every implementation must pass.
//!
//! The shape follows an outbox table in PostgreSQL: [`DispatchStore::enqueue`] inserts the
//! deliveries of one event in one transaction; [`DispatchStore::claim_due`] is an
//! `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING …` that stamps a lease
//! (a fresh token and an expiry) on each claimed row; [`DispatchStore::finish_attempt`] and
//! [`DispatchStore::release`] only touch a row whose lease token still matches, so an instance
//! that lost its lease (it stalled past the expiry and another instance claimed the row) can
//! neither record its attempt nor change the delivery's state.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::subscription::{Subscription, SubscriptionChange, SubscriptionId};

/// A delivery's identifier, sent as `webhook-id`: `msg_` and the simple form of a UUID v7
/// (time ordered, no `.`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryId(Uuid);

crate::util::uuid_v7_id!(DeliveryId);

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg_{}", self.0.simple())
    }
}

impl fmt::Debug for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeliveryId({self})")
    }
}

/// A string that is not a delivery id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a delivery id (expected msg_<32 hex digits>)")]
pub struct BadDeliveryId;

impl FromStr for DeliveryId {
    type Err = BadDeliveryId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix("msg_").unwrap_or(s);
        Uuid::parse_str(hex).map(Self).map_err(|_| BadDeliveryId)
    }
}

impl Serialize for DeliveryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeliveryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where a delivery is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not attempted yet (or a manual retry is waiting).
    Pending,
    /// Delivered: the receiver answered 2xx.
    Succeeded,
    /// Given up: the schedule is exhausted or the receiver answered 410.
    Failed,
    /// An attempt failed; another one is scheduled.
    Retrying,
}

impl DeliveryState {
    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Succeeded => "succeeded",
            DeliveryState::Failed => "failed",
            DeliveryState::Retrying => "retrying",
        }
    }

    /// True for `pending` and `retrying`: the delivery will be attempted.
    #[must_use]
    pub fn is_open(self) -> bool {
        matches!(self, DeliveryState::Pending | DeliveryState::Retrying)
    }
}

/// What caused an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptTrigger {
    /// The first attempt or one of the retry schedule.
    Scheduled,
    /// `POST /webhooks/{id}/deliveries/{delivery_id}/retry`.
    Manual,
}

/// One HTTP attempt of a delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    /// The receiver's status code, 0 when no response came (network error, refusal, timeout).
    pub status_code: u16,
    /// Time from sending to the end of the (truncated) response.
    pub duration_ms: u64,
    /// The first 20 000 bytes of the response body (cut at a character boundary).
    pub response_body: String,
    /// What went wrong, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the attempt started.
    pub at: DateTime<Utc>,
    /// Scheduled or manual.
    pub trigger: AttemptTrigger,
}

/// A delivery to insert: one event for one subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewDelivery {
    /// The id (also the `webhook-id`).
    pub id: DeliveryId,
    /// The subscription.
    pub subscription_id: SubscriptionId,
    /// The event's type.
    pub event_type: String,
    /// The exact body to send (signatures cover these bytes).
    pub payload: String,
    /// Creation time; the first attempt is due then.
    pub created_at: DateTime<Utc>,
}

impl NewDelivery {
    /// A delivery of `payload` to `subscription_id`, due at `now`.
    #[must_use]
    pub fn new(
        subscription_id: SubscriptionId,
        event_type: impl Into<String>,
        payload: impl Into<String>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id: DeliveryId::new(),
            subscription_id,
            event_type: event_type.into(),
            payload: payload.into(),
            created_at: now,
        }
    }
}

/// A delivery with its attempts, as the delivery log shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct Delivery {
    /// The id, sent as `webhook-id`.
    #[schema(value_type = String, example = "msg_0192d0c1a8a07c43b1c2d3e4f5a6b7c8")]
    pub id: DeliveryId,
    /// The subscription.
    #[schema(value_type = String, format = Uuid)]
    pub subscription_id: SubscriptionId,
    /// The event's type.
    pub event_type: String,
    /// The body sent (shown as JSON).
    #[serde(serialize_with = "payload_as_json")]
    #[schema(value_type = Object)]
    pub payload: String,
    /// Where it is.
    pub state: DeliveryState,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When the next attempt is due (open deliveries only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Scheduled attempts made so far (manual ones are not counted).
    pub scheduled_attempts: u32,
    /// Every attempt, oldest first.
    pub attempts: Vec<Attempt>,
}

fn payload_as_json<S: serde::Serializer>(payload: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(payload),
    }
}

/// A lease on a claimed delivery: only its holder may record the attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// A fresh token per claim; completion is fenced by it.
    pub token: Uuid,
    /// The claiming instance.
    pub owner: String,
    /// After this instant another instance may claim the delivery again.
    pub expires_at: DateTime<Utc>,
}

/// A claimed delivery: everything a worker needs to make one attempt.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimedDelivery {
    /// The lease to finish or release the attempt with.
    pub lease: Lease,
    /// The delivery's id.
    pub id: DeliveryId,
    /// The event's type.
    pub event_type: String,
    /// The exact body.
    pub payload: String,
    /// Scheduled attempts made before this one.
    pub scheduled_attempts: u32,
    /// Whether this attempt is a manual retry.
    pub trigger: AttemptTrigger,
    /// The subscription as it is now (enabled), keys included.
    pub subscription: Subscription,
}

/// What to claim.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The current time: deliveries due at or before it, and leases expired before it.
    pub now: DateTime<Utc>,
    /// At most this many.
    pub limit: usize,
    /// Who claims (an instance id).
    pub owner: String,
    /// How long the lease lasts.
    pub lease_for: Duration,
    /// Skip a subscription that already has this many unexpired leases.
    pub per_subscription_cap: usize,
}

impl ClaimRequest {
    /// A claim of at most `limit` deliveries by `owner`.
    #[must_use]
    pub fn new(
        now: DateTime<Utc>,
        limit: usize,
        owner: impl Into<String>,
        lease_for: Duration,
        per_subscription_cap: usize,
    ) -> Self {
        Self {
            now,
            limit,
            owner: owner.into(),
            lease_for,
            per_subscription_cap,
        }
    }
}

/// The state a finished attempt leaves the delivery in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptOutcome {
    /// Delivered.
    Succeeded,
    /// Try again at `at`.
    Retry {
        /// When.
        at: DateTime<Utc>,
    },
    /// Give up.
    Failed,
}

/// What a manual retry found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequeueOutcome {
    /// Queued for an immediate manual attempt.
    Requeued,
    /// No such delivery for that subscription.
    NotFound,
    /// An attempt holds an unexpired lease right now.
    InFlight,
}

/// What [`DispatchStore::endpoint_failed`] recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointFailure {
    /// Start of the run of failures (kept from the first one).
    pub failing_since: DateTime<Utc>,
    /// Failures since the last success, this one included.
    pub consecutive_failures: u32,
}

/// A store error. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The lease token no longer matches: another claim took the delivery.
    #[error("lease lost: the delivery was claimed again by another worker")]
    LeaseLost,
    /// A record with this id already exists.
    #[error("duplicate id")]
    Duplicate,
    /// The backend failed.
    #[error("store backend: {0}")]
    Backend(String),
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// Subscriptions and their deliveries. See the module docs for the PostgreSQL shape.
#[async_trait]
pub trait DispatchStore: Send + Sync + 'static {
    /// Inserts a new subscription.
    async fn insert_subscription(&self, sub: &Subscription) -> StoreResult<()>;
    /// One subscription.
    async fn subscription(&self, id: SubscriptionId) -> StoreResult<Option<Subscription>>;
    /// Every subscription, oldest first.
    async fn subscriptions(&self) -> StoreResult<Vec<Subscription>>;
    /// Applies `change` atomically ([`SubscriptionChange::apply`]); `None` when missing.
    async fn update_subscription(
        &self,
        id: SubscriptionId,
        change: &SubscriptionChange,
    ) -> StoreResult<Option<Subscription>>;
    /// Deletes a subscription and its deliveries; false when missing.
    async fn delete_subscription(&self, id: SubscriptionId) -> StoreResult<bool>;
    /// Records a failed attempt against the endpoint's health: `failing_since` is set if unset,
    /// `consecutive_failures` grows. `None` when the subscription is gone.
    async fn endpoint_failed(
        &self,
        id: SubscriptionId,
        at: DateTime<Utc>,
    ) -> StoreResult<Option<EndpointFailure>>;
    /// Records a success: clears `failing_since` and `consecutive_failures`.
    async fn endpoint_succeeded(&self, id: SubscriptionId) -> StoreResult<()>;
    /// Disables an enabled subscription with `reason`; true when it was enabled.
    async fn disable_subscription(
        &self,
        id: SubscriptionId,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// Inserts the deliveries of one event, all or none, as `pending` and due at creation.
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> StoreResult<()>;
    /// Claims open deliveries due at `req.now` (oldest due first) of enabled subscriptions,
    /// whose lease is absent or expired, respecting the per-subscription cap; each gets a fresh
    /// lease. Two concurrent claims never return the same delivery.
    async fn claim_due(&self, req: &ClaimRequest) -> StoreResult<Vec<ClaimedDelivery>>;
    /// Records `attempt` and moves the delivery to `outcome`, releasing the lease. A
    /// [`AttemptTrigger::Scheduled`] attempt increments `scheduled_attempts`.
    /// [`StoreError::LeaseLost`] when the lease token no longer matches.
    async fn finish_attempt(
        &self,
        lease: &Lease,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<()>;
    /// Gives the delivery back unattempted (shutdown); same fencing as `finish_attempt`.
    async fn release(&self, lease: &Lease) -> StoreResult<()>;
    /// One delivery of a subscription, with its attempts.
    async fn delivery(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
    ) -> StoreResult<Option<Delivery>>;
    /// A subscription's deliveries newest first, strictly older than `before` when given.
    async fn deliveries(
        &self,
        subscription: SubscriptionId,
        limit: usize,
        before: Option<DeliveryId>,
    ) -> StoreResult<Vec<Delivery>>;
    /// Queues a manual attempt now, whatever the state (the `webhook-id` stays the same).
    async fn requeue(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
        now: DateTime<Utc>,
    ) -> StoreResult<RequeueOutcome>;
    /// Open (`pending` or `retrying`) deliveries in all.
    async fn pending_count(&self) -> StoreResult<usize>;
    /// The earliest `next_attempt_at` of an open, unleased delivery of an enabled
    /// subscription, or the earliest lease expiry if sooner.
    async fn next_due_at(&self) -> StoreResult<Option<DateTime<Utc>>>;
}

/// The conformance suite: every [`DispatchStore`] must pass it. `make` returns a fresh, empty
/// store each time it is called.
///
/// ```
/// use std::sync::Arc;
/// use aiwg_core::dispatch::{store_suite, DispatchStore, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// store_suite(|| async { Arc::new(MemoryStore::new()) as Arc<dyn DispatchStore> }).await;
/// # }
/// ```
#[cfg(any(test, feature = "test-util"))]
pub async fn store_suite<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::sync::Arc<dyn DispatchStore>>,
{
    suite::subscriptions_round_trip(make().await).await;
    suite::health_and_disable(make().await).await;
    suite::enqueue_claim_finish(make().await).await;
    suite::claims_are_exclusive_and_fenced(make().await).await;
    suite::expired_leases_are_reclaimed(make().await).await;
    suite::per_subscription_cap(make().await).await;
    suite::disabled_subscriptions_are_skipped(make().await).await;
    suite::retry_and_fail_states(make().await).await;
    suite::requeue_is_manual_and_keeps_the_id(make().await).await;
    suite::listing_newest_first_with_cursor(make().await).await;
    suite::delete_removes_deliveries(make().await).await;
}

#[cfg(any(test, feature = "test-util"))]
mod suite {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::dispatch::sign::SigningSecret;

    fn sub(now: DateTime<Utc>) -> Subscription {
        Subscription::new(
            "https://example.com/hook",
            vec!["*".into()],
            Some("suite".into()),
            SigningSecret::generate(),
            now,
        )
    }

    fn req(now: DateTime<Utc>, limit: usize, owner: &str) -> ClaimRequest {
        ClaimRequest::new(now, limit, owner, Duration::from_secs(30), usize::MAX)
    }

    fn attempt(at: DateTime<Utc>, code: u16, trigger: AttemptTrigger) -> Attempt {
        Attempt {
            status_code: code,
            duration_ms: 1,
            response_body: "ok".into(),
            error: None,
            at,
            trigger,
        }
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    pub(super) async fn subscriptions_round_trip(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now + secs(1));
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        assert!(matches!(
            store.insert_subscription(&a).await,
            Err(StoreError::Duplicate)
        ));
        assert_eq!(store.subscription(a.id).await.unwrap().as_ref(), Some(&a));
        let all = store.subscriptions().await.unwrap();
        assert_eq!(all.iter().map(|s| s.id).collect::<Vec<_>>(), [a.id, b.id]);
        let change = SubscriptionChange::at(now + secs(5))
            .url("https://example.org/x")
            .events(vec!["job.completed".into()])
            .description(None);
        let updated = store
            .update_subscription(a.id, &change)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.url, "https://example.org/x");
        assert_eq!(updated.events, ["job.completed"]);
        assert_eq!(updated.description, None);
        assert_eq!(updated.updated_at, now + secs(5));
        assert_eq!(updated.keys, a.keys);
        assert_eq!(store.subscription(a.id).await.unwrap(), Some(updated));
        assert_eq!(
            store
                .update_subscription(SubscriptionId::new(), &change)
                .await
                .unwrap(),
            None
        );
        assert!(store.delete_subscription(b.id).await.unwrap());
        assert!(!store.delete_subscription(b.id).await.unwrap());
        assert_eq!(store.subscription(b.id).await.unwrap(), None);
    }

    pub(super) async fn health_and_disable(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let f1 = store.endpoint_failed(a.id, now).await.unwrap().unwrap();
        let f2 = store
            .endpoint_failed(a.id, now + secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f1.failing_since, now);
        assert_eq!(f2.failing_since, now, "the run keeps its start");
        assert_eq!(f2.consecutive_failures, 2);
        store.endpoint_succeeded(a.id).await.unwrap();
        let s = store.subscription(a.id).await.unwrap().unwrap();
        assert_eq!((s.failing_since, s.consecutive_failures), (None, 0));
        let f3 = store
            .endpoint_failed(a.id, now + secs(20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f3.failing_since, now + secs(20), "a success resets the run");
        assert_eq!(f3.consecutive_failures, 1);
        assert!(store.disable_subscription(a.id, "gone", now).await.unwrap());
        assert!(!store.disable_subscription(a.id, "gone", now).await.unwrap());
        let s = store.subscription(a.id).await.unwrap().unwrap();
        assert!(!s.enabled);
        assert_eq!(s.disabled_reason.as_deref(), Some("gone"));
        let s = store
            .update_subscription(a.id, &SubscriptionChange::at(now).enabled(true))
            .await
            .unwrap()
            .unwrap();
        assert!(s.enabled);
        assert_eq!(
            (s.failing_since, s.consecutive_failures, s.disabled_reason),
            (None, 0, None),
            "enabling clears the failure record"
        );
        assert_eq!(
            store
                .endpoint_failed(SubscriptionId::new(), now)
                .await
                .unwrap(),
            None
        );
    }

    pub(super) async fn enqueue_claim_finish(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.completed", r#"{"x":1}"#, now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert_eq!(store.next_due_at().await.unwrap(), Some(now));
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert_eq!(got.payload, r#"{"x":1}"#);
        assert!(got.attempts.is_empty());
        assert!(
            store
                .claim_due(&req(now - secs(1), 10, "a"))
                .await
                .unwrap()
                .is_empty(),
            "not due yet"
        );
        let claimed = store.claim_due(&req(now, 10, "a")).await.unwrap();
        assert_eq!(claimed.len(), 1);
        let c = &claimed[0];
        assert_eq!(c.id, d.id);
        assert_eq!(c.payload, d.payload);
        assert_eq!(c.event_type, "job.completed");
        assert_eq!(c.trigger, AttemptTrigger::Scheduled);
        assert_eq!(c.scheduled_attempts, 0);
        assert_eq!(c.subscription.id, a.id);
        assert_eq!(c.subscription.keys, a.keys);
        assert_eq!(c.lease.owner, "a");
        assert!(c.lease.expires_at > now);
        assert!(
            store
                .claim_due(&req(now, 10, "b"))
                .await
                .unwrap()
                .is_empty(),
            "leased rows are not claimed twice"
        );
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 200, AttemptTrigger::Scheduled),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Succeeded);
        assert_eq!(got.scheduled_attempts, 1);
        assert_eq!(got.attempts, [attempt(now, 200, AttemptTrigger::Scheduled)]);
        assert_eq!(got.next_attempt_at, None);
        assert_eq!(store.pending_count().await.unwrap(), 0);
        assert_eq!(store.next_due_at().await.unwrap(), None);
        assert!(
            matches!(
                store
                    .finish_attempt(
                        &c.lease,
                        &attempt(now, 200, AttemptTrigger::Scheduled),
                        AttemptOutcome::Succeeded
                    )
                    .await,
                Err(StoreError::LeaseLost)
            ),
            "a finished lease cannot be used twice"
        );
        assert_eq!(
            store
                .delivery(a.id, d.id)
                .await
                .unwrap()
                .unwrap()
                .attempts
                .len(),
            1
        );
        assert_eq!(
            store.delivery(SubscriptionId::new(), d.id).await.unwrap(),
            None,
            "deliveries are looked up within their subscription"
        );
    }

    pub(super) async fn claims_are_exclusive_and_fenced(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let batch: Vec<_> = (0..200)
            .map(|i| NewDelivery::new(a.id, "job.queued", format!("{{\"i\":{i}}}"), now))
            .collect();
        store.enqueue(&batch).await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = store
                        .claim_due(&req(now, 3, &format!("w{w}")))
                        .await
                        .unwrap();
                    if got.is_empty() {
                        break mine;
                    }
                    mine.extend(got.into_iter().map(|c| c.id));
                    tokio::task::yield_now().await;
                }
            }));
        }
        let mut seen = HashSet::new();
        for t in tasks {
            for id in t.await.unwrap() {
                assert!(seen.insert(id), "{id} claimed twice");
            }
        }
        assert_eq!(seen.len(), 200);
    }

    pub(super) async fn expired_leases_are_reclaimed(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let first = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        assert_eq!(
            store.next_due_at().await.unwrap(),
            Some(first.lease.expires_at),
            "a leased delivery is due again when its lease expires"
        );
        let later = first.lease.expires_at + secs(1);
        let second = store.claim_due(&req(later, 1, "b")).await.unwrap();
        assert_eq!(second.len(), 1, "an expired lease is claimable");
        let second = second.into_iter().next().unwrap();
        assert_ne!(second.lease.token, first.lease.token);
        assert!(matches!(
            store
                .finish_attempt(
                    &first.lease,
                    &attempt(now, 200, AttemptTrigger::Scheduled),
                    AttemptOutcome::Succeeded
                )
                .await,
            Err(StoreError::LeaseLost)
        ));
        assert!(matches!(
            store.release(&first.lease).await,
            Err(StoreError::LeaseLost)
        ));
        store.release(&second.lease).await.unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert!(got.attempts.is_empty(), "the stale holder recorded nothing");
        let third = store.claim_due(&req(later, 1, "c")).await.unwrap();
        assert_eq!(third.len(), 1, "a released delivery is claimable at once");
    }

    pub(super) async fn per_subscription_cap(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        let mut batch: Vec<_> = (0..5)
            .map(|_| NewDelivery::new(a.id, "job.queued", "{}", now))
            .collect();
        batch.push(NewDelivery::new(b.id, "job.queued", "{}", now + secs(1)));
        store.enqueue(&batch).await.unwrap();
        let capped = ClaimRequest::new(now + secs(1), 10, "a", Duration::from_secs(30), 2);
        let got = store.claim_due(&capped).await.unwrap();
        let for_a = got.iter().filter(|c| c.subscription.id == a.id).count();
        let for_b = got.iter().filter(|c| c.subscription.id == b.id).count();
        assert_eq!((for_a, for_b), (2, 1));
        assert!(store.claim_due(&capped).await.unwrap().is_empty());
        let one = got.iter().find(|c| c.subscription.id == a.id).unwrap();
        store
            .finish_attempt(
                &one.lease,
                &attempt(now, 200, AttemptTrigger::Scheduled),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        assert_eq!(store.claim_due(&capped).await.unwrap().len(), 1);
    }

    pub(super) async fn disabled_subscriptions_are_skipped(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store
            .enqueue(&[NewDelivery::new(a.id, "job.queued", "{}", now)])
            .await
            .unwrap();
        store.disable_subscription(a.id, "test", now).await.unwrap();
        assert!(store
            .claim_due(&req(now, 10, "a"))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.next_due_at().await.unwrap(), None);
        assert_eq!(
            store.pending_count().await.unwrap(),
            1,
            "it waits, it is not dropped"
        );
        store
            .update_subscription(a.id, &SubscriptionChange::at(now).enabled(true))
            .await
            .unwrap();
        assert_eq!(store.claim_due(&req(now, 10, "a")).await.unwrap().len(), 1);
    }

    pub(super) async fn retry_and_fail_states(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let c = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 503, AttemptTrigger::Scheduled),
                AttemptOutcome::Retry { at: now + secs(60) },
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Retrying);
        assert_eq!(got.next_attempt_at, Some(now + secs(60)));
        assert_eq!(store.next_due_at().await.unwrap(), Some(now + secs(60)));
        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert!(store
            .claim_due(&req(now + secs(59), 1, "a"))
            .await
            .unwrap()
            .is_empty());
        let c = store
            .claim_due(&req(now + secs(60), 1, "a"))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(c.scheduled_attempts, 1);
        store
            .finish_attempt(
                &c.lease,
                &attempt(now + secs(60), 0, AttemptTrigger::Scheduled),
                AttemptOutcome::Failed,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Failed);
        assert_eq!(got.scheduled_attempts, 2);
        assert_eq!(got.attempts.len(), 2);
        assert_eq!(got.attempts[0].status_code, 503);
        assert_eq!(store.pending_count().await.unwrap(), 0);
    }

    pub(super) async fn requeue_is_manual_and_keeps_the_id(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        let c = store.claim_due(&req(now, 1, "a")).await.unwrap().remove(0);
        assert_eq!(
            store.requeue(a.id, d.id, now).await.unwrap(),
            RequeueOutcome::InFlight
        );
        store
            .finish_attempt(
                &c.lease,
                &attempt(now, 500, AttemptTrigger::Scheduled),
                AttemptOutcome::Failed,
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .requeue(SubscriptionId::new(), d.id, now)
                .await
                .unwrap(),
            RequeueOutcome::NotFound
        );
        assert_eq!(
            store.requeue(a.id, DeliveryId::new(), now).await.unwrap(),
            RequeueOutcome::NotFound
        );
        let later = now + secs(5);
        assert_eq!(
            store.requeue(a.id, d.id, later).await.unwrap(),
            RequeueOutcome::Requeued
        );
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Pending);
        assert_eq!(got.next_attempt_at, Some(later));
        let c = store
            .claim_due(&req(later, 1, "a"))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(c.id, d.id);
        assert_eq!(c.trigger, AttemptTrigger::Manual);
        store
            .finish_attempt(
                &c.lease,
                &attempt(later, 200, AttemptTrigger::Manual),
                AttemptOutcome::Succeeded,
            )
            .await
            .unwrap();
        let got = store.delivery(a.id, d.id).await.unwrap().unwrap();
        assert_eq!(got.state, DeliveryState::Succeeded);
        assert_eq!(
            got.scheduled_attempts, 1,
            "manual attempts are not scheduled ones"
        );
        assert_eq!(
            got.attempts.iter().map(|a| a.trigger).collect::<Vec<_>>(),
            [AttemptTrigger::Scheduled, AttemptTrigger::Manual]
        );
    }

    pub(super) async fn listing_newest_first_with_cursor(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        let b = sub(now);
        store.insert_subscription(&a).await.unwrap();
        store.insert_subscription(&b).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..7 {
            let d = NewDelivery::new(a.id, "job.queued", "{}", now + secs(i));
            ids.push(d.id);
            store
                .enqueue(&[d, NewDelivery::new(b.id, "job.queued", "{}", now)])
                .await
                .unwrap();
        }
        ids.reverse();
        let page1 = store.deliveries(a.id, 3, None).await.unwrap();
        assert_eq!(page1.iter().map(|d| d.id).collect::<Vec<_>>(), ids[0..3]);
        let page2 = store.deliveries(a.id, 3, Some(page1[2].id)).await.unwrap();
        assert_eq!(page2.iter().map(|d| d.id).collect::<Vec<_>>(), ids[3..6]);
        let page3 = store.deliveries(a.id, 3, Some(page2[2].id)).await.unwrap();
        assert_eq!(page3.iter().map(|d| d.id).collect::<Vec<_>>(), ids[6..7]);
        assert!(page1.iter().all(|d| d.subscription_id == a.id));
    }

    pub(super) async fn delete_removes_deliveries(store: Arc<dyn DispatchStore>) {
        let now = Utc::now();
        let a = sub(now);
        store.insert_subscription(&a).await.unwrap();
        let d = NewDelivery::new(a.id, "job.queued", "{}", now);
        store.enqueue(std::slice::from_ref(&d)).await.unwrap();
        assert!(store.delete_subscription(a.id).await.unwrap());
        assert_eq!(store.pending_count().await.unwrap(), 0);
        assert!(store
            .claim_due(&req(now, 10, "a"))
            .await
            .unwrap()
            .is_empty());
        assert!(store.deliveries(a.id, 10, None).await.unwrap().is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_webhook_ids() {
        let id = DeliveryId::new();
        let s = id.to_string();
        assert!(
            s.starts_with("msg_") && !s.contains('.') && s.len() == 36,
            "{s}"
        );
        assert_eq!(s.parse::<DeliveryId>().unwrap(), id);
        assert_eq!(serde_json::to_value(id).unwrap(), s);
        assert!("msg_nope".parse::<DeliveryId>().is_err());
    }
}
