//! A local fake of GitHub's REST API for the tracking tests: it serves the real paths the
//! forge client uses, checks every request (path, method, body) against GitHub's published
//! OpenAPI description (npm `@octokit/openapi`, `AIWG_TEST_GITHUB_OPENAPI`), and records what
//! it got.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub authorization: String,
}

/// How the fake answers.
#[derive(Default)]
pub struct Behaviour {
    /// Answer the next N comment creations with a rate limit (403, remaining 0, reset in 1 s).
    pub rate_limit_creates: AtomicUsize,
    /// Answer the next N edits with 502.
    pub fail_edits: AtomicUsize,
    /// Seconds until installation tokens expire.
    pub token_ttl_secs: AtomicU64,
    /// Bearer tokens answered 401 Bad credentials (revoked before they expired).
    pub revoked: Mutex<Vec<String>>,
    /// Answer the next N reads of a pull request with 502.
    pub fail_pulls: AtomicUsize,
    /// The head commit of every pull request read (default: the description's example's).
    pub pull_sha: Mutex<Option<String>>,
    /// Pull requests' heads live in another repository (a fork).
    pub pull_from_fork: AtomicBool,
    /// Hold the next edit this long before it takes effect (a slow request), and say when it
    /// has arrived.
    pub delay_next_edit: Mutex<Option<std::time::Duration>>,
    pub delayed_edit_arrived: tokio::sync::Notify,
    /// Every comment's text, as the edits that took effect left it.
    pub comments: Mutex<std::collections::HashMap<String, String>>,
    /// Store the next N comment creations, then answer them 502 (as when GitHub fails after
    /// the write).
    pub store_then_fail_creates: AtomicUsize,
}

/// GitHub's own example of `GET /repos/{owner}/{repo}/pulls/{pull_number}`'s answer (from the
/// OpenAPI description, when it is installed; else the fields the client reads), made pull
/// request `number` with `sha` as its head, from a fork when `fork`.
pub fn pull_document(number: u64, sha: Option<&str>, fork: bool) -> Value {
    let mut v = openapi()
        .and_then(|d| {
            d.pointer("/paths/~1repos~1{owner}~1{repo}~1pulls~1{pull_number}/get/responses/200/content/application~1json/examples/default/value")
        })
        .cloned()
        .unwrap_or_else(|| {
            json!({
                "number": 1347,
                "head": {"ref": "new-topic", "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
                         "repo": {"id": 1296269, "full_name": "octocat/Hello-World", "clone_url": "https://github.com/octocat/Hello-World.git"}},
                "base": {"ref": "master", "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
                         "repo": {"id": 1296269, "full_name": "octocat/Hello-World", "clone_url": "https://github.com/octocat/Hello-World.git"}}
            })
        });
    v["number"] = json!(number);
    if let Some(sha) = sha {
        v["head"]["sha"] = json!(sha);
    }
    if fork {
        v["head"]["repo"]["id"] = json!(4242);
        v["head"]["repo"]["full_name"] = json!("mallory/Hello-World");
        v["head"]["repo"]["clone_url"] = json!("https://github.com/mallory/Hello-World.git");
    }
    v
}

pub struct FakeGitHub {
    pub base: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub behaviour: Arc<Behaviour>,
    pub problems: Arc<Mutex<Vec<String>>>,
}

impl FakeGitHub {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn of(&self, method: &str, path_contains: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method && s.path.contains(path_contains))
            .collect()
    }

    /// Panics when a request did not fit GitHub's description.
    pub fn assert_conforms(&self) {
        let p = self.problems.lock().unwrap();
        assert!(
            p.is_empty(),
            "requests GitHub's OpenAPI description does not allow: {p:#?}"
        );
    }
}

#[derive(Clone)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Behaviour>,
    problems: Arc<Mutex<Vec<String>>>,
    next_id: Arc<AtomicU64>,
    bot: String,
}

/// GitHub's OpenAPI description (dereferenced), once per test binary; `None` outside CI when
/// it is not installed.
fn openapi() -> Option<&'static Value> {
    static DOC: OnceLock<Option<Value>> = OnceLock::new();
    DOC.get_or_init(|| {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        match std::env::var("AIWG_TEST_GITHUB_OPENAPI") {
            Ok(path) if !path.is_empty() => {
                let text = std::fs::read_to_string(&path).expect("read the OpenAPI description");
                Some(serde_json::from_str(&text).expect("OpenAPI JSON"))
            }
            _ if ci => panic!("AIWG_TEST_GITHUB_OPENAPI is required in CI (scripts/install-peers.sh)"),
            _ => {
                eprintln!("not checking requests against GitHub's OpenAPI description: AIWG_TEST_GITHUB_OPENAPI is unset (run scripts/install-peers.sh)");
                None
            }
        }
    })
    .as_ref()
}

