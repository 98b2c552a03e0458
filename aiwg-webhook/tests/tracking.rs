//! Closing the loop on GitHub: a job started by a comment reacts 👀, makes exactly one
//! tracking comment, edits it in place as steps finish, and ends with the status and summary;
//! rate limits and 5xx answers are waited out; our own comments never start a job; a GitHub
//! App's JWT (checked by `openssl`, an independent verifier) buys installation tokens that are
//! cached until they expire. Every request is checked against GitHub's OpenAPI description.

#[path = "support/fake_github.rs"]
mod fake_github;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobId, JobObserver, JobStatus, ProjectPolicy, Step, Workflow};
use aiwg_webhook::forge::{ForgeAuth, ForgeClient, GitHubApp};
use aiwg_webhook::tracking::MemoryTrackingStore;
use aiwg_webhook::{HookOutcome, Hooks, IgnoreReason, Platform, Secret, Tracker, TriggersConfig};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

const SECRET: &str = "tracking-webhook-secret";
const TOKEN: &str = "ghp_tracking_token_0123456789";
const STATUS_BASE: &str = "https://ci.example.com/aiwg";

struct Rig {
    engine: Engine,
    hooks: Hooks,
    trackers: Vec<Tracker>,
    _root: tempfile::TempDir,
}

fn client(base: &str, auth: ForgeAuth) -> Arc<ForgeClient> {
    Arc::new(
        ForgeClient::new("triggers.github", Platform::GitHub, Some(base), auth)
            .unwrap()
            .retry_base(Duration::from_millis(20)),
    )
}

/// An engine running a two-step workflow `review`, observed by `trackers`, behind hooks for
/// GitHub whose API client is `client`.
fn rig(fake_base: &str, trackers: Vec<Tracker>, steps_output: &str) -> Rig {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("app")).unwrap();
    let agent = ScriptedExecutor::succeeding(steps_output);
    let mut builder = Engine::builder()
        .executor("echo", Arc::new(agent))
        .workflow(
            Workflow::new("review")
                .step(Step::prompt("draft", "echo", "draft"))
                .step(Step::prompt("check", "echo", "check")),
        )
        .policy(
            ProjectPolicy::builder()
                .root(root.path())
                .map(".*", "app")
                .build()
                .unwrap(),
        )
        .poll_interval(Duration::from_millis(20));
    for t in &trackers {
        builder = builder.observer(Arc::new(t.clone()));
    }
    let engine = builder.build().unwrap();
    let triggers: TriggersConfig = serde_json::from_value(json!({
        "github": {"secret": SECRET, "token": TOKEN, "api_url": fake_base}
    }))
    .unwrap();
    let hooks = Hooks::builder(triggers, engine.clone()).build().unwrap();
    Rig {
        engine,
        hooks,
        trackers,
        _root: root,
    }
}

fn tracker(client: Arc<ForgeClient>, store: Option<Arc<MemoryTrackingStore>>) -> Tracker {
    let mut b = Tracker::builder()
        .forge(client)
        .min_edit_interval(Duration::from_millis(50))
        .status_base(STATUS_BASE);
    if let Some(s) = store {
        b = b.store(s);
    }
    b.build()
}

fn comment(text: &str, login: &str, comment_id: u64, installation: Option<u64>) -> Vec<u8> {
    let mut v = json!({
        "action": "created",
        "issue": { "number": 42, "pull_request": { "url": "https://api.github.com/repos/octo/app/pulls/42" } },
        "comment": { "id": comment_id, "body": text, "user": { "login": login, "type": "User" }, "author_association": "MEMBER" },
        "repository": { "full_name": "octo/app", "clone_url": "https://github.com/octo/app.git", "default_branch": "main" },
        "sender": { "login": login, "type": "User" }
    });
    if let Some(i) = installation {
        v["installation"] = json!({ "id": i });
    }
    v.to_string().into_bytes()
}

fn signed(body: &[u8], delivery: &str) -> http::HeaderMap {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let mut h = http::HeaderMap::new();
    h.insert("x-github-event", "issue_comment".parse().unwrap());
    h.insert("x-github-delivery", delivery.parse().unwrap());
    h.insert("x-hub-signature-256", sig.parse().unwrap());
    h
}

