//! Per-job event streams: stored history first, then live events, ending after the terminal one.

use std::collections::VecDeque;
use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{Engine, EngineError};
use crate::event::JobEvent;
use crate::job::JobId;
use crate::store::StoreError;

struct State {
    engine: Engine,
    id: JobId,
    rx: broadcast::Receiver<JobEvent>,
    buf: VecDeque<JobEvent>,
    last: u64,
    done: bool,
}

impl State {
    /// Re-reads what the store has after `last` (after a lag or a gap).
    async fn refill(&mut self) -> bool {
        match self.engine.inner.store.events(self.id, self.last).await {
            Ok(evs) => {
                self.buf.extend(evs);
                true
            }
            Err(_) => false,
        }
    }

    async fn next(&mut self) -> Option<JobEvent> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                if ev.seq <= self.last {
                    continue;
                }
                self.last = ev.seq;
                if ev.is_terminal() {
                    self.done = true;
                    self.buf.clear();
                }
                return Some(ev);
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Ok(ev) if ev.job_id == self.id && ev.seq > self.last => {
                    if ev.seq > self.last + 1 && self.refill().await {
                        continue;
                    }
                    self.buf.push_back(ev);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    if !self.refill().await {
                        return None;
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

pub(super) async fn job_stream(
    engine: Engine,
    id: JobId,
    after: u64,
) -> Result<Pin<Box<dyn Stream<Item = JobEvent> + Send>>, EngineError> {
    // Subscribe before reading history so nothing falls between the two.
    let rx = engine.inner.bus.subscribe();
    let job = engine.get(id).await?;
    let history = engine
        .inner
        .store
        .events(id, after)
        .await
        .map_err(|e| match e {
            StoreError::NotFound(id) => EngineError::NotFound(id),
            e => EngineError::Store(e),
        })?;
    let state = State {
        engine,
        id,
        rx,
        done: job.is_terminal() && !history.iter().any(JobEvent::is_terminal),
        buf: history.into(),
        last: after,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut st| async move { st.next().await.map(|ev| (ev, st)) },
    )))
}
