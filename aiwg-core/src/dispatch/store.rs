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
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::subscription::{Subscription, SubscriptionChange, SubscriptionId};

/// A delivery's identifier, sent as `webhook-id`: `msg_` and the simple form of a UUID v7
/// (time ordered, no `.`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeliveryId(Uuid);

crate::util::uuid_v7_id!(DeliveryId);

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "msg_{}", self.0.simple())
    }
}

impl DeliveryId {
    /// The id as [`Display`](fmt::Display) writes it, in one allocation of its exact size (a
    /// formatter grows its string four times on the way).
    pub(crate) fn text(&self) -> String {
        let mut hex = [0u8; uuid::fmt::Simple::LENGTH];
        let mut text = String::with_capacity(4 + hex.len());
        text.push_str("msg_");
        text.push_str(self.0.simple().encode_lower(&mut hex));
        text
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
    #[serde(with = "crate::timestamp")]
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
    /// The exact body to send (signatures cover these bytes); the deliveries of one event
    /// share it.
    pub payload: Arc<str>,
    /// Creation time; the first attempt is due then.
    pub created_at: DateTime<Utc>,
}

impl NewDelivery {
    /// A delivery of `payload` to `subscription_id`, due at `now`.
    #[must_use]
    pub fn new(
        subscription_id: SubscriptionId,
        event_type: impl Into<String>,
        payload: impl Into<Arc<str>>,
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
    #[serde(with = "crate::timestamp")]
    pub created_at: DateTime<Utc>,
    /// When the next attempt is due (open deliveries only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, with = "crate::timestamp::option")]
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
pub struct DeliveryLease {
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
    pub lease: DeliveryLease,
    /// The delivery's id.
    pub id: DeliveryId,
    /// The event's type.
    pub event_type: String,
    /// The exact body (shared, not copied, between the store and the request).
    pub payload: Arc<str>,
    /// Scheduled attempts made before this one.
    pub scheduled_attempts: u32,
    /// Whether this attempt is a manual retry.
    pub trigger: AttemptTrigger,
    /// The subscription as it is now (enabled), keys included; shared by the deliveries of
    /// one claim to the same subscription.
    pub subscription: Arc<Subscription>,
}

/// What to claim.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeliveryClaimRequest {
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

impl DeliveryClaimRequest {
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

/// One finished attempt to record: the lease it ran under, what happened and the state it
/// leaves the delivery in. [`DispatchStore::finish_attempts`] records many in one go.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FinishedAttempt {
    /// The lease of the claim the attempt ran under.
    pub lease: DeliveryLease,
    /// What happened.
    pub attempt: Attempt,
    /// The state the delivery moves to.
    pub outcome: AttemptOutcome,
}

impl FinishedAttempt {
    /// A finished attempt of the delivery leased by `lease`.
    #[must_use]
    pub fn new(lease: DeliveryLease, attempt: Attempt, outcome: AttemptOutcome) -> Self {
        Self {
            lease,
            attempt,
            outcome,
        }
    }
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
pub enum DispatchStoreError {
    /// The lease token no longer matches: another claim took the delivery.
    #[error("lease lost: the delivery was claimed again by another worker")]
    LeaseLost,
    /// A record with this id already exists.
    #[error("duplicate id")]
    Duplicate,
    /// The backend failed; the cause is its source.
    #[error("store backend: {0}")]
    Backend(#[source] crate::BackendError),
}

impl DispatchStoreError {
    /// A backend failure without an underlying error.
    #[must_use]
    pub fn backend(context: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self::Backend(crate::BackendError::new(context))
    }

    /// A backend failure caused by `source`.
    #[must_use]
    pub fn backend_from(
        context: impl Into<std::borrow::Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Backend(crate::BackendError::with_source(context, source))
    }
}

/// Shorthand for store results.
pub type DispatchStoreResult<T> = Result<T, DispatchStoreError>;

/// Subscriptions and their deliveries. See the module docs for the PostgreSQL shape.
#[async_trait]
pub trait DispatchStore: Send + Sync + 'static {
    /// Inserts a new subscription.
    async fn insert_subscription(&self, sub: &Subscription) -> DispatchStoreResult<()>;
    /// One subscription.
    async fn subscription(&self, id: SubscriptionId) -> DispatchStoreResult<Option<Subscription>>;
    /// Every subscription, oldest first.
    async fn subscriptions(&self) -> DispatchStoreResult<Vec<Subscription>>;
    /// The enabled subscriptions whose filters match `event_type`, oldest first: whom an event
    /// goes to. The default filters [`subscriptions`](Self::subscriptions); a store that can
    /// answer without copying every subscription should.
    async fn subscribers(&self, event_type: &str) -> DispatchStoreResult<Vec<SubscriptionId>> {
        Ok(self
            .subscriptions()
            .await?
            .iter()
            .filter(|s| s.enabled && s.matches(event_type))
            .map(|s| s.id)
            .collect())
    }
    /// Applies `change` atomically ([`SubscriptionChange::apply`]); `None` when missing.
    async fn update_subscription(
        &self,
        id: SubscriptionId,
        change: &SubscriptionChange,
    ) -> DispatchStoreResult<Option<Subscription>>;
    /// Deletes a subscription and its deliveries; false when missing.
    async fn delete_subscription(&self, id: SubscriptionId) -> DispatchStoreResult<bool>;
    /// Records a failed attempt against the endpoint's health: `failing_since` is set if unset,
    /// `consecutive_failures` grows. `None` when the subscription is gone.
    async fn endpoint_failed(
        &self,
        id: SubscriptionId,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<Option<EndpointFailure>>;
    /// Records a success: clears `failing_since` and `consecutive_failures`.
    async fn endpoint_succeeded(&self, id: SubscriptionId) -> DispatchStoreResult<()>;
    /// Disables an enabled subscription with `reason`; true when it was enabled.
    async fn disable_subscription(
        &self,
        id: SubscriptionId,
        reason: &str,
        at: DateTime<Utc>,
    ) -> DispatchStoreResult<bool>;

    /// Inserts the deliveries of one event, all or none, as `pending` and due at creation.
    async fn enqueue(&self, deliveries: &[NewDelivery]) -> DispatchStoreResult<()>;
    /// Claims open deliveries due at `req.now` (oldest due first) of enabled subscriptions,
    /// whose lease is absent or expired, respecting the per-subscription cap; each gets a fresh
    /// lease. Two concurrent claims never return the same delivery.
    async fn claim_due(
        &self,
        req: &DeliveryClaimRequest,
    ) -> DispatchStoreResult<Vec<ClaimedDelivery>>;
    /// Records `attempt` and moves the delivery to `outcome`, releasing the lease. A
    /// [`AttemptTrigger::Scheduled`] attempt increments `scheduled_attempts`.
    /// [`DispatchStoreError::LeaseLost`] when the lease token no longer matches.
    async fn finish_attempt(
        &self,
        lease: &DeliveryLease,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> DispatchStoreResult<()>;
    /// [`finish_attempt`](Self::finish_attempt) for each of `batch`, in one round trip where
    /// the backend allows it: the dispatcher records the attempts its workers finished together
    /// this way. The answer has one entry per attempt, in order: `true` when it was recorded,
    /// `false` when its lease was lost (nothing written for it). On `Err` the caller treats the
    /// batch as unrecorded: the default implementation (one `finish_attempt` after another) may
    /// have recorded a prefix, whose deliveries are then finished as recorded; the others are
    /// attempted again once their leases expire (at least once).
    async fn finish_attempts(&self, batch: &[FinishedAttempt]) -> DispatchStoreResult<Vec<bool>> {
        let mut recorded = Vec::with_capacity(batch.len());
        for f in batch {
            match self.finish_attempt(&f.lease, &f.attempt, f.outcome).await {
                Ok(()) => recorded.push(true),
                Err(DispatchStoreError::LeaseLost) => recorded.push(false),
                Err(e) => return Err(e),
            }
        }
        Ok(recorded)
    }
    /// Gives the delivery back unattempted (shutdown); same fencing as `finish_attempt`.
    async fn release(&self, lease: &DeliveryLease) -> DispatchStoreResult<()>;
    /// One delivery of a subscription, with its attempts.
    async fn delivery(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
    ) -> DispatchStoreResult<Option<Delivery>>;
    /// A subscription's deliveries newest first, strictly older than `before` when given.
    async fn deliveries(
        &self,
        subscription: SubscriptionId,
        limit: usize,
        before: Option<DeliveryId>,
    ) -> DispatchStoreResult<Vec<Delivery>>;
    /// Queues a manual attempt now, whatever the state (the `webhook-id` stays the same).
    async fn requeue(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
        now: DateTime<Utc>,
    ) -> DispatchStoreResult<RequeueOutcome>;
    /// Open (`pending` or `retrying`) deliveries in all.
    async fn pending_count(&self) -> DispatchStoreResult<usize>;
    /// The earliest `next_attempt_at` of an open, unleased delivery of an enabled
    /// subscription, or the earliest lease expiry if sooner.
    async fn next_due_at(&self) -> DispatchStoreResult<Option<DateTime<Utc>>>;
    /// The dispatcher expects no call soon: its pump found nothing due, or its recorder has no
    /// attempt waiting. A store that keeps resources between calls while the dispatcher is
    /// busy (a database connection: [`PgDispatchStore`](super::PgDispatchStore) keeps one for
    /// its claims and one for its records) lets them go here. By default, nothing.
    fn idle(&self) {}
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
        // The header's text is what `Display` writes, at its exact size.
        let text = id.text();
        assert_eq!((text.as_str(), text.capacity()), (s.as_str(), 36));
        assert_eq!(serde_json::to_value(id).unwrap(), s);
        assert!("msg_nope".parse::<DeliveryId>().is_err());
    }
}
