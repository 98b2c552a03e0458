//! Outbound webhooks: signed, recorded deliveries per second through the dispatcher to a local
//! receiver, beside the same number of bare reqwest POSTs (no signing, no store, no retry
//! bookkeeping) with the same concurrency (10). The ratio of the two throughputs is the
//! dispatcher's overhead.
//!
//! `cargo bench -p aiwg-benches --bench dispatch` (the criterion groups and the side-by-side
//! figure); `cargo bench -p aiwg-benches --bench dispatch -- summary_only` skips the criterion
//! groups. The last line is `ratio dispatch_vs_bare_reqwest <v>`; the one before it,
//! `ratio dispatch_vs_bare_reqwest_same_headers <v>`, compares with bare POSTs that also carry
//! a delivery's five headers (fixed values of the same lengths): the same bytes on the wire, so
//! what the receiver spends on the headers is on both sides. `AIWG_DISPATCH_ONLY=signed` (or
//! `bare`, or `bare_headers`) runs only that side, `AIWG_DISPATCH_ROUNDS` rounds of it (default
//! 150), for a profile or a count of its CPU time; it prints its rate and no `ratio` line.
//! `AIWG_DISPATCH_STORE=postgres` keeps the outbox in PostgreSQL (`PgDispatchStore`, a fresh
//! schema of `AIWG_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`,
//! dropped at the end); the last line is then `ratio dispatch_pg_vs_bare_reqwest <v>`.
// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_benches::pg::BenchSchema;
use aiwg_core::dispatch::{CreateSubscription, Dispatcher, OutboundEvent, PgDispatchStore};
use aiwg_core::secrets::SecretKeyring;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// Deliveries per iteration (10 subscriptions × 20 events, or 200 bare POSTs).
const N: u64 = 200;
const CONCURRENCY: usize = 10;

/// Counts arrivals; wakes a waiter only when the count it waits for is reached, so that the
/// receiver does not wake the measuring thread once per delivery (the dispatcher's rounds wait
/// while deliveries arrive, the bare loop's only after its tasks are done: a per-arrival wake
/// would be charged to the dispatcher alone).
struct Sink {
    count: AtomicU64,
    /// The count [`Sink::wait_for`] waits for.
    target: AtomicU64,
    arrived: Notify,
}

impl Sink {
    async fn wait_for(&self, target: u64) {
        self.target.store(target, Ordering::SeqCst);
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.count.load(Ordering::SeqCst) >= target {
                return;
            }
            arrived.await;
        }
    }
}

