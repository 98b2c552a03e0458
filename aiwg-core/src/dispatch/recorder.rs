//! Batched recording of finished attempts: the workers hand their results to one task, which
//! writes everything waiting in one [`DispatchStore::finish_attempts`] call (one round trip for
//! a durable store, however many attempts finished meanwhile).

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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

struct Job {
    finished: FinishedAttempt,
    done: oneshot::Sender<Recorded>,
}

/// The handle the workers record through. The recording task ends once every handle is dropped
/// and what they sent is written.
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    // Unbounded, but each sender waits for its answer: at most one job per attempt in flight.
    tx: mpsc::UnboundedSender<Job>,
}

impl Recorder {
    /// Spawns the recording task on the current runtime.
    pub(crate) fn spawn(store: Arc<dyn DispatchStore>) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, tokio::spawn(run(store, rx)))
    }

    /// Records `finished` (together with whatever other workers record meanwhile).
    pub(crate) async fn record(&self, finished: FinishedAttempt) -> Recorded {
        let (done, answer) = oneshot::channel();
        if self.tx.send(Job { finished, done }).is_err() {
            return Recorded::Failed;
        }
        answer.await.unwrap_or(Recorded::Failed)
    }
}

async fn run(store: Arc<dyn DispatchStore>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::new();
    let mut batch = Vec::new();
    let mut answers = Vec::new();
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        for job in jobs.drain(..) {
            batch.push(job.finished);
            answers.push(job.done);
        }
        let outcomes = match store.finish_attempts(&batch).await {
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
        };
        batch.clear();
        for (done, outcome) in answers.drain(..).zip(outcomes) {
            let _ = done.send(outcome);
        }
    }
}
