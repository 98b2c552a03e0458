//! Server-sent events framing: `id:`, `event:`, `data:` per job event, keep-alive comments, and
//! the end of the stream after the terminal event.
//!
//! Two streams share the framing: a job's own (`GET /workflows/{job_id}/events`, ids are the
//! job's sequence numbers) and the feed of every job (`GET /events`, ids are
//! [`FeedCursor`]s). The feed's opening may carry an `id:` line without data: it names the
//! position the stream starts from, which a client sends back as `Last-Event-ID` if it has to
//! reconnect before any event arrived (an EventSource records it without dispatching anything).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use crate::engine::{FeedCursor, FeedItem};
use crate::event::JobEvent;
use crate::job::JobId;

/// Shards of the [`FrameCache`] (a power of two).
const CACHE_SHARDS: usize = 16;
/// Jobs a shard of the [`FrameCache`] remembers before it starts over: the cache holds the
/// last frame of at most `CACHE_SHARDS × CACHE_JOBS` jobs.
const CACHE_JOBS: usize = 64;

type CacheShard = Mutex<HashMap<JobId, (Arc<JobEvent>, Bytes)>>;

/// The SSE frame of each job's latest event, made once and shared by all the subscribers of
/// that job: [`Engine::subscribe_shared`](crate::Engine::subscribe_shared) hands every
/// subscriber the same `Arc<JobEvent>`, so the first one to reach an event frames it and the
/// others find it here (the entry holds the event, so a pointer match is that very event).
/// A subscriber that lags behind finds a newer event in the cache and frames its own. Bounded:
/// a shard that fills up is emptied.
pub(crate) struct FrameCache {
    shards: Box<[CacheShard]>,
}

impl FrameCache {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..CACHE_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(
        &self,
        id: JobId,
    ) -> std::sync::MutexGuard<'_, HashMap<JobId, (Arc<JobEvent>, Bytes)>> {
        // The low bits of a UUID v7 are random.
        let n = (id.as_uuid().as_u128() as usize) & (CACHE_SHARDS - 1);
        self.shards[n].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The frame of `event`, made at most once while it is the job's latest.
    pub(crate) fn frame(&self, event: &Arc<JobEvent>) -> Bytes {
        if let Some((cached, bytes)) = self.shard(event.job_id).get(&event.job_id) {
            if Arc::ptr_eq(cached, event) {
                return bytes.clone();
            }
        }
        let bytes = frame(event);
        let mut shard = self.shard(event.job_id);
        let newer = shard
            .get(&event.job_id)
            .is_some_and(|(cached, _)| cached.seq > event.seq);
        if !newer {
            if shard.len() >= CACHE_JOBS && !shard.contains_key(&event.job_id) {
                shard.clear();
            }
            shard.insert(event.job_id, (Arc::clone(event), bytes.clone()));
        }
        bytes
    }
}

/// Frames one event.
pub(crate) fn frame(event: &JobEvent) -> Bytes {
    frame_with_id(&event.seq, event)
}

fn frame_with_id(id: &dyn std::fmt::Display, event: &JobEvent) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    Bytes::from(format!(
        "id: {id}\nevent: {}\ndata: {data}\n\n",
        event.kind.name(),
    ))
}

/// An opening comment and the client's reconnection delay.
const OPENING: &[u8] = b": aiwg event stream\nretry: 2000\n\n";

/// Turns a job's event stream into SSE bytes with a keep-alive comment every `keep_alive`;
/// each event is framed once for all the subscribers sharing `cache`.
pub(crate) fn stream(
    events: Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>>,
    cache: Arc<FrameCache>,
    keep_alive: Duration,
) -> Pin<Box<dyn Stream<Item = Bytes> + Send>> {
    framed(
        events.map(move |ev| cache.frame(&ev)),
        Bytes::from_static(OPENING),
        keep_alive,
    )
}

/// Turns the engine's feed into SSE bytes: events of the `kinds` asked for (all without a
/// filter), `reset` events, keep-alive comments.
pub(crate) fn feed_stream(
    feed: Pin<Box<dyn Stream<Item = FeedItem> + Send>>,
    kinds: Option<Vec<&'static str>>,
    opening_id: Option<FeedCursor>,
    keep_alive: Duration,
) -> Pin<Box<dyn Stream<Item = Bytes> + Send>> {
    let opening = match opening_id {
        Some(id) => Bytes::from(format!(": aiwg event stream\nretry: 2000\nid: {id}\n\n")),
        None => Bytes::from_static(OPENING),
    };
    let frames = feed.filter_map(move |item| {
        let framed = match item {
            FeedItem::Event { cursor, event } => kinds
                .as_ref()
                .is_none_or(|k| k.contains(&event.kind.name()))
                .then(|| frame_with_id(&cursor, &event)),
            FeedItem::Reset { cursor, reason } => Some(Bytes::from(format!(
                "id: {cursor}\nevent: reset\ndata: {}\n\n",
                serde_json::json!({"reason": reason.as_str(), "cursor": cursor.to_string()})
            ))),
        };
        std::future::ready(framed)
    });
    framed(frames, opening, keep_alive)
}

/// Sends `opening`, then the frames, with a keep-alive comment whenever `keep_alive` passes
/// without one.
fn framed(
    frames: impl Stream<Item = Bytes> + Send + 'static,
    opening: Bytes,
    keep_alive: Duration,
) -> Pin<Box<dyn Stream<Item = Bytes> + Send>> {
    struct St {
        frames: Pin<Box<dyn Stream<Item = Bytes> + Send>>,
        keep_alive: Duration,
        opening: Option<Bytes>,
    }
    let st = St {
        frames: Box::pin(frames),
        keep_alive,
        opening: Some(opening),
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        if let Some(opening) = st.opening.take() {
            return Some((opening, st));
        }
        match tokio::time::timeout(st.keep_alive, st.frames.next()).await {
            Ok(Some(frame)) => Some((frame, st)),
            Ok(None) => None,
            Err(_) => Some((Bytes::from_static(b": keep-alive\n\n"), st)),
        }
    }))
}
