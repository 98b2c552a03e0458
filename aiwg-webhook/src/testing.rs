//! The platform-hooks part of the HTTP conformance suite (feature `test-util`): signed GitHub,
//! Slack and Discord requests end to end through a router over real HTTP — verification,
//! parsing, the grammar, a job that runs and completes, replay protection, and refusals.
//!
//! A router's test calls [`hooks_suite`] with the same
//! [`Serve`] it gives the core suite.

use std::sync::Arc;
use std::time::Duration;

use aiwg_core::test_util::conformance::{api_builder, Client, Serve, ADMIN_KEY, READ_KEY};
use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::{Engine, JobId, JobStatus, Parameter, ProjectPolicy, Step, Workflow};
use ed25519_dalek::{Signer, SigningKey};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::{Hooks, TriggersConfig};

const GITHUB_SECRET: &str = "hooks-suite-github-secret";
const SLACK_SECRET: &str = "hooks-suite-slack-signing-secret";
/// RFC 8032 test 1.
const DISCORD_SECRET: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const DISCORD_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Setup {
    engine: Engine,
    echo: ScriptedExecutor,
    _root: tempfile::TempDir,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("app")).expect("mkdir");
    let echo = ScriptedExecutor::succeeding("done");
    let engine = Engine::builder()
        .executor("echo", Arc::new(echo.clone()))
        .workflow(
            Workflow::new("echo")
                .describe("Says hello")
                .param(Parameter::new("who").with_default("world"))
                .step(Step::prompt(
                    "greet",
                    "echo",
                    "hello {{who}}: {{guidance}} ({{trigger.repo}})",
                )),
        )
        .policy(
            ProjectPolicy::builder()
                .root(root.path())
                .map(".*", "app")
                .build()
                .expect("policy"),
        )
        .poll_interval(Duration::from_millis(20))
        .build()
        .expect("engine");
    Setup {
        engine,
        echo,
        _root: root,
    }
}

async fn serve(server: &dyn Serve, setup: &Setup) -> aiwg_core::test_util::conformance::Served {
    let triggers: TriggersConfig = serde_json::from_value(json!({
        "github": {"secret": GITHUB_SECRET, "mention": "@aiwg"},
        "slack": {"signing_secret": SLACK_SECRET, "command": "/aiwg"},
        "discord": {"public_key": DISCORD_PUBLIC},
    }))
    .expect("triggers");
    let hooks = Hooks::builder(triggers, setup.engine.clone())
        .build()
        .expect("hooks");
    let api = api_builder(setup.engine.clone())
        .hooks(Arc::new(hooks))
        .build()
        .expect("api");
    server.serve(api, "").await
}

async fn post(
    c: &reqwest::Client,
    base: &str,
    platform: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, String, String) {
    let mut rb = c.post(format!("{base}/hooks/{platform}"));
    for (k, v) in headers {
        rb = rb.header(*k, v);
    }
    let res = rb.body(body).send().await.expect("request");
    let status = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (status, ct, res.text().await.unwrap_or_default())
}

async fn completed(engine: &Engine, id: &str) -> aiwg_core::Job {
    let id: JobId = id.parse().expect("a job id");
    engine
        .wait(id, Duration::from_secs(20))
        .await
        .expect("the job ends")
}

/// Runs the platform checks against `server`.
pub async fn hooks_suite(server: &dyn Serve) {
    github(server).await;
    slack(server).await;
    discord(server).await;
}

/// A comment event; like on GitHub, each comment (text) has its own id.
fn github_comment(text: &str) -> Vec<u8> {
    let id = 9000 + text.bytes().map(u64::from).sum::<u64>();
    json!({
        "action": "created",
        "issue": { "number": 42, "pull_request": { "url": "https://api.github.com/repos/octo/app/pulls/42" } },
        "comment": { "id": id, "body": text, "user": { "login": "bob", "type": "User" }, "author_association": "MEMBER" },
        "repository": { "full_name": "octo/app", "clone_url": "https://github.com/octo/app.git", "default_branch": "main" },
        "sender": { "login": "bob", "type": "User" }
    })
    .to_string()
    .into_bytes()
}

fn github_headers(event: &str, delivery: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("x-github-event", event.to_owned()),
        ("x-github-delivery", delivery.to_owned()),
        (
            "x-hub-signature-256",
            format!("sha256={}", hmac_hex(GITHUB_SECRET.as_bytes(), &[body])),
        ),
        ("content-type", "application/json".to_owned()),
    ]
}

