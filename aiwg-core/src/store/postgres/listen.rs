//! Cross-instance notification: `LISTEN` on the store's channel and tell the local engine.

use std::sync::Weak;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::types::Json;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{db, to_i64, PgStore};
use crate::event::{JobEvent, JobEventKind};
use crate::job::{JobId, JobStatus};
use crate::store::{ClusterListener, StoreError};

/// The longest notification payload the notifier sends (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7600;

/// The shortest time between two notifications of one store. The first event after a quiet
/// spell goes out at once; under load the events of this window share one `NOTIFY` (one
/// transaction, one turn of PostgreSQL's notification lock, one wake-up of every listener)
/// instead of one each. Under load an event reaches the other instances at most this much later
/// than it would alone (their own queued work they claim at once; a job queued here wakes them
/// within the window).
const NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// An event committed by this store, for the other instances.
pub(super) struct Announce {
    pub(super) job: JobId,
    pub(super) seq: u64,
    pub(super) at: DateTime<Utc>,
    /// The kind's JSON, when short enough to send along.
    pub(super) kind: Option<String>,
}

impl Announce {
    /// The event's entry in a batch payload: `{"j", "s", "a", "k"?}`.
    fn entry(&self, with_kind: bool) -> String {
        let at = serde_json::to_string(&self.at).unwrap_or_else(|_| "null".into());
        match self.kind.as_deref().filter(|_| with_kind) {
            Some(k) => format!(
                r#"{{"j":"{}","s":{},"a":{at},"k":{k}}}"#,
                self.job, self.seq
            ),
            None => format!(r#"{{"j":"{}","s":{},"a":{at}}}"#, self.job, self.seq),
        }
    }
}

/// The store's notifier: a task that sends the events this store committed as few `NOTIFY`s
/// as it can (every event written while the previous one was on its way, or within
/// [`NOTIFY_INTERVAL`] of it, goes into the next).
#[derive(Clone)]
pub(super) struct Notifier {
    tx: mpsc::UnboundedSender<Announce>,
}

impl Notifier {
    /// Starts the task; it ends when the store (the last sender) is dropped, after sending what
    /// is left.
    pub(super) fn start(pool: PgPool, channel: String, instance: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(notify_loop(pool, channel, instance, rx));
        Self { tx }
    }

    pub(super) fn announce(&self, a: Announce) {
        let _ = self.tx.send(a);
    }

    /// Announces an event committed with sequence number `seq`.
    pub(super) fn announce_event(&self, job: JobId, seq: i64, ev: &super::NewEvent) {
        self.announce(Announce {
            job,
            seq: super::to_u64(seq),
            at: ev.at,
            kind: (ev.text.len() <= super::INLINE_KIND_MAX).then(|| ev.text.clone()),
        });
    }
}

async fn notify_loop(
    pool: PgPool,
    channel: String,
    instance: String,
    mut rx: mpsc::UnboundedReceiver<Announce>,
) {
    let head = format!(
        r#"{{"i":{},"b":["#,
        serde_json::to_string(&instance).unwrap_or_else(|_| "\"\"".into())
    );
    let mut carried: Option<Announce> = None;
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        let first = match carried.take() {
            Some(a) => a,
            None => match rx.recv().await {
                Some(a) => a,
                None => return,
            },
        };
        if let Some(last) = last_sent {
            // Let the events of the rest of the window join this one.
            tokio::time::sleep_until(last + NOTIFY_INTERVAL).await;
        }
        let mut payload = head.clone();
        let entry = first
            .entry(head.len() + 200 + first.kind.as_ref().map_or(0, String::len) < MAX_PAYLOAD);
        payload.push_str(&entry);
        while let Ok(next) = rx.try_recv() {
            let mut entry = next.entry(true);
            if payload.len() + entry.len() + 3 > MAX_PAYLOAD {
                entry = next.entry(false);
            }
            if payload.len() + entry.len() + 3 > MAX_PAYLOAD {
                carried = Some(next);
                break;
            }
            payload.push(',');
            payload.push_str(&entry);
        }
        payload.push_str("]}");
        // A notification alone needs no flush to disk: a crash loses it either way.
        let sent =
            sqlx::query("SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)")
                .bind(&channel)
                .bind(&payload)
                .execute(&pool)
                .await;
        last_sent = Some(tokio::time::Instant::now());
        match sent {
            Ok(_) => {}
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "could not notify the other instances of new events")
            }
        }
    }
}

/// One event of a batch notification.
#[derive(Debug, Deserialize)]
struct Entry {
    j: JobId,
    s: u64,
    a: DateTime<Utc>,
    #[serde(default)]
    k: Option<JobEventKind>,
}