/// Triggers `review` by a comment and waits for the job and every tracker to finish.
async fn run_job(rig: &Rig, comment_id: u64, installation: Option<u64>) -> JobId {
    let body = comment("@aiwg review", "bob", comment_id, installation);
    let reply = rig
        .hooks
        .handle("github", &signed(&body, &format!("d-{comment_id}")), &body)
        .await;
    let HookOutcome::Submitted { job_id, .. } = reply.outcome else {
        panic!("{:?}", reply.outcome);
    };
    let job = rig
        .engine
        .wait(job_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    for t in &rig.trackers {
        assert!(
            t.idle(Duration::from_secs(20)).await,
            "the tracker finished"
        );
    }
    job_id
}

#[tokio::test]
async fn a_comment_gets_eyes_and_one_tracking_comment_edited_to_the_end() {
    let fake = fake_github::start("aiwg-bot").await;
    // The first creation is rate limited and the first edit fails with 502: both are waited
    // out, and still exactly one comment is made.
    fake.behaviour.rate_limit_creates.store(1, Ordering::SeqCst);
    fake.behaviour.fail_edits.store(1, Ordering::SeqCst);
    let t = tracker(
        client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))),
        None,
    );
    let rig = rig(&fake.base, vec![t], "All good: <b>3 findings</b>");
    let job = run_job(&rig, 9001, None).await;

    let creates = fake.of("POST", "/repos/octo/app/issues/42/comments");
    assert_eq!(creates.len(), 2, "one rate-limited try, then the comment");
    let reactions = fake.of("POST", "/repos/octo/app/issues/comments/9001/reactions");
    assert_eq!(reactions.len(), 1);
    assert_eq!(reactions[0].body, json!({"content": "eyes"}));
    let first = creates[1].body["body"].as_str().unwrap().to_owned();
    assert!(first.contains("`review`"), "{first}");
    assert!(
        first.contains("- [ ] `draft`") || first.contains("- [x] `draft`"),
        "{first}"
    );
    assert!(
        first.contains(&format!("{STATUS_BASE}/workflows/{job}/status")),
        "{first}"
    );
    // Every edit goes to that one comment (the fake numbers comments from 1000).
    let edits = fake.of("PATCH", "/repos/octo/app/issues/comments/");
    assert!(!edits.is_empty());
    let ids: std::collections::BTreeSet<_> = edits.iter().map(|e| e.path.clone()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let last = edits.last().unwrap().body["body"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(last.contains("✅ completed"), "{last}");
    assert!(
        last.contains("- [x] `draft`") && last.contains("- [x] `check`"),
        "{last}"
    );
    assert!(last.contains("All good: <b>3 findings</b>"), "{last}");
    assert!(last.contains("⏱"), "{last}");
    assert!(last.contains(&format!("<!-- aiwg:job:{job} -->")), "{last}");
    // Coalesced: far fewer edits than events.
    assert!(edits.len() <= 8, "{} edits", edits.len());
    for s in fake.seen() {
        if s.path != "/user" {
            assert_eq!(
                s.authorization,
                format!("Bearer {TOKEN}"),
                "{} {}",
                s.method,
                s.path
            );
        }
    }
    fake.assert_conforms();
}

#[tokio::test]
async fn our_own_comments_never_start_a_job() {
    let fake = fake_github::start("aiwg-bot").await;
    let c = client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN)));
    let t = tracker(c, None);
    let rig = rig(&fake.base, vec![t], "ok");
    // The bot's identity comes from the API (`GET /user`), not from ignore_users.
    let body = comment("@aiwg review", "aiwg-bot", 1, None);
    let r = rig
        .hooks
        .handle("github", &signed(&body, "own-1"), &body)
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::Bot("aiwg-bot".into()))
    );
    // A tracking comment (its marker) never triggers, whoever the forge says wrote it.
    let body = comment(
        "@aiwg review\n\n<!-- aiwg:job:01900000-0000-7000-8000-000000000000 -->",
        "bob",
        2,
        None,
    );
    let r = rig
        .hooks
        .handle("github", &signed(&body, "own-2"), &body)
        .await;
    assert!(
        matches!(r.outcome, HookOutcome::Ignored(IgnoreReason::Bot(_))),
        "{:?}",
        r.outcome
    );
    assert_eq!(
        fake.of("GET", "/user").len(),
        1,
        "the identity is asked once"
    );
    assert!(fake.of("POST", "/comments").is_empty());
}

