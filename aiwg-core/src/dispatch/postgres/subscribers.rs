//! The subscriber list: the enabled subscriptions and their filters, held by each
//! [`PgDispatchStore`](super::PgDispatchStore) so that a job event costs no query to learn
//! whom it goes to ([`DispatchStore::subscribers`](crate::dispatch::DispatchStore::subscribers),
//! asked for every status change of every job).
//!
//! The list is read from the table when it is asked for and nothing is held, and held until a
//! subscription changes. The store forgets it after its own changes, and a task listening on
//! channel `aiwg_webhook_subscriptions` (notified by the table's triggers, migration 0021, for
//! any writer: another instance, a host's own SQL) makes it forget it after everyone else's.
//! The list is held only while that task listens: before its `LISTEN` is in place, and from a
//! lost connection until the next `LISTEN`, every question reads the table. A list read while
//! a change was announced is not kept (the store counts the changes, and keeps a list only if
//! none came while it was read).
//!
//! The task has its own connection (a pool of one made from the store's pool's options), so it
//! takes none from the host's pool, and ends when the store is dropped.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use sqlx::types::Json;
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};
use uuid::Uuid;

use super::db;
use crate::dispatch::subscription::filter_matches;
use crate::dispatch::{DispatchStoreResult, SubscriptionId};

/// The channel the table's triggers notify; the payload is the table's schema.
const CHANNEL: &str = "aiwg_webhook_subscriptions";

/// How long the task waits before listening again after its connection failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// How long the task waits before looking again for the table's triggers when they are missing
/// (the store's migrations have not run yet), unless the store's own migrations end sooner
/// ([`Subscribers::migrated`]).
const LOOK_AGAIN_AFTER: Duration = Duration::from_secs(30);

/// The list and the task that keeps it true (shared by the store's clones).
#[derive(Clone)]
pub(super) struct Subscribers {
    state: Arc<Mutex<State>>,
    /// Cuts the task's wait short (the store's migrations just ran).
    look_again: Arc<Notify>,
    /// Stops the task when the last clone of the store is dropped.
    _listening: Arc<DropGuard>,
}

#[derive(Default)]
struct State {
    /// Changes seen so far (a list read across one is not kept).
    changes: u64,
    /// Whether the task's `LISTEN` is in place: only then is a list kept.
    listening: bool,
    held: Option<Arc<[Held]>>,
}

impl State {
    fn changed(&mut self) {
        self.changes += 1;
        self.held = None;
    }
}

/// An enabled subscription: its id and event filters.
struct Held {
    id: SubscriptionId,
    events: Vec<String>,
}

impl Subscribers {
    /// Starts the task for the store in `scope` (its schema) on `pool`'s server, on the
    /// current Tokio runtime.
    pub(super) fn start(pool: &PgPool, scope: String) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let look_again = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let own = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*pool.connect_options()).clone());
        tokio::spawn(listen(
            Arc::clone(&state),
            own,
            scope,
            Arc::clone(&look_again),
            stop.clone(),
        ));
        Self {
            state,
            look_again,
            _listening: Arc::new(stop.drop_guard()),
        }
    }

    /// The store's migrations ran: the task, if it is waiting to look for the table's triggers
    /// again (a store made before its migrations, as `from_pool` then `migrate` does), looks
    /// now instead of after [`LOOK_AGAIN_AFTER`].
    pub(super) fn migrated(&self) {
        self.look_again.notify_one();
    }

    /// Forgets the list: a subscription changed here.
    pub(super) fn changed(&self) {
        lock(&self.state).changed();
    }

    /// The enabled subscriptions whose filters match `event_type`, oldest first.
    pub(super) async fn matching(
        &self,
        pool: &PgPool,
        event_type: &str,
    ) -> DispatchStoreResult<Vec<SubscriptionId>> {
        let (held, changes) = {
            let state = lock(&self.state);
            (state.held.clone(), state.changes)
        };
        let held = match held {
            Some(held) => held,
            None => {
                let read = read(pool).await?;
                let mut state = lock(&self.state);
                if state.listening && state.changes == changes {
                    state.held = Some(Arc::clone(&read));
                }
                read
            }
        };
        Ok(held
            .iter()
            .filter(|h| h.events.iter().any(|f| filter_matches(f, event_type)))
            .map(|h| h.id)
            .collect())
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The enabled subscriptions, oldest first.
async fn read(pool: &PgPool) -> DispatchStoreResult<Arc<[Held]>> {
    let rows = sqlx::query(
        "SELECT id, events FROM aiwg_webhook_subscriptions WHERE enabled \
         ORDER BY created_at_ns, id",
    )
    .fetch_all(pool)
    .await
    .map_err(db)?;
    rows.iter()
        .map(|r| {
            let id: Uuid = r.try_get("id").map_err(db)?;
            let Json(events): Json<Vec<String>> = r.try_get("events").map_err(db)?;
            Ok(Held {
                id: id.into(),
                events,
            })
        })
        .collect()
}

/// Listens until `stop`, again after each lost connection, and after the store's migrations
/// when the triggers were missing.
async fn listen(
    state: Arc<Mutex<State>>,
    own: PgPool,
    scope: String,
    look_again: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let wait = tokio::select! {
            () = stop.cancelled() => break,
            wait = follow(&state, &own, &scope) => wait,
        };
        lock(&state).listening = false;
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            () = look_again.notified() => {}
        }
    }
    own.close().await;
}

/// Listens on one connection until it fails: each change announced for `scope` forgets the
/// list. Returns how long to wait before listening again.
async fn follow(state: &Mutex<State>, own: &PgPool, scope: &str) -> Duration {
    let mut listener = match PgListener::connect_with(own).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(error = %e, "the webhook subscriber list cannot listen for changes");
            return RELISTEN_AFTER;
        }
    };
    if let Err(e) = listener.listen(CHANNEL).await {
        tracing::warn!(error = %e, "the webhook subscriber list cannot listen for changes");
        return RELISTEN_AFTER;
    }
    // Without the triggers (migration 0021 not run yet) no change is announced: hold nothing.
    // The trigger is looked for in the schema, not through the table's name: a name resolved
    // at the moment the table was renamed (as the tests' probe does, for a few milliseconds)
    // would find nothing and wait half a minute.
    let announced = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgname = 'aiwg_subscriptions_changed' AND n.nspname = $1)",
    )
    .bind(scope)
    .fetch_one(&mut listener)
    .await;
    match announced {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!(
                "the webhook subscriptions' changes are not announced yet (migrations)"
            );
            return LOOK_AGAIN_AFTER;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the webhook subscriber list cannot listen for changes");
            return RELISTEN_AFTER;
        }
    }
    {
        // Whatever changed before the `LISTEN` was in place is read anew.
        let mut state = lock(state);
        state.changed();
        state.listening = true;
    }
    loop {
        match listener.try_recv().await {
            Ok(Some(note)) => {
                if note.payload() == scope {
                    lock(state).changed();
                }
            }
            Ok(None) => {
                tracing::warn!("the webhook subscriber list lost its connection; listening again");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the webhook subscriber list stopped listening");
                break;
            }
        }
    }
    let mut state = lock(state);
    state.listening = false;
    state.changed();
    RELISTEN_AFTER
}
