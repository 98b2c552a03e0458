//! Per-job event streams: stored history first, then live events, ending after the terminal one.
//!
//! Live events reach a job's subscribers through that job's own channel ([`JobChannels`]): a
//! channel exists only while the job has subscribers, an event of a job nobody follows costs a
//! hash lookup, and a subscriber only ever wakes for its own job's events. Subscribers of one job
//! share each event (`Arc<JobEvent>`); nothing is copied per subscriber.
//!
//! Stored history is read a page at a time: at the start, and whenever a subscriber falls more
//! than a channel's worth behind (a burst of output) or the job has ended. The streams of one
//! job read its full pages together ([`Pages`]): a page is read from the store once, by the
//! first stream that needs it, and the others take the same events from it, so a thousand
//! subscribers catching up after a burst cost one store read a page, not a thousand.
//!
//! [`Engine::wait`] needs only the end of a job, so it does not subscribe: it registers a
//! [`Waiter`], which the job's terminal event wakes.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::{Notify, OnceCell};

use super::{Engine, EngineError};
use crate::event::JobEvent;
use crate::fast_hash::FastMap;
use crate::job::JobId;

/// How many stored events a stream reads at a time while it catches up.
const PAGE: usize = 256;

/// Live events a job's channel holds for its slowest subscriber; one further behind catches up
/// from the store. (A channel allocates all its slots when it is made.)
const JOB_CHANNEL: usize = 256;

/// Shards of the channel map (a power of two), so publishers of different jobs rarely meet on
/// one lock.
const SHARDS: usize = 64;

/// What one shard holds: the live channels of jobs with subscribers, and the wake-ups of jobs
/// someone waits for (with how many wait).
#[derive(Default)]
struct ShardState {
    channels: FastMap<JobId, broadcast::Sender<Arc<JobEvent>>>,
    waiters: FastMap<JobId, (Arc<Notify>, usize)>,
    /// The pages of the jobs that have streams (alive while one of them is).
    pages: FastMap<JobId, Weak<Pages>>,
}

/// The events of one page.
type PageEvents = Arc<[Arc<JobEvent>]>;

/// One page of a job's stored events, read once for the streams that meet on it.
type Page = Arc<OnceCell<PageEvents>>;

/// The pages of one job's stored history that its streams are reading, shared between them.
/// Page `k` holds the [`PAGE`] events after sequence number `k * PAGE`: whatever a stream has
/// already received, it reads the page its next event is in, so streams at different places
/// meet on the same pages. A page lives while a stream is in it (each holds the one it reads),
/// so what is kept is what the streams need, as when each read its own; and only a full page is
/// shared (a job's stored events do not change: the last, partial page may still grow, and each
/// stream reads it itself).
#[derive(Default)]
pub(super) struct Pages {
    pages: Mutex<BTreeMap<u64, Weak<OnceCell<PageEvents>>>>,
}

impl Pages {
    /// Page `k`: the one a stream is in, or a new one to read.
    fn page(&self, k: u64) -> Page {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(page) = pages.get(&k).and_then(Weak::upgrade) {
            return page;
        }
        pages.retain(|_, p| p.strong_count() > 0);
        let page = Page::default();
        pages.insert(k, Arc::downgrade(&page));
        page
    }

    /// The pages some stream is in (for tests).
    #[cfg(test)]
    fn live(&self) -> Vec<u64> {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages
            .iter()
            .filter(|(_, p)| p.strong_count() > 0)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Forgets page `k` if it is still `page` (read before the page was full: the next stream
    /// that needs it reads it again).
    fn forget(&self, k: u64, page: &Page) {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if pages
            .get(&k)
            .is_some_and(|p| p.as_ptr() == Arc::as_ptr(page))
        {
            pages.remove(&k);
        }
    }
}

type Shard = Mutex<ShardState>;

/// The live channels of the jobs that have subscribers, sharded by job id.
pub(super) struct JobChannels {
    shards: Box<[Shard]>,
    /// Reads of stored history by the streams (for tests).
    #[cfg(test)]
    history_reads: std::sync::atomic::AtomicUsize,
}

/// Someone waiting for a job to end; [`JobChannels::publish`] wakes it with the job's terminal
/// event. Dropping it unregisters it.
pub(super) struct Waiter<'a> {
    channels: &'a JobChannels,
    id: JobId,
    ended: Arc<Notify>,
}

impl Waiter<'_> {
    /// Wakes when the job's terminal event is published. Enable it (or poll it) before
    /// checking whether the job already ended, so that no end falls between the two.
    pub(super) fn ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.ended.notified()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut shard = self.channels.shard(self.id);
        if let Some((ended, n)) = shard.waiters.get_mut(&self.id) {
            if Arc::ptr_eq(ended, &self.ended) {
                *n -= 1;
                if *n == 0 {
                    shard.waiters.remove(&self.id);
                }
            }
        }
    }
}

