//! The feed: every job's events in one ordered stream, resumable from a cursor.
//!
//! Each event the engine publishes (its own, and those other instances report through
//! [`ClusterListener`](crate::store::ClusterListener)) gets a place in the feed: a
//! [`FeedCursor`] made of this engine's *epoch* (random, chosen at build time) and a sequence
//! number that grows by one per event. The feed keeps the most recent events in a bounded ring
//! (by count and by bytes), so a client that lost its connection resumes where it left off and
//! misses nothing — as long as what it missed is still in the ring. When it is not (the client
//! was away too long, fell too far behind, or its cursor comes from another process or
//! instance, whose numbering means nothing here), the stream starts with
//! [`FeedItem::Reset`]: the client should reload what it shows (`GET /jobs`) and go on from the
//! reset's cursor.
//!
//! Subscribers hold only their cursor and a small batch of shared events: a slow subscriber
//! never makes the server hold more than the ring, it gets a reset instead.
//!
//! The ring keeps events from the first time the feed hands out a position (a subscription, or
//! [`Engine::feed_cursor`](super::Engine::feed_cursor)): before that no client can hold a
//! cursor of this feed, so no event could ever be asked for, and an engine nobody follows
//! (workers without a dashboard, say) neither keeps nor frees ten thousand events. The
//! numbering runs from the start all the same.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::watch;

use crate::event::JobEvent;

/// Events the feed keeps by default.
pub const DEFAULT_FEED_EVENTS: usize = 10_000;
/// Bytes (of event JSON) the feed keeps by default: 16 MiB.
pub const DEFAULT_FEED_BYTES: usize = 16 * 1024 * 1024;

/// How many events a subscriber takes from the ring at a time.
const BATCH: usize = 64;

/// A position in the feed: `<epoch>-<seq>` on the wire (the SSE `id` of `GET /events`), e.g.
/// `9f86d081884c7d65-42`. Sequence 0 is the position before the first event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FeedCursor {
    /// The feed it belongs to (one per engine instance and process).
    pub epoch: u64,
    /// The last event seen (0: none).
    pub seq: u64,
}

impl fmt::Display for FeedCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.epoch, self.seq)
    }
}

/// A string that is not a [`FeedCursor`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a feed cursor (expected `<16 hex digits>-<number>`)")]
#[non_exhaustive]
pub struct BadCursor;

impl FromStr for FeedCursor {
    type Err = BadCursor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, seq) = s.trim().split_once('-').ok_or(BadCursor)?;
        if epoch.len() != 16 || !epoch.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadCursor);
        }
        if seq.is_empty() || seq.len() > 19 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadCursor);
        }
        Ok(Self {
            epoch: u64::from_str_radix(epoch, 16).map_err(|_| BadCursor)?,
            seq: seq.parse().map_err(|_| BadCursor)?,
        })
    }
}

/// Why a feed subscription starts over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetReason {
    /// Events after the client's cursor are no longer kept (it was away too long or read too
    /// slowly).
    Expired,
    /// The cursor belongs to another feed: another process, or another instance.
    OtherFeed,
}

impl ResetReason {
    /// The wire name: `expired` or `other_feed`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Expired => "expired",
            ResetReason::OtherFeed => "other_feed",
        }
    }
}

/// One item of a feed subscription.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FeedItem {
    /// A job event, at its place in the feed.
    Event {
        /// Its place (resume after it with this cursor).
        cursor: FeedCursor,
        /// The event.
        event: Arc<JobEvent>,
    },
    /// Events may have been missed: reload, then go on from `cursor`.
    Reset {
        /// Where the subscription goes on from (the newest event at the time).
        cursor: FeedCursor,
        /// Why.
        reason: ResetReason,
    },
}

struct Entry {
    seq: u64,
    event: Arc<JobEvent>,
    bytes: usize,
}

struct Ring {
    entries: VecDeque<Entry>,
    bytes: usize,
    /// The sequence number of the newest event (0: none yet).
    last: u64,
    closed: bool,
    /// A position was handed out: events are kept from then on (see the module docs).
    observed: bool,
}

/// The engine's feed (see the module docs).
pub(crate) struct Feed {
    epoch: u64,
    max_events: usize,
    max_bytes: usize,
    ring: Mutex<Ring>,
    /// [`Ring::observed`], read without the lock to skip weighing events nobody keeps.
    observed: AtomicBool,
    /// The newest sequence number, to wake subscribers.
    tick: watch::Sender<u64>,
}

