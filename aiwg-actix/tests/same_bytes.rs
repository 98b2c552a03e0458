//! The actix-web adapter answers what the axum router answers: the same script of requests runs
//! against both (each over its own, identically built engine), and the answers must agree on
//! status, the headers that matter and the body, once the values that naturally differ
//! (job ids, timestamps, secrets, durations) are replaced by placeholders.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aiwg_core::dispatch::Dispatcher;
use aiwg_core::test_util::conformance::{
    api_builder, fixture, FixtureOptions, Serve, ADMIN_KEY, READ_KEY, TRIGGER_KEY,
};
use regex::{Captures, Regex};
use serde_json::{json, Value};

const ZERO: &str = "00000000-0000-7000-8000-000000000000";
const GITHUB_SECRET: &str = "same-bytes-github-secret";
const PING: &[u8] =
    br#"{"zen":"Keep it logically awesome.","hook_id":1,"repository":{"full_name":"octo/app"}}"#;
/// HMAC-SHA256 of [`PING`] under [`GITHUB_SECRET`].
const PING_SIGNATURE: &str =
    "sha256=bda9f763166511148e08abaefc920998c82371807a605fff68d5dfcca616cea6";
const PING_CHANGED: [u8; PING.len()] = {
    let mut b = [0u8; PING.len()];
    let mut i = 0;
    while i < PING.len() {
        b[i] = PING[i];
        i += 1;
    }
    b[9] = b'k'; // "Keep" -> "keep"
    b
};

/// Headers that are compared value for value. Everything else the API sets is compared too,
/// except what the HTTP stacks add on their own (see [`STACK_HEADERS`]).
const MATTER: &[&str] = &[
    "content-type",
    "www-authenticate",
    "allow",
    "retry-after",
    "location",
    "cache-control",
    "x-accel-buffering",
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
];

/// Added by hyper or actix-http themselves, or differing by design (`x-request-id`).
const STACK_HEADERS: &[&str] = &[
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-request-id",
];

