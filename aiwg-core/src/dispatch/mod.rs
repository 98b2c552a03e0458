//! Outbound webhooks: signed, retried deliveries of job events to subscribers.
//!
//! This module turns the engine's job events into HTTP POSTs to the URLs your users subscribe,
//! the way Svix or GitHub do it: every delivery is written to a store **before** it is
//! attempted (an outbox), signed with [Standard Webhooks] `v1`, retried on a schedule with
//! jitter, recorded attempt by attempt, and never sent to a private address unless you allow
//! it.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/
//!
//! # 1. Build and start a dispatcher
//!
//! [`Dispatcher::builder`] gives a `#[must_use]` builder; every setting has the default of
//! the contract (10 workers, connect 5 s / total 15 s, the `long` retry schedule, 256 KiB payload
//! cap, private targets refused). [`Dispatcher::start`] spawns the worker pool on the current
//! tokio runtime and [`Dispatcher::shutdown`] stops it. The handle is a cheap `Clone`.
//!
//! # 2. Subscribe
//!
//! [`Dispatcher::create`] validates the URL (`http`/`https`) and the event filters (exact names
//! such as `job.completed`, `job.*`, or `*`), generates a `whsec_` secret of 32 random bytes
//! unless one is given, and returns it — the only time besides
//! [`Dispatcher::rotate_secret`] that a secret leaves the dispatcher. A rotation keeps the old
//! key signing alongside the new one for a grace period (24 h by default), so the
//! `webhook-signature` header then carries two `v1,` signatures.
//!
//! # 3. Publish
//!
//! [`Dispatcher::publish`] takes an [`OutboundEvent`] (build one from a job with
//! [`OutboundEvent::for_job`]) and writes one delivery per enabled, matching subscription. The
//! worker pool claims due deliveries with a lease ([`DispatchStore::claim_due`]), so two
//! instances sharing a durable store never send the same attempt. It claims ahead of its
//! workers, several deliveries in one store call (up to [`CLAIMED_PER_WORKER`] held per
//! worker), and hands them to long-lived worker tasks; a worker sends the next as soon as its
//! request is answered, while the attempt is recorded, in batches with those that finish
//! meanwhile ([`DispatchStore::finish_attempts`]).
//!
//! ```
//! use aiwg_core::dispatch::{CreateSubscription, Dispatcher, OutboundEvent, RetryPolicy};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dispatcher = Dispatcher::builder()
//!     .retry(RetryPolicy::parse("1s, 30s, 5m")?)
//!     .workers(4)
//!     .build()?;
//! dispatcher.start()?;
//!
//! let created = dispatcher
//!     .create(CreateSubscription {
//!         url: "https://hooks.example.com/aiwg".into(),
//!         events: vec!["job.completed".into(), "job.failed".into()],
//!         ..Default::default()
//!     })
//!     .await?;
//! assert!(created.secret.starts_with("whsec_"));
//!
//! let event = OutboundEvent::new("job.completed", json!({ "job_id": "0192…" }));
//! assert_eq!(dispatcher.publish(event).await?, 1);
//! assert_eq!(dispatcher.publish(OutboundEvent::new("job.queued", json!({}))).await?, 0);
//!
//! let log = dispatcher.deliveries(created.subscription.id, 10, None).await?;
//! assert_eq!(log.deliveries[0].event_type, "job.completed");
//! dispatcher.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # 4. What a subscriber receives
//!
//! `POST <url>` with the body `{"type", "event", "timestamp", "data"}` and the headers
//! `webhook-id` (the delivery's id, `msg_…`, the same for every retry and for a manual
//! redelivery), `webhook-timestamp` (Unix seconds, fresh per attempt), `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, one per live key, space
//! separated), `content-type: application/json` and `user-agent: aiwg/<version>`.
//!
//! # 5. Outcomes, retries and endpoint health
//!
//! A 2xx answer succeeds. A 410 disables the subscription and fails the delivery. Anything
//! else — 429, 5xx, other statuses, redirects (never followed), timeouts, network errors and
//! SSRF refusals — is retried on the [`RetryPolicy`] (`long`: 5 s, 5 m, 30 m, 2 h, 5 h, 10 h,
//! 10 h; `short`: 3 attempts, 5 s then 10 s; or your own list), each wait spread by ±20 %;
//! a `Retry-After` on a 429 or 5xx is honoured (the wait is at least that long, up to
//! [`DispatcherBuilder::retry_after_max`]). When the schedule is exhausted the delivery is
//! `failed`. A subscription whose attempts keep failing for longer than
//! [`DispatcherBuilder::disable_after`] (5 days) is disabled; a success resets the count.
//! Disabling logs a warning and sends a [`DispatchNotice`] to [`Dispatcher::notices`].
//! Every attempt counts in `aiwg_deliveries_total{outcome}` (`succeeded`, `retrying`,
//! `failed`, `gone`).
//!
//! # 6. The delivery log
//!
//! [`Dispatcher::deliveries`] lists a subscription's deliveries newest first with every
//! attempt: status code (0 when no response came), duration, the first 20 000 bytes of the
//! response, the error, the time and whether it was scheduled or manual.
//! [`Dispatcher::retry_delivery`] queues a manual attempt with the same `webhook-id`.
//!
//! # 7. SSRF guard
//!
//! Private, loopback, link-local, CGNAT, multicast, documentation, unspecified and broadcast
//! IPv4 addresses, IPv6 ULA/link-local/loopback, and IPv4-mapped forms of all of these are
//! refused **at connect time** (a resolver that filters what DNS returns, plus a check of
//! IP-literal hosts) unless [`DispatcherBuilder::allow_private_targets`] or
//! [`DispatcherBuilder::allow_subnet`] allow them.
//!
//! # 8. Stores
//!
//! [`MemoryDispatchStore`] keeps everything in memory; `PgDispatchStore` (feature `postgres`)
//! keeps subscriptions and the outbox in PostgreSQL, shared by every instance. A durable store
//! implements [`DispatchStore`] and must pass `aiwg_core::test_util::dispatch_store_suite`
//! (feature `test-util`).

