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
//! A flusher hears [`Flush::idle`] when a batch has been written and no call waits. The
//! PostgreSQL flushers keep their connection between batches while calls keep coming and
//! hand it back to the pool there (`KeptConnection`, with the `postgres` feature): sqlx
//! tests every connection handed back with a round trip, one more per statement.
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
use std::sync::atomic::{AtomicUsize, Ordering};
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

    /// Called when a batch (or a lone call) has been written and no call waits: a flusher
    /// that keeps something between batches while calls keep coming (a database connection,
    /// see `KeptConnection`) lets it go here. Does nothing by default.
    fn idle(&self) {}
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
    /// Calls handed to the task and not yet taken into a batch.
    waiting: Arc<AtomicUsize>,
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
        let waiting = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(
            Arc::clone(&flusher),
            Arc::clone(&slots),
            Arc::clone(&waiting),
            rx,
            max_batch.max(1),
        ));
        Self {
            tx,
            flusher,
            slots,
            waiting,
        }
    }

    /// What writes the batches.
    pub fn flusher(&self) -> &F {
        &self.flusher
    }

    /// Writes `item`: at once when nothing is on its way, otherwise with the next batch.
    /// `None` when the task is gone (the runtime that ran it shut down).
    pub async fn call(&self, item: F::Item) -> Option<F::Answer> {
        if let Ok(_slot) = self.slots.try_acquire() {
            let answer = self.flusher.flush(vec![item]).await.pop();
            if self.waiting.load(Ordering::SeqCst) == 0 {
                self.flusher.idle();
            }
            return answer;
        }
        let (reply, answer) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if self.tx.send((item, reply)).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        answer.await.ok()
    }
}

async fn run<F: Flush>(
    flusher: Arc<F>,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
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
        waiting.fetch_sub(batch.len(), Ordering::SeqCst);
        let flusher = Arc::clone(&flusher);
        let waiting = Arc::clone(&waiting);
        tokio::spawn(async move {
            let (items, replies): (Vec<F::Item>, Vec<_>) = batch.into_iter().unzip();
            let answers = flusher.flush(items).await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
            if waiting.load(Ordering::SeqCst) == 0 {
                flusher.idle();
            }
            drop(slot);
        });
    }
    // The handle is gone: let the batches on their way end.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
}

/// A PostgreSQL connection a flusher keeps between its batches while calls keep coming.
///
/// sqlx tests every connection handed back to its pool with a round trip to the server (a
/// `Sync` and its `ReadyForQuery`), so a statement run on the pool costs two round trips.
/// A flusher under load writes batch after batch: it runs its statement with
/// [`run`](Self::run) (or takes its connection with [`take`](Self::take) and gives it back
/// with [`keep`](Self::keep) when its statements succeeded), and [`release`](Self::release)s
/// it to the pool from
/// [`Flush::idle`], or at once when the pool has no other connection to spare. A connection
/// is out of the slot while in use, so a write dropped half-way drops its connection with it
/// (sqlx then reads what was left before the pool takes it back), and a failed statement's
/// connection goes back to the pool, which tests it.
#[cfg(feature = "postgres")]
pub struct KeptConnection {
    pool: sqlx::PgPool,
    kept: std::sync::Mutex<Option<sqlx::pool::PoolConnection<sqlx::Postgres>>>,
}

