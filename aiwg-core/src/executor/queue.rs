//! The engine's own receiving side of an [`EventSink`](super::EventSink): the events of one
//! step, in the order they were emitted.
//!
//! A tokio `mpsc` channel allocates its first block of slots (32 events) when it is made, and
//! most steps emit nothing (a command that prints nothing, an executor that answers at once):
//! the engine made, faulted in and freed that block for every step of every job. This queue
//! allocates one small shared cell per step and grows only with the events actually emitted.
//! Events emitted after the step's receiver is gone are dropped, as a closed channel's are.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::AgentEvent;

/// What a sink and its step's receiver share.
#[derive(Debug, Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct State {
    events: VecDeque<AgentEvent>,
    /// The receiver is gone: what is emitted now is dropped.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an event for the step's receiver (dropped once it is gone).
    pub(super) fn push(&self, event: AgentEvent) {
        {
            let mut s = self.lock();
            if s.closed {
                return;
            }
            s.events.push_back(event);
        }
        self.arrived.notify_one();
    }

    /// Whether the receiver is gone.
    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// The events of one step, for the engine (see [`EventSink::queued`](super::EventSink)).
#[derive(Debug)]
pub(crate) struct StepEvents {
    shared: Arc<Shared>,
}

impl StepEvents {
    pub(super) fn new() -> (Arc<Shared>, Self) {
        let shared = Arc::new(Shared::default());
        (Arc::clone(&shared), Self { shared })
    }

    /// Whether no event is waiting.
    pub(crate) fn is_empty(&self) -> bool {
        self.shared.lock().events.is_empty()
    }

    /// The next event, if one is waiting.
    pub(crate) fn try_recv(&mut self) -> Option<AgentEvent> {
        self.shared.lock().events.pop_front()
    }

    /// Moves the events waiting, at most `max`, to `out` (one lock for all of them).
    pub(crate) fn try_recv_many(&mut self, max: usize, out: &mut Vec<AgentEvent>) {
        let mut s = self.shared.lock();
        let n = s.events.len().min(max);
        out.extend(s.events.drain(..n));
    }

    /// The next event, once one is emitted. Cancel-safe: an event is taken only by the poll
    /// that returns it.
    pub(crate) async fn recv(&mut self) -> AgentEvent {
        loop {
            if let Some(ev) = self.try_recv() {
                return ev;
            }
            // A push between the look above and this wait leaves a permit: not missed.
            self.shared.arrived.notified().await;
        }
    }
}

impl Drop for StepEvents {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.closed = true;
        // Freed now, not when the last sink clone an executor kept goes.
        s.events = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;
    use crate::executor::LogStream;

    fn text(t: &str) -> AgentEvent {
        AgentEvent::Text { text: t.into() }
    }

    #[tokio::test]
    async fn events_arrive_in_order_and_wake_a_waiting_receiver() {
        let (shared, mut rx) = StepEvents::new();
        assert!(rx.is_empty());
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second, rx)
        });
        tokio::task::yield_now().await;
        shared.push(text("a"));
        shared.push(AgentEvent::Log {
            stream: LogStream::Stderr,
            line: "b".into(),
        });
        let (first, second, mut rx) = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken")
            .expect("task");
        assert_eq!(first, text("a"));
        assert!(matches!(second, AgentEvent::Log { line, .. } if line == "b"));
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_receive_given_up_loses_no_event() {
        let (shared, mut rx) = StepEvents::new();
        // A receive polled and dropped (another `select!` branch won) takes nothing.
        assert!(rx.recv().now_or_never().is_none());
        shared.push(text("kept"));
        assert_eq!(rx.recv().await, text("kept"));
    }

    #[test]
    fn what_is_emitted_after_the_receiver_is_gone_is_dropped() {
        let (shared, rx) = StepEvents::new();
        shared.push(text("before"));
        assert!(!shared.is_closed());
        drop(rx);
        assert!(shared.is_closed());
        shared.push(text("after"));
        assert!(shared.lock().events.is_empty());
    }
}
