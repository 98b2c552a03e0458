//! Per-job event streams: stored history first, then live events, ending after the terminal one.
//!
//! Live events reach a job's subscribers through that job's own channel ([`JobChannels`]): a
//! channel exists only while the job has subscribers, an event of a job nobody follows costs a
//! hash lookup, and a subscriber only ever wakes for its own job's events. Subscribers of one job
//! share each event (`Arc<JobEvent>`); nothing is copied per subscriber.
//!
//! [`Engine::wait`] needs only the end of a job, so it does not subscribe: it registers a
//! [`Waiter`], which the job's terminal event wakes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::Notify;

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
}

type Shard = Mutex<ShardState>;

/// The live channels of the jobs that have subscribers, sharded by job id.
pub(super) struct JobChannels {
    shards: Box<[Shard]>,
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
    }
}

impl State {
    /// Reads the next page of stored events after `last`; `false` when the store failed.
    async fn page(&mut self) -> bool {
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
    let mut state = State {
        engine,
        id,
        rx: Some(rx),
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
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |mut st| async move { st.next().await.map(|ev| (ev, st)) },
    )))
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
}