impl JobChannels {
    pub(super) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            #[cfg(test)]
            history_reads: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn shard(&self, id: JobId) -> std::sync::MutexGuard<'_, ShardState> {
        // The low bits of a UUID v7 are random.
        let n = (id.as_uuid().as_u128() as usize) & (SHARDS - 1);
        self.shards[n].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `event` to its job's subscribers, if it has any. The channel of a job that ended
    /// is dropped: its subscribers read what is left and end; its waiters wake.
    pub(super) fn publish(&self, event: &Arc<JobEvent>) {
        let ended = {
            let mut shard = self.shard(event.job_id);
            if let Some(tx) = shard.channels.get(&event.job_id) {
                let _ = tx.send(Arc::clone(event));
                if event.is_terminal() {
                    shard.channels.remove(&event.job_id);
                }
            }
            if event.is_terminal() {
                shard.waiters.remove(&event.job_id)
            } else {
                None
            }
        };
        // Woken after the shard's lock: a waiter's thread may have to be unparked.
        if let Some((ended, _)) = ended {
            ended.notify_waiters();
        }
    }

    /// Registers a wait for job `id` to end.
    pub(super) fn waiter(&self, id: JobId) -> Waiter<'_> {
        let mut shard = self.shard(id);
        let (ended, n) = shard
            .waiters
            .entry(id)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        *n += 1;
        Waiter {
            channels: self,
            id,
            ended: Arc::clone(ended),
        }
    }

    fn subscribe(&self, id: JobId) -> broadcast::Receiver<Arc<JobEvent>> {
        self.shard(id)
            .channels
            .entry(id)
            .or_insert_with(|| broadcast::channel(JOB_CHANNEL).0)
            .subscribe()
    }

    /// Drops `rx`, and the job's channel with it when it was the last subscriber.
    fn unsubscribe(&self, id: JobId, rx: broadcast::Receiver<Arc<JobEvent>>) {
        let mut shard = self.shard(id);
        drop(rx);
        if shard
            .channels
            .get(&id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            shard.channels.remove(&id);
        }
    }

    /// The shared pages of job `id`'s history, made for its first stream.
    fn pages(&self, id: JobId) -> Arc<Pages> {
        let mut shard = self.shard(id);
        if let Some(pages) = shard.pages.get(&id).and_then(Weak::upgrade) {
            return pages;
        }
        let pages = Arc::new(Pages::default());
        shard.pages.insert(id, Arc::downgrade(&pages));
        pages
    }

    /// Drops a stream's hold on its job's pages, and the pages with it when it was the last.
    fn release_pages(&self, id: JobId, pages: Arc<Pages>) {
        let mut shard = self.shard(id);
        // Under the shard's lock: no other stream can take the pages up meanwhile.
        drop(pages);
        if shard.pages.get(&id).is_some_and(|w| w.strong_count() == 0) {
            shard.pages.remove(&id);
        }
    }

    /// Counts a read of stored history (for tests).
    fn read_history(&self) {
        #[cfg(test)]
        self.history_reads.fetch_add(1, Ordering::Relaxed);
    }

    /// How many reads of stored history the streams made (for tests).
    #[cfg(test)]
    pub(super) fn history_reads(&self) -> usize {
        self.history_reads.load(Ordering::Relaxed)
    }

    /// How many jobs have shared pages (for tests).
    #[cfg(test)]
    pub(super) fn paged(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).pages.len())
            .sum()
    }

    /// How many jobs have a live channel (for tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).channels.len())
            .sum()
    }

    /// How many jobs someone waits for (for tests).
    #[cfg(test)]
    pub(super) fn waited(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).waiters.len())
            .sum()
    }
}

