//! What the actix-web adapter itself adds: body limits enforced before buffering, SSE streamed
//! live, CORS, request ids, and living inside a host app with its own routes, state and
//! default service.

mod support;

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use aiwg_core::http::Api;
use aiwg_core::test_util::conformance::{
    api_builder, fixture, Client, FixtureOptions, Serve, ADMIN_KEY, READ_KEY, TRIGGER_KEY,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// Sends raw bytes on a fresh connection and returns what the server answers up to the end of
/// the response head (and whatever body came with it), without ever finishing the request.
async fn raw_exchange(base_url: &str, request: &[u8]) -> String {
    let addr = base_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the server answered without waiting for the rest of the body")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(head_end) = text.find("\r\n\r\n") {
            // Stop once the problem document (small, with a Content-Length) is in.
            if text[head_end..].contains('}') {
                break;
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn small_api(fx: &aiwg_core::test_util::conformance::Fixture) -> Api {
    api_builder(fx.engine.clone())
        .body_limit(1024)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_before_any_body_byte() {
    let fx = fixture(FixtureOptions::default());
    let s = support::Actix.serve(small_api(&fx), "").await;
    let head = format!(
        "POST /workflows/trigger HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {TRIGGER_KEY}\r\n\
         content-type: application/json\r\ncontent-length: 1000000000\r\n\r\n"
    );
    // Not one byte of the announced gigabyte is sent.
    let answer = raw_exchange(&s.base_url, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("content-type: application/problem+json"));
    assert!(
        answer.contains("exceeds the limit of 1024 bytes"),
        "{answer}"
    );
    assert_eq!(fx.echo.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_refused_as_soon_as_it_passes_the_limit() {
    let fx = fixture(FixtureOptions::default());
    let s = support::Actix.serve(small_api(&fx), "").await;
    let mut request = format!(
        "POST /workflows/trigger HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {TRIGGER_KEY}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    // One chunk of 2 KiB, and the body never ends (no zero-length chunk).
    request.extend_from_slice(b"800\r\n");
    request.extend_from_slice(&[b' '; 0x800]);
    request.extend_from_slice(b"\r\n");
    let answer = raw_exchange(&s.base_url, &request).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"status\":413"), "{answer}");
    assert_eq!(fx.echo.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_at_the_limit_is_accepted() {
    let fx = fixture(FixtureOptions::default());
    let s = support::Actix.serve(small_api(&fx), "").await;
    let mut body =
        serde_json::to_vec(&json!({"workflow": "echo", "project_path": "proj"})).unwrap();
    // Pad with JSON whitespace up to exactly the limit.
    body.resize(1024, b' ');
    let res = reqwest::Client::new()
        .post(format!("{}/workflows/trigger", s.base_url))
        .bearer_auth(TRIGGER_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_streamed_live_with_keep_alives() {
    let fx = fixture(FixtureOptions::default());
    let s = support::Actix
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let c = Client::new(&s.base_url);
    let r = c
        .send(
            "POST",
            "/workflows/trigger",
            Some(TRIGGER_KEY),
            Some(aiwg_core::test_util::conformance::Body::Json(
                json!({"workflow": "hang", "project_path": "proj"}),
            )),
        )
        .await;
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let mut live = c
        .sse_live(&format!("/workflows/{id}/events"), READ_KEY)
        .await;
    // The job never ends on its own, so anything read here was flushed while the response
    // was still open.
    let first = live.next_event().await.expect("the first event, live");
    assert_eq!(first.id.as_deref(), Some("1"));
    assert!(fx.hang.wait_started(1, WAIT).await);
    for _ in 0..2 {
        let c = live
            .next_comment()
            .await
            .expect("a keep-alive on the open stream");
        assert!(c.contains("keep-alive"));
    }
    let r = c
        .send(
            "POST",
            &format!("/workflows/{id}/cancel"),
            Some(ADMIN_KEY),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let mut last = None;
    while let Some(f) = live.next_event().await {
        last = Some(f);
    }
    let last: Value = serde_json::from_str(&last.expect("terminal event").data).unwrap();
    assert_eq!(last["to"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_or_made() {
    let fx = fixture(FixtureOptions::default());
    let s = support::Actix
        .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
        .await;
    let http = reqwest::Client::new();
    let kept = http
        .get(format!("{}/health", s.base_url))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "req-42");
    let mut made = Vec::new();
    for path in ["/health", "/jobs"] {
        // Errors carry one as well.
        let res = http
            .get(format!("{}{path}", s.base_url))
            .send()
            .await
            .unwrap();
        made.push(res.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    assert!(made.iter().all(|id| id.len() >= 16), "{made:?}");
    assert_ne!(made[0], made[1]);
}

/// A host app with state, routes before and after the aiwg scope, and a default service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lives_inside_a_host_app() {
    let fx = fixture(FixtureOptions::default());
    let aiwg = aiwg_actix::configure(api_builder(fx.engine.clone()).build().unwrap());
    let greeting = web::Data::new(String::from("hello from the host"));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(greeting.clone())
            .route(
                "/",
                web::get().to(|g: web::Data<String>| async move {
                    HttpResponse::Ok().body(g.get_ref().clone())
                }),
            )
            .service(web::scope("/aiwg").configure(aiwg.clone()))
            .route("/after", web::get().to(|| async { "after" }))
            .default_service(web::to(|| async {
                HttpResponse::NotFound().body("host 404")
            }))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("{base}{path}"))
            .bearer_auth(TRIGGER_KEY)
            .send()
    };

    assert_eq!(
        get("/").await.unwrap().text().await.unwrap(),
        "hello from the host"
    );
    assert_eq!(get("/after").await.unwrap().text().await.unwrap(), "after");
    let health = get("/aiwg/health").await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let missing = get("/aiwg/nope").await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(missing.text().await.unwrap(), "host 404");
    let trig = http
        .post(format!("{base}/aiwg/workflows/trigger"))
        .bearer_auth(TRIGGER_KEY)
        .json(&json!({"workflow": "echo", "project_path": "proj"}))
        .send()
        .await
        .unwrap();
    assert_eq!(trig.status().as_u16(), 202);
    let location = trig.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = trig.json().await.unwrap();
    assert_eq!(
        location,
        format!("/aiwg/workflows/{}/status", v["job_id"].as_str().unwrap())
    );
    handle.stop(false).await;
}