mod config;
mod dispatcher;
mod event;
mod memory;
mod observer;
#[cfg(feature = "postgres")]
mod postgres;
mod recorder;
mod retry;
mod sender;
mod sign;
mod ssrf;
mod store;
mod subscription;

pub use config::DispatchConfig;
pub use dispatcher::{
    DeliveryPage, DispatchNotice, Dispatcher, DispatcherBuilder, CLAIMED_PER_WORKER,
};
pub use event::{
    event_type_for_status, OutboundEvent, EVENT_TYPES, JOB_AWAITING_APPROVAL, JOB_CANCELLED,
    JOB_COMPLETED, JOB_FAILED, JOB_QUEUED, JOB_STARTED, JOB_STEP_COMPLETED, JOB_TIMED_OUT,
};
pub use memory::MemoryDispatchStore;
pub use observer::outbound_event;
#[cfg(feature = "postgres")]
pub use postgres::PgDispatchStore;
pub use retry::{parse_retry_after, RetryPolicy};
pub use sender::{RESPONSE_BODY_LIMIT, USER_AGENT_VALUE};
pub use sign::{signature_header, SigningSecret};
pub use ssrf::{is_public, IpNet, TargetPolicy};
pub use store::{
    Attempt, AttemptOutcome, AttemptTrigger, BadDeliveryId, ClaimedDelivery, Delivery,
    DeliveryClaimRequest, DeliveryId, DeliveryLease, DeliveryState, DispatchStore,
    DispatchStoreError, DispatchStoreResult, EndpointFailure, FinishedAttempt, NewDelivery,
    RequeueOutcome,
};
pub use subscription::{
    filter_matches, CreateSubscription, CreatedSubscription, RotatedSecret, SigningKey,
    Subscription, SubscriptionChange, SubscriptionId, SubscriptionList, UpdateSubscription,
    WebhookSubscription,
};

/// What the dispatcher's methods can fail with. Never carries a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError {
    /// No such subscription or delivery (also an id that does not parse).
    #[error("not found")]
    NotFound,
    /// The request is invalid; the text says why (HTTP 400).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The request conflicts with the current state (HTTP 409), e.g. a retry of a delivery
    /// whose attempt is in flight.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The event's body is larger than the payload cap (HTTP 413).
    #[error("payload of {size} bytes exceeds the {limit}-byte limit")]
    PayloadTooLarge {
        /// The body's size.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DispatchStoreError),
}

impl From<BadDeliveryId> for DispatchError {
    fn from(_: BadDeliveryId) -> Self {
        DispatchError::NotFound
    }
}
