//! [`PgDispatchStore`]: the outbox on PostgreSQL (feature `postgres`; migrations
//! `migrations/outbox/0002_webhook_deliveries.sql`, the tables, and `0018_claim_deliveries.sql`,
//! the claim and the attempts' record): subscriptions and the delivery outbox, shared by every
//! instance.
//!
//! A claim is one call of `aiwg_claim_deliveries`, a batch of finished attempts one call of
//! `aiwg_finish_deliveries`; both read the outbox only through its indexes, whatever plan the
//! statistics of the moment would suggest.
//!
//! Claims are `FOR UPDATE SKIP LOCKED` over open, due deliveries of enabled subscriptions, so
//! two instances never take the same delivery. When a per-subscription cap is set, the in-flight
//! count of each subscription is re-read under a transaction-scoped advisory lock on the
//! subscription (taken in id order, so claimers never deadlock), which makes the cap hold
//! across instances. Completion and release are fenced by the lease token. Times are stored as
//! Unix nanoseconds so they round-trip exactly.
//!
//! The claims and the records each run on a connection the store keeps while its dispatcher is
//! busy, handed back to the pool when the dispatcher is idle ([`DispatchStore::idle`]).

mod subscribers;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use sqlx::migrate::Migrator;
use sqlx::PgPool;

use crate::coalesce::KeptConnection;
use crate::secrets::{self, SecretError, SecretKeyring};

use crate::dispatch::{
    Attempt, AttemptOutcome, AttemptTrigger, ClaimedDelivery, Delivery, DeliveryClaimRequest,
    DeliveryId, DeliveryLease, DeliveryState, DispatchStore, DispatchStoreError,
    DispatchStoreResult, EndpointFailure, FinishedAttempt, NewDelivery, RequeueOutcome, SigningKey,
    SigningSecret, Subscription, SubscriptionChange, SubscriptionId,
};

/// The outbox's migrations (versions unique across aiwg, so they compose with the jobs' and
/// the de-duplication's on one database).
static MIGRATOR: Migrator = Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("migrations/outbox")
};

/// A [`DispatchStore`] in PostgreSQL: subscriptions and the delivery outbox, shared by every
/// instance that connects to the same database and schema.
///
/// Claims are `FOR UPDATE SKIP LOCKED`, so two instances never take the same delivery; a
/// per-subscription in-flight cap is re-read under a transaction-scoped advisory lock, so it
/// holds across instances; completion and release are fenced by the lease token.
///
/// Each store (with its clones) holds the enabled subscriptions and their filters, so that
/// [`subscribers`](DispatchStore::subscribers), asked for every status change of every job,
/// costs no query; it drops them when a subscription changes, here at once, elsewhere when the
/// table's triggers announce it (migration 0021). For that it keeps **one connection of its
/// own**, outside the pool, made with the pool's options (`LISTEN` on channel
/// `aiwg_webhook_subscriptions`), from [`from_pool`](Self::from_pool) until the last clone is
/// dropped; count it when sizing the server's `max_connections`. Until its `LISTEN` is in place,
/// and while its connection is lost, every question reads the table.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), aiwg_core::dispatch::DispatchStoreError> {
/// use std::sync::Arc;
/// use aiwg_core::dispatch::{Dispatcher, PgDispatchStore};
///
/// use aiwg_core::secrets::SecretKeyring;
///
/// // Subscription secrets are sealed with the keyring from AIWG_SECRET_KEY.
/// let keyring = SecretKeyring::from_env().ok().flatten().expect("AIWG_SECRET_KEY");
/// let outbox = PgDispatchStore::from_pool(pool).await?.with_keyring(keyring);
/// outbox.migrate().await?;
/// let dispatcher = Dispatcher::builder().store(Arc::new(outbox)).build();
/// # let _ = dispatcher; Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgDispatchStore {
    pool: PgPool,
    /// The scope of advisory-lock keys: the schema, so two schemas never share locks.
    scope: String,
    /// Seals subscription secrets; without one, storing a secret fails.
    keyring: Option<SecretKeyring>,
    /// The enabled subscriptions and their filters, held until one changes.
    subscribers: subscribers::Subscribers,
    /// The connections the claims and the records run on while the dispatcher is busy.
    kept: Arc<Kept>,
}

