//! Load harness for the axum router, each workload beside a bare axum handler that answers the
//! same bytes, on the same machine, with the same client and concurrency:
//!
//! 1. the signed GitHub `issue_comment` trigger path — `POST /hooks/github` (verify → parse →
//!    grammar → authorize → de-duplicate → enqueue → 202) — beside a bare handler answering
//!    `202 {"job_id": …}`;
//! 2. the status endpoint — `GET /workflows/{id}/status` (auth → store read → JSON) — beside a
//!    bare handler answering the same document.
//!
//! `cargo bench -p aiwg-benches --bench http_load` prints requests/s, p50 and p99 for each, and
//! the throughput ratio aiwg / bare. `AIWG_LOAD_REQUESTS` (default 4000) and
//! `AIWG_LOAD_CONCURRENCY` (default 16) change the load; every loop is bounded in count and only
//! talks to 127.0.0.1.

use aiwg_benches::env_usize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiwg_benches::github::issue_comment;
use aiwg_core::http::{Api, ApiKey, Scope};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobRequest, Parameter, ProjectPolicy, Step, Workflow};
use aiwg_webhook::platform::github;
use axum::routing::{get, post};

const SECRET: &str = "load-harness-webhook-secret";
const KEY: &str = "load-harness-api-key-0123456789";

struct Stats {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("serve");
    });
    format!("http://{addr}")
}

/// Sends `n` requests from `concurrency` tasks; `make(i)` builds request `i`.
async fn load<F>(
    client: &reqwest::Client,
    n: usize,
    concurrency: usize,
    expect: u16,
    make: F,
) -> Stats
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, make, next) = (client.clone(), Arc::clone(&make), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break lat;
                }
                let t = Instant::now();
                let res = make(&client, i).send().await.expect("request");
                let status = res.status().as_u16();
                let _ = res.bytes().await;
                assert_eq!(status, expect, "request {i}");
                lat.push(t.elapsed());
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Stats {
        rps: n as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn report(name: &str, aiwg: &Stats, bare: &Stats) {
    println!(
        "{name:<24} aiwg {:>8.0} req/s  p50 {:>7.2?}  p99 {:>7.2?} | bare {:>8.0} req/s  p50 {:>7.2?}  p99 {:>7.2?} | ratio {:.2}",
        aiwg.rps, aiwg.p50, aiwg.p99, bare.rps, bare.p50, bare.p99, aiwg.rps / bare.rps
    );
}

fn main() {
    let n = env_usize("AIWG_LOAD_REQUESTS", 4000);
    let concurrency = env_usize("AIWG_LOAD_CONCURRENCY", 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let root = tempfile::tempdir().expect("tempdir");
        let engine = Engine::builder()
            .executor("noop", Arc::new(ScriptedExecutor::succeeding("ok")))
            .workflow(
                Workflow::new("review")
                    .param(Parameter::new("depth"))
                    .param(Parameter::new("focus"))
                    .step(Step::prompt("review", "noop", "review {{guidance}}")),
            )
            .policy(
                ProjectPolicy::builder()
                    .root(root.path())
                    .map(".*", ".")
                    .build()
                    .expect("policy"),
            )
            .workers(4)
            .queue_capacity(n * 4)
            .build()
            .expect("engine");
        let triggers: aiwg_webhook::TriggersConfig = serde_json::from_value(
            serde_json::json!({"github": {"secret": SECRET, "mention": "@aiwg"}}),
        )
        .expect("triggers");
        let hooks = aiwg_webhook::Hooks::builder(triggers, engine.clone())
            .build()
            .expect("hooks");
        let api = Api::builder(engine.clone())
            .key(ApiKey::plain("load", KEY, vec![Scope::Admin]).expect("key"))
            .hooks(Arc::new(hooks))
            .build()
            .expect("api");
        let aiwg = serve(aiwg_axum::router(api)).await;

        let job = engine.submit(JobRequest::new("review")).await.expect("job");
        let job = engine
            .wait(job.id, Duration::from_secs(10))
            .await
            .expect("done");
        let client = reqwest::Client::new();
        let status_doc = client
            .get(format!("{aiwg}/workflows/{}/status", job.id))
            .bearer_auth(KEY)
            .send()
            .await
            .expect("status")
            .bytes()
            .await
            .expect("body");
        let accepted = format!(r#"{{"job_id":"{}"}}"#, job.id);
        let bare = serve(
            axum::Router::new()
                .route(
                    "/hooks/github",
                    post(move || {
                        let body = accepted.clone();
                        async move {
                            (
                                axum::http::StatusCode::ACCEPTED,
                                [("content-type", "application/json")],
                                body,
                            )
                        }
                    }),
                )
                .route(
                    "/workflows/{id}/status",
                    get(move || {
                        let body = status_doc.clone();
                        async move { ([("content-type", "application/json")], body) }
                    }),
                ),
        )
        .await;

        let body = Arc::new(issue_comment(8 * 1024));
        let signature = github::sign(SECRET, &body);
        let github_req =
            |base: String, body: Arc<Vec<u8>>, signature: String, salt: &'static str| {
                move |c: &reqwest::Client, i: usize| {
                    c.post(format!("{base}/hooks/github"))
                        .header("x-github-event", "issue_comment")
                        .header("x-github-delivery", format!("{salt}-{i}"))
                        .header("x-hub-signature-256", signature.as_str())
                        .header("content-type", "application/json")
                        .body(body.as_ref().clone())
                }
            };
        println!(
            "{n} requests per run, concurrency {concurrency}, ~{} byte deliveries",
            body.len()
        );
        // Warm both servers and the client's connection pool.
        load(
            &client,
            200,
            concurrency,
            202,
            github_req(aiwg.clone(), Arc::clone(&body), signature.clone(), "warm"),
        )
        .await;
        load(
            &client,
            200,
            concurrency,
            202,
            github_req(bare.clone(), Arc::clone(&body), signature.clone(), "warm"),
        )
        .await;

        let a = load(
            &client,
            n,
            concurrency,
            202,
            github_req(aiwg.clone(), Arc::clone(&body), signature.clone(), "run"),
        )
        .await;
        let b = load(
            &client,
            n,
            concurrency,
            202,
            github_req(bare.clone(), Arc::clone(&body), signature.clone(), "run"),
        )
        .await;
        report("github issue_comment", &a, &b);

        let status_req = |base: String, id: String| {
            move |c: &reqwest::Client, _: usize| {
                c.get(format!("{base}/workflows/{id}/status"))
                    .bearer_auth(KEY)
            }
        };
        let id = job.id.to_string();
        let a = load(
            &client,
            n,
            concurrency,
            200,
            status_req(aiwg.clone(), id.clone()),
        )
        .await;
        let b = load(&client, n, concurrency, 200, status_req(bare.clone(), id)).await;
        report("status endpoint", &a, &b);
        engine.shutdown(Duration::from_secs(5)).await;
    });
}
