//! Jobs started from Slack and Discord report their outcome back: a real HTTP receiver on
//! loopback stands in for Discord's API and Slack's response_url.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobRequest, Step, TriggerInfo, Workflow};
use aiwg_webhook::PlatformReplies;
use axum::extract::State;
use axum::http::Uri;
use axum::http::{Method, StatusCode};
use axum::routing::any;
use serde_json::Value;
use tokio::sync::mpsc;

type Seen = mpsc::UnboundedSender<(Method, String, Value)>;

/// What the receiver records, and how many requests it still refuses with a rate limit.
#[derive(Clone)]
struct Receiver {
    seen: Seen,
    refuse: Arc<AtomicUsize>,
    /// Requests received, refused or not.
    tries: Arc<AtomicUsize>,
}

/// Records each request; the first `refuse` are answered 429 with `Retry-After: 1` (Discord's
/// rate limit) and not recorded.
async fn record(
    State(r): State<Receiver>,
    method: Method,
    uri: Uri,
    body: String,
) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    r.tries.fetch_add(1, Ordering::SeqCst);
    let refused = r
        .refuse
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if refused {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "{\"message\": \"You are being rate limited.\", \"retry_after\": 1.0}",
        );
    }
    let _ = r.seen.send((
        method,
        uri.path().to_owned(),
        serde_json::from_str(&body).unwrap_or(Value::Null),
    ));
    (StatusCode::OK, [("retry-after", "0")], "ok")
}

async fn receiver() -> (String, mpsc::UnboundedReceiver<(Method, String, Value)>) {
    let (base, rx, _) = refusing_receiver(0).await;
    (base, rx)
}

/// A receiver that refuses its first `refuse` requests; also the count of requests it got.
async fn refusing_receiver(
    refuse: usize,
) -> (
    String,
    mpsc::UnboundedReceiver<(Method, String, Value)>,
    Arc<AtomicUsize>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tries = Arc::new(AtomicUsize::new(0));
    let state = Receiver {
        seen: tx,
        refuse: Arc::new(AtomicUsize::new(refuse)),
        tries: tries.clone(),
    };
    let app = axum::Router::new().fallback(any(record)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), rx, tries)
}

fn engine(replies: PlatformReplies, fail: bool) -> Engine {
    let exec = if fail {
        ScriptedExecutor::succeeding("never").fail_times(usize::MAX)
    } else {
        ScriptedExecutor::succeeding("all tests pass")
    };
    Engine::builder()
        .executor("x", Arc::new(exec))
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
        .observer(Arc::new(replies))
        .build()
        .unwrap()
}

/// A request from `source` with these reply handles: the credentials (`slack_response_url`,
/// `discord_token`) privately, the rest in `trigger.extra`, as the platform hooks keep them.
fn request(source: &str, handles: &[(&str, String)]) -> JobRequest {
    let mut t = TriggerInfo::new(source);
    let mut r = JobRequest::new("check");
    for (k, v) in handles {
        if matches!(*k, "slack_response_url" | "discord_token") {
            r = r.reply_credential(*k, v.clone());
        } else {
            t.extra.insert((*k).to_owned(), v.clone());
        }
    }
    r.trigger(t)
}

async fn next(
    rx: &mut mpsc::UnboundedReceiver<(Method, String, Value)>,
) -> (Method, String, Value) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a reply arrives")
        .expect("open")
}

#[tokio::test]
async fn discord_commands_get_their_deferred_message_edited() {
    let (base, mut rx) = receiver().await;
    let replies = PlatformReplies::builder()
        .discord_api(format!("{base}/api"))
        .build()
        .unwrap();
    let engine = engine(replies, false);
    let t = request(
        "discord",
        &[
            ("discord_application_id", "2200".into()),
            ("discord_token", "tok-1".into()),
        ],
    );
    let job = engine.submit(t).await.unwrap();
    let (method, path, body) = next(&mut rx).await;
    assert_eq!(method, Method::PATCH);
    assert_eq!(path, "/api/webhooks/2200/tok-1/messages/@original");
    let content = body["content"].as_str().unwrap();
    assert!(
        content.contains(&job.id.to_string())
            && content.contains("completed")
            && content.contains("all tests pass"),
        "{content}"
    );
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn slack_commands_get_an_ephemeral_message_with_the_error() {
    let (base, mut rx) = receiver().await;
    let replies = PlatformReplies::builder()
        .slack_hosts(vec![])
        .build()
        .unwrap();
    let engine = engine(replies, true);
    let t = request(
        "slack",
        &[("slack_response_url", format!("{base}/commands/T1/1/x"))],
    );
    engine.submit(t).await.unwrap();
    let (method, path, body) = next(&mut rx).await;
    assert_eq!((method, path.as_str()), (Method::POST, "/commands/T1/1/x"));
    assert_eq!(body["response_type"], "ephemeral");
    let text = body["text"].as_str().unwrap();
    assert!(
        text.contains("failed") && text.contains("scripted failure"),
        "{text}"
    );
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_slack_response_url_outside_the_allowed_hosts_is_not_called() {
    let (base, mut rx) = receiver().await;
    // Default hosts: only https://hooks.slack.com. The loopback URL must be refused, while the
    // Discord reply (allowed) still arrives, proving the observer ran for both jobs in order.
    let replies = PlatformReplies::builder()
        .discord_api(format!("{base}/api"))
        .build()
        .unwrap();
    let engine = Engine::builder()
        .executor("x", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(Workflow::new("check").step(Step::prompt("run", "x", "check")))
        .observer(Arc::new(replies))
        .workers(1)
        .build()
        .unwrap();
    let slack = request("slack", &[("slack_response_url", format!("{base}/evil"))]);
    let first = engine.submit(slack).await.unwrap();
    engine
        .wait(first.id, Duration::from_secs(20))
        .await
        .unwrap();
    let discord = request(
        "discord",
        &[
            ("discord_application_id", "1".into()),
            ("discord_token", "t".into()),
        ],
    );
    engine.submit(discord).await.unwrap();
    let (_, path, _) = next(&mut rx).await;
    assert_eq!(
        path, "/api/webhooks/1/t/messages/@original",
        "the first request seen is Discord's, not the refused Slack one"
    );
    engine.shutdown(Duration::from_secs(1)).await;
}

/// Discord answers the first edit 429 with `Retry-After: 1` (its rate limit): the edit is made
/// again after the wait, and arrives.
#[tokio::test]
async fn a_reply_the_platform_asks_to_wait_for_is_sent_again() {
    let (base, mut rx, tries) = refusing_receiver(1).await;
    let replies = PlatformReplies::builder()
        .discord_api(format!("{base}/api"))
        .build()
        .unwrap();
    let engine = engine(replies, false);
    let t = request(
        "discord",
        &[
            ("discord_application_id", "2200".into()),
            ("discord_token", "tok-2".into()),
        ],
    );
    engine.submit(t).await.unwrap();
    let (method, path, body) = next(&mut rx).await;
    assert_eq!(method, Method::PATCH);
    assert_eq!(path, "/api/webhooks/2200/tok-2/messages/@original");
    assert!(body["content"].as_str().unwrap().contains("completed"));
    assert_eq!(tries.load(Ordering::SeqCst), 2, "refused once, then sent");
    engine.shutdown(Duration::from_secs(1)).await;
}