#[derive(Clone, Debug)]
enum Req {
    None,
    Json(Value),
    Raw(&'static str, Vec<u8>),
    /// `n` bytes of JSON whitespace over the limit, written whole on a fresh connection before
    /// the answer is read (with a Content-Length, or chunked), so that no client-side race
    /// with the early 413 can lose the answer.
    Oversized {
        n: usize,
        chunked: bool,
    },
}

#[derive(Clone, Debug)]
struct Step {
    what: &'static str,
    method: &'static str,
    /// `{job}`, `{hook}`… are replaced by values captured earlier in the script.
    path: String,
    key: Option<&'static str>,
    body: Req,
    headers: Vec<(&'static str, &'static str)>,
    /// Capture this JSON field of the answer under this name.
    capture: Option<(&'static str, &'static str)>,
    /// Whether to compare the body (not for `/metrics`: the recorder is process-wide, so both
    /// servers' counters land in it).
    compare_body: bool,
    /// Whether the answer comes from the host app rather than the API (a path outside the API:
    /// axum's fallback or actix's default service); then only status and body are compared.
    host: bool,
}

fn step(what: &'static str, method: &'static str, path: &str, key: Option<&'static str>) -> Step {
    Step {
        what,
        method,
        path: path.to_owned(),
        key,
        body: Req::None,
        headers: Vec::new(),
        capture: None,
        compare_body: true,
        host: false,
    }
}

impl Step {
    fn json(mut self, v: Value) -> Self {
        self.body = Req::Json(v);
        self
    }
    fn raw(mut self, ct: &'static str, b: &[u8]) -> Self {
        self.body = Req::Raw(ct, b.to_vec());
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn capture(mut self, field: &'static str, name: &'static str) -> Self {
        self.capture = Some((field, name));
        self
    }
    fn status_only(mut self) -> Self {
        self.compare_body = false;
        self
    }
    fn host(mut self) -> Self {
        self.host = true;
        self
    }
}

/// One answer, headers lower-cased with repeated values joined.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn script() -> Vec<Step> {
    let trig = |extra: Value| {
        let mut v = json!({"workflow": "echo", "project_path": "proj"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        v
    };
    vec![
        // Public endpoints, before any job runs (so the queue figures are all zero).
        step("health", "GET", "/health", None),
        step("openapi", "GET", "/openapi.json", None),
        step("server status", "GET", "/status", Some(READ_KEY)),
        step("metrics", "GET", "/metrics", Some(READ_KEY)).status_only(),
        step("available", "GET", "/workflows/available", Some(READ_KEY)),
        step("empty listing", "GET", "/jobs", Some(READ_KEY)),
        // 401, 403.
        step("no key", "GET", "/jobs", None),
        step("wrong key", "GET", "/jobs", Some("wrong-key-wrong-key-wrong")),
        step("missing scope", "POST", "/workflows/trigger", Some(READ_KEY)).json(trig(json!({}))),
        step("admin only", "GET", "/webhooks", Some(TRIGGER_KEY)),
        step("cancel scope", "POST", &format!("/workflows/{ZERO}/cancel"), Some(READ_KEY)),
        // 404, 405.
        step("unknown path", "GET", "/no-such-thing", None).host(),
        step("unknown nested path", "GET", "/workflows/a/b/c/d", Some(ADMIN_KEY)).host(),
        step("unknown job status", "GET", &format!("/workflows/{ZERO}/status"), Some(READ_KEY)),
        step("unknown job events", "GET", &format!("/workflows/{ZERO}/events"), Some(READ_KEY)),
        step("unknown job cancel", "POST", &format!("/workflows/{ZERO}/cancel"), Some(ADMIN_KEY)),
        step("unknown workflow", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(json!({"workflow": "ghost"})),
        step("unknown platform", "POST", "/hooks/nowhere", None).raw("application/json", b"{}"),
        step("delete health", "DELETE", "/health", None),
        step("head health", "HEAD", "/health", None),
        step("health with a query", "GET", "/health?x=1&y", None),
        step("trailing slash", "GET", "/health/", None).host(),
        step("head jobs", "HEAD", "/jobs", Some(READ_KEY)),
        step("put jobs", "PUT", "/jobs", Some(ADMIN_KEY)),
        step("get trigger", "GET", "/workflows/trigger", Some(ADMIN_KEY)),
        step("get hook", "GET", "/hooks/github", None),
        // 400, 403 (policy), 413, 415.
        step("malformed JSON", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .raw("application/json", b"{not json"),
        step("empty JSON", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .raw("application/json", b""),
        step("unknown field", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(trig(json!({"unknown_field": 1}))),
        step("bad param", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(trig(json!({"params": {"nope": "x"}}))),
        step("outside roots", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(json!({"workflow": "echo", "project_path": "/etc"})),
        step("bad job id", "GET", "/workflows/xyz/status", Some(READ_KEY)),
        // The API decides before the handshake is looked at, on both stacks.
        step("WebSocket upgrade by POST", "POST", "/ws", Some(READ_KEY))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        step("WebSocket upgrade of a bad job id, no key", "GET", "/workflows/xyz/ws", Some(READ_KEY))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket"),
        step("bad percent-encoded id", "GET", "/workflows/a%2Fb%20c/status", Some(READ_KEY)),
        step("bad query", "GET", "/jobs?limit=abc", Some(READ_KEY)),
        step("unknown query", "GET", "/jobs?bogus=1", Some(READ_KEY)),
        step("text/plain", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .raw("text/plain", b"{\"workflow\":\"echo\"}"),
        step("no body", "POST", "/workflows/trigger", Some(TRIGGER_KEY)),
        Step {
            body: Req::Oversized {
                n: 4096,
                chunked: false,
            },
            ..step("too large", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
        },
        Step {
            body: Req::Oversized {
                n: 4096,
                chunked: true,
            },
            ..step("too large, chunked", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
        },
        step("bad last-event-id", "GET", &format!("/workflows/{ZERO}/events"), Some(READ_KEY))
            .header("last-event-id", "abc"),
        // 200 (synchronous), 202, 409, events, status.
        step("synchronous trigger", "POST", "/workflows/trigger", Some(ADMIN_KEY))
            .json(trig(json!({"async": false, "params": {"who": "sync"}})))
            .capture("job_id", "sync"),
        step("trigger", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(trig(json!({"guidance": "now", "idempotency_key": "k-1"})))
            .capture("job_id", "job"),
        // The stream ends after the terminal event, so from here on the job's state is settled.
        step("events", "GET", "/workflows/{job}/events", Some(READ_KEY)),
        step("same key, same body", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(trig(json!({"guidance": "now", "idempotency_key": "k-1"}))),
        step("same key, other body", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .json(trig(json!({"guidance": "later", "idempotency_key": "k-1"}))),
        step("idempotency header", "POST", "/workflows/trigger", Some(TRIGGER_KEY))
            .header("idempotency-key", "k-1")
            .json(trig(json!({"guidance": "now"}))),
        step("events after 3", "GET", "/workflows/{job}/events", Some(READ_KEY))
            .header("last-event-id", "3"),
        step("status", "GET", "/workflows/{job}/status", Some(READ_KEY)),
        step("sync status", "GET", "/workflows/{sync}/status", Some(READ_KEY)),
        step("cancel finished", "POST", "/workflows/{job}/cancel", Some(ADMIN_KEY)),
        step("listing", "GET", "/jobs?workflow=echo&status=completed", Some(READ_KEY)),
        step("listing page", "GET", "/jobs?limit=1", Some(READ_KEY)),
        // Platform hooks: signatures over the raw bytes.
        step("unsigned GitHub delivery", "POST", "/hooks/github", None)
            .header("x-github-event", "ping")
            .header("x-github-delivery", "d-1")
            .raw("application/json", PING),
        step("badly signed GitHub delivery", "POST", "/hooks/github", None)
            .header("x-github-event", "ping")
            .header("x-github-delivery", "d-1")
            .header("x-hub-signature-256", "sha256=00")
            .raw("application/json", PING),
        step("GitHub ping", "POST", "/hooks/github", None)
            .header("x-github-event", "ping")
            .header("x-github-delivery", "d-1")
            .header("x-hub-signature-256", PING_SIGNATURE)
            .raw("application/json", PING),
        step("GitHub ping, one byte changed", "POST", "/hooks/github", None)
            .header("x-github-event", "ping")
            .header("x-github-delivery", "d-2")
            .header("x-hub-signature-256", PING_SIGNATURE)
            .raw("application/json", &PING_CHANGED),
        // Outbound webhook subscriptions.
        step("create hook", "POST", "/webhooks", Some(ADMIN_KEY))
            .json(json!({"url": "https://example.com/hook", "events": ["job.completed", "job.*"], "description": "ci"}))
            .capture("id", "hook"),
        step("bad hook url", "POST", "/webhooks", Some(ADMIN_KEY))
            .json(json!({"url": "ftp://example.com", "events": ["job.completed"]})),
        step("list hooks", "GET", "/webhooks", Some(ADMIN_KEY)),
        step("get hook", "GET", "/webhooks/{hook}", Some(ADMIN_KEY)),
        step("patch hook", "PATCH", "/webhooks/{hook}", Some(ADMIN_KEY))
            .json(json!({"enabled": false})),
        step("rotate", "POST", "/webhooks/{hook}/rotate-secret", Some(ADMIN_KEY)),
        step("deliveries", "GET", "/webhooks/{hook}/deliveries", Some(ADMIN_KEY)),
        step(
            "retry unknown delivery",
            "POST",
            "/webhooks/{hook}/deliveries/msg_00000000000070008000000000000000/retry",
            Some(ADMIN_KEY),
        ),
        step("delete hook", "DELETE", "/webhooks/{hook}", Some(ADMIN_KEY)),
        step("deleted hook", "GET", "/webhooks/{hook}", Some(ADMIN_KEY)),
        step("hook not an id", "GET", "/webhooks/not-an-id", Some(ADMIN_KEY)),
        // The key's scopes, the feed's refusals, the dashboard.
        step("whoami", "GET", "/whoami", Some(READ_KEY)),
        step("whoami without a key", "GET", "/whoami", None),
        step("feed, bad last-event-id", "GET", "/events", Some(READ_KEY))
            .header("last-event-id", "7"),
        step("feed, unknown kind", "GET", "/events?kinds=nope", Some(READ_KEY)),
        step("feed, no scope", "GET", "/events", Some(TRIGGER_KEY)),
        step("dashboard", "GET", "/ui/", None),
        step("dashboard script", "GET", "/ui/app.js", None),
        step("dashboard styles", "GET", "/ui/style.css", None),
        step("dashboard, no such file", "GET", "/ui/nope.js", None),
        step("dashboard redirect", "GET", "/ui", None),
        step("dashboard, wrong method", "DELETE", "/ui/", None),
    ]
}

async fn run(server: &dyn Serve, prefix: &str, steps: &[Step]) -> Vec<Answer> {
    let fx = fixture(FixtureOptions::default());
    // A small limit, so that the over-limit bodies stay small.
    let triggers: aiwg_webhook::TriggersConfig =
        serde_json::from_value(json!({"github": {"secret": GITHUB_SECRET, "mention": "@aiwg"}}))
            .expect("triggers");
    let hooks = aiwg_webhook::Hooks::builder(triggers, fx.engine.clone())
        .build()
        .expect("hooks");
    let api = api_builder(fx.engine.clone())
        .hooks(std::sync::Arc::new(hooks))
        .body_limit(1024)
        .dispatcher(Dispatcher::builder().build().expect("dispatcher"))
        .build()
        .expect("api");
    let served = server.serve(api, prefix).await;
    // A fresh connection per request: no answer depends on how a stack treats the connection
    // after the previous one.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut vars: HashMap<&str, String> = HashMap::new();
    let mut out = Vec::new();
    for s in steps {
        let mut path = s.path.clone();
        for (name, value) in &vars {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        if let Req::Oversized { n, chunked } = s.body {
            out.push(raw_oversized(&served.base_url, &path, s.key, n, chunked).await);
            continue;
        }
        let method = reqwest::Method::from_bytes(s.method.as_bytes()).unwrap();
        let mut rb = http.request(method, format!("{}{path}", served.base_url));
        if let Some(k) = s.key {
            rb = rb.bearer_auth(k);
        }
        for (n, v) in &s.headers {
            rb = rb.header(*n, *v);
        }
        rb = match &s.body {
            Req::None | Req::Oversized { .. } => rb,
            Req::Json(v) => rb.json(v),
            Req::Raw(ct, b) => rb.header("content-type", *ct).body(b.clone()),
        };
        let res = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", s.what));
        let status = res.status().as_u16();
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in res.headers() {
            let v = v.to_str().unwrap_or("<binary>").to_owned();
            headers
                .entry(k.as_str().to_owned())
                .and_modify(|e| {
                    e.push_str(", ");
                    e.push_str(&v);
                })
                .or_insert(v);
        }
        let body = res.text().await.unwrap_or_default();
        if let Some((field, name)) = s.capture {
            let v: Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {body}", s.what));
            let id = v[field]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no {field} in {body}", s.what));
            vars.insert(name, id.to_owned());
        }
        out.push(Answer {
            status,
            headers,
            body,
        });
    }
    drop(served);
    fx.engine.shutdown(Duration::ZERO).await;
    out
}

/// POSTs `n` bytes over raw TCP, all of them before reading, and reads the answer (head and
/// Content-Length body).
async fn raw_oversized(
    base_url: &str,
    path: &str,
    key: Option<&str>,
    n: usize,
    chunked: bool,
) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = base_url.trim_start_matches("http://");
    let (addr, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut req = format!(
        "POST {prefix}{path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n"
    );
    if let Some(k) = key {
        req.push_str(&format!("authorization: Bearer {k}\r\n"));
    }
    let mut bytes = if chunked {
        req.push_str("transfer-encoding: chunked\r\n\r\n");
        let mut b = req.into_bytes();
        for _ in 0..n / 512 {
            b.extend_from_slice(b"200\r\n");
            b.extend_from_slice(&[b' '; 512]);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n\r\n");
        b
    } else {
        req.push_str(&format!("content-length: {n}\r\n\r\n"));
        let mut b = req.into_bytes();
        b.extend(std::iter::repeat_n(b' ', n));
        b
    };
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    bytes.clear();
    let mut buf = [0u8; 4096];
    let (head, body_start) = loop {
        let got = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(got > 0, "connection closed before the answer's head");
        bytes.extend_from_slice(&buf[..got]);
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&bytes[..end]).into_owned(), end + 4);
        }
    };
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for line in lines {
        let (k, v) = line.split_once(':').unwrap();
        let v = v.trim().to_owned();
        headers
            .entry(k.to_ascii_lowercase())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
    }
    let len: usize = headers["content-length"].parse().unwrap();
    while bytes.len() < body_start + len {
        let got = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("the answer's body")
            .unwrap();
        assert!(got > 0, "connection closed within the answer's body");
        bytes.extend_from_slice(&buf[..got]);
    }
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes[body_start..body_start + len]).into_owned(),
    }
}

/// Replaces what naturally differs between two runs: ids become `<id1>`, `<id2>`… in order of
/// first appearance (so the same id in two places stays the same placeholder), timestamps,
/// secrets, durations and uptimes become fixed markers, keep-alive comments disappear.
struct Normalizer {
    ids: HashMap<String, usize>,
    uuid: Regex,
    time: Regex,
    secret: Regex,
    numbers: Regex,
    tempdir: Regex,
    keep_alive: Regex,
}

impl Normalizer {
    fn new() -> Self {
        Self {
            ids: HashMap::new(),
            uuid: Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
                .unwrap(),
            time: Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)").unwrap(),
            secret: Regex::new(r"whsec_[A-Za-z0-9+/=_-]+").unwrap(),
            numbers: Regex::new(r#""(duration_ms|uptime_secs|elapsed_ms)":\d+"#).unwrap(),
            tempdir: Regex::new(r"\.tmp[A-Za-z0-9]{6}").unwrap(),
            keep_alive: Regex::new(r"(?m)^: keep-alive\n\n").unwrap(),
        }
    }

    fn text(&mut self, s: &str) -> String {
        let ids = &mut self.ids;
        let s = self.uuid.replace_all(s, |c: &Captures<'_>| {
            let n = ids.len() + 1;
            let n = *ids.entry(c[0].to_owned()).or_insert(n);
            if c[0] == *ZERO {
                "<zero>".to_owned()
            } else {
                format!("<id{n}>")
            }
        });
        let s = self.time.replace_all(&s, "<time>");
        let s = self.secret.replace_all(&s, "whsec_<secret>");
        let s = self.numbers.replace_all(&s, "\"$1\":<n>");
        let s = self.tempdir.replace_all(&s, "<tempdir>");
        self.keep_alive.replace_all(&s, "").into_owned()
    }

    fn answer(&mut self, a: &Answer, s: &Step) -> Answer {
        let headers = a
            .headers
            .iter()
            .filter(|(k, _)| !s.host && !STACK_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| {
                // Header names are case-insensitive, and so are the tokens `vary` lists.
                let v = if k == "vary" {
                    v.to_ascii_lowercase()
                } else {
                    self.text(v)
                };
                (k.clone(), v)
            })
            .collect();
        let body = if s.compare_body {
            self.text(&a.body)
        } else {
            String::new()
        };
        Answer {
            status: a.status,
            headers,
            body,
        }
    }
}

fn compare(steps: &[Step], axum: &[Answer], actix: &[Answer]) {
    assert_eq!(axum.len(), actix.len());
    let (mut na, mut nx) = (Normalizer::new(), Normalizer::new());
    let mut mismatches = Vec::new();
    for ((s, a), x) in steps.iter().zip(axum).zip(actix) {
        let (a, x) = (na.answer(a, s), nx.answer(x, s));
        // The headers that matter must be there on both sides with the same value; any other
        // header the API set must agree too.
        for h in MATTER {
            if a.headers.get(*h) != x.headers.get(*h) {
                mismatches.push(format!(
                    "{}: header {h}: axum {:?}, actix {:?}",
                    s.what,
                    a.headers.get(*h),
                    x.headers.get(*h)
                ));
            }
        }
        if a != x {
            mismatches.push(format!("{}:\n  axum  {a:?}\n  actix {x:?}", s.what));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} answers differ:\n{}",
        mismatches.len(),
        steps.len(),
        mismatches.join("\n")
    );
}

fn expect_statuses(steps: &[Step], answers: &[Answer]) {
    // The script exercises what it claims to: every error class shows up.
    let seen: Vec<u16> = answers.iter().map(|a| a.status).collect();
    for status in [200, 201, 202, 204, 400, 401, 403, 404, 405, 409, 413, 415] {
        assert!(seen.contains(&status), "the script never produced {status}");
    }
    let by_name: HashMap<&str, &Answer> = steps.iter().map(|s| s.what).zip(answers).collect();
    assert_eq!(by_name["too large"].status, 413);
    assert_eq!(by_name["too large, chunked"].status, 413);
    assert_eq!(by_name["malformed JSON"].status, 400);
    assert_eq!(by_name["synchronous trigger"].status, 200);
    assert_eq!(by_name["trigger"].status, 202);
    assert_eq!(by_name["same key, other body"].status, 409);
    assert_eq!(by_name["events"].status, 200);
    assert!(by_name["events"].body.contains("event: status"));
    assert!(by_name["delete health"].headers.contains_key("allow"));
    assert!(by_name["no key"].headers.contains_key("www-authenticate"));
    assert_eq!(by_name["unsigned GitHub delivery"].status, 401);
    assert_eq!(by_name["GitHub ping"].status, 200);
    assert_eq!(by_name["GitHub ping, one byte changed"].status, 401);
}

async fn same_answers(prefix: &str) {
    let steps = script();
    let axum = run(&support::Axum, prefix, &steps).await;
    let actix = run(&support::Actix, prefix, &steps).await;
    expect_statuses(&steps, &axum);
    compare(&steps, &axum, &actix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_answers_what_axum_answers_at_the_root() {
    same_answers("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_answers_what_axum_answers_under_a_prefix() {
    same_answers("/aiwg").await;
}

/// Under a prefix with a parameter of the host's (`/{tenant}`), each route still gets its own
/// parameters: axum lists the enclosing ones first, and taking them by position made a job's
/// status answer 400 (the tenant taken for the job id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_answers_what_axum_answers_under_a_prefix_with_a_parameter() {
    same_answers("/{tenant}").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_answers_agree() {
    async fn run_full(server: &dyn Serve) -> Vec<Answer> {
        let fx = fixture(FixtureOptions {
            queue_capacity: Some(1),
            workers: Some(1),
        });
        let served = server
            .serve(api_builder(fx.engine.clone()).build().unwrap(), "")
            .await;
        let c = aiwg_core::test_util::conformance::Client::new(&served.base_url);
        let body = || {
            Some(aiwg_core::test_util::conformance::Body::Json(
                json!({"workflow": "hang", "project_path": "proj"}),
            ))
        };
        let mut out = Vec::new();
        let first = c
            .send("POST", "/workflows/trigger", Some(TRIGGER_KEY), body())
            .await;
        assert!(fx.hang.wait_started(1, Duration::from_secs(20)).await);
        let second = c
            .send("POST", "/workflows/trigger", Some(TRIGGER_KEY), body())
            .await;
        let third = c
            .send("POST", "/workflows/trigger", Some(TRIGGER_KEY), body())
            .await;
        for r in [first, second, third] {
            out.push(Answer {
                status: r.status,
                headers: r.headers,
                body: r.text,
            });
        }
        drop(served);
        fx.engine.shutdown(Duration::ZERO).await;
        out
    }
    let axum = run_full(&support::Axum).await;
    let actix = run_full(&support::Actix).await;
    let steps: Vec<Step> = ["queued 1", "queued 2", "queue full"]
        .into_iter()
        .map(|w| step(w, "POST", "/workflows/trigger", Some(TRIGGER_KEY)))
        .collect();
    assert_eq!(axum[2].status, 503);
    assert_eq!(
        axum[2].headers.get("retry-after").map(String::as_str),
        Some("5")
    );
    compare(&steps, &axum, &actix);
}

/// Under a prefix with a parameter of the host's (`/{tenant}`), the links an accepted trigger
/// answers with name the request's own prefix (`/acme`), on both routers, and lead to the job.
/// They used to carry the pattern itself (`/{tenant}/workflows/…`), which no client can follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_under_a_prefix_with_a_parameter_name_the_requests_own_prefix() {
    let servers: [&dyn Serve; 2] = [&support::Axum, &support::Actix];
    for server in servers {
        let fx = fixture(FixtureOptions::default());
        let served = server
            .serve(api_builder(fx.engine.clone()).build().unwrap(), "/{tenant}")
            .await;
        let origin = served
            .base_url
            .split("/{tenant}")
            .next()
            .unwrap()
            .to_owned();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        for tenant in ["acme", "b%20c"] {
            let res = http
                .post(format!("{origin}/{tenant}/workflows/trigger"))
                .bearer_auth(TRIGGER_KEY)
                .json(&json!({"workflow": "echo", "project_path": "proj"}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202);
            let location = res.headers()["location"].to_str().unwrap().to_owned();
            let body: Value = res.json().await.unwrap();
            let id = body["job_id"].as_str().unwrap();
            let status_url = format!("/{tenant}/workflows/{id}/status");
            assert_eq!(location, status_url);
            assert_eq!(body["status_url"], status_url);
            assert_eq!(
                body["events_url"],
                format!("/{tenant}/workflows/{id}/events")
            );
            let status = http
                .get(format!("{origin}{location}"))
                .bearer_auth(READ_KEY)
                .send()
                .await
                .unwrap();
            assert_eq!(status.status(), 200, "{location}");
        }
        drop(served);
        fx.engine.shutdown(Duration::ZERO).await;
    }
}