async fn github(server: &dyn Serve) {
    let setup = setup();
    let s = serve(server, &setup).await;
    let c = reqwest::Client::new();
    let body = github_comment("@aiwg echo --who \"the team\" please check `$(id)`");
    let (status, ct, text) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-1", &body),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert!(ct.starts_with("application/json"));
    let v: Value = serde_json::from_str(&text).expect("json");
    let id = v["job_id"].as_str().expect("job_id").to_owned();
    let job = completed(&setup.engine, &id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.trigger.source, "github");
    assert_eq!(job.trigger.repo.as_deref(), Some("octo/app"));
    assert_eq!(job.trigger.pr, Some(42));
    assert_eq!(job.trigger.delivery_id.as_deref(), Some("d-1"));
    assert_eq!(
        setup.echo.requests()[0].prompt,
        "hello the team: please check `$(id)` (octo/app)"
    );
    // The job is visible through the API too.
    let r = Client::new(&s.base_url)
        .send(
            "GET",
            &format!("/workflows/{id}/status"),
            Some(READ_KEY),
            None,
        )
        .await;
    assert_eq!(r.json()["trigger"]["source"], "github");

    // A redelivery returns the same job and starts nothing.
    let (status, _, text) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-1", &body),
        body.clone(),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["job_id"],
        id.as_str()
    );
    assert_eq!(setup.echo.calls(), 1);

    // Bad, missing and tampered signatures are 401 problems; nothing runs.
    let mut bad = github_headers("issue_comment", "d-2", &body);
    bad[2].1 = format!("sha256={}", "0".repeat(64));
    let (status, ct, _) = post(&c, &s.base_url, "github", &bad, body.clone()).await;
    assert_eq!((status, ct.as_str()), (401, "application/problem+json"));
    let mut tampered = body.clone();
    tampered.push(b' ');
    let (status, _, _) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-3", &body),
        tampered,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = post(
        &c,
        &s.base_url,
        "github",
        &[("x-github-event", "issue_comment".into())],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    // ping, an unmentioned comment, and an unknown workflow.
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#.to_vec();
    let (status, _, _) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("ping", "d-4", &ping),
        ping,
    )
    .await;
    assert_eq!(status, 200);
    let quiet = github_comment("nothing for the bot here");
    let (status, _, text) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-5", &quiet),
        quiet,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        serde_json::from_str::<Value>(&text).unwrap()["ignored"].is_string(),
        "{text}"
    );
    let unknown = github_comment("@aiwg no-such-workflow");
    let (status, _, text) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-6", &unknown),
        unknown,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(setup.echo.calls(), 1, "no refused delivery ran a job");
    // Over the body limit before buffering.
    let huge = vec![b' '; 70 * 1024];
    let (status, _, _) = post(
        &c,
        &s.base_url,
        "github",
        &github_headers("issue_comment", "d-7", &huge),
        huge,
    )
    .await;
    assert_eq!(status, 413);

    // The audit trail: every trigger attempt, newest first; the ping and the comment that did
    // not address us were no attempts.
    let audit = Client::new(&s.base_url)
        .send("GET", "/audit?source=github", Some(ADMIN_KEY), None)
        .await;
    assert_eq!(audit.status, 200, "{}", audit.text);
    assert!(!audit.text.contains(GITHUB_SECRET));
    let entries = audit.json()["entries"].as_array().unwrap().clone();
    let seen: Vec<(&str, Option<&str>)> = entries
        .iter()
        .map(|e| (e["decision"].as_str().unwrap(), e["delivery_id"].as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("refused", Some("d-6")),
            ("refused", None),
            ("refused", None),
            ("refused", None),
            ("duplicate", Some("d-1")),
            ("accepted", Some("d-1")),
        ],
        "{}",
        audit.text
    );
    let accepted = &entries[5];
    assert_eq!(accepted["actor"], "bob");
    assert_eq!(accepted["repo"], "octo/app");
    assert_eq!(accepted["workflow"], "echo");
    assert_eq!(accepted["job_id"], id.as_str());
    assert!(accepted["key_name"].is_null());
    assert_eq!(entries[0]["workflow"], "no-such-workflow");
    assert!(entries[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no-such-workflow"));
    assert!(entries[1]["reason"].as_str().unwrap().contains("signature"));
}

fn slack_headers(body: &[u8], ts: i64) -> Vec<(&'static str, String)> {
    let ts = ts.to_string();
    vec![
        ("x-slack-request-timestamp", ts.clone()),
        (
            "x-slack-signature",
            format!(
                "v0={}",
                hmac_hex(
                    SLACK_SECRET.as_bytes(),
                    &[b"v0:", ts.as_bytes(), b":", body]
                )
            ),
        ),
        (
            "content-type",
            "application/x-www-form-urlencoded".to_owned(),
        ),
    ]
}

async fn slack(server: &dyn Serve) {
    let setup = setup();
    let s = serve(server, &setup).await;
    let c = reqwest::Client::new();
    let body = b"token=x&team_id=T1&channel_id=C1&user_id=U1&user_name=ann&command=%2Faiwg&text=echo+--who+slack+--project+octo%2Fapp+ship+it&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1%2F1%2Fx&trigger_id=1.2.3".to_vec();
    let (status, ct, text) = post(
        &c,
        &s.base_url,
        "slack",
        &slack_headers(&body, now()),
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(ct.starts_with("application/json"));
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["response_type"], "ephemeral", "{v}");
    let job = setup
        .engine
        .list(&aiwg_core::store::JobQuery::default())
        .await
        .expect("list")
        .jobs;
    assert_eq!(job.len(), 1);
    assert!(
        v.to_string().contains(&job[0].id.to_string()),
        "the message names the job: {v}"
    );
    let job = completed(&setup.engine, &job[0].id.to_string()).await;
    assert_eq!(job.trigger.source, "slack");
    assert_eq!(job.params["who"], "slack");
    // The response_url lets its holder post as the bot: it is kept with the job for the reply
    // and shown nowhere, not to a reader's key, not in the event stream, not to subscribers.
    let capability = "hooks.slack.com/commands/T1/1/x";
    assert_eq!(
        job.reply_credentials.get("slack_response_url"),
        Some("https://hooks.slack.com/commands/T1/1/x")
    );
    let id = job.id.to_string();
    for path in [
        format!("/workflows/{id}/status"),
        "/jobs".to_owned(),
        format!("/workflows/{id}/events"),
    ] {
        let res = c
            .get(format!("{}{path}", s.base_url))
            .bearer_auth(READ_KEY)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), 200, "{path}");
        let text = res.text().await.expect("body");
        assert!(text.contains(&id), "{path}: {text}");
        assert!(
            !text.contains(capability),
            "{path} shows the response_url: {text}"
        );
    }
    let events: Vec<_> = futures_util::StreamExt::collect(
        setup.engine.subscribe(job.id, 0).await.expect("subscribe"),
    )
    .await;
    assert!(events.len() >= 2);
    for event in events {
        if let Some(out) = aiwg_core::dispatch::outbound_event(&job, &event) {
            let payload = out.body();
            assert!(!payload.contains(capability), "{payload}");
        }
    }
    // Stale timestamps and bad signatures are refused.
    let (status, _, _) = post(
        &c,
        &s.base_url,
        "slack",
        &slack_headers(&body, now() - 3600),
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let mut bad = slack_headers(&body, now());
    bad[1].1 = format!("v0={}", "1".repeat(64));
    let (status, _, _) = post(&c, &s.base_url, "slack", &bad, body).await;
    assert_eq!(status, 401);
    // The Events API handshake echoes the challenge.
    let challenge = br#"{"token":"x","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#.to_vec();
    let mut h = slack_headers(&challenge, now());
    h[2].1 = "application/json".to_owned();
    let (status, _, text) = post(&c, &s.base_url, "slack", &h, challenge).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"),
        "{text}"
    );
    assert_eq!(setup.echo.calls(), 1);
}