fn matches_template(template: &str, path: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(a, b)| (a.starts_with('{') && !b.is_empty()) || a == b)
}

/// A small JSON Schema check (type, enum, required, properties, additionalProperties,
/// anyOf/oneOf, items) — what request bodies of GitHub's description use.
fn validate(schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(any) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
    {
        let ok = any.iter().any(|s| {
            let mut e = Vec::new();
            validate(s, v, at, &mut e);
            e.is_empty()
        });
        if !ok {
            out.push(format!("{at}: matches none of the alternatives"));
        }
        return;
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            "null" => v.is_null(),
            _ => true,
        });
        if !types.is_empty() && !fits {
            out.push(format!("{at}: not of type {types:?}"));
            return;
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            out.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(r) = r.as_str() {
                if !obj.contains_key(r) {
                    out.push(format!("{at}: `{r}` is required"));
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(s, val, &format!("{at}.{k}"), out),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    out.push(format!("{at}: `{k}` is not allowed"));
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(items, x, &format!("{at}[{i}]"), out);
        }
    }
}

/// What GitHub's description says of this request; an empty list when it fits.
fn conformance(method: &Method, path: &str, query: Option<&str>, body: &Value) -> Vec<String> {
    let Some(doc) = openapi() else {
        return Vec::new();
    };
    let paths = doc["paths"].as_object().expect("paths");
    let Some((template, item)) = paths.iter().find(|(t, _)| matches_template(t, path)) else {
        return vec![format!("{method} {path}: no such path")];
    };
    let m = method.as_str().to_ascii_lowercase();
    let Some(op) = item.get(&m) else {
        return vec![format!("{method} {template}: no such operation")];
    };
    let mut out = Vec::new();
    // Every query parameter is one the operation declares.
    let declared: Vec<&str> = op["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query")
        .filter_map(|p| p["name"].as_str())
        .collect();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split('=').next().unwrap_or("");
        if !declared.contains(&name) {
            out.push(format!("{method} {template}: no query parameter `{name}`"));
        }
    }
    match op.pointer("/requestBody/content/application~1json/schema") {
        Some(schema) => {
            let required = op.pointer("/requestBody/required") == Some(&Value::Bool(true));
            if body.is_null() && required {
                out.push(format!("{method} {template}: a body is required"));
            } else if !body.is_null() {
                validate(schema, body, &format!("{method} {template}"), &mut out);
            }
        }
        None if !body.is_null() => out.push(format!("{method} {template}: takes no JSON body")),
        None => {}
    }
    out
}