/// The connections a store (with its clones) keeps between calls while its dispatcher is busy
/// and hands back to the pool when the dispatcher says it is idle
/// ([`DispatchStore::idle`]): sqlx tests every connection handed back with a round trip.
struct Kept {
    /// The pump's claims and its look at the next due time.
    claims: KeptConnection,
    /// The recorder's batches of attempts.
    records: KeptConnection,
}

impl std::fmt::Debug for PgDispatchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgDispatchStore")
            .field("scope", &self.scope)
            .field("pool_size", &self.pool.size())
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl PgDispatchStore {
    /// The outbox in `pool`'s current schema (the first existing schema of its `search_path`).
    /// Runs no migrations: call [`migrate`](Self::migrate) or run [`migrator`](Self::migrator)
    /// yourself. Share the pool with `PgStore` to keep one set of connections.
    pub async fn from_pool(pool: PgPool) -> DispatchStoreResult<Self> {
        let scope = crate::util::current_schema(&pool)
            .await
            .map_err(DispatchStoreError::Backend)?;
        Ok(Self {
            subscribers: subscribers::Subscribers::start(&pool, scope.clone()),
            kept: Arc::new(Kept {
                claims: KeptConnection::new(pool.clone()),
                records: KeptConnection::new(pool.clone()),
            }),
            pool,
            scope,
            keyring: None,
        })
    }

    /// Seals subscription secrets with `keyring` before writing them (see
    /// [`crate::secrets`]). Without a keyring, creating or changing a subscription fails with
    /// [`SecretError::NoKey`], which names the variable to set: secrets are never written in
    /// the clear.
    #[must_use]
    pub fn with_keyring(mut self, keyring: SecretKeyring) -> Self {
        self.keyring = Some(keyring);
        self
    }

    /// Runs the outbox's embedded migrations (idempotent; safe when several instances start
    /// at once).
    pub async fn migrate(&self) -> DispatchStoreResult<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| DispatchStoreError::backend_from("postgres: migration failed", e))?;
        self.subscribers.migrated();
        Ok(())
    }

    /// The outbox's embedded migrations (from `aiwg-core/migrations/outbox`), for hosts that
    /// run them with their own tooling.
    #[must_use]
    pub fn migrator() -> &'static Migrator {
        &MIGRATOR
    }

    /// The connection pool.
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Deletes finished deliveries (`succeeded` or `failed`) created before `before`, with their
    /// attempts; returns how many. Open deliveries are never touched. Any instance may run it.
    pub async fn purge_finished(&self, before: DateTime<Utc>) -> DispatchStoreResult<u64> {
        Ok(sqlx::query(
            "DELETE FROM aiwg_webhook_deliveries \
             WHERE state IN ('succeeded', 'failed') AND created_at_ns < $1",
        )
        .bind(ns(before))
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected())
    }
}

fn db(e: sqlx::Error) -> DispatchStoreError {
    match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
            DispatchStoreError::Duplicate
        }
        _ => DispatchStoreError::backend_from("postgres", e),
    }
}

fn ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

fn at(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(n)
}

