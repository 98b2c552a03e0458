//! Calls that arrive together, written together: the batching behind the PostgreSQL stores'
//! submits, audit entries and inbound de-duplication, for any store that writes one row per
//! call.
//!
//! A call goes out at once, from its caller, while nothing else is on its way; the calls that
//! arrive meanwhile wait in the coalescer's task and go out together, as one [`Flush::flush`],
//! as soon as the one on its way has been answered. Nothing waits for a timer, and a store
//! that is not busy costs its callers no hand-over. Where every write takes a lock until it
//! commits, or waits for the disk, many callers then share one statement and one commit
//! instead of queueing for one each. (The PostgreSQL job store's completer is the same idea
//! with one more rule: at most one write per job in a batch.)
//!
//! ```
//! use aiwg_core::coalesce::{Coalescer, Flush};
//!
//! /// Doubles numbers, a batch at a time (a store would write them in one statement).
//! struct Doubler;
//!
//! impl Flush for Doubler {
//!     type Item = u32;
//!     type Answer = u32;
//!     async fn flush(&self, items: Vec<u32>) -> Vec<u32> {
//!         items.into_iter().map(|n| n * 2).collect()
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let doubler = Coalescer::start(Doubler, 100);
//! assert_eq!(doubler.call(21).await, Some(42));
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

/// Statements on their way at once. One: a statement of many rows costs the database less
/// than several of fewer (the completer's measurements), and a lock held until the commit lets
/// only one through at a time anyway.
const IN_FLIGHT: usize = 1;

/// Writes a batch.
pub trait Flush: Send + Sync + 'static {
    /// One call's input.
    type Item: Send + 'static;
    /// One call's answer (its error included: a batch that fails answers each call).
    type Answer: Send + 'static;

    /// Writes `items`, answering each, in order: one answer per item (a missing answer is
    /// the item's caller seeing `None` from [`Coalescer::call`]).
    fn flush(&self, items: Vec<Self::Item>) -> impl Future<Output = Vec<Self::Answer>> + Send;
}

/// The answers of a batch written by one statement: each item's own answer, or, when the
/// statement failed, its error for every one of the batch's `n` items.
pub fn answer_each<T, E: Clone>(n: usize, written: Result<Vec<T>, E>) -> Vec<Result<T, E>> {
    match written {
        Ok(answers) => answers.into_iter().map(Ok).collect(),
        Err(e) => std::iter::repeat_n(e, n).map(Err).collect(),
    }
}

type Call<F> = (<F as Flush>::Item, oneshot::Sender<<F as Flush>::Answer>);

/// The handle of a coalescer's task. The task ends, after writing what it was given, when the
/// handle is dropped.
pub struct Coalescer<F: Flush> {
    tx: mpsc::UnboundedSender<Call<F>>,
    flusher: Arc<F>,
    /// One permit per batch on its way ([`IN_FLIGHT`]).
    slots: Arc<Semaphore>,
}

impl<F: Flush> std::fmt::Debug for Coalescer<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("in_flight", &(IN_FLIGHT - self.slots.available_permits()))
            .finish_non_exhaustive()
    }
}

impl<F: Flush> Coalescer<F> {
    /// Starts the task (on the current Tokio runtime); batches hold at most `max_batch` calls.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start(flusher: F, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let flusher = Arc::new(flusher);
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(run(
            Arc::clone(&flusher),
            Arc::clone(&slots),
            rx,
            max_batch.max(1),
        ));
        Self { tx, flusher, slots }
    }

    /// What writes the batches.
    pub fn flusher(&self) -> &F {
        &self.flusher
    }

    /// Writes `item`: at once when nothing is on its way, otherwise with the next batch.
    /// `None` when the task is gone (the runtime that ran it shut down).
    pub async fn call(&self, item: F::Item) -> Option<F::Answer> {
        if let Ok(_slot) = self.slots.try_acquire() {
            return self.flusher.flush(vec![item]).await.pop();
        }
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).ok()?;
        answer.await.ok()
    }
}

async fn run<F: Flush>(
    flusher: Arc<F>,
    slots: Arc<Semaphore>,
    mut rx: mpsc::UnboundedReceiver<Call<F>>,
    max_batch: usize,
) {
    while let Some(first) = rx.recv().await {
        // Wait for a slot: what arrives meanwhile joins the batch.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        let flusher = Arc::clone(&flusher);
        tokio::spawn(async move {
            let (items, replies): (Vec<F::Item>, Vec<_>) = batch.into_iter().unzip();
            let answers = flusher.flush(items).await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
            drop(slot);
        });
    }
    // The handle is gone: let the batches on their way end.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
}