/// About what an event weighs in memory and as JSON: its fixed part and its text (JSON values
/// of tools are measured exactly; they are rare next to the text and status events).
fn approx_bytes(event: &JobEvent) -> usize {
    use crate::event::JobEventKind as K;
    use crate::executor::AgentEvent as A;
    let json = |v: &serde_json::Value| crate::util::json_len(v);
    let error =
        |e: &Option<crate::job::JobError>| e.as_ref().map_or(0, |e| e.kind.len() + e.message.len());
    let text = match &event.kind {
        K::Status {
            reason, error: e, ..
        } => reason.as_ref().map_or(0, String::len) + error(e),
        K::StepStarted { step, agent, .. } => step.len() + agent.len(),
        K::StepFinished { step, error: e, .. } => step.len() + error(e),
        K::OutputTruncated { step, .. } => step.len(),
        K::Log { level, message } => level.len() + message.len(),
        K::Agent { step, event } => {
            step.len()
                + match event {
                    A::Init {
                        session_id,
                        model,
                        tools,
                    } => {
                        session_id.as_ref().map_or(0, String::len)
                            + model.as_ref().map_or(0, String::len)
                            + tools.iter().map(|t| t.len() + 8).sum::<usize>()
                    }
                    A::Text { text } => text.len(),
                    A::ToolUse { id, name, input } => {
                        id.as_ref().map_or(0, String::len) + name.len() + json(input)
                    }
                    A::ToolResult {
                        tool_use_id,
                        content,
                        ..
                    } => tool_use_id.as_ref().map_or(0, String::len) + json(content),
                    A::Usage { .. } => 128,
                    A::Log { line, .. } => line.len(),
                    A::Raw { value } => json(value),
                }
        }
    };
    256 + text
}

enum Read {
    Events(Vec<FeedItem>),
    Reset(FeedCursor, ResetReason),
    Nothing,
    Closed,
}

