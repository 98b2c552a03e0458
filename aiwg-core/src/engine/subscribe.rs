//! Per-job event streams: stored history first, then live events, ending after the terminal one.

use std::collections::VecDeque;
use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{Engine, EngineError};
use crate::event::JobEvent;
use crate::job::JobId;

/// How many stored events a stream reads at a time while it catches up.
const PAGE: usize = 256;

struct State {
    engine: Engine,
    id: JobId,
    rx: broadcast::Receiver<JobEvent>,
    buf: VecDeque<JobEvent>,
    last: u64,
    /// Still reading stored history (at the start, after a lag or a gap).
    backlog: bool,
    /// The job had ended when the stream began: once the history is read, nothing is left.
    ended: bool,
    done: bool,
}

impl State {
    /// Reads the next page of stored events after `last`; `false` when the store failed.
    async fn page(&mut self) -> bool {
        match self
            .engine
            .inner
            .store
            .events_page(self.id, self.last, PAGE)
            .await
        {
            Ok(evs) => {
                self.backlog = evs.len() == PAGE;
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
            if self.backlog {
                if !self.page().await {
                    return None;
                }
                continue;
            }
            if self.ended {
                return None;
            }
            match self.rx.recv().await {
                Ok(ev) if ev.job_id == self.id && ev.seq > self.last => {
                    if ev.seq > self.last + 1 {
                        // A gap: catch up from the store (the live event comes with it).
                        self.backlog = true;
                        continue;
                    }
                    self.buf.push_back(ev);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => self.backlog = true,
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
    let state = State {
        engine,
        id,
        rx,
        buf: VecDeque::new(),
        last: after,
        backlog: true,
        ended: job.is_terminal(),
        done: false,
    };
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut st| async move { st.next().await.map(|ev| (ev, st)) },
    )))
}
