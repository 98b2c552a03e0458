//! Server-sent events framing: `id:`, `event:`, `data:` per job event, keep-alive comments, and
//! the end of the stream after the terminal event.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::event::JobEvent;

/// Frames one event.
pub(crate) fn frame(event: &JobEvent) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq,
        event.kind.name(),
        data
    ))
}

/// Turns a job's event stream into SSE bytes with a keep-alive comment every `keep_alive`.
pub(crate) fn stream(
    events: Pin<Box<dyn Stream<Item = JobEvent> + Send>>,
    keep_alive: Duration,
) -> Pin<Box<dyn Stream<Item = Bytes> + Send>> {
    struct St {
        events: Pin<Box<dyn Stream<Item = JobEvent> + Send>>,
        keep_alive: Duration,
        opened: bool,
    }
    let st = St {
        events,
        keep_alive,
        opened: false,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        if !st.opened {
            st.opened = true;
            // An opening comment and the client's reconnection delay.
            return Some((
                Bytes::from_static(b": aiwg event stream\nretry: 2000\n\n"),
                st,
            ));
        }
        match tokio::time::timeout(st.keep_alive, st.events.next()).await {
            Ok(Some(ev)) => Some((frame(&ev), st)),
            Ok(None) => None,
            Err(_) => Some((Bytes::from_static(b": keep-alive\n\n"), st)),
        }
    }))
}
