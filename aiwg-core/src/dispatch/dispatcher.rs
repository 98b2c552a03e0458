//! The [`Dispatcher`] handle, its builder, the management API and the worker pool.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{broadcast, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::config::DispatchConfig;
use super::event::{OutboundEvent, EVENT_TYPES};
use super::memory::MemoryDispatchStore;
use super::recorder::{Recorded, Recorder};
use super::retry::RetryPolicy;
use super::sender::{SendResult, Sender};
use super::sign::SigningSecret;
use super::ssrf::{literal_host, IpNet, TargetPolicy};
use super::store::{
    Attempt, AttemptOutcome, AttemptTrigger, ClaimedDelivery, Delivery, DeliveryClaimRequest,
    DeliveryId, DispatchStore, FinishedAttempt, NewDelivery, RequeueOutcome,
};
use super::subscription::{
    validate_filters, CreateSubscription, CreatedSubscription, RotatedSecret, SigningKey,
    Subscription, SubscriptionChange, SubscriptionId, SubscriptionList, UpdateSubscription,
    WebhookSubscription,
};
use super::DispatchError;
use crate::future_slot::FutureSlot;
use crate::util::later;

type Result<T, E = DispatchError> = std::result::Result<T, E>;

/// An operational event about a subscription (also logged with `tracing::warn!`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DispatchNotice {
    /// The dispatcher disabled a subscription.
    SubscriptionDisabled {
        /// The subscription.
        subscription_id: SubscriptionId,
        /// Its URL.
        url: String,
        /// Why (`410 Gone` or the failing window).
        reason: String,
        /// When.
        #[serde(with = "crate::timestamp")]
        at: DateTime<Utc>,
    },
}

/// One page of a subscription's delivery log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeliveryPage {
    /// Deliveries, newest first, each with its attempts.
    pub deliveries: Vec<Delivery>,
    /// Pass as `cursor` for the next (older) page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Builds a [`Dispatcher`]. Every setting has a default.
#[must_use]
pub struct DispatcherBuilder {
    store: Option<Arc<dyn DispatchStore>>,
    retry: RetryPolicy,
    workers: usize,
    per_subscription_cap: usize,
    connect_timeout: Duration,
    timeout: Duration,
    allow_private: bool,
    subnets: Vec<String>,
    max_payload: usize,
    disable_after: Duration,
    rotation_grace: Duration,
    retry_after_max: Duration,
    poll_interval: Duration,
    instance_id: Option<String>,
}

impl fmt::Debug for DispatcherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DispatcherBuilder")
            .field("retry", &self.retry)
            .field("workers", &self.workers)
            .field("per_subscription_cap", &self.per_subscription_cap)
            .field("allow_private", &self.allow_private)
            .field("subnets", &self.subnets)
            .finish_non_exhaustive()
    }
}

impl Default for DispatcherBuilder {
    fn default() -> Self {
        Self {
            store: None,
            retry: RetryPolicy::long(),
            workers: 10,
            per_subscription_cap: 5,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            allow_private: false,
            subnets: Vec::new(),
            max_payload: 256 * 1024,
            disable_after: Duration::from_secs(5 * 86_400),
            rotation_grace: Duration::from_secs(86_400),
            retry_after_max: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(1),
            instance_id: None,
        }
    }
}

