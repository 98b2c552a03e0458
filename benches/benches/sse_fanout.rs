//! SSE fan-out: 1 000 subscribers of one running job each receive every event the job emits.
//! Reports the CPU time per event (all subscribers together, what the process spent from the
//! first emitted event to the last one received everywhere) and the memory per subscriber (the
//! growth of the resident set while the subscribers wait for the next event), beside a bare
//! `tokio::sync::broadcast` channel carrying the same events to the same number of tasks as
//! the baseline. Every subscriber frames each event as the SSE endpoint does
//! (`serde_json::to_string`, then `id:`/`event:`/`data:` lines).
//!
//! `cargo bench -p aiwg-benches --bench sse_fanout`. `AIWG_FANOUT_SUBSCRIBERS` (default 1000)
//! and `AIWG_FANOUT_EVENTS` (default 2000) change the sizes; `AIWG_FANOUT_ROUNDS` (default 5)
//! the rounds, in each of which the baseline and the two ways of subscribing run one after the
//! other, each figure being the median of its rounds. (Single runs varied from 0.26 to 1.84
//! here: a burst of 2 000 events outruns a job's live channel of 256 events, so some
//! subscribers catch up from the store, how many depending on the moment; with a channel of
//! 4 096 the lowest single-run figures did not occur in five runs.) The last lines are
//! `ratio <name> <value>` (baseline / ours: higher is better). The resident-set growth per
//! subscriber printed here is too coarse to compare; the `sse_memory` bench counts the heap
//! bytes per subscriber with the allocator.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_core::executor::{
    AgentEvent, AgentRequest, AgentResult, Capabilities, EventSink, Executor, ExecutorError, Health,
};
use aiwg_core::{Engine, JobEvent, JobEventKind, JobRequest, Step, Workflow};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// An executor that emits text events when told to and ends when its command channel closes.
struct Emitter {
    commands: tokio::sync::Mutex<mpsc::UnboundedReceiver<usize>>,
    started: Arc<Notify>,
}

#[async_trait]
impl Executor for Emitter {
    async fn execute(
        &self,
        _request: AgentRequest,
        events: EventSink,
        _cancel: CancellationToken,
    ) -> Result<AgentResult, ExecutorError> {
        self.started.notify_one();
        let mut commands = self.commands.lock().await;
        while let Some(n) = commands.recv().await {
            for i in 0..n {
                events.emit(AgentEvent::Text {
                    text: format!("line {i}: the agent says something of a typical length here"),
                });
            }
        }
        Ok(AgentResult::text("done"))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(false, true, false)
    }