struct State {
    engine: Engine,
    id: JobId,
    /// The job's live channel (`None` once dropped).
    rx: Option<broadcast::Receiver<Arc<JobEvent>>>,
    /// The job's history pages, shared with its other streams (`None` once dropped).
    pages: Option<Arc<Pages>>,
    /// The shared page this stream is reading (kept for the streams behind it).
    reading: Option<Page>,
    buf: VecDeque<Arc<JobEvent>>,
    last: u64,
    /// Still reading stored history (at the start, after a lag or a gap).
    backlog: bool,
    /// The job had ended when the stream began: once the history is read, nothing is left.
    ended: bool,
    done: bool,
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take() {
            self.engine.inner.channels.unsubscribe(self.id, rx);
        }
        if let Some(pages) = self.pages.take() {
            self.engine.inner.channels.release_pages(self.id, pages);
        }
    }
}

impl State {
    /// Reads the next page of stored events after `last`; `false` when the store failed. The
    /// page `last` is in comes from the job's shared pages when it is full (read from the store
    /// by the first stream that needs it); otherwise this stream reads on from `last` itself.
    async fn page(&mut self) -> bool {
        let k = self.last / PAGE as u64;
        if let Some(pages) = &self.pages {
            let page = pages.page(k);
            let store = &self.engine.inner.store;
            // Whether this stream read the page (after its own subscription to the live events).
            let read_here = AtomicBool::new(false);
            let read = page
                .get_or_try_init(|| async {
                    read_here.store(true, Ordering::Relaxed);
                    self.engine.inner.channels.read_history();
                    let evs = store.events_page(self.id, k * PAGE as u64, PAGE).await?;
                    Ok::<_, crate::store::StoreError>(
                        evs.into_iter().map(Arc::new).collect::<PageEvents>(),
                    )
                })
                .await;
            let Ok(evs) = read else { return false };
            // A full page: the events after `last` in it, and the next page after them. The
            // last page, still partial, is not shared: read here, it is all this stream needs of
            // the history; read by another stream (perhaps before this one subscribed), this
            // stream reads on from `last` itself, below.
            let full = evs.len() == PAGE;
            if !full {
                pages.forget(k, &page);
            }
            if full || read_here.load(Ordering::Relaxed) {
                self.buf
                    .extend(evs.iter().filter(|ev| ev.seq > self.last).cloned());
                self.backlog = full;
                self.reading = full.then_some(page);
                return true;
            }
            self.reading = None;
        }
        self.engine.inner.channels.read_history();
        match self
            .engine
            .inner
            .store
            .events_page(self.id, self.last, PAGE)
            .await
        {
            Ok(evs) => {
                self.backlog = evs.len() == PAGE;
                self.buf.extend(evs.into_iter().map(Arc::new));
                true
            }
            Err(_) => false,
        }
    }

    async fn next(&mut self) -> Option<Arc<JobEvent>> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                if ev.seq <= self.last {
                    continue;
                }
                self.last = ev.seq;
                if ev.is_terminal() {
                    self.done = true;
                    self.buf.clear();
                    if let Some(rx) = self.rx.take() {
                        self.engine.inner.channels.unsubscribe(self.id, rx);
                    }
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
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Ok(ev) if ev.seq > self.last => {
                    if ev.seq > self.last + 1 {
                        // A gap: catch up from the store (the live event comes with it).
                        self.backlog = true;
                        continue;
                    }
                    self.buf.push_back(ev);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => self.backlog = true,
                // The job ended (its channel is dropped after the terminal event, which was
                // received before this): whatever is left is in the store.
                Err(RecvError::Closed) => {
                    self.ended = true;
                    self.backlog = true;
                }
            }
        }
    }
}

async fn start(engine: Engine, id: JobId, after: u64) -> Result<State, EngineError> {
    // Subscribe before reading history so nothing falls between the two.
    let rx = engine.inner.channels.subscribe(id);
    let pages = engine.inner.channels.pages(id);
    let mut state = State {
        engine,
        id,
        rx: Some(rx),
        pages: Some(pages),
        reading: None,
        buf: VecDeque::new(),
        last: after,
        backlog: true,
        ended: false,
        done: false,
    };
    // On an error, dropping `state` drops the channel again.
    let job = state.engine.get(id).await?;
    state.ended = job.is_terminal();
    if state.ended {
        if let Some(rx) = state.rx.take() {
            state.engine.inner.channels.unsubscribe(id, rx);
        }
    }
    Ok(state)
}