impl DispatcherBuilder {
    /// The store (default: a fresh [`MemoryDispatchStore`]).
    pub fn store(mut self, store: Arc<dyn DispatchStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The retry schedule (default [`RetryPolicy::long`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The worker pool's size: requests in flight at once (default 10). The dispatcher holds at
    /// most [`CLAIMED_PER_WORKER`] times this many deliveries at once (claimed ahead of a free
    /// worker, being sent, or being recorded after their answer).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Concurrent attempts per subscription (default 5).
    pub fn max_in_flight_per_subscription(mut self, n: usize) -> Self {
        self.per_subscription_cap = n;
        self
    }

    /// Connect timeout (default 5 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Whole-attempt timeout (default 15 s).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Allow private, loopback, link-local… targets (default false).
    pub fn allow_private_targets(mut self, allow: bool) -> Self {
        self.allow_private = allow;
        self
    }

    /// Allow one network although it is not public (`"10.1.0.0/16"`); checked by `build`.
    pub fn allow_subnet(mut self, cidr: impl Into<String>) -> Self {
        self.subnets.push(cidr.into());
        self
    }

    /// Largest event body in bytes (default 256 KiB).
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload = n;
        self
    }

    /// Disable a subscription whose attempts keep failing for this long (default 5 days).
    pub fn disable_after(mut self, d: Duration) -> Self {
        self.disable_after = d;
        self
    }

    /// How long the previous secret keeps signing after a rotation (default 24 h).
    pub fn rotation_grace(mut self, d: Duration) -> Self {
        self.rotation_grace = d;
        self
    }

    /// The longest `Retry-After` honoured (default 1 h).
    pub fn retry_after_max(mut self, d: Duration) -> Self {
        self.retry_after_max = d;
        self
    }

    /// How often an idle pool looks at the store for work another instance queued
    /// (default 1 s; local publishes and retries wake them at once).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// This instance's name in leases (default: a random UUID).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Applies the `webhooks:` configuration section.
    pub fn config(mut self, c: &DispatchConfig) -> Self {
        if let Some(r) = &c.retry {
            self.retry = r.clone();
        }
        if let Some(n) = c.workers {
            self.workers = n;
        }
        if let Some(n) = c.max_in_flight_per_subscription {
            self.per_subscription_cap = n;
        }
        if let Some(b) = c.allow_private_targets {
            self.allow_private = b;
        }
        self.subnets.extend(c.allowed_subnets.iter().cloned());
        if let Some(d) = c.connect_timeout {
            self.connect_timeout = d;
        }
        if let Some(d) = c.timeout {
            self.timeout = d;
        }
        if let Some(n) = c.max_payload_bytes {
            self.max_payload = n;
        }
        if let Some(d) = c.disable_after {
            self.disable_after = d;
        }
        if let Some(d) = c.rotation_grace {
            self.rotation_grace = d;
        }
        if let Some(d) = c.retry_after_max {
            self.retry_after_max = d;
        }
        self
    }

    /// Checks the settings and builds the handle (nothing runs until
    /// [`Dispatcher::start`]).
    pub fn build(self) -> Result<Dispatcher> {
        let positive = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(DispatchError::Invalid(format!(
                    "webhooks.{name} must be positive"
                )))
            }
        };
        positive("workers", self.workers > 0)?;
        positive(
            "max_in_flight_per_subscription",
            self.per_subscription_cap > 0,
        )?;
        positive("connect_timeout", !self.connect_timeout.is_zero())?;
        positive("timeout", !self.timeout.is_zero())?;
        positive("max_payload_bytes", self.max_payload > 0)?;
        positive("poll_interval", !self.poll_interval.is_zero())?;
        let allowed = self
            .subnets
            .iter()
            .map(|s| s.parse::<IpNet>())
            .collect::<Result<Vec<_>>>()?;
        let policy = Arc::new(TargetPolicy {
            allow_private: self.allow_private,
            allowed,
        });
        let sender = Sender::new(policy.clone(), self.connect_timeout, self.timeout)?;
        let (notices, _) = broadcast::channel(64);
        Ok(Dispatcher {
            inner: Arc::new(Inner {
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryDispatchStore::new())),
                retry: self.retry,
                workers: self.workers,
                per_subscription_cap: self.per_subscription_cap,
                timeout: self.timeout,
                max_payload: self.max_payload,
                disable_after: self.disable_after,
                rotation_grace: self.rotation_grace,
                retry_after_max: self.retry_after_max,
                poll_interval: self.poll_interval,
                owner: self
                    .instance_id
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
                policy,
                sender,
                wake: Notify::new(),
                notices,
                running: Mutex::new(None),
            }),
        })
    }
}