fn count(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn ucount(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// A signing key as stored.
#[derive(Serialize, Deserialize)]
struct StoredKey {
    secret: String,
    #[serde(default, with = "crate::timestamp::option")]
    expires_at: Option<DateTime<Utc>>,
}

const SUB_COLUMNS: &str = "id, url, events, description, enabled, disabled_reason, keys, \
     created_at_ns, updated_at_ns, failing_since_ns, consecutive_failures";

const DELIVERY_COLUMNS: &str = "id, subscription_id, event_type, payload, state, created_at_ns, \
     next_attempt_at_ns, scheduled_attempts, attempts";

/// The associated data a subscription's secrets are sealed with: they open only in its row.
fn secret_context(id: &Uuid) -> Vec<u8> {
    format!("aiwg:subscription:{id}").into_bytes()
}

fn secret_err(e: SecretError) -> DispatchStoreError {
    DispatchStoreError::backend_from("postgres: subscription secret", e)
}

impl PgDispatchStore {
    /// The signing keys as stored: each secret sealed with the keyring.
    fn keys_json(&self, sub: &Subscription) -> DispatchStoreResult<Json<Vec<StoredKey>>> {
        let keyring = self
            .keyring
            .as_ref()
            .ok_or_else(|| secret_err(SecretError::NoKey))?;
        let context = secret_context(sub.id.as_uuid());
        Ok(Json(
            sub.keys
                .iter()
                .map(|k| StoredKey {
                    secret: keyring.seal(k.secret.expose().as_bytes(), &context),
                    expires_at: k.expires_at,
                })
                .collect(),
        ))
    }

    /// A subscription read with its row, its secrets opened (a secret stored in the clear by
    /// a version without encryption reads as it is, and is sealed at its next write).
    fn subscription_of(&self, row: &PgRow) -> DispatchStoreResult<Subscription> {
        let id: Uuid = row.try_get("id").map_err(db)?;
        let context = secret_context(&id);
        let Json(events): Json<Vec<String>> = row.try_get("events").map_err(db)?;
        let Json(keys): Json<Vec<StoredKey>> = row.try_get("keys").map_err(db)?;
        let keys = keys
            .into_iter()
            .map(|k| {
                let plain = if secrets::is_sealed(&k.secret) {
                    let keyring = self
                        .keyring
                        .as_ref()
                        .ok_or_else(|| secret_err(SecretError::NoKey))?;
                    let bytes = keyring.open(&k.secret, &context).map_err(secret_err)?;
                    String::from_utf8(bytes).map_err(|_| secret_err(SecretError::Corrupt))?
                } else {
                    k.secret
                };
                SigningSecret::parse(&plain)
                    .map(|secret| SigningKey {
                        secret,
                        expires_at: k.expires_at,
                    })
                    .map_err(|_| {
                        DispatchStoreError::backend("postgres: a stored signing key is invalid")
                    })
            })
            .collect::<DispatchStoreResult<Vec<_>>>()?;
        subscription_row(row, id, events, keys)
    }

    /// Seals again every subscription secret that is stored in the clear or under a key other
    /// than the keyring's sealing one (after a rotation of `AIWG_SECRET_KEY`); returns how many
    /// subscriptions were rewritten. Idempotent; any instance may run it (the example server
    /// does at start).
    pub async fn reseal_secrets(&self) -> DispatchStoreResult<u64> {
        let Some(keyring) = &self.keyring else {
            return Err(secret_err(SecretError::NoKey));
        };
        let mut tx = self.pool.begin().await.map_err(db)?;
        let rows = sqlx::query(&format!(
            "SELECT {SUB_COLUMNS} FROM aiwg_webhook_subscriptions ORDER BY id FOR UPDATE"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut n = 0;
        for row in &rows {
            let Json(stored): Json<Vec<StoredKey>> = row.try_get("keys").map_err(db)?;
            if stored.iter().any(|k| keyring.is_stale(&k.secret)) {
                let sub = self.subscription_of(row)?;
                self.write_subscription(&mut tx, &sub).await?;
                n += 1;
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(n)
    }
}

fn subscription_row(
    row: &PgRow,
    id: Uuid,
    events: Vec<String>,
    keys: Vec<SigningKey>,
) -> DispatchStoreResult<Subscription> {
    Ok(Subscription {
        id: id.into(),
        url: row.try_get("url").map_err(db)?,
        events,
        description: row.try_get("description").map_err(db)?,
        enabled: row.try_get("enabled").map_err(db)?,
        disabled_reason: row.try_get("disabled_reason").map_err(db)?,
        keys,
        created_at: at(row.try_get("created_at_ns").map_err(db)?),
        updated_at: at(row.try_get("updated_at_ns").map_err(db)?),
        failing_since: row
            .try_get::<Option<i64>, _>("failing_since_ns")
            .map_err(db)?
            .map(at),
        consecutive_failures: ucount(row.try_get("consecutive_failures").map_err(db)?),
    })
}

fn state_of(s: &str) -> DispatchStoreResult<DeliveryState> {
    Ok(match s {
        "pending" => DeliveryState::Pending,
        "succeeded" => DeliveryState::Succeeded,
        "failed" => DeliveryState::Failed,
        "retrying" => DeliveryState::Retrying,
        other => {
            return Err(DispatchStoreError::backend(format!(
                "postgres: unknown delivery state `{other}`"
            )))
        }
    })
}

fn delivery_of(row: &PgRow) -> DispatchStoreResult<Delivery> {
    let id: Uuid = row.try_get("id").map_err(db)?;
    let sub: Uuid = row.try_get("subscription_id").map_err(db)?;
    let state: String = row.try_get("state").map_err(db)?;
    let Json(attempts): Json<Vec<Attempt>> = row.try_get("attempts").map_err(db)?;
    Ok(Delivery {
        id: id.into(),
        subscription_id: sub.into(),
        event_type: row.try_get("event_type").map_err(db)?,
        payload: row.try_get("payload").map_err(db)?,
        state: state_of(&state)?,
        created_at: at(row.try_get("created_at_ns").map_err(db)?),
        next_attempt_at: row
            .try_get::<Option<i64>, _>("next_attempt_at_ns")
            .map_err(db)?
            .map(at),
        scheduled_attempts: ucount(row.try_get("scheduled_attempts").map_err(db)?),
        attempts,
    })
}

impl PgDispatchStore {
    async fn write_subscription(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        sub: &Subscription,
    ) -> DispatchStoreResult<()> {
        sqlx::query(
            "UPDATE aiwg_webhook_subscriptions SET url = $2, events = $3, description = $4, \
                 enabled = $5, disabled_reason = $6, keys = $7, created_at_ns = $8, \
                 updated_at_ns = $9, failing_since_ns = $10, consecutive_failures = $11 \
             WHERE id = $1",
        )
        .bind(sub.id.as_uuid())
        .bind(&sub.url)
        .bind(Json(&sub.events))
        .bind(sub.description.as_deref())
        .bind(sub.enabled)
        .bind(sub.disabled_reason.as_deref())
        .bind(self.keys_json(sub)?)
        .bind(ns(sub.created_at))
        .bind(ns(sub.updated_at))
        .bind(sub.failing_since.map(ns))
        .bind(count(sub.consecutive_failures))
        .execute(&mut **tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

#[async_trait]
impl DispatchStore for PgDispatchStore {
    async fn insert_subscription(&self, sub: &Subscription) -> DispatchStoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO aiwg_webhook_subscriptions ({SUB_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(sub.id.as_uuid())
        .bind(&sub.url)
        .bind(Json(&sub.events))
        .bind(sub.description.as_deref())
        .bind(sub.enabled)
        .bind(sub.disabled_reason.as_deref())
        .bind(self.keys_json(sub)?)
        .bind(ns(sub.created_at))
        .bind(ns(sub.updated_at))
        .bind(sub.failing_since.map(ns))
        .bind(count(sub.consecutive_failures))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        self.subscribers.changed();
        Ok(())
    }

    async fn subscription(&self, id: SubscriptionId) -> DispatchStoreResult<Option<Subscription>> {
        let row = sqlx::query(&format!(
            "SELECT {SUB_COLUMNS} FROM aiwg_webhook_subscriptions WHERE id = $1"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(|r| self.subscription_of(r)).transpose()
    }

    async fn subscriptions(&self) -> DispatchStoreResult<Vec<Subscription>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUB_COLUMNS} FROM aiwg_webhook_subscriptions ORDER BY created_at_ns, id"
        ))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|r| self.subscription_of(r)).collect()
    }

    async fn subscribers(&self, event_type: &str) -> DispatchStoreResult<Vec<SubscriptionId>> {
        self.subscribers.matching(&self.pool, event_type).await
    }

    async fn update_subscription(
        &self,
        id: SubscriptionId,
        change: &SubscriptionChange,
    ) -> DispatchStoreResult<Option<Subscription>> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let row = sqlx::query(&format!(
            "SELECT {SUB_COLUMNS} FROM aiwg_webhook_subscriptions WHERE id = $1 FOR UPDATE"
        ))
        .bind(id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut sub = self.subscription_of(&row)?;
        change.apply(&mut sub);
        self.write_subscription(&mut tx, &sub).await?;
        tx.commit().await.map_err(db)?;
        self.subscribers.changed();
        Ok(Some(sub))
    }

    async fn delete_subscription(&self, id: SubscriptionId) -> DispatchStoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let gone = sqlx::query("DELETE FROM aiwg_webhook_subscriptions WHERE id = $1")
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        sqlx::query("DELETE FROM aiwg_webhook_deliveries WHERE subscription_id = $1")
            .bind(id.as_uuid())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        self.subscribers.changed();
        Ok(gone > 0)
    }

    async fn endpoint_failed(
        &self,
        id: SubscriptionId,
        at_: DateTime<Utc>,
    ) -> DispatchStoreResult<Option<EndpointFailure>> {
        let row = sqlx::query(
            "UPDATE aiwg_webhook_subscriptions \
             SET failing_since_ns = COALESCE(failing_since_ns, $2), \
                 consecutive_failures = LEAST(consecutive_failures::bigint + 1, 2147483647) \
             WHERE id = $1 RETURNING failing_since_ns, consecutive_failures",
        )
        .bind(id.as_uuid())
        .bind(ns(at_))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(EndpointFailure {
                failing_since: at(r.try_get("failing_since_ns").map_err(db)?),
                consecutive_failures: ucount(r.try_get("consecutive_failures").map_err(db)?),
            })
        })
        .transpose()
    }

    async fn endpoint_succeeded(&self, id: SubscriptionId) -> DispatchStoreResult<()> {
        sqlx::query(
            "UPDATE aiwg_webhook_subscriptions SET failing_since_ns = NULL, \
             consecutive_failures = 0 WHERE id = $1",
        )
        .bind(id.as_uuid())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn disable_subscription(
        &self,
        id: SubscriptionId,
        reason: &str,
        at_: DateTime<Utc>,
    ) -> DispatchStoreResult<bool> {
        let n = sqlx::query(
            "UPDATE aiwg_webhook_subscriptions SET enabled = FALSE, disabled_reason = $2, \
             updated_at_ns = $3 WHERE id = $1 AND enabled",
        )
        .bind(id.as_uuid())
        .bind(reason)
        .bind(ns(at_))
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        self.subscribers.changed();
        Ok(n > 0)
    }

    async fn enqueue(&self, deliveries: &[NewDelivery]) -> DispatchStoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = deliveries.iter().map(|d| *d.id.as_uuid()).collect();
        let subs: Vec<Uuid> = deliveries
            .iter()
            .map(|d| *d.subscription_id.as_uuid())
            .collect();
        let types: Vec<&str> = deliveries.iter().map(|d| d.event_type.as_str()).collect();
        let payloads: Vec<&str> = deliveries.iter().map(|d| &*d.payload).collect();
        let created: Vec<i64> = deliveries.iter().map(|d| ns(d.created_at)).collect();
        // One statement: all rows or none.
        sqlx::query(
            "INSERT INTO aiwg_webhook_deliveries (id, subscription_id, event_type, payload, \
                 state, created_at_ns, next_attempt_at_ns) \
             SELECT id, sub, et, pl, 'pending', c, c \
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[]) \
                 AS t(id, sub, et, pl, c)",
        )
        .bind(&ids)
        .bind(&subs)
        .bind(&types)
        .bind(&payloads)
        .bind(&created)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn claim_due(
        &self,
        req: &DeliveryClaimRequest,
    ) -> DispatchStoreResult<Vec<ClaimedDelivery>> {
        if req.limit == 0 || req.per_subscription_cap == 0 {
            return Ok(Vec::new());
        }
        let now = ns(req.now);
        // A cap this large cannot bind: skip the per-subscription locks.
        let capped = req.per_subscription_cap < 1_000_000;
        let cap = i64::try_from(req.per_subscription_cap).unwrap_or(i64::MAX);
        let fetch = if capped {
            req.limit.saturating_mul(2).min(1000)
        } else {
            req.limit.min(1000)
        };
        let expires_at = crate::util::later(req.now, req.lease_for);
        // One call (migration 0018): the candidates, their subscriptions' locks and leases in
        // flight under a cap, the new leases, and each claimed delivery's subscription.
        let claim = sqlx::query("SELECT * FROM aiwg_claim_deliveries($1, $2, $3, $4, $5, $6, $7)")
            .bind(now)
            .bind(capped.then_some(cap))
            .bind(i32::try_from(req.limit.min(1000)).unwrap_or(1000))
            .bind(i32::try_from(fetch).unwrap_or(1000))
            .bind(&req.owner)
            .bind(ns(expires_at))
            .bind(&self.scope);
        let rows = self
            .kept
            .claims
            .run(db, async |conn| claim.fetch_all(conn).await.map_err(db))
            .await?;
        // A subscription's row comes with each of its deliveries; it is read (and its keys
        // opened) once. One whose keys cannot be opened (sealed with a key this instance lacks,
        // or corrupt) costs only its own deliveries: they keep the leases just taken, unsent,
        // and come back when those end, while the rest of the claim goes out. (An error for the
        // whole claim would leave every delivery of it leased and unsent, and the same
        // deliveries, claimed again together, would fail again.)
        let mut subs: BTreeMap<Uuid, Option<std::sync::Arc<Subscription>>> = BTreeMap::new();
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let id: Uuid = r.try_get("delivery_id").map_err(db)?;
            let sub: Uuid = r.try_get("subscription_id").map_err(db)?;
            let subscription = match subs.get(&sub) {
                Some(s) => s.clone(),
                None => {
                    let s = match self.subscription_of(r) {
                        Ok(s) => Some(std::sync::Arc::new(s)),
                        Err(e) => {
                            tracing::warn!(
                                subscription = %sub, error = %e,
                                "webhook outbox: a subscription's keys cannot be read; its deliveries wait for their leases to end"
                            );
                            None
                        }
                    };
                    subs.insert(sub, s.clone());
                    s
                }
            };
            let Some(subscription) = subscription else {
                continue;
            };
            let manual: bool = r.try_get("manual").map_err(db)?;
            out.push(ClaimedDelivery {
                lease: DeliveryLease {
                    delivery_id: id.into(),
                    token: r.try_get("lease_token").map_err(db)?,
                    owner: req.owner.clone(),
                    expires_at,
                },
                id: id.into(),
                event_type: r.try_get("event_type").map_err(db)?,
                payload: r.try_get::<&str, _>("payload").map_err(db)?.into(),
                scheduled_attempts: ucount(r.try_get("scheduled_attempts").map_err(db)?),
                trigger: if manual {
                    AttemptTrigger::Manual
                } else {
                    AttemptTrigger::Scheduled
                },
                subscription,
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
        let (state, next) = match outcome {
            AttemptOutcome::Succeeded => (DeliveryState::Succeeded, None),
            AttemptOutcome::Failed => (DeliveryState::Failed, None),
            AttemptOutcome::Retry { at: when } => (DeliveryState::Retrying, Some(ns(when))),
        };
        let scheduled = i32::from(attempt.trigger == AttemptTrigger::Scheduled);
        let n = sqlx::query(
            "UPDATE aiwg_webhook_deliveries \
             SET attempts = attempts || jsonb_build_array($3::jsonb), \
                 scheduled_attempts = scheduled_attempts + $4, manual = FALSE, state = $5, \
                 next_attempt_at_ns = $6, lease_token = NULL, lease_owner = NULL, \
                 lease_expires_at_ns = NULL \
             WHERE id = $1 AND lease_token = $2",
        )
        .bind(lease.delivery_id.as_uuid())
        .bind(lease.token)
        .bind(Json(attempt))
        .bind(scheduled)
        .bind(state.as_str())
        .bind(next)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        if n == 0 {
            return Err(DispatchStoreError::LeaseLost);
        }
        Ok(())
    }

    async fn finish_attempts(&self, batch: &[FinishedAttempt]) -> DispatchStoreResult<Vec<bool>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(batch.len());
        let mut tokens = Vec::with_capacity(batch.len());
        let mut attempts = Vec::with_capacity(batch.len());
        let mut scheduled = Vec::with_capacity(batch.len());
        let mut states = Vec::with_capacity(batch.len());
        let mut next = Vec::with_capacity(batch.len());
        for f in batch {
            let (state, when) = match f.outcome {
                AttemptOutcome::Succeeded => (DeliveryState::Succeeded, None),
                AttemptOutcome::Failed => (DeliveryState::Failed, None),
                AttemptOutcome::Retry { at } => (DeliveryState::Retrying, Some(ns(at))),
            };
            ids.push(*f.lease.delivery_id.as_uuid());
            tokens.push(f.lease.token);
            attempts.push(Json(&f.attempt));
            scheduled.push(i32::from(f.attempt.trigger == AttemptTrigger::Scheduled));
            states.push(state.as_str());
            next.push(when);
        }
        // One statement for the whole batch, fenced row by row by the lease token (migration
        // 0018: it reads each delivery by key whatever the statistics say).
        let record =
            sqlx::query("SELECT f AS id FROM aiwg_finish_deliveries($1, $2, $3, $4, $5, $6) AS f")
                .bind(&ids)
                .bind(&tokens)
                .bind(&attempts)
                .bind(&scheduled)
                .bind(&states)
                .bind(&next);
        let rows = self
            .kept
            .records
            .run(db, async |conn| record.fetch_all(conn).await.map_err(db))
            .await?;
        let mut done = BTreeSet::new();
        for r in &rows {
            let id: Uuid = r.try_get("id").map_err(db)?;
            done.insert(id);
        }
        Ok(ids.iter().map(|id| done.contains(id)).collect())
    }

    async fn release(&self, lease: &DeliveryLease) -> DispatchStoreResult<()> {
        let n = sqlx::query(
            "UPDATE aiwg_webhook_deliveries SET lease_token = NULL, lease_owner = NULL, \
             lease_expires_at_ns = NULL WHERE id = $1 AND lease_token = $2",
        )
        .bind(lease.delivery_id.as_uuid())
        .bind(lease.token)
        .execute(&self.pool)
        .await
        .map_err(db)?
        .rows_affected();
        if n == 0 {
            return Err(DispatchStoreError::LeaseLost);
        }
        Ok(())
    }

    async fn delivery(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
    ) -> DispatchStoreResult<Option<Delivery>> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM aiwg_webhook_deliveries \
             WHERE id = $1 AND subscription_id = $2"
        ))
        .bind(id.as_uuid())
        .bind(subscription.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(delivery_of).transpose()
    }

    async fn deliveries(
        &self,
        subscription: SubscriptionId,
        limit: usize,
        before: Option<DeliveryId>,
    ) -> DispatchStoreResult<Vec<Delivery>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM aiwg_webhook_deliveries \
             WHERE subscription_id = $1 AND ($2::uuid IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(subscription.as_uuid())
        .bind(before.map(|b| *b.as_uuid()))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(delivery_of).collect()
    }

    async fn requeue(
        &self,
        subscription: SubscriptionId,
        id: DeliveryId,
        now: DateTime<Utc>,
    ) -> DispatchStoreResult<RequeueOutcome> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let row = sqlx::query(
            "SELECT lease_token, lease_expires_at_ns FROM aiwg_webhook_deliveries \
             WHERE id = $1 AND subscription_id = $2 FOR UPDATE",
        )
        .bind(id.as_uuid())
        .bind(subscription.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            return Ok(RequeueOutcome::NotFound);
        };
        let token: Option<Uuid> = row.try_get("lease_token").map_err(db)?;
        let expires: Option<i64> = row.try_get("lease_expires_at_ns").map_err(db)?;
        if token.is_some() && expires.is_some_and(|e| e > ns(now)) {
            // Release the row at once: its attempt in flight records its outcome on it.
            tx.rollback().await.map_err(db)?;
            return Ok(RequeueOutcome::InFlight);
        }
        sqlx::query(
            "UPDATE aiwg_webhook_deliveries SET lease_token = NULL, lease_owner = NULL, \
                 lease_expires_at_ns = NULL, manual = TRUE, state = 'pending', \
                 next_attempt_at_ns = $2 WHERE id = $1",
        )
        .bind(id.as_uuid())
        .bind(ns(now))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(RequeueOutcome::Requeued)
    }

    async fn pending_count(&self) -> DispatchStoreResult<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM aiwg_webhook_deliveries WHERE state IN ('pending', 'retrying')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn next_due_at(&self) -> DispatchStoreResult<Option<DateTime<Utc>>> {
        let next = sqlx::query_scalar(
            "SELECT LEAST( \
                 (SELECT min(d.next_attempt_at_ns) FROM aiwg_webhook_deliveries d \
                  JOIN aiwg_webhook_subscriptions s ON s.id = d.subscription_id \
                  WHERE d.state IN ('pending', 'retrying') AND d.lease_token IS NULL \
                    AND s.enabled), \
                 (SELECT min(lease_expires_at_ns) FROM aiwg_webhook_deliveries \
                  WHERE lease_token IS NOT NULL))",
        );
        let n: Option<i64> = self
            .kept
            .claims
            .run(db, async |conn| next.fetch_one(conn).await.map_err(db))
            .await?;
        Ok(n.map(at))
    }

    fn idle(&self) {
        self.kept.claims.release();
        self.kept.records.release();
    }
}