/// A notification payload. Batches of events: `i` (instance) and `b` (the events: `j` job,
/// `s` seq, `a` time, `k` the kind, left out when too long). Cancel requests: `i` and `c` (the
/// job). Single events (what earlier versions sent): `i`, `j`, `s`, `a`, `k`.
#[derive(Debug, Deserialize)]
struct Note {
    i: String,
    #[serde(default)]
    b: Option<Vec<Entry>>,
    #[serde(default)]
    c: Option<JobId>,
    #[serde(default)]
    j: Option<JobId>,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default)]
    a: Option<DateTime<Utc>>,
    #[serde(default)]
    k: Option<JobEventKind>,
}

impl PgStore {
    /// Subscribes to this store's channel and starts a task that keeps the local engine (its
    /// [`cluster_listener`](crate::Engine::cluster_listener)) in step with the other instances
    /// sharing the database:
    ///
    /// - a job queued (or re-queued) elsewhere, or a job that finished elsewhere and so freed a
    ///   project slot, wakes the engine's idle workers ([`ClusterListener::wake`]);
    /// - every event recorded elsewhere reaches the engine's subscribers
    ///   ([`ClusterListener::remote_event`]);
    /// - a cancel requested elsewhere for a job running here stops it
    ///   ([`ClusterListener::remote_cancel`]).
    ///
    /// Returns once `LISTEN` is in place, so everything committed afterwards is seen. The task
    /// holds one connection of the store's pool while it runs (size the pool accordingly). The task
    /// reconnects after a lost connection (notifications sent meanwhile are lost; the engine's
    /// polling picks up queued work, and subscribers catch up at the next event of their job),
    /// and ends when the pool is closed, at the first notification after the engine was
    /// dropped, or when aborted (abort it when the engine shuts down).
    pub async fn listen(
        &self,
        engine: Weak<dyn ClusterListener>,
    ) -> Result<JoinHandle<()>, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(db)?;
        listener.listen(&self.channel).await.map_err(db)?;
        let weak = engine;
        let pool = self.pool.clone();
        let instance = self.instance.clone();
        Ok(tokio::spawn(run(listener, weak, pool, instance)))
    }
}

async fn run(
    mut listener: PgListener,
    engine: Weak<dyn ClusterListener>,
    pool: PgPool,
    instance: String,
) {
    loop {
        // `try_recv` is not cancelled half-way (no `select!`), so no message is lost to a
        // partial read.
        let received = listener.try_recv().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match received {
            Ok(Some(n)) => handle(&*engine, &pool, &instance, n.payload()).await,
            Ok(None) => {
                tracing::warn!("postgres listener lost its connection; reconnecting");
                // Whatever was queued meanwhile is not announced again.
                engine.wake();
            }
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "postgres listener failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn handle(engine: &dyn ClusterListener, pool: &PgPool, instance: &str, payload: &str) {
    let note: Note = match serde_json::from_str(payload) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable aiwg notification");
            return;
        }
    };
    if note.i == instance {
        // Our own engine published it already.
        return;
    }
    if let Some(id) = note.c {
        engine.remote_cancel(id);
        return;
    }
    let mut wake = false;
    if let Some(batch) = note.b {
        for e in batch {
            wake |= event(engine, pool, e.j, e.s, Some(e.a), e.k).await;
        }
    } else if let (Some(job_id), Some(seq)) = (note.j, note.s) {
        wake = event(engine, pool, job_id, seq, note.a, note.k).await;
    }
    // Once per notification: the worker woken claims for every idle one.
    if wake {
        engine.wake();
    }
}

/// Hands one remote event to the engine (reading it from the table when its kind was left
/// out); whether it may have made work claimable (a job queued, a project slot freed).
async fn event(
    engine: &dyn ClusterListener,
    pool: &PgPool,
    job_id: JobId,
    seq: u64,
    at: Option<DateTime<Utc>>,
    kind: Option<JobEventKind>,
) -> bool {
    let event = match (at, kind) {
        (Some(at), Some(kind)) => JobEvent {
            job_id,
            seq,
            at,
            kind,
        },
        _ => match fetch(pool, job_id, seq).await {
            Ok(Some(ev)) => ev,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, job = %job_id, seq, "could not read a remote event");
                return false;
            }
        },
    };
    let wake = matches!(
        &event.kind,
        JobEventKind::Status { from, to, .. }
            if *to == JobStatus::Queued || *from == Some(JobStatus::Running)
    );
    engine.remote_event(event);
    wake
}

async fn fetch(pool: &PgPool, job_id: JobId, seq: u64) -> Result<Option<JobEvent>, StoreError> {
    let row = sqlx::query("SELECT at, kind FROM aiwg_job_events WHERE job_id = $1 AND seq = $2")
        .bind(job_id.as_uuid())
        .bind(to_i64(seq))
        .fetch_optional(pool)
        .await
        .map_err(db)?;
    row.map(|r| {
        let Json(kind): Json<JobEventKind> = r.try_get("kind").map_err(db)?;
        Ok(JobEvent {
            job_id,
            seq,
            at: r.try_get("at").map_err(db)?,
            kind,
        })
    })
    .transpose()
}