/// The outbound webhook dispatcher: a cheap-clone handle. See the [module docs](super).
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn DispatchStore>,
    retry: RetryPolicy,
    workers: usize,
    per_subscription_cap: usize,
    /// A request's timeout (the sender's); a claim's lease covers it and
    /// [`LEASE_BEYOND_TIMEOUT`] more.
    timeout: Duration,
    max_payload: usize,
    disable_after: Duration,
    rotation_grace: Duration,
    retry_after_max: Duration,
    poll_interval: Duration,
    owner: String,
    policy: Arc<TargetPolicy>,
    sender: Sender,
    wake: Notify,
    notices: broadcast::Sender<DispatchNotice>,
    running: Mutex<Option<(CancellationToken, Vec<JoinHandle<()>>)>>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("owner", &self.inner.owner)
            .field("workers", &self.inner.workers)
            .field("retry", &self.inner.retry)
            .finish_non_exhaustive()
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Dispatcher {
    /// A builder with the defaults.
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder::default()
    }

    /// The store behind the dispatcher.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn DispatchStore> {
        &self.inner.store
    }

    /// Spawns the worker pool on the current tokio runtime. Calling it again while running does
    /// nothing; after [`shutdown`](Self::shutdown) it starts a new pool.
    pub fn start(&self) -> Result<()> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            DispatchError::Invalid("Dispatcher::start needs a tokio runtime".into())
        })?;
        let mut running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if running.is_some() {
            return Ok(());
        }
        let cancel = CancellationToken::new();
        let _entered = handle.enter();
        let recorder = Recorder::start(self.inner.store.clone());
        // The pump waits for its workers and for the records of the attempts they made.
        let pump = handle.spawn(pump(self.inner.clone(), recorder, cancel.clone()));
        *running = Some((cancel, vec![pump]));
        Ok(())
    }

    /// Stops the worker pool: an attempt in flight is abandoned and its delivery released for
    /// a later attempt (at least once); attempts already answered are recorded. Waits for the
    /// workers to end.
    pub async fn shutdown(&self) {
        let running = self
            .inner
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((cancel, tasks)) = running {
            cancel.cancel();
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    /// Operational notices (a subscription was disabled…). Slow receivers miss old notices.
    #[must_use]
    pub fn notices(&self) -> broadcast::Receiver<DispatchNotice> {
        self.inner.notices.subscribe()
    }

    /// Writes one delivery per enabled subscription matching the event, before any attempt;
    /// returns how many. [`DispatchError::PayloadTooLarge`] beyond the cap,
    /// [`DispatchError::Invalid`] for an unknown event type.
    pub async fn publish(&self, event: OutboundEvent) -> Result<usize> {
        if !EVENT_TYPES.contains(&event.event_type.as_str()) {
            return Err(DispatchError::Invalid(format!(
                "unknown event type `{}`",
                event.event_type
            )));
        }
        let subscribers = self.subscribers(&event.event_type).await?;
        self.publish_to(&subscribers, &event).await
    }

    /// The enabled subscriptions that want `event_type`: asked before an event is built, so
    /// events nobody subscribed to cost no serialisation.
    pub(crate) async fn subscribers(&self, event_type: &str) -> Result<Vec<SubscriptionId>> {
        Ok(self.inner.store.subscribers(event_type).await?)
    }

    /// [`publish`](Self::publish) to `subscribers` (from [`subscribers`](Self::subscribers)).
    pub(crate) async fn publish_to(
        &self,
        subscribers: &[SubscriptionId],
        event: &OutboundEvent,
    ) -> Result<usize> {
        if subscribers.is_empty() {
            return Ok(0);
        }
        let body: Arc<str> = event.body().into();
        if body.len() > self.inner.max_payload {
            return Err(DispatchError::PayloadTooLarge {
                size: body.len(),
                limit: self.inner.max_payload,
            });
        }
        let now = Utc::now();
        let batch: Vec<NewDelivery> = subscribers
            .iter()
            .map(|id| NewDelivery::new(*id, event.event_type.clone(), body.clone(), now))
            .collect();
        self.inner.store.enqueue(&batch).await?;
        self.inner.wake.notify_one();
        Ok(batch.len())
    }

    /// Open (`pending` or `retrying`) deliveries, for the status endpoint.
    pub async fn pending_deliveries(&self) -> Result<usize> {
        Ok(self.inner.store.pending_count().await?)
    }

    fn validate_url(&self, url: &str) -> Result<String> {
        let url = url.trim();
        if url.len() > 2048 {
            return Err(DispatchError::Invalid(
                "`url` is longer than 2048 bytes".into(),
            ));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| DispatchError::Invalid(format!("`url` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(DispatchError::Invalid(format!(
                "`url` must use http or https, not `{}`",
                parsed.scheme()
            )));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(DispatchError::Invalid("`url` has no host".into()));
        }
        if let Some(ip) = literal_host(&parsed) {
            self.inner
                .policy
                .check(ip)
                .map_err(DispatchError::Invalid)?;
        }
        Ok(parsed.to_string())
    }

    /// Creates a subscription; the answer carries the secret (shown only now and on rotation).
    pub async fn create(&self, req: CreateSubscription) -> Result<CreatedSubscription> {
        let url = self.validate_url(&req.url)?;
        let events = validate_filters(&req.events)?;
        let secret = match req.secret.as_deref() {
            Some(s) => SigningSecret::parse(s)?,
            None => SigningSecret::generate(),
        };
        let description = req.description.filter(|d| !d.trim().is_empty());
        let sub = Subscription::new(url, events, description, secret.clone(), Utc::now());
        self.inner.store.insert_subscription(&sub).await?;
        Ok(CreatedSubscription {
            subscription: sub.view(),
            secret: secret.expose().to_owned(),
        })
    }

    /// Every subscription, oldest first.
    pub async fn list(&self) -> Result<SubscriptionList> {
        Ok(SubscriptionList {
            webhooks: self
                .inner
                .store
                .subscriptions()
                .await?
                .iter()
                .map(Subscription::view)
                .collect(),
        })
    }

    /// One subscription.
    pub async fn get(&self, id: SubscriptionId) -> Result<WebhookSubscription> {
        self.inner
            .store
            .subscription(id)
            .await?
            .map(|s| s.view())
            .ok_or(DispatchError::NotFound)
    }

    /// Changes a subscription. Enabling it clears its failure record and lets its waiting
    /// deliveries go.
    pub async fn update(
        &self,
        id: SubscriptionId,
        req: UpdateSubscription,
    ) -> Result<WebhookSubscription> {
        let mut change = SubscriptionChange::at(Utc::now());
        if let Some(url) = &req.url {
            change = change.url(self.validate_url(url)?);
        }
        if let Some(events) = &req.events {
            change = change.events(validate_filters(events)?);
        }
        if let Some(enabled) = req.enabled {
            change = change.enabled(enabled);
        }
        if let Some(d) = req.description {
            change = change.description(Some(d).filter(|d| !d.trim().is_empty()));
        }
        let sub = self
            .inner
            .store
            .update_subscription(id, &change)
            .await?
            .ok_or(DispatchError::NotFound)?;
        if req.enabled == Some(true) {
            self.inner.wake.notify_one();
        }
        Ok(sub.view())
    }

    /// Deletes a subscription and its delivery log.
    pub async fn delete(&self, id: SubscriptionId) -> Result<()> {
        if self.inner.store.delete_subscription(id).await? {
            Ok(())
        } else {
            Err(DispatchError::NotFound)
        }
    }

    /// A new secret; the current one keeps signing alongside it for the rotation grace.
    pub async fn rotate_secret(&self, id: SubscriptionId) -> Result<RotatedSecret> {
        let now = Utc::now();
        let sub = self
            .inner
            .store
            .subscription(id)
            .await?
            .ok_or(DispatchError::NotFound)?;
        let until = later(now, self.inner.rotation_grace);
        let secret = SigningSecret::generate();
        let mut keys = vec![SigningKey {
            secret: secret.clone(),
            expires_at: None,
        }];
        keys.extend(
            sub.keys
                .into_iter()
                .filter(|k| k.is_live(now))
                .map(|k| SigningKey {
                    expires_at: Some(k.expires_at.map_or(until, |at| at.min(until))),
                    ..k
                }),
        );
        self.inner
            .store
            .update_subscription(id, &SubscriptionChange::at(now).keys(keys))
            .await?
            .ok_or(DispatchError::NotFound)?;
        Ok(RotatedSecret {
            id,
            secret: secret.expose().to_owned(),
            previous_expires_at: until,
        })
    }

    /// A subscription's deliveries, newest first, `limit` (1 to 500) per page, after the
    /// `cursor` of the previous page.
    pub async fn deliveries(
        &self,
        id: SubscriptionId,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<DeliveryPage> {
        let limit = limit.clamp(1, 500);
        let before = cursor
            .map(|c| c.parse::<DeliveryId>())
            .transpose()
            .map_err(|_| DispatchError::Invalid("`cursor` is not a delivery id".into()))?;
        if self.inner.store.subscription(id).await?.is_none() {
            return Err(DispatchError::NotFound);
        }
        let mut deliveries = self.inner.store.deliveries(id, limit + 1, before).await?;
        let next_cursor = if deliveries.len() > limit {
            deliveries.truncate(limit);
            deliveries.last().map(|d| d.id.to_string())
        } else {
            None
        };
        Ok(DeliveryPage {
            deliveries,
            next_cursor,
        })
    }

    /// One delivery with its attempts.
    pub async fn delivery(&self, id: SubscriptionId, delivery_id: DeliveryId) -> Result<Delivery> {
        self.inner
            .store
            .delivery(id, delivery_id)
            .await?
            .ok_or(DispatchError::NotFound)
    }

    /// Queues a manual attempt of a delivery with the same `webhook-id`.
    /// [`DispatchError::Conflict`] while an attempt is in flight or the subscription is disabled.
    pub async fn retry_delivery(&self, id: SubscriptionId, delivery_id: DeliveryId) -> Result<()> {
        let sub = self
            .inner
            .store
            .subscription(id)
            .await?
            .ok_or(DispatchError::NotFound)?;
        if !sub.enabled {
            return Err(DispatchError::Conflict(
                "the subscription is disabled; enable it first".into(),
            ));
        }
        match self
            .inner
            .store
            .requeue(id, delivery_id, Utc::now())
            .await?
        {
            RequeueOutcome::Requeued => {
                self.inner.wake.notify_one();
                Ok(())
            }
            RequeueOutcome::InFlight => Err(DispatchError::Conflict(
                "an attempt of this delivery is in flight".into(),
            )),
            _ => Err(DispatchError::NotFound),
        }
    }
}

/// The worker pool: the pump claims as many due deliveries as there are free places
/// ([`CLAIMED_PER_WORKER`] per worker), in one store call, and hands them to the workers
/// through a queue; each worker sends one delivery at a time and takes the next from the queue
/// as soon as its request is answered, while the attempt's record is written (by the
/// [`Recorder`], in batches when the store is slow).
async fn pump(inner: Arc<Inner>, recorder: Recorder, cancel: CancellationToken) {
    let hand = Arc::new(Hand::new(inner.workers));
    let mut workers = JoinSet::new();
    for _ in 0..inner.workers {
        workers.spawn(work(
            inner.clone(),
            recorder.clone(),
            hand.clone(),
            cancel.clone(),
        ));
    }
    loop {
        let wake = inner.wake.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let free = hand.places.available_permits();
        if free == 0 {
            // A recorded attempt frees its place, then wakes us.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = &mut wake => {}
                () = tokio::time::sleep(inner.poll_interval) => {}
            }
            continue;
        }
        let req = DeliveryClaimRequest::new(
            Utc::now(),
            free,
            inner.owner.clone(),
            inner.timeout + LEASE_BEYOND_TIMEOUT,
            inner.per_subscription_cap,
        );
        let claim = inner.store.claim_due(&req);
        tokio::pin!(claim);
        let claimed = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                // A database may have leased deliveries already (its statement goes on even if
                // its answer is not read): wait for them and release them, rather than leave
                // them to their leases.
                if let Ok(claimed) = claim.await {
                    for task in claimed {
                        release(&inner, &task).await;
                    }
                }
                break;
            }
            r = &mut claim => r,
        };
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "webhook dispatcher: claiming deliveries failed");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(inner.poll_interval) => continue,
                }
            }
        };
        if claimed.is_empty() {
            let wait = match inner.store.next_due_at().await {
                Ok(Some(at)) => (at - Utc::now())
                    .to_std()
                    .ok()
                    .filter(|d| !d.is_zero())
                    .map_or(inner.poll_interval, |d| d.min(inner.poll_interval)),
                _ => inner.poll_interval,
            };
            inner.store.idle();
            tokio::select! {
                () = cancel.cancelled() => break,
                () = &mut wake => {}
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        for task in hand.give(claimed) {
            release(&inner, &task).await;
        }
    }
    // Cancelled: each worker releases the delivery it was sending, then the pump those still
    // waiting for a worker; attempts already answered are recorded (their places come back).
    while workers.join_next().await.is_some() {}
    for held in hand.take_all() {
        release(&inner, &held.task).await;
    }
    if let Ok(all) = u32::try_from(hand.total) {
        let _ = hand.places.acquire_many(all).await;
    }
    inner.store.idle();
}