#[tokio::test]
async fn two_instances_make_exactly_one_comment() {
    let fake = fake_github::start("aiwg-bot").await;
    let store = Arc::new(MemoryTrackingStore::new());
    // Two trackers (two instances) see every event of the job and share the claims.
    let a = tracker(
        client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))),
        Some(store.clone()),
    );
    let b = tracker(
        client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))),
        Some(store),
    );
    let rig = rig(&fake.base, vec![a, b], "done");
    run_job(&rig, 7, None).await;
    assert_eq!(fake.of("POST", "/issues/42/comments").len(), 1);
    assert_eq!(fake.of("POST", "/reactions").len(), 1);
    let edits = fake.of("PATCH", "/issues/comments/");
    assert!(edits
        .iter()
        .any(|e| e.body["body"].as_str().unwrap().contains("✅ completed")));
    fake.assert_conforms();
}

/// With several instances a job's later events may all be published on another one: the
/// instance that heard only of its start ends its comment writer once it has nothing to send,
/// instead of waiting for an end it never hears of (a task and an entry per job, for ever).
#[tokio::test]
async fn a_writer_that_hears_no_more_of_its_job_ends() {
    use futures_util::StreamExt;

    let fake = fake_github::start("aiwg-bot").await;
    let store = Arc::new(MemoryTrackingStore::new());
    let a = Tracker::builder()
        .forge(client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))))
        .store(store.clone())
        .min_edit_interval(Duration::from_millis(50))
        .idle_writer(Duration::from_millis(300))
        .build();
    let b = tracker(
        client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))),
        Some(store),
    );
    let rig = rig(&fake.base, vec![b], "done");
    let id = run_job(&rig, 9, None).await;
    // Instance A hears of the job's start only.
    let mut running = rig.engine.get(id).await.unwrap();
    running.status = JobStatus::Running;
    let first = rig
        .engine
        .subscribe(id, 0)
        .await
        .unwrap()
        .next()
        .await
        .unwrap();
    a.on_event(&running, &first).await;
    assert!(
        a.idle(Duration::from_secs(10)).await,
        "the writer ended with nothing more to send"
    );
    // It found B's comment through the claims and made none of its own.
    assert_eq!(fake.of("POST", "/issues/42/comments").len(), 1);
}

#[tokio::test]
async fn a_forge_that_is_down_never_fails_the_job() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}/api");
    let t = tracker(client(&base, ForgeAuth::Token(Secret::new(TOKEN))), None);
    let rig = rig(&base, vec![t], "fine");
    // A comment on an issue (on a pull request, the hooks would need the forge to read it
    // first, and refuse the trigger without it: see below).
    let mut body: Value = serde_json::from_slice(&comment("@aiwg review", "bob", 5, None)).unwrap();
    body["issue"]
        .as_object_mut()
        .unwrap()
        .remove("pull_request");
    let body = body.to_string().into_bytes();
    let reply = rig
        .hooks
        .handle("github", &signed(&body, "d-5"), &body)
        .await;
    let HookOutcome::Submitted { job_id, .. } = reply.outcome else {
        panic!("{:?}", reply.outcome);
    };
    let job = rig
        .engine
        .wait(job_id, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(job.status, JobStatus::Completed);
    assert!(
        rig.trackers[0].idle(Duration::from_secs(20)).await,
        "the tracker gave up by itself"
    );
    // On a pull request, with the forge down, the default fork policy refuses: the origin of
    // the head cannot be known.
    let body = comment("@aiwg review", "bob", 6, None);
    let reply = rig
        .hooks
        .handle("github", &signed(&body, "d-6"), &body)
        .await;
    assert!(
        matches!(
            reply.outcome,
            HookOutcome::Ignored(IgnoreReason::PullRequestUnknown(_))
        ),
        "{:?}",
        reply.outcome
    );
}

/// With `fork_policy: allow` the origin decides nothing: a comment on a pull request whose
/// forge cannot be read still starts its job, which then runs the head fetched when it starts.
#[tokio::test]
async fn under_fork_policy_allow_an_unreadable_pull_request_still_starts_its_job() {
    let fake = fake_github::start("aiwg-bot").await;
    fake.behaviour.fail_pulls.store(10, Ordering::SeqCst);
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("app")).unwrap();
    let engine = Engine::builder()
        .executor("echo", Arc::new(ScriptedExecutor::succeeding("ok")))
        .workflow(Workflow::new("review").step(Step::prompt("draft", "echo", "draft")))
        .policy(
            ProjectPolicy::builder()
                .root(root.path())
                .map(".*", "app")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let triggers: TriggersConfig = serde_json::from_value(json!({
        "github": {"secret": SECRET, "token": TOKEN, "api_url": fake.base, "fork_policy": "allow"}
    }))
    .unwrap();
    let hooks = Hooks::builder(triggers, engine.clone()).build().unwrap();
    let body = comment("@aiwg review", "bob", 7, None);
    let reply = hooks.handle("github", &signed(&body, "d-7"), &body).await;
    let HookOutcome::Submitted { job_id, .. } = reply.outcome else {
        panic!("{:?}", reply.outcome);
    };
    let job = engine.get(job_id).await.unwrap();
    assert!(!job.trigger.extra.contains_key("head_sha"));
    assert_eq!(
        fake.of("GET", "/repos/octo/app/pulls/42").len(),
        2,
        "two tries"
    );
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl")
}