async fn receiver() -> (String, Arc<Sink>) {
    let sink = Arc::new(Sink {
        count: AtomicU64::new(0),
        target: AtomicU64::new(0),
        arrived: Notify::new(),
    });
    let s = sink.clone();
    let app = axum::Router::new().fallback(move |_body: axum::body::Bytes| {
        let s = s.clone();
        async move {
            // `wait_for` stores its target before it reads the count: either this sees the new
            // target or `wait_for` sees this arrival.
            let n = s.count.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= s.target.load(Ordering::SeqCst) {
                s.arrived.notify_waiters();
            }
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), sink)
}

/// A realistic event (its `data` as one string of the usual size; serde_json is not a
/// dependency of this crate).
fn event() -> OutboundEvent {
    OutboundEvent::new(
        "job.completed",
        r#"{"job_id": "0192d0c1-a8a0-7c43-b1c2-d3e4f5a6b7c8", "workflow": "review", "project": "/srv/p", "agent": "claude", "status": "completed", "exit_code": 0, "duration_ms": 1234, "trigger": {"source": "github", "repo": "o/r", "pr": 7}}"#.into(),
    )
}

/// A PostgreSQL outbox in a schema of its own (`AIWG_DISPATCH_STORE=postgres`), and the
/// schema, to drop at the end.
async fn pg_outbox() -> (Arc<PgDispatchStore>, BenchSchema) {
    let db = BenchSchema::create("dispatch")
        .await
        .unwrap_or_else(|why| panic!("AIWG_DISPATCH_STORE=postgres: {why}"));
    let keyring = SecretKeyring::parse("bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
        .expect("keyring");
    let store = PgDispatchStore::from_pool(db.pool(16).await)
        .await
        .expect("outbox")
        .with_keyring(keyring);
    store.migrate().await.expect("migrate");
    (Arc::new(store), db)
}

fn dispatch(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let (base, sink) = rt.block_on(receiver());
    let pg = std::env::var("AIWG_DISPATCH_STORE").is_ok_and(|s| s == "postgres");
    let outbox = pg.then(|| rt.block_on(pg_outbox()));
    let dispatcher = rt.block_on(async {
        let mut builder = Dispatcher::builder()
            .allow_private_targets(true)
            .workers(CONCURRENCY);
        if let Some((store, _)) = &outbox {
            builder = builder.store(store.clone());
        }
        let d = builder.build().unwrap();
        d.start().unwrap();
        for i in 0..10 {
            d.create(CreateSubscription {
                url: format!("{base}/s{i}"),
                events: vec!["job.*".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        d
    });
    let data = event().data;
    let client = reqwest::Client::new();
    let payload = event().body();

    let mut group = c.benchmark_group("outbound_webhooks");
    group.throughput(Throughput::Elements(N));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));

    group.bench_function("dispatcher_signed_recorded", |b| {
        b.to_async(&rt).iter(|| {
            let d = dispatcher.clone();
            let sink = sink.clone();
            let data = data.clone();
            async move {
                let target = sink.count.load(Ordering::SeqCst) + N;
                for _ in 0..N / 10 {
                    d.publish(OutboundEvent::new("job.completed", data.clone()))
                        .await
                        .unwrap();
                }
                sink.wait_for(target).await;
            }
        });
    });

    group.bench_function("bare_reqwest_post", |b| {
        b.to_async(&rt).iter(|| {
            let client = client.clone();
            let sink = sink.clone();
            let url = format!("{base}/bare");
            let payload = payload.clone();
            async move {
                let target = sink.count.load(Ordering::SeqCst) + N;
                let next = Arc::new(AtomicU64::new(0));
                let mut tasks = Vec::new();
                for _ in 0..CONCURRENCY {
                    let (client, url, payload, next) =
                        (client.clone(), url.clone(), payload.clone(), next.clone());
                    tasks.push(tokio::spawn(async move {
                        while next.fetch_add(1, Ordering::SeqCst) < N {
                            let r = client
                                .post(&url)
                                .body(payload.clone())
                                .send()
                                .await
                                .unwrap();
                            assert!(r.status().is_success());
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                sink.wait_for(target).await;
            }
        });
    });
    group.finish();

    // A direct side-by-side figure, rounds interleaved so that load from elsewhere hits both
    // alike; printed for the report.
    let rounds = 20;
    let signed_round = || {
        rt.block_on(async {
            let start = Instant::now();
            let target = sink.count.load(Ordering::SeqCst) + N;
            for _ in 0..N / 10 {
                dispatcher
                    .publish(OutboundEvent::new("job.completed", data.clone()))
                    .await
                    .unwrap();
            }
            sink.wait_for(target).await;
            start.elapsed()
        })
    };
    // `headers`: the bare POSTs carry a delivery's headers (fixed values of the same lengths),
    // so that what is compared is the same bytes on the wire.
    let bare_round = |headers: bool| {
        rt.block_on(async {
            let start = Instant::now();
            let target = sink.count.load(Ordering::SeqCst) + N;
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..CONCURRENCY {
                let (client, url, payload, next) = (
                    client.clone(),
                    format!("{base}/bare"),
                    payload.clone(),
                    next.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::SeqCst) < N {
                        let mut post = client.post(&url);
                        if headers {
                            post = post.headers(delivery_headers());
                        }
                        post.body(payload.clone()).send().await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            sink.wait_for(target).await;
            start.elapsed()
        })
    };
    // `AIWG_DISPATCH_ONLY=signed|bare|bare_headers` runs one side alone (for a profile of it);
    // the figures are then not printed.
    let only = std::env::var("AIWG_DISPATCH_ONLY").ok();
    if let Some(only) = only {
        let rounds: u32 = std::env::var("AIWG_DISPATCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(150);
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            total += match only.as_str() {
                "bare" => bare_round(false),
                "bare_headers" => bare_round(true),
                _ => signed_round(),
            };
        }
        println!(
            "{only} alone: {:.0}/s over {} deliveries",
            f64::from(rounds) * N as f64 / total.as_secs_f64(),
            u64::from(rounds) * N
        );
        rt.block_on(dispatcher.shutdown());
        drop_outbox(&rt, outbox);
        return;
    }
    let (mut signed, mut bare, mut same_bytes) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        signed += signed_round();
        bare += bare_round(false);
        same_bytes += bare_round(true);
    }
    let per_sec = |d: Duration| (N * rounds) as f64 / d.as_secs_f64();
    println!(
        "side by side over {} deliveries: dispatcher {:.0}/s, bare reqwest {:.0}/s, ratio {:.2}; \
         bare reqwest with a delivery's headers {:.0}/s, ratio {:.2}",
        N * rounds,
        per_sec(signed),
        per_sec(bare),
        per_sec(signed) / per_sec(bare),
        per_sec(same_bytes),
        per_sec(signed) / per_sec(same_bytes),
    );
    rt.block_on(dispatcher.shutdown());
    let name = if outbox.is_some() {
        "dispatch_pg_vs_bare_reqwest"
    } else {
        "dispatch_vs_bare_reqwest"
    };
    drop_outbox(&rt, outbox);
    // The machine-readable figures, last (throughput: ours / baseline, higher is better).
    println!(
        "ratio {name}_same_headers {:.3}",
        per_sec(signed) / per_sec(same_bytes)
    );
    println!("ratio {name} {:.3}", per_sec(signed) / per_sec(bare));
}

/// A delivery's headers as the dispatcher sends them, with fixed values of the same lengths
/// (a `msg_` id, a timestamp in seconds, one `v1,` signature).
fn delivery_headers() -> reqwest::header::HeaderMap {
    use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, USER_AGENT};
    let mut h = HeaderMap::with_capacity(8);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(
        USER_AGENT,
        HeaderValue::from_static(aiwg_core::dispatch::USER_AGENT_VALUE),
    );
    h.insert(
        "webhook-id",
        HeaderValue::from_static("msg_0192d0c1a8a07c43b1c2d3e4f5a6b7c8"),
    );
    h.insert("webhook-timestamp", HeaderValue::from_static("1796630400"));
    h.insert(
        "webhook-signature",
        HeaderValue::from_static("v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4="),
    );
    h
}

/// Drops the PostgreSQL outbox's schema, if there is one.
fn drop_outbox(rt: &Runtime, outbox: Option<(Arc<PgDispatchStore>, BenchSchema)>) {
    if let Some((store, db)) = outbox {
        drop(store);
        rt.block_on(db.drop_schema());
    }
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
