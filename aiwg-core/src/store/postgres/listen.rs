//! Cross-instance notification: `LISTEN` on the store's channel and tell the local engine.

use std::sync::{Arc, Mutex, Weak};
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
    /// What the other instances may skip a wake-up for.
    pub(super) hint: Hint,
}

/// What an announced event tells the other instances about waking for it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Hint {
    /// Nothing: wake as the event says.
    None,
    /// A job queued here that this instance sees to (its `queued` event): an idle worker here
    /// was woken for it, or jobs running here fill its project's limit. The other instances
    /// need not wake for it (`"w": true`).
    SeenToHere,
    /// A running job's end that frees no concurrency group (it had none): only instances
    /// whose claims are limited per project need wake for it (`"x": true`).
    FreesNoGroup,
}

impl Announce {
    /// The event's entry in a batch payload: `{"j", "s", "a", "k"?, "w"? | "x"?}`.
    fn entry(&self, with_kind: bool) -> String {
        let at = serde_json::to_string(&self.at).unwrap_or_else(|_| "null".into());
        let w = match self.hint {
            Hint::None => "",
            Hint::SeenToHere => r#","w":true"#,
            Hint::FreesNoGroup => r#","x":true"#,
        };
        match self.kind.as_deref().filter(|_| with_kind) {
            Some(k) => format!(
                r#"{{"j":"{}","s":{},"a":{at},"k":{k}{w}}}"#,
                self.job, self.seq
            ),
            None => format!(r#"{{"j":"{}","s":{},"a":{at}{w}}}"#, self.job, self.seq),
        }
    }
}

/// The store's notifier: a task that sends the events this store committed as few `NOTIFY`s
/// as it can (every event written while the previous one was on its way, or within
/// [`NOTIFY_INTERVAL`] of it, goes into the next).
#[derive(Clone)]
pub(super) struct Notifier {
    tx: mpsc::UnboundedSender<Announce>,
    /// The local engine, once the store listens for it ([`PgStore::listen`]): asked whether it
    /// claims a job queued here itself.
    local: Arc<Mutex<Option<Weak<dyn ClusterListener>>>>,
}

impl Notifier {
    /// Starts the task; it ends when the store (the last sender) is dropped, after sending what
    /// is left.
    pub(super) fn start(pool: PgPool, channel: String, instance: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(notify_loop(pool, channel, instance, rx));
        Self {
            tx,
            local: Arc::default(),
        }
    }

    /// The engine that listens through this store (see [`Notifier::announce_queued`]).
    fn set_local(&self, engine: Weak<dyn ClusterListener>) {
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
    }

    pub(super) fn announce(&self, a: Announce) {
        let _ = self.tx.send(a);
    }

    /// Announces an event committed with sequence number `seq`.
    pub(super) fn announce_event(&self, job: JobId, seq: i64, ev: &super::NewEvent) {
        self.send_event(job, seq, ev, Hint::None);
    }

    /// Announces the event that ended `job`'s attempt, telling the other instances when the
    /// end frees no concurrency group (see [`ClusterListener::limits_claims_per_project`]).
    pub(super) fn announce_ended(&self, job: &crate::job::Job, seq: i64, ev: &super::NewEvent) {
        let hint = if job.concurrency_group.is_none() {
            Hint::FreesNoGroup
        } else {
            Hint::None
        };
        self.send_event(job.id, seq, ev, hint);
    }

    /// Announces the `queued` event of a job just created here. When the local engine sees to
    /// it ([`ClusterListener::promise_claim`]: an idle worker it wakes once the create has
    /// answered, or the job's project full of jobs it runs), the other instances are told not
    /// to wake for it: their claims would find it taken (or the project full) and, on a small
    /// machine, slow the one that takes it.
    pub(super) fn announce_queued(&self, job: &crate::job::Job, seq: i64, ev: &super::NewEvent) {
        let engine = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade);
        let hint = if engine.is_some_and(|e| e.promise_claim(&job.project_path)) {
            Hint::SeenToHere
        } else {
            Hint::None
        };
        self.send_event(job.id, seq, ev, hint);
    }

    fn send_event(&self, job: JobId, seq: i64, ev: &super::NewEvent, hint: Hint) {
        self.announce(Announce {
            job,
            seq: super::to_u64(seq),
            at: ev.at,
            kind: (ev.text.len() <= super::INLINE_KIND_MAX).then(|| ev.text.clone()),
            hint,
        });
    }
}