#[tokio::test]
async fn a_github_app_signs_its_jwt_and_caches_installation_tokens() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "openssl is required in CI");
        eprintln!("skipping: no openssl to verify the JWT with");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let public = dir.path().join("pub.pem");
    let key_s = key.to_str().unwrap();
    assert!(openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        key_s
    ])
    .status
    .success());
    assert!(openssl(&[
        "pkey",
        "-in",
        key_s,
        "-pubout",
        "-out",
        public.to_str().unwrap()
    ])
    .status
    .success());
    let pem = std::fs::read_to_string(&key).unwrap();
    let app = Arc::new(GitHubApp::new("123", &pem).unwrap());
    assert!(GitHubApp::new("123", "not a key").is_err());

    let fake = fake_github::start("unused").await;
    // Tokens that expire within a minute are not reused: each job buys a new one.
    fake.behaviour.token_ttl_secs.store(30, Ordering::SeqCst);
    let t = tracker(client(&fake.base, ForgeAuth::App(app)), None);
    let rig = rig(&fake.base, vec![t], "ok");
    run_job(&rig, 11, Some(555)).await;
    run_job(&rig, 12, Some(555)).await;
    let tokens = fake.of("POST", "/app/installations/555/access_tokens");
    let uses = fake
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/repos/octo/app/issues"))
        .count();
    assert_eq!(
        tokens.len(),
        uses,
        "a token about to expire is replaced before each use"
    );
    // An hour-long token is cached: the next two jobs buy one between them.
    fake.behaviour.token_ttl_secs.store(3600, Ordering::SeqCst);
    run_job(&rig, 13, Some(555)).await;
    run_job(&rig, 14, Some(555)).await;
    assert_eq!(
        fake.of("POST", "/app/installations/555/access_tokens")
            .len(),
        uses + 1
    );
    // A cached token revoked before it expires (401) is dropped: the next request buys another
    // one, and the job still gets its comment (the cached token was used for an hour).
    let last = fake
        .of("POST", "/issues/42/comments")
        .last()
        .unwrap()
        .authorization
        .clone();
    let revoked = last.strip_prefix("Bearer ").unwrap().to_owned();
    fake.behaviour.revoked.lock().unwrap().push(revoked.clone());
    let comments = fake.of("POST", "/issues/42/comments").len();
    run_job(&rig, 15, Some(555)).await;
    let made = fake.of("POST", "/issues/42/comments");
    assert_eq!(made.len(), comments + 1, "the job got its comment");
    assert_ne!(
        made.last().unwrap().authorization,
        format!("Bearer {revoked}")
    );
    assert_eq!(
        fake.of("POST", "/app/installations/555/access_tokens")
            .len(),
        uses + 2,
        "one new token after the 401"
    );
    // Comments are made with installation tokens, never with the JWT.
    for c in fake.of("POST", "/issues/42/comments") {
        assert!(
            c.authorization.starts_with("Bearer ghs_installation_555_"),
            "{}",
            c.authorization
        );
    }

    // The JWT, verified by openssl with the public key.
    let jwt = tokens[0]
        .authorization
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    let claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["iss"], "123");
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    let now = chrono::Utc::now().timestamp();
    assert!(iat <= now && exp > now && exp - iat <= 600, "{claims}");
    std::fs::write(
        dir.path().join("data"),
        format!("{}.{}", parts[0], parts[1]),
    )
    .unwrap();
    std::fs::write(dir.path().join("sig"), b64.decode(parts[2]).unwrap()).unwrap();
    let out = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        public.to_str().unwrap(),
        "-signature",
        dir.path().join("sig").to_str().unwrap(),
        dir.path().join("data").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Verified OK"));
    fake.assert_conforms();
}