pub(super) async fn job_stream(
    engine: Engine,
    id: JobId,
    after: u64,
) -> Result<Pin<Box<dyn Stream<Item = JobEvent> + Send>>, EngineError> {
    let state = start(engine, id, after).await?;
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut st| async move {
            st.next()
                .await
                .map(|ev| (Arc::try_unwrap(ev).unwrap_or_else(|ev| (*ev).clone()), st))
        },
    )))
}

pub(super) async fn shared_job_stream(
    engine: Engine,
    id: JobId,
    after: u64,
) -> Result<Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>>, EngineError> {
    let state = start(engine, id, after).await?;
    Ok(shared(state))
}

/// [`shared_job_stream`], or `None` when the job has ended and no event of it comes after
/// `after` (a client resuming after the terminal event: nothing will ever follow).
pub(super) async fn resumed_shared_job_stream(
    engine: Engine,
    id: JobId,
    after: u64,
) -> Result<Option<Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>>>, EngineError> {
    let state = start(engine, id, after).await?;
    if state.ended && after > 0 {
        let next = state
            .engine
            .inner
            .store
            .events_page(id, after, 1)
            .await
            .map_err(EngineError::Store)?;
        if next.is_empty() {
            return Ok(None);
        }
    }
    Ok(Some(shared(state)))
}