    fn kind(&self) -> &'static str {
        "emitter"
    }

    async fn health(&self) -> Health {
        Health::healthy()
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size in bytes, from /proc/self/statm.
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// CPU time of the whole process (user + system), from /proc/self/stat (clock ticks of 10 ms).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// What the SSE endpoint writes for an event.
fn frame(event: &JobEvent) -> usize {
    let data = serde_json::to_string(event).unwrap_or_default();
    format!(
        "id: {}\nevent: {}\ndata: {data}\n\n",
        event.seq,
        event.kind.name()
    )
    .len()
}

fn is_text(event: &JobEvent) -> bool {
    matches!(
        &event.kind,
        JobEventKind::Agent {
            event: AgentEvent::Text { .. },
            ..
        }
    )
}

/// Counts subscribers that reached a number of text events.
#[derive(Default)]
struct Progress {
    ready: AtomicUsize,
    done: AtomicUsize,
    notify: Notify,
}

impl Progress {
    async fn wait(&self, counter: &AtomicUsize, n: usize) {
        loop {
            let notified = self.notify.notified();
            if counter.load(Ordering::SeqCst) >= n {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

struct Figures {
    cpu_per_event: Duration,
    bytes_per_subscriber: usize,
    wall: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `Engine::subscribe`: each subscriber gets its own copy of each event.
    Owned,
    /// `Engine::subscribe_shared`: the subscribers share each event.
    Shared,
}

async fn engine_run(subscribers: usize, events: usize, mode: Mode) -> Figures {
    let (commands, rx) = mpsc::unbounded_channel();
    let started = Arc::new(Notify::new());
    let emitter = Emitter {
        commands: tokio::sync::Mutex::new(rx),
        started: Arc::clone(&started),
    };
    let engine = Engine::builder()
        .executor("emit", Arc::new(emitter))
        .workflow(Workflow::new("talk").step(Step::prompt("talk", "emit", "x")))
        .workers(1)
        .build()
        .expect("engine");
    let was_started = started.notified();
    let job = engine
        .submit(JobRequest::new("talk"))
        .await
        .expect("submit");
    was_started.await;

    let progress = Arc::new(Progress::default());
    let before = rss();
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let progress = Arc::clone(&progress);
        match mode {
            Mode::Owned => {
                let mut stream = engine.subscribe(job.id, 0).await.expect("subscribe");
                tasks.push(tokio::spawn(async move {
                    let mut seen = 0;
                    let mut bytes = 0;
                    let mut ready = false;
                    while let Some(ev) = stream.next().await {
                        bytes += frame(&ev);
                        if !ready && matches!(ev.kind, JobEventKind::StepStarted { .. }) {
                            ready = true;
                            progress.bump(&progress.ready);
                        }
                        if is_text(&ev) {
                            seen += 1;
                            if seen == events {
                                progress.bump(&progress.done);
                            }
                        }
                    }
                    bytes
                }));
            }
            Mode::Shared => {
                let mut stream = engine.subscribe_shared(job.id, 0).await.expect("subscribe");
                tasks.push(tokio::spawn(async move {
                    let mut seen = 0;
                    let mut bytes = 0;
                    let mut ready = false;
                    while let Some(ev) = stream.next().await {
                        bytes += frame(&ev);
                        if !ready && matches!(ev.kind, JobEventKind::StepStarted { .. }) {
                            ready = true;
                            progress.bump(&progress.ready);
                        }
                        if is_text(&ev) {
                            seen += 1;
                            if seen == events {
                                progress.bump(&progress.done);
                            }
                        }
                    }
                    bytes
                }));
            }
        }
    }
    progress.wait(&progress.ready, subscribers).await;
    let bytes_per_subscriber = rss().saturating_sub(before) / subscribers;

    let (cpu0, t0) = (cpu(), Instant::now());
    commands.send(events).expect("emit");
    progress.wait(&progress.done, subscribers).await;
    let (cpu_used, wall) = (cpu().saturating_sub(cpu0), t0.elapsed());

    drop(commands);
    for t in tasks {
        assert!(t.await.expect("subscriber") > 0);
    }
    let done = engine
        .wait(job.id, Duration::from_secs(60))
        .await
        .expect("end");
    assert_eq!(done.status, aiwg_core::JobStatus::Completed);
    engine.shutdown(Duration::from_secs(5)).await;
    Figures {
        cpu_per_event: cpu_used / u32::try_from(events).expect("events"),
        bytes_per_subscriber,
        wall,
    }
}

fn sample_event(job_id: aiwg_core::JobId, seq: u64, i: usize) -> JobEvent {
    JobEvent {
        job_id,
        seq,
        at: chrono::Utc::now(),
        kind: JobEventKind::Agent {
            step: "talk".into(),
            event: AgentEvent::Text {
                text: format!("line {i}: the agent says something of a typical length here"),
            },
        },
    }
}

/// The baseline: a bare broadcast channel of shared events, one task per receiver, the same
/// framing.
async fn baseline_run(subscribers: usize, events: usize) -> Figures {
    let (tx, _) = broadcast::channel::<Arc<JobEvent>>(events + 16);
    let progress = Arc::new(Progress::default());
    let before = rss();
    let mut tasks = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let mut rx = tx.subscribe();
        let progress = Arc::clone(&progress);
        tasks.push(tokio::spawn(async move {
            let mut seen = 0;
            let mut bytes = 0;
            progress.bump(&progress.ready);
            while let Ok(ev) = rx.recv().await {
                bytes += frame(&ev);
                seen += 1;
                if seen == events {
                    progress.bump(&progress.done);
                }
            }
            bytes
        }));
    }
    progress.wait(&progress.ready, subscribers).await;
    let bytes_per_subscriber = rss().saturating_sub(before) / subscribers;
    let id = aiwg_core::JobId::new();
    let (cpu0, t0) = (cpu(), Instant::now());
    for i in 0..events {
        let _ = tx.send(Arc::new(sample_event(id, i as u64 + 1, i)));
    }
    progress.wait(&progress.done, subscribers).await;
    let (cpu_used, wall) = (cpu().saturating_sub(cpu0), t0.elapsed());
    drop(tx);
    for t in tasks {
        assert!(t.await.expect("receiver") > 0);
    }
    Figures {
        cpu_per_event: cpu_used / u32::try_from(events).expect("events"),
        bytes_per_subscriber,
        wall,
    }
}

/// The median of `figures` by CPU per event (the upper one of an even count).
fn median(mut figures: Vec<Figures>) -> Figures {
    figures.sort_by_key(|f| f.cpu_per_event);
    figures.swap_remove(figures.len() / 2)
}

fn main() {
    let subscribers = env("AIWG_FANOUT_SUBSCRIBERS", 1000).max(1);
    let events = env("AIWG_FANOUT_EVENTS", 2000).max(1);
    let rounds = env("AIWG_FANOUT_ROUNDS", 5).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // A warm-up of each, so that the allocator's and the runtime's first growth is not
        // counted against whichever runs first.
        baseline_run(subscribers, 100).await;
        engine_run(subscribers, 100, Mode::Owned).await;

        // The three alternate within each round, so that a slow moment of the machine falls
        // on all of them alike; each figure is the median of its rounds.
        let (mut bases, mut owneds, mut shareds) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            let base = baseline_run(subscribers, events).await;
            let owned = engine_run(subscribers, events, Mode::Owned).await;
            let shared = engine_run(subscribers, events, Mode::Shared).await;
            println!(
                "round {round}: CPU per event: bare {:.1?}, Engine::subscribe {:.1?}, \
                 Engine::subscribe_shared {:.1?}",
                base.cpu_per_event, owned.cpu_per_event, shared.cpu_per_event
            );
            bases.push(base);
            owneds.push(owned);
            shareds.push(shared);
        }
        let (base, owned, shared) = (median(bases), median(owneds), median(shareds));
        println!("{subscribers} subscribers of one job, {events} events, medians of {rounds} rounds:");
        for (name, f) in [
            ("bare broadcast (baseline)", &base),
            ("Engine::subscribe", &owned),
            ("Engine::subscribe_shared", &shared),
        ] {
            println!(
                "  {name:<28} CPU {:>9.1?}/event ({:>6.2?} per delivery), {:>6} B/subscriber, {:>7.0} deliveries/s",
                f.cpu_per_event,
                f.cpu_per_event / u32::try_from(subscribers).expect("subscribers"),
                f.bytes_per_subscriber,
                (subscribers * events) as f64 / f.wall.as_secs_f64()
            );
        }
        let cpu_ratio = |f: &Figures| {
            base.cpu_per_event.as_secs_f64() / f.cpu_per_event.as_secs_f64().max(1e-12)
        };
        println!();
        println!("ratio sse_fanout_cpu_per_event {:.3}", cpu_ratio(&owned));
        println!("ratio sse_fanout_shared_cpu_per_event {:.3}", cpu_ratio(&shared));
        // The resident set barely moves for a few hundred kilobytes the allocator already
        // holds; the memory per subscriber is counted by the allocator in `sse_memory`.
    });
}