#[cfg(feature = "postgres")]
impl KeptConnection {
    /// Keeps connections of `pool`.
    #[must_use]
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self {
            pool,
            kept: std::sync::Mutex::new(None),
        }
    }

    fn slot(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<sqlx::pool::PoolConnection<sqlx::Postgres>>> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept connection, or one from the pool when none is kept (or another call has it).
    ///
    /// # Errors
    ///
    /// The pool's, when it has to hand out a connection and cannot.
    pub async fn take(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
        let kept = self.slot().take();
        match kept {
            Some(conn) => Ok(conn),
            None => self.pool.acquire().await,
        }
    }

    /// Keeps `conn` for the next statement: call it after a statement that succeeded. When a
    /// connection is kept already, or the pool has none to spare (none idle and no room for
    /// another), `conn` goes back to the pool: a kept connection is one nobody else can have,
    /// and the writers that keep theirs must not leave the pool's other users waiting.
    pub fn keep(&self, conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
        let spare = self.pool.num_idle() > 0
            || self.pool.size() < self.pool.options().get_max_connections();
        if !spare {
            return;
        }
        let mut slot = self.slot();
        if slot.is_none() {
            *slot = Some(conn);
        }
    }

    /// Runs `statement` on the kept connection (or one from the pool; `acquire` makes the
    /// pool's error the caller's) and keeps the connection for the next statement when it
    /// succeeded: [`take`](Self::take), then [`keep`](Self::keep).
    ///
    /// # Errors
    ///
    /// The pool's, through `acquire`, or the statement's.
    pub async fn run<T, E>(
        &self,
        acquire: impl FnOnce(sqlx::Error) -> E,
        statement: impl AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.take().await.map_err(acquire)?;
        let done = statement(&mut conn).await;
        if done.is_ok() {
            self.keep(conn);
        }
        done
    }

    /// Hands the kept connection, if any, back to the pool.
    pub fn release(&self) {
        let kept = self.slot().take();
        drop(kept);
    }

    /// Whether a connection is kept.
    fn is_kept(&self) -> bool {
        self.slot().is_some()
    }
}

#[cfg(feature = "postgres")]
impl std::fmt::Debug for KeptConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConnection")
            .field("kept", &self.is_kept())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Logs its batches and its idle calls; its first batch waits for the gate.
    struct Logger {
        log: Mutex<Vec<String>>,
        gate: Semaphore,
        first: std::sync::atomic::AtomicBool,
    }

    impl Flush for Logger {
        type Item = u32;
        type Answer = u32;
        async fn flush(&self, items: Vec<u32>) -> Vec<u32> {
            if self.first.swap(false, Ordering::SeqCst) {
                let _ = self.gate.acquire().await.map(|p| p.forget());
            }
            self.log.lock().unwrap().push(format!("flush {items:?}"));
            items
        }
        fn idle(&self) {
            self.log.lock().unwrap().push("idle".into());
        }
    }

    /// A flusher hears `idle` once the calls stop, not between batches while calls wait.
    #[tokio::test]
    async fn the_flusher_is_told_when_no_call_waits() {
        let c = Arc::new(Coalescer::start(
            Logger {
                log: Mutex::default(),
                gate: Semaphore::new(0),
                first: true.into(),
            },
            10,
        ));
        let call = |n| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.call(n).await })
        };
        let first = call(1);
        // The first call is on its way (it holds the one slot); two more wait for it.
        while c.slots.available_permits() != 0 {
            tokio::task::yield_now().await;
        }
        let (second, third) = (call(2), call(3));
        while c.waiting.load(Ordering::SeqCst) != 2 {
            tokio::task::yield_now().await;
        }
        c.flusher().gate.add_permits(1);
        let answers = tokio::time::timeout(Duration::from_secs(10), async {
            (first.await, second.await, third.await)
        })
        .await
        .expect("answered");
        assert_eq!(
            (answers.0.unwrap(), answers.1.unwrap(), answers.2.unwrap()),
            (Some(1), Some(2), Some(3))
        );
        // The batch's task tells the flusher after answering its callers.
        tokio::time::timeout(Duration::from_secs(10), async {
            while c.flusher().log.lock().unwrap().len() < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("idle");
        assert_eq!(
            *c.flusher().log.lock().unwrap(),
            ["flush [1]", "flush [2, 3]", "idle"]
        );
        // A lone call: written at once, then idle.
        assert_eq!(c.call(4).await, Some(4));
        assert_eq!(
            c.flusher().log.lock().unwrap()[3..],
            ["flush [4]".to_owned(), "idle".to_owned()]
        );
    }
}