async fn release(inner: &Inner, task: &ClaimedDelivery) {
    if let Err(e) = inner.store.release(&task.lease).await {
        tracing::debug!(error = %e, "webhook dispatcher: release on shutdown");
    }
}

/// How many deliveries per worker the dispatcher holds at once: claimed and waiting for a
/// worker, being sent, or answered and waiting for their record (a database round trip,
/// batched through [`DispatchStore::finish_attempts`](super::DispatchStore::finish_attempts)).
/// Claiming ahead of the workers makes each claim take several deliveries (one round trip for
/// all of them on a database) and lets a worker send again as soon as its request is answered.
pub const CLAIMED_PER_WORKER: usize = 4;

/// How much longer than a request's timeout a claim's lease lasts.
const LEASE_BEYOND_TIMEOUT: Duration = Duration::from_secs(30);

/// A delivery waiting for a worker is sent only while its lease has at least the request's
/// timeout and this much left; otherwise it is released for a later claim, so that no other
/// instance can claim it while it is being sent.
const LEASE_LEFT_TO_SEND: Duration = Duration::from_secs(10);

/// A claimed delivery and its place among those the dispatcher holds, kept until its attempt
/// is recorded or the delivery released.
struct Held {
    task: ClaimedDelivery,
    place: OwnedSemaphorePermit,
}

