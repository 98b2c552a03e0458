//! A worker's slot for the future that ends its last piece of work (an attempt's record, a
//! job's outcome): polled once where it is made, so that a store that answers at once (in
//! memory) costs no task and no allocation, the slot's box being kept for the next one; handed
//! on whole, box and all, when it is not done (a database's round trip), so that the worker
//! goes on to its next piece while it finishes elsewhere.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// See the module docs.
pub(crate) struct FutureSlot<F>(Pin<Box<Option<F>>>);

impl<F: Future> FutureSlot<F> {
    pub(crate) fn new() -> Self {
        Self(Box::pin(None))
    }

    /// Polls `fut` once in this slot: its output when it was ready; otherwise the future, to
    /// be finished elsewhere (the slot takes a fresh box for the next).
    ///
    /// Not an `async fn`: `fut` goes into the box here, when it is called, instead of being
    /// kept in an `async fn`'s state first and moved into the box when that state is polled.
    /// A job's outcome is a future of several kilobytes; each move is a copy of all of it.
    pub(crate) fn poll_once(
        &mut self,
        fut: F,
    ) -> impl Future<Output = Result<F::Output, Unfinished<F>>> + '_ {
        self.0.set(Some(fut));
        async move {
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(self.0.as_mut().as_pin_mut().map(|f| f.poll(cx)))
            })
            .await;
            match polled {
                Some(Poll::Ready(out)) => {
                    self.0.set(None);
                    Ok(out)
                }
                _ => Err(Unfinished(std::mem::replace(&mut self.0, Box::pin(None)))),
            }
        }
    }
}

/// A future polled once and not done, in its box: awaiting it finishes it.
pub(crate) struct Unfinished<F>(Pin<Box<Option<F>>>);

impl<F: Future> Future for Unfinished<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.0.as_mut().as_pin_mut() {
            Some(f) => f.poll(cx),
            None => unreachable!("an unfinished future is made with its future"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ready_future_answers_here_and_a_pending_one_is_handed_on() {
        let mut slot = FutureSlot::new();
        assert_eq!(slot.poll_once(async { 1 }).await.ok(), Some(1));
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let mut slot = FutureSlot::new();
        let unfinished = match slot.poll_once(async move { rx.await.unwrap_or(0) }).await {
            Ok(_) => panic!("the answer was not there yet"),
            Err(u) => u,
        };
        tx.send(7).unwrap();
        assert_eq!(tokio::spawn(unfinished).await.unwrap(), 7);
    }
}