impl Feed {
    pub(crate) fn new(max_events: usize, max_bytes: usize) -> Self {
        Self {
            // Never 0, so that no cursor of another feed can carry this epoch by accident of a
            // default value.
            epoch: rand::random::<u64>() | 1,
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            ring: Mutex::new(Ring {
                entries: VecDeque::new(),
                bytes: 0,
                last: 0,
                closed: false,
                observed: false,
            }),
            observed: AtomicBool::new(false),
            tick: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event (called wherever the engine broadcasts one).
    pub(crate) fn push(&self, event: Arc<JobEvent>) {
        // Weighed outside the lock; under it, `observed` decides (a first cursor may be handed
        // out in between: the event is then weighed under the lock).
        let weighed = self
            .observed
            .load(Ordering::Relaxed)
            .then(|| approx_bytes(&event));
        // The events the ring lets go, freed after the lock: their memory is cold by then, and
        // freeing it under the lock made every other publisher wait. The first is held apart:
        // a push usually lets go of one, and a `Vec` would allocate for it.
        let mut evicted = (None, Vec::new());
        let seq = {
            let mut ring = self.lock();
            if ring.closed {
                return;
            }
            ring.last += 1;
            let seq = ring.last;
            if !ring.observed {
                return;
            }
            let bytes = weighed.unwrap_or_else(|| approx_bytes(&event));
            ring.entries.push_back(Entry { seq, event, bytes });
            ring.bytes += bytes;
            while ring.entries.len() > self.max_events
                || (ring.bytes > self.max_bytes && ring.entries.len() > 1)
            {
                if let Some(old) = ring.entries.pop_front() {
                    ring.bytes -= old.bytes;
                    match evicted.0 {
                        None => evicted.0 = Some(old),
                        Some(_) => evicted.1.push(old),
                    }
                }
            }
            seq
        };
        drop(evicted);
        // Nobody to wake: skip the tick (it wakes eight wait lists, each under its own lock,
        // for every event). A subscriber that arrives later takes its receiver before it reads
        // the ring, so it finds this event there.
        if self.tick.receiver_count() > 0 {
            self.tick.send_replace(seq);
        }
    }

    /// The position after the newest event. From now on the ring keeps events (see the module
    /// docs).
    pub(crate) fn cursor(&self) -> FeedCursor {
        let mut ring = self.lock();
        ring.observed = true;
        self.observed.store(true, Ordering::Relaxed);
        FeedCursor {
            epoch: self.epoch,
            seq: ring.last,
        }
    }

    /// Ends every subscription once it has read what is there (engine shutdown).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.tick.send_modify(|_| {});
    }

    fn read(&self, after: u64) -> Read {
        let ring = self.lock();
        let first = ring.entries.front().map_or(ring.last + 1, |e| e.seq);
        if after > ring.last {
            // Not a position this feed ever had.
            return Read::Reset(
                FeedCursor {
                    epoch: self.epoch,
                    seq: ring.last,
                },
                ResetReason::OtherFeed,
            );
        }
        if after + 1 < first {
            return Read::Reset(
                FeedCursor {
                    epoch: self.epoch,
                    seq: ring.last,
                },
                ResetReason::Expired,
            );
        }
        if after == ring.last {
            return if ring.closed {
                Read::Closed
            } else {
                Read::Nothing
            };
        }
        // Sequence numbers in the ring are consecutive.
        let start = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
        Read::Events(
            ring.entries
                .iter()
                .skip(start)
                .take(BATCH)
                .map(|e| FeedItem::Event {
                    cursor: FeedCursor {
                        epoch: self.epoch,
                        seq: e.seq,
                    },
                    event: Arc::clone(&e.event),
                })
                .collect(),
        )
    }
}

struct Sub {
    feed: Arc<super::Inner>,
    rx: watch::Receiver<u64>,
    seq: u64,
    /// A reset to send first (a cursor of another feed).
    pending: VecDeque<FeedItem>,
}

impl Sub {
    async fn next(&mut self) -> Option<FeedItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            // Mark the current tick as seen before reading, so that an event pushed after the
            // read wakes the wait below.
            self.rx.borrow_and_update();
            match self.feed.feed.read(self.seq) {
                Read::Events(items) => {
                    if let Some(FeedItem::Event { cursor, .. }) = items.last() {
                        self.seq = cursor.seq;
                    }
                    self.pending.extend(items);
                }
                Read::Reset(cursor, reason) => {
                    self.seq = cursor.seq;
                    return Some(FeedItem::Reset { cursor, reason });
                }
                Read::Closed => return None,
                Read::Nothing => {
                    if self.rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

pub(super) fn subscribe(
    inner: Arc<super::Inner>,
    after: Option<FeedCursor>,
) -> Pin<Box<dyn Stream<Item = FeedItem> + Send>> {
    let feed = &inner.feed;
    let rx = feed.tick.subscribe();
    let mut pending = VecDeque::new();
    let seq = match after {
        Some(c) if c.epoch == feed.epoch => c.seq,
        Some(_) => {
            let now = feed.cursor();
            pending.push_back(FeedItem::Reset {
                cursor: now,
                reason: ResetReason::OtherFeed,
            });
            now.seq
        }
        None => feed.cursor().seq,
    };
    let sub = Sub {
        feed: inner,
        rx,
        seq,
        pending,
    };
    Box::pin(futures_util::stream::unfold(sub, |mut sub| async move {
        sub.next().await.map(|item| (item, sub))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_print_and_parse() {
        let c = FeedCursor {
            epoch: 0x9f86_d081_884c_7d65,
            seq: 42,
        };
        assert_eq!(c.to_string(), "9f86d081884c7d65-42");
        assert_eq!("9f86d081884c7d65-42".parse::<FeedCursor>(), Ok(c));
        for bad in [
            "",
            "42",
            "9f86d081884c7d65",
            "9f86d081884c7d65-",
            "9f86d081884c7d6-1",
            "9f86d081884c7d65--1",
            "9f86d081884c7d65-+1",
            "zf86d081884c7d65-1",
            "9f86d081884c7d65-99999999999999999999",
        ] {
            assert!(bad.parse::<FeedCursor>().is_err(), "{bad}");
        }
    }

    /// The items' places (0 for a reset).
    fn seqs(items: &[FeedItem]) -> Vec<u64> {
        items
            .iter()
            .map(|i| match i {
                FeedItem::Event { cursor, .. } => cursor.seq,
                FeedItem::Reset { .. } => 0,
            })
            .collect()
    }

    fn event(n: u64) -> JobEvent {
        JobEvent {
            job_id: crate::job::JobId::new(),
            seq: n,
            at: chrono::Utc::now(),
            kind: crate::event::JobEventKind::Log {
                level: "info".into(),
                message: "x".repeat(100),
            },
        }
    }

    #[test]
    fn the_ring_is_bounded_by_count_and_bytes_and_says_when_a_cursor_expired() {
        let feed = Feed::new(3, usize::MAX);
        assert_eq!(feed.cursor().seq, 0);
        for n in 1..=5 {
            feed.push(Arc::new(event(n)));
        }
        assert_eq!(feed.cursor().seq, 5);
        assert!(matches!(
            feed.read(1),
            Read::Reset(c, ResetReason::Expired) if c.seq == 5
        ));
        let Read::Events(items) = feed.read(2) else {
            panic!("events 3 to 5 are kept")
        };
        assert_eq!(seqs(&items), [3, 4, 5]);
        assert!(matches!(feed.read(5), Read::Nothing));
        assert!(matches!(
            feed.read(6),
            Read::Reset(_, ResetReason::OtherFeed)
        ));
        feed.close();
        assert!(matches!(feed.read(5), Read::Closed));

        let small = Feed::new(1000, 500);
        small.cursor();
        for n in 1..=20 {
            small.push(Arc::new(event(n)));
        }
        let kept = small.lock().entries.len();
        assert!(
            (1..=3).contains(&kept),
            "{kept} events of ~200 bytes in 500"
        );
        assert!(small.lock().bytes <= 500);
    }

    /// Before a position was handed out, events are numbered but not kept: nobody can ask for
    /// them. From the first cursor on, every event is kept, and a cursor from before it reads
    /// as expired.
    #[test]
    fn events_are_kept_from_the_first_cursor_handed_out() {
        let feed = Feed::new(100, usize::MAX);
        for n in 1..=4 {
            feed.push(Arc::new(event(n)));
        }
        assert_eq!(feed.lock().entries.len(), 0);
        assert_eq!(feed.lock().bytes, 0);
        let first = feed.cursor();
        assert_eq!(first.seq, 4);
        for n in 5..=7 {
            feed.push(Arc::new(event(n)));
        }
        let Read::Events(items) = feed.read(first.seq) else {
            panic!("the events after the first cursor are kept")
        };
        assert_eq!(seqs(&items), [5, 6, 7]);
        assert!(matches!(
            feed.read(2),
            Read::Reset(c, ResetReason::Expired) if c.seq == 7
        ));
    }
}