/// A recording fake for GitLab, Gitea and Bitbucket: answers a created comment with an id.
async fn recording_forge() -> (
    String,
    Arc<std::sync::Mutex<Vec<(String, String, Value, String)>>>,
) {
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, Uri};
    type Log = Arc<std::sync::Mutex<Vec<(String, String, Value, String)>>>;
    async fn handle(
        State(log): State<Log>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> (axum::http::StatusCode, String) {
        let auth = ["private-token", "authorization"]
            .iter()
            .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
            .unwrap_or("")
            .to_owned();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = uri.path().to_owned();
        log.lock()
            .unwrap()
            .push((method.to_string(), path.clone(), v, auth));
        if method == Method::POST && path.ends_with("/comments") || path.ends_with("/notes") {
            (axum::http::StatusCode::CREATED, r#"{"id": 4242}"#.into())
        } else if method == Method::GET {
            (
                axum::http::StatusCode::OK,
                r#"{"login": "bot", "username": "bot", "nickname": "bot"}"#.into(),
            )
        } else {
            (axum::http::StatusCode::OK, "{}".into())
        }
    }
    let log: Log = Arc::default();
    let app = axum::Router::new().fallback(handle).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), log)
}

/// The same tracking on GitLab (merge request notes, award emoji), Gitea (issue comments,
/// reactions) and Bitbucket (pull request comments, no reactions), each with its own
/// authentication, at the documented paths.
#[tokio::test]
async fn gitlab_gitea_and_bitbucket_get_the_same_tracking_at_their_paths() {
    use aiwg_core::{Job, JobEvent, JobEventKind, TriggerInfo};

    let (base, log) = recording_forge().await;
    let cases = [
        (
            Platform::GitLab,
            "group/sub/app",
            "PRIVATE-TOKEN-VALUE",
            "PRIVATE-TOKEN-VALUE",
            vec![
                (
                    "POST",
                    "/projects/group%2Fsub%2Fapp/merge_requests/7/notes/55/award_emoji",
                ),
                ("POST", "/projects/group%2Fsub%2Fapp/merge_requests/7/notes"),
                (
                    "PUT",
                    "/projects/group%2Fsub%2Fapp/merge_requests/7/notes/4242",
                ),
            ],
        ),
        (
            Platform::Gitea,
            "org/repo",
            "gitea-token",
            "token gitea-token",
            vec![
                ("POST", "/repos/org/repo/issues/comments/55/reactions"),
                ("POST", "/repos/org/repo/issues/7/comments"),
                ("PATCH", "/repos/org/repo/issues/comments/4242"),
            ],
        ),
        (
            Platform::Bitbucket,
            "team/repo",
            "bb-token",
            "Bearer bb-token",
            vec![
                ("POST", "/repositories/team/repo/pullrequests/7/comments"),
                (
                    "PUT",
                    "/repositories/team/repo/pullrequests/7/comments/4242",
                ),
            ],
        ),
    ];
    for (platform, repo, token, auth, want) in cases {
        log.lock().unwrap().clear();
        let c = Arc::new(
            ForgeClient::new(
                "t",
                platform,
                Some(&base),
                ForgeAuth::Token(Secret::new(token)),
            )
            .unwrap()
            .retry_base(Duration::from_millis(10)),
        );
        let t = Tracker::builder()
            .forge(c)
            .min_edit_interval(Duration::from_millis(10))
            .build();
        let mut trigger = TriggerInfo::new(platform.as_str());
        trigger.repo = Some(repo.into());
        trigger.pr = Some(7);
        trigger.extra.insert("comment_id".into(), "55".into());
        let mut job: Job = serde_json::from_value(json!({
            "id": JobId::new().to_string(), "workflow": "review", "project_path": "/p",
            "params": {}, "guidance": null, "priority": 0, "status": "queued", "attempt": 0,
            "max_attempts": 1, "timeout": 60000, "created_at": chrono::Utc::now(),
            "started_at": null, "finished_at": null, "retry_at": null,
            "progress": {"completed": [], "in_progress": [], "pending": ["draft"]},
            "result": null, "error": null, "dead_letter": false, "trigger": trigger,
            "history": [], "cancel_requested": false, "idempotency_key": null
        }))
        .unwrap_or_else(|e| panic!("a job: {e}"));
        let ev = |seq: u64, to: JobStatus| JobEvent {
            job_id: job.id,
            seq,
            at: chrono::Utc::now(),
            kind: JobEventKind::Status {
                from: None,
                to,
                attempt: 1,
                reason: None,
                error: None,
            },
        };
        t.on_event(&job, &ev(1, JobStatus::Queued)).await;
        // Wait for the comment to exist, so the end is an edit (sooner, the two would be
        // coalesced into one comment made at the end).
        let made = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let created = log.lock().unwrap().iter().any(|(m, p, _, _)| {
                    m == "POST" && (p.ends_with("/comments") || p.ends_with("/notes"))
                });
                if created {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(made.is_ok(), "{platform}: no comment was made");
        job.status = JobStatus::Completed;
        job.progress.completed = vec!["draft".into()];
        job.progress.pending.clear();
        t.on_event(&job, &ev(2, JobStatus::Completed)).await;
        assert!(t.idle(Duration::from_secs(10)).await);
        let seen = log.lock().unwrap().clone();
        let got: Vec<(&str, &str)> = seen
            .iter()
            .map(|(m, p, _, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(got, want, "{platform}");
        for (_, _, body, a) in &seen {
            assert_eq!(a, auth, "{platform}");
            let text = match platform {
                Platform::Bitbucket => body["content"]["raw"].as_str(),
                _ => body["body"]
                    .as_str()
                    .or(body["name"].as_str())
                    .or(body["content"].as_str()),
            };
            assert!(text.is_some(), "{platform}: {body}");
        }
        let last = &seen.last().unwrap().2;
        let last = last["body"]
            .as_str()
            .or(last["content"]["raw"].as_str())
            .unwrap();
        assert!(last.contains("✅ completed"), "{platform}: {last}");
    }
}

#[tokio::test]
async fn the_memory_tracking_store_passes_the_suite() {
    aiwg_webhook::tracking::tracking_store_suite(|| async {
        Arc::new(MemoryTrackingStore::new()) as Arc<dyn aiwg_webhook::tracking::TrackingStore>
    })
    .await;
}

/// GitHub's `issue_comment` names neither the pull request's head commit nor where the head
/// lives. With API access the hooks read the pull request first: the job names the commit that
/// was the head when it was asked for, and a pull request from a fork is refused by the default
/// `fork_policy`. Without the read, a comment on a fork's pull request started a job, and the
/// job ran whatever the head was when a worker got to it.
#[tokio::test]
async fn a_comment_on_a_pull_request_runs_its_head_and_a_forks_is_refused() {
    let fake = fake_github::start("aiwg-bot").await;
    let sha = "0123456789abcdef0123456789abcdef01234567";
    *fake.behaviour.pull_sha.lock().unwrap() = Some(sha.to_owned());
    let rig = rig(&fake.base, vec![], "ok");
    let job = run_job(&rig, 9101, None).await;
    let reads = fake.of("GET", "/repos/octo/app/pulls/42");
    assert_eq!(reads.len(), 1, "the pull request was read once");
    assert_eq!(reads[0].authorization, format!("Bearer {TOKEN}"));
    let job = rig.engine.get(job).await.unwrap();
    let extra = &job.trigger.extra;
    assert_eq!(extra.get("head_sha").map(String::as_str), Some(sha));
    assert!(extra.contains_key("head_ref"), "{extra:?}");

    // A fork's pull request: refused, nothing submitted.
    fake.behaviour.pull_from_fork.store(true, Ordering::SeqCst);
    let body = comment("@aiwg review", "bob", 9102, None);
    let reply = rig
        .hooks
        .handle("github", &signed(&body, "d-9102"), &body)
        .await;
    assert!(
        matches!(
            reply.outcome,
            HookOutcome::Ignored(IgnoreReason::ForkRefused)
        ),
        "{:?}",
        reply.outcome
    );

    // A forge that cannot say: refused (fail closed), within the webhook's time.
    fake.behaviour.pull_from_fork.store(false, Ordering::SeqCst);
    fake.behaviour.fail_pulls.store(10, Ordering::SeqCst);
    let body = comment("@aiwg review", "bob", 9103, None);
    let reply = rig
        .hooks
        .handle("github", &signed(&body, "d-9103"), &body)
        .await;
    match &reply.outcome {
        HookOutcome::Ignored(r @ IgnoreReason::PullRequestUnknown(why)) => {
            assert!(why.contains("502"), "{why}");
            assert!(!why.contains(TOKEN) && !why.contains(&fake.base), "{why}");
            assert_eq!(r.label(), "pull_request_unknown");
        }
        other => panic!("{other:?}"),
    }
    let page = rig
        .engine
        .list(&aiwg_core::store::JobQuery::default().limit(10))
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1, "only the first comment started a job");
    fake.assert_conforms();
}

/// Two instances edit one job's comment, each from its own view of the job. The first
/// instance's edit of an older state is slow and lands after the second instance's final
/// one: the first then writes the newest text again, so the comment ends showing the job's
/// end. Nothing ordered the instances' edits before, and the comment stayed at "running".
#[tokio::test]
async fn a_slow_instances_older_edit_does_not_leave_the_comment_behind() {
    let fake = fake_github::start("aiwg-bot").await;
    let rig = rig(&fake.base, vec![], "done well");
    let job_id = run_job(&rig, 9201, None).await;
    let done = rig.engine.get(job_id).await.unwrap();
    let events: Vec<aiwg_core::JobEvent> = {
        use futures_util::StreamExt;
        rig.engine
            .subscribe(job_id, 0)
            .await
            .unwrap()
            .collect()
            .await
    };
    let (first, middle, last) = (
        &events[1],
        &events[events.len() / 2],
        events.last().unwrap(),
    );
    assert!(first.seq < middle.seq && middle.seq < last.seq);
    let mut running = done.clone();
    running.status = JobStatus::Running;
    running.finished_at = None;
    let mut later = running.clone();
    later.progress.completed.clear();

    let store = Arc::new(MemoryTrackingStore::new());
    let instance = |name: &str| {
        Tracker::builder()
            .forge(client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))))
            .store(store.clone())
            .instance(name)
            .min_edit_interval(Duration::from_millis(10))
            .idle_writer(Duration::from_millis(300))
            .status_base(STATUS_BASE)
            .build()
    };
    let (slow, quick) = (instance("slow"), instance("quick"));
    // The slow instance makes the comment, then sends an edit that takes a while.
    slow.on_event(&running, first).await;
    assert!(slow.idle(Duration::from_secs(20)).await);
    *fake.behaviour.delay_next_edit.lock().unwrap() = Some(Duration::from_millis(1500));
    slow.on_event(&later, middle).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        fake.behaviour.delayed_edit_arrived.notified(),
    )
    .await
    .expect("the slow edit arrived");
    // Meanwhile the other instance writes the end, which takes effect first.
    quick.on_event(&done, last).await;
    assert!(quick.idle(Duration::from_secs(20)).await);
    assert!(slow.idle(Duration::from_secs(20)).await);
    let comments = fake.behaviour.comments.lock().unwrap().clone();
    assert_eq!(comments.len(), 1, "{comments:?}");
    let text = comments.values().next().unwrap();
    assert!(text.contains("✅ completed"), "{text}");
    assert!(text.contains("done well"), "{text}");
    fake.assert_conforms();
}

