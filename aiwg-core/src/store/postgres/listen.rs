//! Cross-instance notification: `LISTEN` on the store's channel and tell the local engine.

use std::sync::Weak;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::postgres::{PgListener, PgPool};
use sqlx::types::Json;
use sqlx::Row;
use tokio::task::JoinHandle;

use super::{db, to_i64, PgStore};
use crate::event::{JobEvent, JobEventKind};
use crate::job::{JobId, JobStatus};
use crate::store::{ClusterListener, StoreError};

/// A notification payload. Events: `i` (instance), `j` (job), `s` (seq), `a` (time) and `k`
/// (the kind, left out when too long). Cancel requests: `i` and `c` (the job).
#[derive(Debug, Deserialize)]
struct Note {
    i: String,
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
    let (Some(job_id), Some(seq)) = (note.j, note.s) else {
        return;
    };
    let event = match (note.a, note.k) {
        (Some(at), Some(kind)) => JobEvent {
            job_id,
            seq,
            at,
            kind,
        },
        _ => match fetch(pool, job_id, seq).await {
            Ok(Some(ev)) => ev,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, job = %job_id, seq, "could not read a remote event");
                return;
            }
        },
    };
    let wake = matches!(
        &event.kind,
        JobEventKind::Status { from, to, .. }
            if *to == JobStatus::Queued || *from == Some(JobStatus::Running)
    );
    engine.remote_event(event);
    if wake {
        engine.wake();
    }
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