async fn handle(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri
        .path()
        .strip_prefix("/api")
        .unwrap_or(uri.path())
        .to_owned();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::String("<not JSON>".into()))
    };
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    s.problems
        .lock()
        .unwrap()
        .extend(conformance(&method, &path, uri.query(), &body));
    if headers.get("x-github-api-version").is_none() {
        s.problems
            .lock()
            .unwrap()
            .push(format!("{method} {path}: no X-GitHub-Api-Version"));
    }
    s.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        body: body.clone(),
        authorization,
    });
    let seg: Vec<&str> = path.split('/').collect();
    let b = &s.behaviour;
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if b.revoked.lock().unwrap().iter().any(|t| t == bearer) {
        return json_answer(
            StatusCode::UNAUTHORIZED,
            json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}),
        );
    }
    match (method.as_str(), seg.as_slice()) {
        ("GET", ["", "user"]) => json_answer(
            StatusCode::OK,
            json!({"login": s.bot, "id": 1, "type": "User"}),
        ),
        ("GET", ["", "app"]) => json_answer(
            StatusCode::OK,
            json!({"id": 123, "slug": "aiwg-app", "name": "aiwg"}),
        ),
        ("GET", ["", "repos", _, _, "installation"]) => {
            json_answer(StatusCode::OK, json!({"id": 777}))
        }
        ("POST", ["", "app", "installations", id, "access_tokens"]) => {
            let ttl = i64::try_from(b.token_ttl_secs.load(Ordering::SeqCst)).unwrap_or(3600);
            let exp = chrono::Utc::now() + chrono::Duration::seconds(ttl);
            json_answer(
                StatusCode::CREATED,
                json!({"token": format!("ghs_installation_{id}_{}", s.next_id.fetch_add(1, Ordering::SeqCst)),
                       "expires_at": exp.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}),
            )
        }
        ("GET", ["", "repos", _, _, "pulls", n]) => {
            if b.fail_pulls.load(Ordering::SeqCst) > 0 {
                b.fail_pulls.fetch_sub(1, Ordering::SeqCst);
                return json_answer(StatusCode::BAD_GATEWAY, json!({"message": "Server Error"}));
            }
            let Ok(number) = n.parse::<u64>() else {
                return json_answer(StatusCode::NOT_FOUND, json!({"message": "Not Found"}));
            };
            let sha = b.pull_sha.lock().unwrap().clone();
            json_answer(
                StatusCode::OK,
                pull_document(
                    number,
                    sha.as_deref(),
                    b.pull_from_fork.load(Ordering::SeqCst),
                ),
            )
        }
        ("GET", ["", "repos", _, _, "issues", _, "comments"]) => {
            // Every comment the bot made (this fake keeps one thread), oldest first.
            let comments = b.comments.lock().unwrap();
            let mut ids: Vec<u64> = comments.keys().filter_map(|k| k.parse().ok()).collect();
            ids.sort_unstable();
            let list: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "body": comments[&id.to_string()], "user": {"login": s.bot, "type": "Bot"}}))
                .collect();
            json_answer(StatusCode::OK, Value::Array(list))
        }
        ("POST", ["", "repos", _, _, "issues", _, "comments"]) => {
            if b.rate_limit_creates.load(Ordering::SeqCst) > 0 {
                b.rate_limit_creates.fetch_sub(1, Ordering::SeqCst);
                let reset = chrono::Utc::now().timestamp() + 1;
                return (
                    StatusCode::FORBIDDEN,
                    [
                        ("x-ratelimit-remaining", "0".to_owned()),
                        ("x-ratelimit-reset", reset.to_string()),
                        ("content-type", "application/json".to_owned()),
                    ],
                    r#"{"message":"API rate limit exceeded"}"#,
                )
                    .into_response();
            }
            let id = s.next_id.fetch_add(1, Ordering::SeqCst);
            b.comments.lock().unwrap().insert(
                id.to_string(),
                body["body"].as_str().unwrap_or_default().to_owned(),
            );
            if b.store_then_fail_creates.load(Ordering::SeqCst) > 0 {
                b.store_then_fail_creates.fetch_sub(1, Ordering::SeqCst);
                return json_answer(StatusCode::BAD_GATEWAY, json!({"message": "Server Error"}));
            }
            json_answer(StatusCode::CREATED, json!({"id": id, "body": body["body"]}))
        }
        ("PATCH", ["", "repos", _, _, "issues", "comments", id]) => {
            if b.fail_edits.load(Ordering::SeqCst) > 0 {
                b.fail_edits.fetch_sub(1, Ordering::SeqCst);
                return json_answer(StatusCode::BAD_GATEWAY, json!({"message": "Server Error"}));
            }
            let delay = b.delay_next_edit.lock().unwrap().take();
            if let Some(d) = delay {
                b.delayed_edit_arrived.notify_one();
                tokio::time::sleep(d).await;
            }
            b.comments.lock().unwrap().insert(
                (*id).to_owned(),
                body["body"].as_str().unwrap_or_default().to_owned(),
            );
            json_answer(
                StatusCode::OK,
                json!({"id": id.parse::<u64>().unwrap_or(0), "body": body["body"]}),
            )
        }
        ("POST", ["", "repos", _, _, "issues", "comments", _, "reactions"])
        | ("POST", ["", "repos", _, _, "pulls", "comments", _, "reactions"]) => json_answer(
            StatusCode::CREATED,
            json!({"id": 1, "content": body["content"]}),
        ),
        _ => json_answer(StatusCode::NOT_FOUND, json!({"message": "Not Found"})),
    }
}

fn json_answer(status: StatusCode, v: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Starts the fake on a loopback port; `bot` is the login `GET /user` answers.
pub async fn start(bot: &str) -> FakeGitHub {
    let shared = Shared {
        seen: Arc::default(),
        behaviour: Arc::new(Behaviour {
            token_ttl_secs: AtomicU64::new(3600),
            ..Behaviour::default()
        }),
        problems: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1000)),
        bot: bot.to_owned(),
    };
    let app = Router::new().fallback(handle).with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    FakeGitHub {
        base: format!("http://{addr}/api"),
        seen: shared.seen,
        behaviour: shared.behaviour,
        problems: shared.problems,
    }
}