/// What the pump hands the workers: the deliveries claimed and not yet taken by a worker, and
/// the places (a semaphore of [`CLAIMED_PER_WORKER`] per worker) that bound what is held.
struct Hand {
    waiting: Mutex<VecDeque<Held>>,
    /// Wakes an idle worker, once per delivery handed.
    ready: Notify,
    places: Arc<Semaphore>,
    total: usize,
    /// The pump is woken to claim once this many places are free, or fewer deliveries than
    /// this wait (one per worker): a claim per batch of deliveries, not one per delivery.
    batch: usize,
}

impl Hand {
    fn new(workers: usize) -> Self {
        let total = workers.saturating_mul(CLAIMED_PER_WORKER);
        Self {
            waiting: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            places: Arc::new(Semaphore::new(total)),
            total,
            batch: workers,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Held>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `claimed` for the workers; answers what found no free place (to release).
    fn give(&self, claimed: Vec<ClaimedDelivery>) -> Vec<ClaimedDelivery> {
        let mut left = Vec::new();
        let mut given = 0;
        {
            let mut waiting = self.waiting();
            for task in claimed {
                // Only the pump takes places, and it claimed no more than were free.
                match self.places.clone().try_acquire_owned() {
                    Ok(place) => {
                        waiting.push_back(Held { task, place });
                        given += 1;
                    }
                    Err(_) => left.push(task),
                }
            }
        }
        for _ in 0..given.min(self.batch) {
            self.ready.notify_one();
        }
        left
    }

    fn take_all(&self) -> Vec<Held> {
        self.waiting().drain(..).collect()
    }

    /// The next delivery to send; `None` once cancelled. An idle worker wakes the pump: it may
    /// claim whatever places are free.
    async fn next(&self, inner: &Inner, cancel: &CancellationToken) -> Option<Held> {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(held) = self.waiting().pop_front() {
                return Some(held);
            }
            inner.wake.notify_one();
            tokio::select! {
                biased;
                () = cancel.cancelled() => return None,
                () = ready => {}
            }
        }
    }

    /// A delivery's place is free again: wakes the pump when a retry changed the next due
    /// time, when a batch of places is free, or when fewer deliveries wait than there are
    /// workers (a slow store's records hold places: the next claim then starts before the
    /// workers run dry).
    fn settled(&self, inner: &Inner, retrying: bool) {
        if retrying
            || self.places.available_permits() >= self.batch
            || self.waiting().len() < self.batch
        {
            inner.wake.notify_one();
        }
    }
}

/// One worker: sends one delivery at a time.
async fn work(inner: Arc<Inner>, recorder: Recorder, hand: Arc<Hand>, cancel: CancellationToken) {
    // Where an attempt's record is polled: kept for the next one when the record was written in
    // its first poll, handed to a task of its own with the record otherwise.
    let mut record = FutureSlot::new();
    while let Some(Held { task, place }) = hand.next(&inner, &cancel).await {
        let lease_left = (task.lease.expires_at - Utc::now())
            .to_std()
            .unwrap_or_default();
        if lease_left < inner.timeout + LEASE_LEFT_TO_SEND {
            release(&inner, &task).await;
            drop(place);
            inner.wake.notify_one();
            continue;
        }
        let r = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                release(&inner, &task).await;
                return;
            }
            r = inner.sender.send(&task) => r,
        };
        // The request is answered: this worker sends the next while this one is recorded (the
        // delivery's lease stays until then, so no other claim takes it, and a
        // per-subscription cap still counts it). An in-memory store records it in this first
        // poll; a database's round trip goes on in a task of its own.
        let recorded = record
            .poll_once(settle(
                inner.clone(),
                recorder.clone(),
                hand.clone(),
                Held { task, place },
                r,
            ))
            .await;
        if let Err(unfinished) = recorded {
            tokio::spawn(unfinished);
        }
    }
}