fn discord_headers(body: &[u8], ts: &str) -> Vec<(&'static str, String)> {
    let bytes: [u8; 32] = hex::decode(DISCORD_SECRET)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    let key = SigningKey::from_bytes(&bytes);
    let mut msg = ts.as_bytes().to_vec();
    msg.extend_from_slice(body);
    vec![
        (
            "x-signature-ed25519",
            hex::encode(key.sign(&msg).to_bytes()),
        ),
        ("x-signature-timestamp", ts.to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
}

async fn discord(server: &dyn Serve) {
    let setup = setup();
    let s = serve(server, &setup).await;
    let c = reqwest::Client::new();
    let ts = now().to_string();
    let ping = br#"{"type":1,"id":"1","application_id":"2","token":"t","version":1}"#.to_vec();
    let (status, _, text) = post(
        &c,
        &s.base_url,
        "discord",
        &discord_headers(&ping, &ts),
        ping.clone(),
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&text).unwrap()),
        (200, json!({"type": 1}))
    );
    // Discord probes with bad signatures on purpose: 401.
    let mut probe = discord_headers(&ping, &ts);
    probe[1].1 = "1".to_owned();
    let (status, ct, _) = post(&c, &s.base_url, "discord", &probe, ping.clone()).await;
    assert_eq!((status, ct.as_str()), (401, "application/problem+json"));
    let command = json!({
        "type": 2, "id": "1100", "application_id": "2200", "token": "interaction-token",
        "member": { "user": { "id": "77", "username": "alice" }, "roles": [] },
        "data": { "id": "5", "name": "aiwg", "type": 1, "options": [
            { "name": "echo", "type": 1, "options": [
                { "name": "who", "type": 3, "value": "discord" },
                { "name": "project", "type": 3, "value": "octo/app" },
                { "name": "guidance", "type": 3, "value": "go" } ] } ] }
    })
    .to_string()
    .into_bytes();
    let (status, _, text) = post(
        &c,
        &s.base_url,
        "discord",
        &discord_headers(&command, &ts),
        command,
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&text).unwrap()),
        (200, json!({"type": 5})),
        "{text}"
    );
    let jobs = setup
        .engine
        .list(&aiwg_core::store::JobQuery::default())
        .await
        .expect("list")
        .jobs;
    assert_eq!(jobs.len(), 1);
    let job = completed(&setup.engine, &jobs[0].id.to_string()).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.trigger.source, "discord");
    assert_eq!(job.params["who"], "discord");
    assert_eq!(job.guidance.as_deref(), Some("go"));
}
