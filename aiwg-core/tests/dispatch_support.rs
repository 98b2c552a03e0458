//! Shared helpers for the dispatcher tests: a real axum receiver on loopback and condition
//! waits. Included by the other `dispatch_*` tests with `#[path]`; as a test target of its
//! own it has only a self-check.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::dispatch::{Delivery, DeliveryState, Dispatcher, SubscriptionId};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// What the receiver answers.
#[derive(Clone, Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Reply {
    pub(crate) fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    pub(crate) fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_owned(), v.to_owned()));
        self
    }

    pub(crate) fn body(mut self, b: impl Into<String>) -> Self {
        self.body = b.into();
        self
    }
}

type Script = Box<dyn FnMut(&Received, usize) -> Reply + Send>;

struct Inner {
    requests: Mutex<Vec<Received>>,
    script: Mutex<Script>,
    arrived: Notify,
}

/// A real HTTP server on 127.0.0.1 that records requests and answers from a script.
#[derive(Clone)]
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    inner: Arc<Inner>,
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Received {
        path: uri.path().to_owned(),
        headers,
        body,
    };
    let reply = {
        let mut reqs = inner.requests.lock().unwrap();
        let n = reqs.len();
        let reply = (inner.script.lock().unwrap())(&req, n);
        reqs.push(req);
        reply
    };
    inner.arrived.notify_waiters();
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Receiver {
    /// A receiver answering 200 to everything.
    pub(crate) async fn ok() -> Self {
        Self::start(|_, _| Reply::status(200)).await
    }

    /// A receiver answering with `script(request, index)`.
    pub(crate) async fn start(
        script: impl FnMut(&Received, usize) -> Reply + Send + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, script)
    }

    /// A receiver on a given listener.
    pub(crate) fn serve(
        listener: tokio::net::TcpListener,
        script: impl FnMut(&Received, usize) -> Reply + Send + 'static,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            arrived: Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, inner }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replaces the script.
    pub(crate) fn set_script(
        &self,
        script: impl FnMut(&Received, usize) -> Reply + Send + 'static,
    ) {
        *self.inner.script.lock().unwrap() = Box::new(script);
    }

    /// Everything received so far.
    pub(crate) fn requests(&self) -> Vec<Received> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// How many requests arrived.
    pub(crate) fn count(&self) -> usize {
        self.inner.requests.lock().unwrap().len()
    }

    /// Waits (bounded) until at least `n` requests arrived.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Received> {
        let fut = async {
            loop {
                let arrived = self.inner.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if self.count() >= n {
                    return self.requests();
                }
                arrived.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {n} requests, got {}", self.count()))
    }
}

/// Polls `check` until it returns `Some`, failing the test after 60 s.
pub(crate) async fn wait_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let fut = async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Waits until the only delivery of `sub` is in `state`, and returns it.
pub(crate) async fn wait_delivery(
    d: &Dispatcher,
    sub: SubscriptionId,
    state: DeliveryState,
) -> Delivery {
    wait_until(&format!("a {state:?} delivery"), || async {
        let page = d.deliveries(sub, 100, None).await.unwrap();
        page.deliveries.into_iter().find(|x| x.state == state)
    })
    .await
}

#[tokio::test]
async fn receiver_records_requests() {
    let r = Receiver::start(|_, n| Reply::status(if n == 0 { 500 } else { 201 })).await;
    let client = reqwest::Client::new();
    let a = client.post(r.url("/a")).body("x").send().await.unwrap();
    let b = client.post(r.url("/b")).send().await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (500, 201));
    let got = r.wait_for(2).await;
    assert_eq!(got[0].path, "/a");
    assert_eq!(&got[0].body[..], b"x");
}