/// GitHub answered 502 to the comment's creation but had stored it: the writer looks for the
/// job's comment before posting again, adopts it, and edits it to the end. Posting again
/// blindly made a second comment.
#[tokio::test]
async fn a_comment_stored_despite_a_5xx_is_adopted_not_posted_twice() {
    let fake = fake_github::start("aiwg-bot").await;
    fake.behaviour
        .store_then_fail_creates
        .store(1, Ordering::SeqCst);
    let t = tracker(
        client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))),
        None,
    );
    let rig = rig(&fake.base, vec![t], "adopted");
    let job = run_job(&rig, 9301, None).await;
    assert_eq!(
        fake.of("POST", "/repos/octo/app/issues/42/comments").len(),
        1
    );
    let lists = fake.of("GET", "/repos/octo/app/issues/42/comments");
    assert_eq!(lists.len(), 1, "looked once before posting again");
    let comments = fake.behaviour.comments.lock().unwrap().clone();
    assert_eq!(comments.len(), 1, "{comments:?}");
    let text = comments.values().next().unwrap();
    assert!(
        text.contains("✅ completed") && text.contains(&format!("aiwg:job:{job}")),
        "{text}"
    );
    fake.assert_conforms();
}

/// An instance that takes a claim over (its own from before a restart, or a stale one) finds
/// the comment its predecessor made but never recorded, and edits it instead of making another.
#[tokio::test]
async fn a_claim_taken_over_finds_the_comment_its_holder_made() {
    let fake = fake_github::start("aiwg-bot").await;
    let store = Arc::new(MemoryTrackingStore::new());
    let t = Tracker::builder()
        .forge(client(&fake.base, ForgeAuth::Token(Secret::new(TOKEN))))
        .store(store.clone())
        .instance("host-1")
        .min_edit_interval(Duration::from_millis(20))
        .status_base(STATUS_BASE)
        .build();
    let rig = rig(&fake.base, vec![], "found");
    let job_id = run_job(&rig, 9401, None).await;
    let done = rig.engine.get(job_id).await.unwrap();
    // The instance's predecessor under the same name claimed the job and made its comment,
    // then stopped before recording the comment's id.
    use aiwg_webhook::tracking::{TrackClaim, TrackingStore};
    assert_eq!(
        store
            .claim(job_id, "host-1", Duration::from_secs(60))
            .await
            .unwrap(),
        TrackClaim::Mine
    );
    let earlier = aiwg_webhook::tracking::render(&done, Platform::GitHub, None);
    fake.behaviour
        .comments
        .lock()
        .unwrap()
        .insert("77".into(), earlier.replace("completed", "running"));
    let events: Vec<aiwg_core::JobEvent> = {
        use futures_util::StreamExt;
        rig.engine
            .subscribe(job_id, 0)
            .await
            .unwrap()
            .collect()
            .await
    };
    t.on_event(&done, events.last().unwrap()).await;
    assert!(t.idle(Duration::from_secs(20)).await);
    assert!(
        fake.of("POST", "/issues/42/comments").is_empty(),
        "no second comment"
    );
    assert_eq!(fake.of("PATCH", "/issues/comments/77").len(), 1);
    let text = fake.behaviour.comments.lock().unwrap()["77"].clone();
    assert!(text.contains("✅ completed"), "{text}");
    fake.assert_conforms();
}