async fn notify_loop(
    pool: PgPool,
    channel: String,
    instance: String,
    mut rx: mpsc::UnboundedReceiver<Announce>,
) {
    let head = format!(r#"{}"b":["#, own_prefix(&instance));
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
        // On the pool, not kept between sends as the store's batching writers keep theirs
        // (`KeptConnection`): a send waits up to `NOTIFY_INTERVAL` for the next, and a
        // connection held through that wait would be one less for everyone else.
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

/// How every batch notification of `instance` begins: `{"i":<instance>,`. The listener
/// recognises its own store's notifications by it without reading the rest (a batch of
/// events with their kinds and times, which its engine published already); the name is
/// closed by its quote, so no other instance's name matches.
fn own_prefix(instance: &str) -> String {
    format!(
        r#"{{"i":{},"#,
        serde_json::to_string(instance).unwrap_or_else(|_| "\"\"".into())
    )
}

/// One event of a batch notification.
#[derive(Debug, Deserialize)]
struct Entry {
    j: JobId,
    s: u64,
    #[serde(with = "crate::timestamp")]
    a: DateTime<Utc>,
    #[serde(default)]
    k: Option<JobEventKind>,
    /// A job queued by an instance that sees to it itself (see [`Hint::SeenToHere`]).
    #[serde(default)]
    w: bool,
    /// A running job ended that had no concurrency group.
    #[serde(default)]
    x: bool,
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
    #[serde(with = "crate::timestamp::option")]
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
        self.notifier.set_local(engine.clone());
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
    let own = own_prefix(&instance);
    loop {
        // `try_recv` is not cancelled half-way (no `select!`), so no message is lost to a
        // partial read.
        let received = listener.try_recv().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        match received {
            // This store's own batches: its engine published their events already. (Every
            // instance hears its own notifications; one alone hears nothing else.)
            Ok(Some(n)) if n.payload().starts_with(&own) => {}
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
            let (w, x) = (e.w, e.x);
            wake |= match event(engine, pool, e.j, e.s, Some(e.a), e.k).await {
                // A job whose own instance sees to it is left to that instance.
                Some(Claimable::Queued) => !w,
                // An end that frees no group matters only to claims limited per project.
                Some(Claimable::Freed) => !x || engine.limits_claims_per_project(),
                None => false,
            };
        }
    } else if let (Some(job_id), Some(seq)) = (note.j, note.s) {
        wake = event(engine, pool, job_id, seq, note.a, note.k)
            .await
            .is_some();
    }
    // Once per notification: the worker woken claims for every idle one.
    if wake {
        engine.wake();
    }
}

/// How a remote event may have made work claimable here.
enum Claimable {
    /// A job was queued (or queued again).
    Queued,
    /// A running job stopped running: a project slot, and maybe a concurrency group, is free.
    Freed,
}

/// Hands one remote event to the engine (reading it from the table when its kind was left
/// out); whether it may have made work claimable, and how.
async fn event(
    engine: &dyn ClusterListener,
    pool: &PgPool,
    job_id: JobId,
    seq: u64,
    at: Option<DateTime<Utc>>,
    kind: Option<JobEventKind>,
) -> Option<Claimable> {
    let event = match (at, kind) {
        (Some(at), Some(kind)) => JobEvent {
            job_id,
            seq,
            at,
            kind,
        },
        _ => match fetch(pool, job_id, seq).await {
            Ok(Some(ev)) => ev,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, job = %job_id, seq, "could not read a remote event");
                return None;
            }
        },
    };
    let claimable = match &event.kind {
        JobEventKind::Status { to, .. } if *to == JobStatus::Queued => Some(Claimable::Queued),
        JobEventKind::Status { from, .. } if *from == Some(JobStatus::Running) => {
            Some(Claimable::Freed)
        }
        _ => None,
    };
    engine.remote_event(event);
    claimable
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts wake-ups and remote events; limits its claims per project when told to.
    struct Listener {
        wakes: AtomicUsize,
        events: AtomicUsize,
        per_project: bool,
    }

    impl ClusterListener for Listener {
        fn wake(&self) {
            self.wakes.fetch_add(1, Ordering::SeqCst);
        }
        fn remote_event(&self, _: JobEvent) {
            self.events.fetch_add(1, Ordering::SeqCst);
        }
        fn remote_cancel(&self, _: JobId) {}
        fn limits_claims_per_project(&self) -> bool {
            self.per_project
        }
    }

    /// A batch from instance `other` of one status change of a new job, with `hint`.
    fn note(from: Option<JobStatus>, to: JobStatus, hint: Hint) -> String {
        let kind = serde_json::to_string(&JobEventKind::status(from, to, 1)).unwrap();
        let a = Announce {
            job: JobId::new(),
            seq: 2,
            at: Utc::now(),
            kind: Some(kind),
            hint,
        };
        format!(r#"{{"i":"other","b":[{}]}}"#, a.entry(true))
    }

    /// Wake-ups one notification gives a listener, and that its event was handed over.
    async fn wakes(payload: &str, per_project: bool) -> usize {
        let l = Listener {
            wakes: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            per_project,
        };
        // Never connected: every kind is in the payload, so nothing is read.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        handle(&l, &pool, "here", payload).await;
        assert_eq!(l.events.load(Ordering::SeqCst), 1, "{payload}");
        l.wakes.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn remote_notes_wake_only_an_engine_that_may_claim_something_because_of_them() {
        use JobStatus::{Cancelled, Completed, Queued, Running};
        // A job queued elsewhere wakes, unless the instance that queued it woke its own
        // idle worker for it.
        assert_eq!(wakes(&note(None, Queued, Hint::None), false).await, 1);
        assert_eq!(wakes(&note(None, Queued, Hint::SeenToHere), false).await, 0);
        // A job that stopped running elsewhere frees a project slot and maybe a group: it
        // wakes, unless it had no group and this engine's claims are not limited per project.
        for to in [Completed, Cancelled] {
            assert_eq!(wakes(&note(Some(Running), to, Hint::None), false).await, 1);
            assert_eq!(
                wakes(&note(Some(Running), to, Hint::FreesNoGroup), false).await,
                0
            );
            assert_eq!(
                wakes(&note(Some(Running), to, Hint::FreesNoGroup), true).await,
                1
            );
        }
        // A retry is a job queued again: it wakes whatever its group.
        assert_eq!(
            wakes(&note(Some(Running), Queued, Hint::FreesNoGroup), false).await,
            1
        );
        // Other events do not wake.
        assert_eq!(
            wakes(&note(Some(Queued), Running, Hint::None), true).await,
            0
        );
        // What an earlier version sent (no flags): every queued job and every end wakes.
        let old = |from: Option<JobStatus>, to| {
            let kind = serde_json::to_string(&JobEventKind::status(from, to, 1)).unwrap();
            format!(
                r#"{{"i":"other","b":[{{"j":"{}","s":2,"a":"2026-12-04T00:00:00Z","k":{kind}}}]}}"#,
                JobId::new()
            )
        };
        assert_eq!(wakes(&old(None, Queued), false).await, 1);
        assert_eq!(wakes(&old(Some(Running), Completed), false).await, 1);
    }

    /// The listener knows its own store's batches by their first bytes, and no other
    /// instance's: not one whose name begins with its own, nor one whose name needs escaping.
    #[test]
    fn a_store_knows_its_own_batches_by_their_prefix_alone() {
        let ours = |instance: &str, payload: &str| payload.starts_with(&own_prefix(instance));
        let batch = |instance: &str| {
            format!(
                r#"{}"b":[{{"j":"{}","s":2,"a":"2026-12-04T00:00:00Z"}}]}}"#,
                own_prefix(instance),
                JobId::new()
            )
        };
        assert!(ours("host-1", &batch("host-1")));
        assert!(!ours("host-1", &batch("host-12")));
        assert!(!ours("host-12", &batch("host-1")));
        assert!(!ours("host-1", &note(None, JobStatus::Queued, Hint::None)));
        let quoted = r#"a "quoted" \ name"#;
        assert!(ours(quoted, &batch(quoted)));
        assert!(!ours("a ", &batch(quoted)));
        // What the notifier sends parses as a batch of that instance.
        let note: Note = serde_json::from_str(&batch(quoted)).unwrap();
        assert_eq!(note.i, quoted);
        assert_eq!(note.b.map(|b| b.len()), Some(1));
    }
}