fn shared(state: State) -> Pin<Box<dyn Stream<Item = Arc<JobEvent>> + Send>> {
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        st.next().await.map(|ev| (ev, st))
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::StreamExt;

    use crate::test_util::ScriptedExecutor;
    use crate::{Engine, JobRequest, Step, Workflow};

    #[tokio::test]
    async fn a_job_has_a_live_channel_only_while_someone_follows_it() {
        let exec = ScriptedExecutor::hanging();
        let engine = Engine::builder()
            .executor("hang", Arc::new(exec.clone()))
            .workflow(Workflow::new("w").step(Step::prompt("s", "hang", "x")))
            .build()
            .unwrap();
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        assert_eq!(engine.inner.channels.len(), 0, "nobody follows it yet");
        let owned = engine.subscribe(job.id, 0).await.unwrap();
        let mut shared = engine.subscribe_shared(job.id, 0).await.unwrap();
        assert_eq!(engine.inner.channels.len(), 1, "one channel for both");
        drop(owned);
        assert_eq!(engine.inner.channels.len(), 1, "the other still follows");
        assert!(exec.wait_started(1, Duration::from_secs(5)).await);
        engine.cancel(job.id).await.unwrap();
        let mut seqs = Vec::new();
        while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), shared.next())
            .await
            .expect("the stream ends after the terminal event")
        {
            seqs.push(ev.seq);
            if ev.is_terminal() {
                assert_eq!(engine.inner.channels.len(), 0, "dropped at the end");
            }
        }
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "every event once"
        );
        // A finished job's history needs no channel.
        let replay = engine.subscribe(job.id, 0).await.unwrap();
        assert_eq!(engine.inner.channels.len(), 0);
        assert_eq!(replay.count().await, seqs.len());
        engine.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn wait_needs_no_channel_and_leaves_no_waiter_behind() {
        let exec = ScriptedExecutor::hanging();
        let engine = Engine::builder()
            .executor("hang", Arc::new(exec.clone()))
            .workflow(Workflow::new("w").step(Step::prompt("s", "hang", "x")))
            .build()
            .unwrap();
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        // A wait that times out unregisters itself.
        let err = engine.wait(job.id, Duration::from_millis(20)).await;
        assert!(matches!(err, Err(crate::EngineError::WaitTimeout(_))));
        assert_eq!(engine.inner.channels.waited(), 0);
        // Two waiters share one wake-up, made by the terminal event.
        let (a, b) = (engine.clone(), engine.clone());
        let first = tokio::spawn(async move { a.wait(job.id, Duration::from_secs(10)).await });
        let second = tokio::spawn(async move { b.wait(job.id, Duration::from_secs(10)).await });
        assert!(exec.wait_started(1, Duration::from_secs(5)).await);
        while engine.inner.channels.waited() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            engine.inner.channels.len(),
            0,
            "waiting subscribes to nothing"
        );
        engine.cancel(job.id).await.unwrap();
        for w in [first, second] {
            let done = w.await.unwrap().expect("the job ended");
            assert_eq!(done.status, crate::JobStatus::Cancelled);
        }
        assert_eq!(engine.inner.channels.waited(), 0);
        // Waiting for a job that already ended answers at once.
        let ended = engine.wait(job.id, Duration::from_secs(10)).await.unwrap();
        assert!(ended.is_terminal());
        engine.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_short_history_is_read_once() {
        let engine = Engine::builder()
            .executor("ok", Arc::new(ScriptedExecutor::succeeding("done")))
            .workflow(Workflow::new("w").step(Step::prompt("s", "ok", "x")))
            .build()
            .unwrap();
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        engine.wait(job.id, Duration::from_secs(10)).await.unwrap();
        let stored = engine.store().events(job.id, 0).await.unwrap().len();
        let stream = engine.subscribe(job.id, 0).await.unwrap();
        assert_eq!(stream.count().await, stored);
        assert_eq!(engine.inner.channels.history_reads(), 1);
        engine.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn the_streams_of_a_job_read_its_full_pages_of_history_once_together() {
        let mut exec = ScriptedExecutor::succeeding("done");
        for i in 0..600 {
            exec = exec.emit(crate::executor::AgentEvent::Text {
                text: format!("line {i}"),
            });
        }
        let engine = Engine::builder()
            .executor("talk", Arc::new(exec))
            .workflow(Workflow::new("w").step(Step::prompt("s", "talk", "x")))
            .build()
            .unwrap();
        let job = engine.submit(JobRequest::new("w")).await.unwrap();
        let done = engine.wait(job.id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(done.status, crate::JobStatus::Completed);
        let stored = engine.store().events(job.id, 0).await.unwrap().len() as u64;
        assert!(
            stored > 2 * super::PAGE as u64,
            "more than two full pages: {stored}"
        );

        // Two streams of the job from the start, and a third from the middle of its first
        // page, read side by side (as subscribers catching up after a burst are).
        let mut streams = [
            engine.subscribe_shared(job.id, 0).await.unwrap(),
            engine.subscribe_shared(job.id, 0).await.unwrap(),
            engine.subscribe_shared(job.id, 100).await.unwrap(),
        ];
        assert_eq!(
            engine.inner.channels.paged(),
            1,
            "one set of pages for the job"
        );
        let mut read: [Vec<Arc<crate::JobEvent>>; 3] = Default::default();
        let mut open = [true; 3];
        while open.iter().any(|o| *o) {
            for (i, stream) in streams.iter_mut().enumerate() {
                if open[i] {
                    match stream.next().await {
                        Some(ev) => read[i].push(ev),
                        None => open[i] = false,
                    }
                }
            }
            if read[0].len() == super::PAGE + 50 {
                // Every stream is in the second page: the first is no longer kept.
                let pages = engine.inner.channels.pages(job.id);
                assert_eq!(pages.live(), vec![1]);
            }
        }
        let [xs, ys, zs] = read;
        // Two full pages read once, and the last page read by each stream: five reads, where
        // streams reading on their own made eight.
        assert_eq!(engine.inner.channels.history_reads(), 5);
        let seqs = |evs: &[Arc<crate::JobEvent>]| evs.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(&xs),
            (1..=stored).collect::<Vec<_>>(),
            "every event once, in order"
        );
        assert_eq!(seqs(&ys), seqs(&xs));
        assert_eq!(seqs(&zs), (101..=stored).collect::<Vec<_>>());
        // The full pages' events are the same events for every stream (read once); the last,
        // partial page is read by each stream itself.
        let full = 2 * super::PAGE;
        assert!(xs[..full]
            .iter()
            .zip(&ys[..full])
            .all(|(x, y)| Arc::ptr_eq(x, y)));
        assert!(xs[100..full]
            .iter()
            .zip(&zs)
            .all(|(x, z)| Arc::ptr_eq(x, z)));
        assert!(!Arc::ptr_eq(&xs[full], &ys[full]));
        drop(streams);
        assert_eq!(
            engine.inner.channels.paged(),
            0,
            "gone with the last stream"
        );
        // A stream dropped before its end lets them go too.
        let d = engine.subscribe_shared(job.id, 0).await.unwrap();
        assert_eq!(engine.inner.channels.paged(), 1);
        drop(d);
        assert_eq!(engine.inner.channels.paged(), 0);
        engine.shutdown(Duration::from_secs(1)).await;
    }
}
