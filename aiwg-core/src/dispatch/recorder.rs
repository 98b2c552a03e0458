//! Batched recording of finished attempts, through a [`Coalescer`]: an attempt is written at
//! once, by the worker that made it, while no other record is on its way (an in-memory store
//! answers there and then, with no hand-over to another task); the attempts that finish
//! meanwhile go together in one [`DispatchStore::finish_attempts`] call (one round trip for a
//! durable store, however many attempts finished meanwhile).

use std::sync::Arc;

use crate::coalesce::{Coalescer, Flush};

use super::store::{DispatchStore, FinishedAttempt};

/// The most attempts written in one call.
const MAX_BATCH: usize = 256;

/// What became of one attempt handed to the [`Recorder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Written; the delivery is in its new state.
    Yes,
    /// The lease no longer matched: nothing was written.
    LeaseLost,
    /// The store failed (logged once per batch) or the recorder is gone.
    Failed,
}

/// Writes a batch of finished attempts.
struct Attempts(Arc<dyn DispatchStore>);

impl Flush for Attempts {
    type Item = FinishedAttempt;
    type Answer = Recorded;

    async fn flush(&self, batch: Vec<FinishedAttempt>) -> Vec<Recorded> {
        match self.0.finish_attempts(&batch).await {
            Ok(recorded) if recorded.len() == batch.len() => recorded
                .into_iter()
                .map(|ok| {
                    if ok {
                        Recorded::Yes
                    } else {
                        Recorded::LeaseLost
                    }
                })
                .collect(),
            Ok(_) => {
                tracing::warn!(
                    "webhook dispatcher: the store answered for the wrong number of attempts"
                );
                vec![Recorded::Failed; batch.len()]
            }
            Err(e) => {
                tracing::warn!(error = %e, attempts = batch.len(), "webhook dispatcher: recording attempts failed");
                vec![Recorded::Failed; batch.len()]
            }
        }
    }

    fn idle(&self) {
        self.0.idle();
    }
}

/// The handle the workers record through. Its task ends once every handle is dropped and what
/// they sent is written.
#[derive(Clone, Debug)]
pub(crate) struct Recorder(Arc<Coalescer<Attempts>>);

impl Recorder {
    /// Starts the recording task on the current runtime.
    pub(crate) fn start(store: Arc<dyn DispatchStore>) -> Self {
        Self(Arc::new(Coalescer::start(Attempts(store), MAX_BATCH)))
    }

    /// Records `finished` (together with whatever other workers record meanwhile).
    pub(crate) async fn record(&self, finished: FinishedAttempt) -> Recorded {
        self.0.call(finished).await.unwrap_or(Recorded::Failed)
    }
}