/// `find_comment` on GitLab, Gitea and Bitbucket: the documented list of each (notes newest
/// first; comments since a time; a page of `values`), the bot's own marked comment found and
/// another user's comment quoting the marker passed over.
#[tokio::test]
async fn each_forge_finds_the_bots_marked_comment_and_not_a_quote() {
    use axum::http::Uri;
    type Seen = Arc<std::sync::Mutex<Vec<String>>>;
    async fn handle(
        axum::extract::State(seen): axum::extract::State<Seen>,
        uri: Uri,
    ) -> axum::Json<Value> {
        let path = uri.path().to_owned();
        seen.lock()
            .unwrap()
            .push(format!("{path}?{}", uri.query().unwrap_or("")));
        let marked = "done\n<!-- aiwg:job:J -->";
        let quote = "> <!-- aiwg:job:J -->";
        axum::Json(if path.ends_with("/user") {
            json!({"login": "bot", "username": "bot", "nickname": "bot"})
        } else if path.contains("/notes") {
            json!([
                {"id": 3, "body": quote, "author": {"username": "mallory"}},
                {"id": 2, "body": marked, "author": {"username": "bot"}},
                {"id": 1, "body": "hi", "author": {"username": "bot"}}
            ])
        } else if path.contains("/repositories/") {
            json!({"values": [
                {"id": 13, "content": {"raw": quote}, "user": {"nickname": "mallory"}},
                {"id": 12, "content": {"raw": marked}, "user": {"nickname": "bot"}}
            ], "pagelen": 100})
        } else {
            json!([
                {"id": 21, "body": marked, "user": {"login": "bot"}},
                {"id": 22, "body": quote, "user": {"login": "mallory"}}
            ])
        })
    }
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let since = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    for (platform, repo, want, path) in [
        (
            Platform::GitLab,
            "grp/app",
            "2",
            "/projects/grp%2Fapp/merge_requests/42/notes?sort=desc&order_by=created_at&per_page=100&page=1",
        ),
        (
            Platform::Gitea,
            "octo/app",
            "21",
            "/repos/octo/app/issues/42/comments?since=2026-12-07T10:00:00Z&page=1&limit=50",
        ),
        (
            Platform::Bitbucket,
            "ws/app",
            "12",
            "/repositories/ws/app/pullrequests/42/comments?sort=-created_on&pagelen=100&page=1",
        ),
    ] {
        let c = ForgeClient::new(
            "triggers.x",
            platform,
            Some(&base),
            ForgeAuth::Token(Secret::new("bot:token")),
        )
        .unwrap();
        let target = aiwg_webhook::forge::CommentTarget::new(repo, 42, true);
        let found = c
            .find_comment(&target, "<!-- aiwg:job:J -->", since)
            .await
            .unwrap();
        assert_eq!(found.as_deref(), Some(want), "{platform}");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.iter().any(|s| s == path), "{platform}: {seen:?}");
    }
}