/// Records an answered attempt, then frees its place.
async fn settle(inner: Arc<Inner>, recorder: Recorder, hand: Arc<Hand>, held: Held, r: SendResult) {
    let Held { task, place } = held;
    let retrying = finish(&inner, &recorder, task, r).await;
    drop(place);
    hand.settled(&inner, retrying);
}

/// Records the attempt's outcome and the endpoint's health; true when a retry is scheduled.
async fn finish(inner: &Inner, recorder: &Recorder, task: ClaimedDelivery, r: SendResult) -> bool {
    let ClaimedDelivery {
        lease,
        id,
        scheduled_attempts,
        trigger,
        subscription: sub,
        ..
    } = task;
    let code = r.status_code;
    let now = Utc::now();
    let record = Attempt {
        status_code: code,
        duration_ms: u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX),
        response_body: r.body,
        error: r.error,
        at: r.at,
        trigger,
    };
    let success = (200..300).contains(&code);
    let (outcome, label) = if success {
        (AttemptOutcome::Succeeded, "succeeded")
    } else if code == 410 {
        (AttemptOutcome::Failed, "gone")
    } else {
        let made = match trigger {
            AttemptTrigger::Scheduled => scheduled_attempts.saturating_add(1),
            _ => scheduled_attempts.max(1),
        };
        let honour = code == 429 || code >= 500;
        let delay = inner.retry.delay_after(made).map(|d| match r.retry_after {
            Some(ra) if honour => d.max(ra.min(inner.retry_after_max)),
            _ => d,
        });
        match delay {
            Some(d) => (AttemptOutcome::Retry { at: later(now, d) }, "retrying"),
            None => (AttemptOutcome::Failed, "failed"),
        }
    };
    metrics::counter!("aiwg_deliveries_total", "outcome" => label).increment(1);
    tracing::debug!(
        delivery = %id, subscription = %sub.id, status = code, outcome = label,
        "webhook attempt"
    );
    let retrying = matches!(outcome, AttemptOutcome::Retry { .. });
    match recorder
        .record(FinishedAttempt::new(lease, record, outcome))
        .await
    {
        Recorded::Yes => {}
        Recorded::LeaseLost => {
            tracing::warn!(delivery = %id, "webhook attempt finished after its lease was lost; not recorded");
            return false;
        }
        // The recorder logged why.
        Recorded::Failed => return false,
    }
    let health = if success {
        // Skip the write when the claim's snapshot shows a healthy endpoint (the common case);
        // a failure recorded since then is reset by the next success.
        if sub.failing_since.is_some() || sub.consecutive_failures > 0 {
            inner.store.endpoint_succeeded(sub.id).await.map(|()| None)
        } else {
            Ok(None)
        }
    } else if code == 410 {
        Ok(Some("the endpoint answered 410 Gone".to_owned()))
    } else {
        inner.store.endpoint_failed(sub.id, now).await.map(|f| {
            f.filter(|f| now - f.failing_since >= to_chrono(inner.disable_after))
                .map(|f| {
                    format!(
                        "failing continuously since {} ({} failed attempts)",
                        f.failing_since.to_rfc3339(),
                        f.consecutive_failures
                    )
                })
        })
    };
    match health {
        Ok(Some(reason)) => disable(inner, &sub, &reason, now).await,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(subscription = %sub.id, error = %e, "webhook dispatcher: recording endpoint health failed");
        }
    }
    retrying
}

async fn disable(inner: &Inner, sub: &Subscription, reason: &str, now: DateTime<Utc>) {
    match inner.store.disable_subscription(sub.id, reason, now).await {
        Ok(true) => {
            tracing::warn!(subscription = %sub.id, url = %sub.url, reason, "webhook subscription disabled");
            let _ = inner.notices.send(DispatchNotice::SubscriptionDisabled {
                subscription_id: sub.id,
                url: sub.url.clone(),
                reason: reason.to_owned(),
                at: now,
            });
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(subscription = %sub.id, error = %e, "webhook dispatcher: disabling failed");
        }
    }
}
