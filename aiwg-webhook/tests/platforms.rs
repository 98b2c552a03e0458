//! GitLab, Slack, Discord, Gitea/Forgejo, Bitbucket and the generic endpoint.

mod common;

use aiwg_webhook::platform::{discord, gitlab, slack, standard};
use aiwg_webhook::{
    BuildError, EventKind, HookOutcome, Hooks, IgnoreReason, Platform, Secret, TriggersConfig,
    VerifyError,
};
use common::*;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::json;

// ---------------------------------------------------------------- GitLab

const GL: &str = r#"
gitlab:
  token: gl-secret-token
  allowed_users: [alice]
  rules: [ { event: pull_request, action: opened, workflow: review } ]
"#;

fn gl_headers(event: &str, token: &str, uuid: &str) -> http::HeaderMap {
    headers(&[
        ("x-gitlab-event", event),
        ("x-gitlab-token", token),
        ("x-gitlab-event-uuid", uuid),
        ("content-type", "application/json"),
    ])
}

fn gl_project() -> serde_json::Value {
    json!({ "id": 15, "name": "app", "path_with_namespace": "group/sub/app", "default_branch": "main",
            "git_http_url": "https://gitlab.example.com/group/sub/app.git",
            "git_ssh_url": "git@gitlab.example.com:group/sub/app.git", "web_url": "https://gitlab.example.com/group/sub/app" })
}

/// A Note Hook on a merge request, shaped as GitLab documents it.
fn gl_note_on_mr(note: &str, username: &str, source_project_id: u64) -> Vec<u8> {
    json!({
        "object_kind": "note", "event_type": "note",
        "user": { "id": 1, "name": "Alice A.", "username": username, "avatar_url": "x", "email": "[REDACTED]" },
        "project_id": 15, "project": gl_project(),
        "repository": { "name": "app", "url": "git@gitlab.example.com:group/sub/app.git", "homepage": "https://gitlab.example.com/group/sub/app" },
        "object_attributes": { "id": 1244, "note": note, "noteable_type": "MergeRequest", "author_id": 1,
            "created_at": "2015-05-17 18:21:36 UTC", "project_id": 15, "noteable_id": 7, "system": false,
            "url": "https://gitlab.example.com/group/sub/app/merge_requests/1#note_1244", "action": "create" },
        "merge_request": { "id": 7, "iid": 1, "target_branch": "main", "source_branch": "ms-viewport",
            "source_project_id": source_project_id, "target_project_id": 15, "title": "Tests", "state": "opened",
            "merge_status": "can_be_merged", "last_commit": { "id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "message": "fixed readme" },
            "source": { "path_with_namespace": "fork/app", "git_http_url": "https://gitlab.example.com/fork/app.git" },
            "target": gl_project() }
    })
    .to_string()
    .into_bytes()
}

/// A Merge Request Hook (`open`).
fn gl_merge_request(action: &str) -> Vec<u8> {
    json!({
        "object_kind": "merge_request", "event_type": "merge_request",
        "user": { "id": 1, "name": "Alice A.", "username": "alice" },
        "project": gl_project(),
        "object_attributes": { "id": 99, "iid": 3, "target_branch": "main", "source_branch": "feat",
            "source_project_id": 15, "target_project_id": 15, "state": "opened", "action": action,
            "last_commit": { "id": "cafe" }, "url": "https://gitlab.example.com/group/sub/app/merge_requests/3",
            "source": gl_project(), "target": gl_project() },
        "labels": [ { "id": 206, "title": "API" } ],
        "changes": {}
    })
    .to_string()
    .into_bytes()
}

#[test]
fn gitlab_token_and_signing() {
    let token = Secret::new("gl-secret-token");
    let body = b"{}";
    let h = gl_headers("Note Hook", "gl-secret-token", "u");
    assert_eq!(gitlab::verify(&token, None, &h, body, NOW), Ok(()));
    let wrong = gl_headers("Note Hook", "gl-secret-tokeN", "u");
    assert_eq!(
        gitlab::verify(&token, None, &wrong, body, NOW),
        Err(VerifyError::TokenMismatch)
    );
    let mut missing = h.clone();
    missing.remove("x-gitlab-token");
    assert_eq!(
        gitlab::verify(&token, None, &missing, body, NOW),
        Err(VerifyError::MissingHeader("x-gitlab-token"))
    );
    assert_eq!(
        gitlab::verify(&Secret::new(""), None, &h, body, NOW),
        Err(VerifyError::NotConfigured)
    );
    // With GitLab's Standard Webhooks signing configured, the signature is required too.
    let key =
        standard::SigningKey::from_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("key");
    assert_eq!(
        gitlab::verify(&token, Some(&key), &h, body, NOW),
        Err(VerifyError::MissingHeader("webhook-id"))
    );
    let mut signed = h.clone();
    signed.insert("webhook-id", "msg_1".parse().expect("v"));
    signed.insert("webhook-timestamp", NOW.to_string().parse().expect("v"));
    signed.insert(
        "webhook-signature",
        key.sign("msg_1", NOW, body).parse().expect("v"),
    );
    assert_eq!(
        gitlab::verify(&token, Some(&key), &signed, body, NOW),
        Ok(())
    );
    assert_eq!(
        gitlab::verify(&token, Some(&key), &signed, b"{ }", NOW),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        gitlab::verify(&token, Some(&key), &signed, body, NOW + 301),
        Err(VerifyError::StaleTimestamp)
    );
}

#[tokio::test]
async fn gitlab_note_hook_submits() {
    let hooks = hooks(GL);
    let body = gl_note_on_mr(
        "/cc @aiwg review --depth 3 look at the viewport",
        "alice",
        15,
    );
    let (sub, seen) = capturing(1);
    let h = gl_headers("Note Hook", "gl-secret-token", "uuid-1");
    let r = hooks.handle("gitlab", &h, &body, &sub).await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(req.workflow, "review");
    assert_eq!(req.params["depth"], "3");
    assert_eq!(req.guidance.as_deref(), Some("look at the viewport"));
    assert_eq!(req.project.as_deref(), Some("group/sub/app"));
    assert_eq!(req.trigger.source, "gitlab");
    assert_eq!(req.trigger.pr, Some(1));
    assert_eq!(req.trigger.delivery_id.as_deref(), Some("uuid-1"));
    assert_eq!(
        req.trigger.extra["head_sha"],
        "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    );
    assert_eq!(req.trigger.extra["head_ref"], "ms-viewport");
    assert_eq!(
        req.trigger.extra["clone_url"],
        "https://gitlab.example.com/group/sub/app.git"
    );
    assert_eq!(req.trigger.extra["comment_id"], "1244");
    // replay (Idempotency-Key wins over the UUID when present)
    assert_eq!(
        hooks
            .handle("gitlab", &h, &body, &sub)
            .await
            .json()
            .expect("json"),
        r.json().expect("json")
    );

    // a user who named themselves after an allowed one: the display name admits nobody
    let renamed: Vec<u8> = String::from_utf8(gl_note_on_mr("@aiwg review", "mallory", 15))
        .expect("utf-8")
        .replace("\"Alice A.\"", "\"alice\"")
        .into_bytes();
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "gl-secret-token", "u1"),
            &renamed,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::UserNotAllowed("mallory".into()))
    );

    // a user not in allowed_users, a fork MR, a bot
    let other = gl_note_on_mr("@aiwg review", "eve", 15);
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "gl-secret-token", "u2"),
            &other,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::UserNotAllowed("eve".into()))
    );
    let fork = gl_note_on_mr("@aiwg review", "alice", 99);
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "gl-secret-token", "u3"),
            &fork,
            &never(),
        )
        .await;
    assert_eq!(r.outcome, HookOutcome::Ignored(IgnoreReason::ForkRefused));
    let bot = gl_note_on_mr("@aiwg review", "project_15_bot_0123abcd", 15);
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "gl-secret-token", "u4"),
            &bot,
            &never(),
        )
        .await;
    assert!(
        matches!(r.outcome, HookOutcome::Ignored(IgnoreReason::Bot(_))),
        "{:?}",
        r.outcome
    );
    // wrong token → 401
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "nope", "u5"),
            &body,
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 401);
}

#[tokio::test]
async fn gitlab_merge_request_hook_and_rules() {
    let hooks = hooks(GL);
    let body = gl_merge_request("open");
    let h = gl_headers("Merge Request Hook", "gl-secret-token", "mr-1");
    let ev = hooks
        .verify_and_parse(Platform::GitLab, &h, &body)
        .expect("parses");
    assert_eq!(
        (ev.event.as_str(), ev.action.as_deref()),
        ("pull_request", Some("opened"))
    );
    let pr = ev.pull_request.as_ref().expect("mr");
    assert_eq!(
        (pr.number, pr.head_sha.as_deref(), pr.from_fork),
        (3, Some("cafe"), Some(false))
    );
    assert_eq!(ev.labels, vec!["API".to_owned()]);
    let (sub, seen) = capturing(1);
    assert_eq!(
        hooks
            .handle("gitlab", &h, &body, &sub)
            .await
            .status
            .as_u16(),
        202
    );
    assert_eq!(seen.lock().expect("lock")[0].workflow, "review");
    let closed = gl_merge_request("close");
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Merge Request Hook", "gl-secret-token", "mr-2"),
            &closed,
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    // another hook kind, even with unusual fields, is tolerated
    let pipeline =
        json!({ "object_kind": "pipeline", "object_attributes": { "source": "push", "id": 1 } })
            .to_string();
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("Pipeline Hook", "gl-secret-token", "p"),
            pipeline.as_bytes(),
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.outcome);
    // an Issue Hook adding a label
    let issue = json!({
        "object_kind": "issue", "user": { "username": "alice" }, "project": gl_project(),
        "object_attributes": { "iid": 23, "action": "update" },
        "labels": [ { "title": "old" }, { "title": "aiwg" } ],
        "changes": { "labels": { "previous": [ { "title": "old" } ], "current": [ { "title": "old" }, { "title": "aiwg" } ] } }
    })
    .to_string();
    let ev = hooks
        .verify_and_parse(
            Platform::GitLab,
            &gl_headers("Issue Hook", "gl-secret-token", "i"),
            issue.as_bytes(),
        )
        .expect("parses");
    assert_eq!(
        (ev.action.as_deref(), ev.issue),
        (Some("labeled"), Some(23))
    );
    assert_eq!(ev.labels, vec!["aiwg".to_owned()]);
}

// ---------------------------------------------------------------- Slack

const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SLACK_TS: i64 = 1_531_420_618;
const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";

fn slack_headers(body: &[u8], ts: i64) -> http::HeaderMap {
    let ts = ts.to_string();
    let sig = format!(
        "v0={}",
        hmac_hex(
            SLACK_SECRET.as_bytes(),
            &[b"v0:", ts.as_bytes(), b":", body]
        )
    );
    headers(&[
        ("x-slack-request-timestamp", &ts),
        ("x-slack-signature", &sig),
        ("content-type", "application/x-www-form-urlencoded"),
    ])
}

fn slack_hooks(command: &str) -> TestHooks {
    let config: TriggersConfig = serde_norway::from_str(&format!(
        "slack: {{ signing_secret: \"{SLACK_SECRET}\", command: \"{command}\" }}"
    ))
    .expect("config");
    TestHooks {
        config,
        ..hooks_at("{}", SLACK_TS + 10)
    }
}

#[test]
fn slack_peers_vector_and_negatives() {
    let secret = Secret::new(SLACK_SECRET);
    let body = SLACK_BODY.as_bytes();
    let h = headers(&[
        ("x-slack-request-timestamp", "1531420618"),
        (
            "x-slack-signature",
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
        ),
    ]);
    assert_eq!(slack::verify(&secret, &h, body, SLACK_TS), Ok(()));
    assert_eq!(slack::verify(&secret, &h, body, SLACK_TS + 300), Ok(()));
    assert_eq!(slack::verify(&secret, &h, body, SLACK_TS - 300), Ok(()));
    assert_eq!(
        slack::verify(&secret, &h, body, SLACK_TS + 301),
        Err(VerifyError::StaleTimestamp)
    );
    assert_eq!(
        slack::verify(&secret, &h, body, SLACK_TS - 301),
        Err(VerifyError::FutureTimestamp)
    );
    assert_eq!(
        slack::verify(&secret, &h, &body[1..], SLACK_TS),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        slack::verify(
            &Secret::new("8f742231b10e8888abcd99yyyzzz85a6"),
            &h,
            body,
            SLACK_TS
        ),
        Err(VerifyError::Mismatch)
    );
    assert_eq!(
        slack::verify(&Secret::new(""), &h, body, SLACK_TS),
        Err(VerifyError::NotConfigured)
    );
    let truncated = headers(&[
        ("x-slack-request-timestamp", "1531420618"),
        (
            "x-slack-signature",
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b5",
        ),
    ]);
    assert_eq!(
        slack::verify(&secret, &truncated, body, SLACK_TS),
        Err(VerifyError::MalformedSignature)
    );
    let no_ts = headers(&[("x-slack-signature", "v0=00")]);
    assert_eq!(
        slack::verify(&secret, &no_ts, body, SLACK_TS),
        Err(VerifyError::MissingHeader("x-slack-request-timestamp"))
    );
    let bad_ts = headers(&[
        ("x-slack-request-timestamp", "soon"),
        ("x-slack-signature", "v0=00"),
    ]);
    assert_eq!(
        slack::verify(&secret, &bad_ts, body, SLACK_TS),
        Err(VerifyError::MalformedHeader("x-slack-request-timestamp"))
    );
}

#[tokio::test]
async fn slack_slash_command() {
    // Slack's documented example request: command /webhook-collect with empty text → help, ephemeral.
    let hooks = slack_hooks("/webhook-collect");
    let r = hooks
        .handle(
            "slack",
            &slack_headers(SLACK_BODY.as_bytes(), SLACK_TS),
            SLACK_BODY.as_bytes(),
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(matches!(r.outcome, HookOutcome::Help(_)));
    let j = r.json().expect("json");
    assert_eq!(j["response_type"], "ephemeral");
    assert!(j["text"].as_str().expect("text").contains("`review`"));

    // Another command is not ours.
    let other = slack_hooks("/aiwg");
    let r = other
        .handle(
            "slack",
            &slack_headers(SLACK_BODY.as_bytes(), SLACK_TS),
            SLACK_BODY.as_bytes(),
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::OtherCommand("/webhook-collect".into()))
    );

    // A real command with --project.
    let body = SLACK_BODY
        .replace("command=%2Fwebhook-collect", "command=%2Faiwg")
        .replace(
            "text=",
            "text=fix+--project+octo%2Fapp+--level%3D2+%E2%80%9Cthe+login+bug%E2%80%9D",
        );
    let (sub, seen) = capturing(1);
    let r = other
        .handle(
            "slack",
            &slack_headers(body.as_bytes(), SLACK_TS),
            body.as_bytes(),
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 200, "{:?}", r.outcome);
    let HookOutcome::Submitted { job_id, .. } = &r.outcome else {
        panic!("{:?}", r.outcome)
    };
    let j = r.json().expect("json");
    assert_eq!(j["response_type"], "ephemeral");
    assert!(j["text"]
        .as_str()
        .expect("text")
        .contains(&job_id.to_string()));
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(req.workflow, "fix");
    assert_eq!(req.project.as_deref(), Some("octo/app"));
    assert_eq!(req.params["level"], "2");
    assert_eq!(req.guidance.as_deref(), Some("the login bug"));
    assert_eq!(req.trigger.actor.as_deref(), Some("U2CERLKJA"));
    assert_eq!(
        req.reply_credentials.get("slack_response_url"),
        Some("https://hooks.slack.com/commands/T1DC2JH3J/397700885554/96rGlfmibIGlgcZRskXaIFfN")
    );
    assert!(
        !req.trigger.extra.contains_key("slack_response_url"),
        "a capability is never public trigger data"
    );
    assert_eq!(
        req.trigger.delivery_id.as_deref(),
        Some("398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c")
    );
    // stale → 401
    let r = other
        .handle(
            "slack",
            &slack_headers(body.as_bytes(), SLACK_TS - 400),
            body.as_bytes(),
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::StaleTimestamp)
    );
}

#[tokio::test]
async fn slack_events_api() {
    let hooks = slack_hooks("/aiwg");
    let body = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let mut h = slack_headers(body, SLACK_TS);
    h.insert("content-type", "application/json".parse().expect("v"));
    let r = hooks.handle("slack", &h, body, &never()).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("content-type").unwrap_or_default()
        ),
        (200, "application/json")
    );
    assert_eq!(
        r.json().expect("json"),
        json!({ "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P" })
    );

    let mention = json!({
        "type": "event_callback", "team_id": "T1", "event_id": "Ev123",
        "event": { "type": "app_mention", "user": "U1", "text": "<@U0BOT> review --project octo/app please", "channel": "C1", "ts": "1.2" }
    })
    .to_string();
    let mut h = slack_headers(mention.as_bytes(), SLACK_TS);
    h.insert("content-type", "application/json".parse().expect("v"));
    let (sub, seen) = capturing(1);
    let r = hooks.handle("slack", &h, mention.as_bytes(), &sub).await;
    assert_eq!(r.status.as_u16(), 200);
    // Slack retries the same event_id: de-duplicated.
    h.insert("x-slack-retry-num", "1".parse().expect("v"));
    let again = hooks.handle("slack", &h, mention.as_bytes(), &sub).await;
    assert_eq!(again.json().expect("json"), r.json().expect("json"));
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(
        (req.workflow.as_str(), req.guidance.as_deref()),
        ("review", Some("please"))
    );
    assert_eq!(req.trigger.extra["slack_channel"], "C1");
    assert_eq!(req.trigger.delivery_id.as_deref(), Some("Ev123"));

    let bot = json!({ "type": "event_callback", "event_id": "Ev2",
        "event": { "type": "app_mention", "bot_id": "B1", "text": "<@U0BOT> review" } })
    .to_string();
    let mut h = slack_headers(bot.as_bytes(), SLACK_TS);
    h.insert("content-type", "application/json".parse().expect("v"));
    let r = hooks.handle("slack", &h, bot.as_bytes(), &never()).await;
    assert!(matches!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::Bot(_))
    ));
}

// ---------------------------------------------------------------- Discord

/// RFC 8032 test 1.
const RFC8032_SECRET: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const RFC8032_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn discord_headers(body: &[u8], ts: &str) -> http::HeaderMap {
    let bytes: [u8; 32] = hex::decode(RFC8032_SECRET)
        .expect("hex")
        .try_into()
        .expect("32");
    let key = SigningKey::from_bytes(&bytes);
    let mut msg = ts.as_bytes().to_vec();
    msg.extend_from_slice(body);
    let sig = hex::encode(key.sign(&msg).to_bytes());
    headers(&[("x-signature-ed25519", &sig), ("x-signature-timestamp", ts)])
}

fn discord_hooks() -> TestHooks {
    hooks(&format!(
        "discord: {{ public_key: \"{RFC8032_PUBLIC}\", allowed_roles: [\"42\"] }}"
    ))
}

#[test]
fn discord_rfc8032_key_and_negatives() {
    // RFC 8032 test 1: the empty message.
    let key = discord::public_key(RFC8032_PUBLIC).expect("key");
    let bytes: [u8; 32] = hex::decode(RFC8032_SECRET)
        .expect("hex")
        .try_into()
        .expect("32");
    assert_eq!(SigningKey::from_bytes(&bytes).verifying_key(), key);
    let rfc_sig = "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";
    let h = headers(&[
        ("x-signature-ed25519", rfc_sig),
        ("x-signature-timestamp", ""),
    ]);
    // An empty timestamp header is refused before the signature is checked.
    assert_eq!(
        discord::verify(&key, &h, b""),
        Err(VerifyError::MalformedHeader("x-signature-timestamp"))
    );
    let body = br#"{"type":1}"#;
    let h = discord_headers(body, "1700000000");
    assert_eq!(discord::verify(&key, &h, body), Ok(()));
    assert_eq!(
        discord::verify(&key, &h, br#"{"type":2}"#),
        Err(VerifyError::Mismatch)
    );
    let mut other_ts = h.clone();
    other_ts.insert("x-signature-timestamp", "1700000001".parse().expect("v"));
    assert_eq!(
        discord::verify(&key, &other_ts, body),
        Err(VerifyError::Mismatch)
    );
    let sig = h["x-signature-ed25519"].to_str().expect("ascii").to_owned();
    let mut truncated = h.clone();
    truncated.insert("x-signature-ed25519", sig[..120].parse().expect("v"));
    assert_eq!(
        discord::verify(&key, &truncated, body),
        Err(VerifyError::MalformedSignature)
    );
    let mut missing = h.clone();
    missing.remove("x-signature-ed25519");
    assert_eq!(
        discord::verify(&key, &missing, body),
        Err(VerifyError::MissingHeader("x-signature-ed25519"))
    );
    assert!(discord::public_key("abcd").is_err());
}

#[tokio::test]
async fn discord_ping_and_commands() {
    let hooks = discord_hooks();
    let ping = br#"{"type":1,"id":"1","application_id":"2","token":"t","version":1}"#;
    let r = hooks
        .handle(
            "discord",
            &discord_headers(ping, "1700000000"),
            ping,
            &never(),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json().expect("json")),
        (200, json!({ "type": 1 }))
    );
    // A signed interaction replayed outside the ±5 minute window: 401.
    let stale = hooks
        .handle(
            "discord",
            &discord_headers(ping, "1699999000"),
            ping,
            &never(),
        )
        .await;
    assert_eq!(stale.status.as_u16(), 401);
    assert_eq!(
        stale.outcome,
        HookOutcome::Unauthorized(VerifyError::StaleTimestamp)
    );
    // Discord's probe: a bad signature must be 401.
    let mut bad = discord_headers(ping, "1700000000");
    bad.insert("x-signature-timestamp", "1700000099".parse().expect("v"));
    let r = hooks.handle("discord", &bad, ping, &never()).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("content-type").unwrap_or_default()
        ),
        (401, "application/problem+json")
    );

    let command = json!({
        "type": 2, "id": "1100", "application_id": "2200", "token": "interaction-token",
        "guild_id": "9", "channel_id": "8",
        "member": { "user": { "id": "77", "username": "alice" }, "roles": ["42"] },
        "data": { "id": "5", "name": "aiwg", "type": 1, "options": [
            { "name": "review", "type": 1, "options": [
                { "name": "depth", "type": 4, "value": 2 },
                { "name": "project", "type": 3, "value": "octo/app" },
                { "name": "guidance", "type": 3, "value": "be thorough" } ] } ] }
    })
    .to_string();
    let (sub, seen) = capturing(1);
    let h = discord_headers(command.as_bytes(), "1700000000");
    let r = hooks.handle("discord", &h, command.as_bytes(), &sub).await;
    assert_eq!(
        (r.status.as_u16(), r.json().expect("json")),
        (200, json!({ "type": 5 })),
        "{:?}",
        r.outcome
    );
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(req.workflow, "review");
    assert_eq!(req.params["depth"], "2");
    assert_eq!(req.project.as_deref(), Some("octo/app"));
    assert_eq!(req.guidance.as_deref(), Some("be thorough"));
    assert_eq!(req.trigger.actor.as_deref(), Some("77"));
    assert_eq!(
        req.reply_credentials.get("discord_token"),
        Some("interaction-token")
    );
    assert!(!req.trigger.extra.contains_key("discord_token"));
    assert_eq!(req.trigger.extra["discord_application_id"], "2200");
    assert_eq!(req.trigger.delivery_id.as_deref(), Some("1100"));

    // A member without the role gets an ephemeral refusal (type 4, flag 64).
    let no_role = command
        .replace("[\"42\"]", "[\"1\"]")
        .replace("1100", "1101");
    let r = hooks
        .handle(
            "discord",
            &discord_headers(no_role.as_bytes(), "1700000000"),
            no_role.as_bytes(),
            &never(),
        )
        .await;
    let j = r.json().expect("json");
    assert_eq!(
        (j["type"].as_u64(), j["data"]["flags"].as_u64()),
        (Some(4), Some(64))
    );
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::RoleNotAllowed)
    );

    // A single text option goes through the grammar; `help` lists workflows.
    let text = json!({ "type": 2, "id": "1200", "application_id": "2", "token": "t",
        "member": { "user": { "id": "77" }, "roles": ["42"] },
        "data": { "name": "aiwg", "options": [ { "name": "text", "type": 3, "value": "help" } ] } })
    .to_string();
    let r = hooks
        .handle(
            "discord",
            &discord_headers(text.as_bytes(), "1700000000"),
            text.as_bytes(),
            &never(),
        )
        .await;
    assert!(matches!(r.outcome, HookOutcome::Help(_)));
    assert!(r.json().expect("json")["data"]["content"]
        .as_str()
        .expect("content")
        .contains("`fix`"));
    let ev = hooks
        .verify_and_parse(
            Platform::Discord,
            &discord_headers(text.as_bytes(), "1700000000"),
            text.as_bytes(),
        )
        .expect("parses");
    assert_eq!(
        (ev.kind, ev.text.as_deref()),
        (EventKind::ChatCommand, Some("help"))
    );
}

#[tokio::test]
async fn discord_bad_public_key_fails_the_build() {
    let config: TriggersConfig =
        serde_norway::from_str("discord: { public_key: \"zz\" }").expect("config");
    let err = Hooks::builder(config, common::engine().engine.clone())
        .build()
        .expect_err("bad key");
    assert!(matches!(err, BuildError::InvalidKey { ref key, .. } if key == "discord.public_key"));
    // Empty key: builds, refuses everything.
    let hooks = hooks("discord: { public_key: \"\" }");
    let r = hooks.verify_and_parse(
        Platform::Discord,
        &discord_headers(b"{}", "1700000000"),
        b"{}",
    );
    assert_eq!(
        r.err(),
        Some(HookOutcome::Unauthorized(VerifyError::NotConfigured))
    );
}

// ---------------------------------------------------------------- Gitea, Bitbucket, generic

#[tokio::test]
async fn gitea_and_forgejo() {
    // Gitea's comment payloads name no author association and not the pull request's origin:
    // by default nobody may trigger, and an unknown origin counts as a fork.
    let outsider_check = hooks("gitea: { secret: gt-secret }");
    let fork_check = hooks("gitea: { secret: gt-secret, allowed_users: [alice] }");
    let hooks = hooks("gitea: { secret: gt-secret, allowed_users: [alice], fork_policy: allow }");
    let body = json!({
        "action": "created", "is_pull": true,
        "issue": { "number": 4, "pull_request": { "merged": false }, "user": { "login": "alice" } },
        "comment": { "id": 5, "body": "@aiwg fix --x y", "user": { "login": "alice" } },
        "repository": { "full_name": "org/repo", "clone_url": "https://gitea.example.com/org/repo.git", "default_branch": "main" },
        "sender": { "login": "alice" }
    })
    .to_string();
    let sig = hmac_hex(b"gt-secret", &[body.as_bytes()]);
    let h = headers(&[
        ("x-gitea-signature", &sig),
        ("x-gitea-event", "issue_comment"),
        ("x-gitea-delivery", "g-0"),
    ]);
    let r = outsider_check
        .handle("gitea", &h, body.as_bytes(), &never())
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.json().expect("json"),
        json!({ "ignored": "not authorized" })
    );
    let r = fork_check
        .handle("gitea", &h, body.as_bytes(), &never())
        .await;
    assert_eq!(r.outcome, HookOutcome::Ignored(IgnoreReason::ForkRefused));
    for (sig_header, event_header, delivery_header) in [
        ("x-gitea-signature", "x-gitea-event", "x-gitea-delivery"),
        (
            "x-forgejo-signature",
            "x-forgejo-event",
            "x-forgejo-delivery",
        ),
    ] {
        let h = headers(&[
            (sig_header, &sig),
            (event_header, "issue_comment"),
            (delivery_header, sig_header),
        ]);
        // A fresh store per header flavour: the second is the same signed comment, which one
        // store would (rightly) take for a replay.
        let hooks = hooks_clone_fresh(&hooks);
        let (sub, seen) = capturing(1);
        let r = hooks.handle("forgejo", &h, body.as_bytes(), &sub).await;
        assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
        let req = seen.lock().expect("lock").pop().expect("request");
        assert_eq!(
            (req.trigger.source.as_str(), req.trigger.pr),
            ("gitea", Some(4))
        );
        assert_eq!(req.project.as_deref(), Some("org/repo"));
    }
    let h = headers(&[
        ("x-gitea-signature", &format!("sha256={sig}")),
        ("x-gitea-event", "issue_comment"),
    ]);
    assert_eq!(
        hooks
            .handle("gitea", &h, body.as_bytes(), &never())
            .await
            .status
            .as_u16(),
        401
    );
    let h = headers(&[
        ("x-gitea-signature", &sig),
        ("x-gitea-event", "issue_comment"),
    ]);
    assert_eq!(
        hooks
            .handle("gitea", &h, b"{}", &never())
            .await
            .status
            .as_u16(),
        401
    );
}

#[tokio::test]
async fn bitbucket_comment() {
    let hooks = hooks("bitbucket: { secret: bb-secret, allowed_users: [alice] }");
    let closed = common::hooks("bitbucket: { secret: bb-secret }");
    let outsider = common::hooks("bitbucket: { secret: bb-secret, allowed_users: [bob] }");
    let body = json!({
        "actor": { "display_name": "Alice", "nickname": "alice", "account_id": "557058:1", "type": "user" },
        "repository": { "full_name": "team/repo", "links": { "html": { "href": "https://bitbucket.org/team/repo" } }, "mainbranch": { "name": "main" } },
        "pullrequest": { "id": 12,
            "source": { "branch": { "name": "feat" }, "commit": { "hash": "abc" }, "repository": { "full_name": "team/repo" } },
            "destination": { "branch": { "name": "main" }, "repository": { "full_name": "team/repo" } } },
        "comment": { "id": 3, "content": { "raw": "@aiwg review now" } }
    })
    .to_string();
    let sig = format!("sha256={}", hmac_hex(b"bb-secret", &[body.as_bytes()]));
    let h = headers(&[
        ("x-hub-signature", &sig),
        ("x-event-key", "pullrequest:comment_created"),
        ("x-request-uuid", "bb-1"),
    ]);
    let r = closed
        .handle("bitbucket", &h, body.as_bytes(), &never())
        .await;
    assert_eq!(
        r.json().expect("json"),
        json!({ "ignored": "not authorized" })
    );
    let r = outsider
        .handle("bitbucket", &h, body.as_bytes(), &never())
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::UserNotAllowed("alice".into()))
    );
    // Nor does a display name set to an allowed login.
    let renamed = body.replace("\"display_name\":\"Alice\"", "\"display_name\":\"bob\"");
    assert_ne!(renamed, body);
    let renamed_sig = format!("sha256={}", hmac_hex(b"bb-secret", &[renamed.as_bytes()]));
    let renamed_h = headers(&[
        ("x-hub-signature", &renamed_sig),
        ("x-event-key", "pullrequest:comment_created"),
        ("x-request-uuid", "bb-renamed"),
    ]);
    let r = outsider
        .handle("bitbucket", &renamed_h, renamed.as_bytes(), &never())
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::UserNotAllowed("alice".into()))
    );
    let (sub, seen) = capturing(1);
    let r = hooks.handle("bitbucket", &h, body.as_bytes(), &sub).await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(
        (req.workflow.as_str(), req.trigger.pr),
        ("review", Some(12))
    );
    assert_eq!(
        req.trigger.extra["clone_url"],
        "https://bitbucket.org/team/repo.git"
    );
    assert_eq!(req.trigger.extra["head_sha"], "abc");
    let mut no_key = h.clone();
    no_key.remove("x-event-key");
    assert_eq!(
        hooks
            .handle("bitbucket", &no_key, body.as_bytes(), &never())
            .await
            .status
            .as_u16(),
        400
    );
    let mut wrong = h.clone();
    wrong.insert(
        "x-hub-signature",
        format!("sha256={}", hmac_hex(b"other", &[body.as_bytes()]))
            .parse()
            .expect("v"),
    );
    assert_eq!(
        hooks
            .handle("bitbucket", &wrong, body.as_bytes(), &never())
            .await
            .status
            .as_u16(),
        401
    );
}

#[tokio::test]
async fn generic_standard_webhooks_and_bearer() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let hooks = hooks(&format!(
        "generic: {{ secret: \"{secret}\", rules: [ {{ event: invoice.paid, workflow: fix }} ] }}"
    ));
    let wh = standardwebhooks::Webhook::new(secret).expect("key");
    let body =
        br#"{"workflow":"review","project":"octo/app","guidance":"hi","params":{"n":3,"s":"x"}}"#;
    let sign = |id: &str, ts: i64, body: &[u8]| {
        headers(&[
            ("webhook-id", id),
            ("webhook-timestamp", &ts.to_string()),
            ("webhook-signature", &wh.sign(id, ts, body).expect("signs")),
        ])
    };
    let (sub, seen) = capturing(1);
    let r = hooks
        .handle("generic", &sign("msg_1", NOW, body), body, &sub)
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(req.project.as_deref(), Some("octo/app"));
    assert_eq!(
        (req.params["n"].as_str(), req.params["s"].as_str()),
        ("3", "x")
    );
    assert_eq!(req.trigger.delivery_id.as_deref(), Some("msg_1"));
    // stale, future, tampered
    let r = hooks
        .handle("generic", &sign("msg_2", NOW - 301, body), body, &never())
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::StaleTimestamp)
    );
    let r = hooks
        .handle("generic", &sign("msg_3", NOW + 301, body), body, &never())
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::FutureTimestamp)
    );
    let r = hooks
        .handle("generic", &sign("msg_4", NOW, body), b"{}", &never())
        .await;
    assert_eq!(r.outcome, HookOutcome::Unauthorized(VerifyError::Mismatch));
    // an event mapped by a rule
    let event = br#"{"type":"invoice.paid","data":{}}"#;
    let (sub, seen) = capturing(1);
    assert_eq!(
        hooks
            .handle("generic", &sign("msg_5", NOW, event), event, &sub)
            .await
            .status
            .as_u16(),
        202
    );
    assert_eq!(seen.lock().expect("lock")[0].workflow, "fix");

    let bearer = common::hooks("generic: { token: t0ken }");
    let text = br#"{"text":"review --depth 1 quickly"}"#;
    let (sub, seen) = capturing(1);
    let h = headers(&[("authorization", "Bearer t0ken")]);
    assert_eq!(
        bearer
            .handle("generic", &h, text, &sub)
            .await
            .status
            .as_u16(),
        202
    );
    assert_eq!(
        seen.lock().expect("lock")[0].guidance.as_deref(),
        Some("quickly")
    );
    // The scheme in any case, as on the API's endpoints.
    let (sub, _) = capturing(1);
    let text2 = br#"{"text":"review --depth 1 again"}"#;
    let h = headers(&[("authorization", "BEARER t0ken")]);
    assert_eq!(
        bearer
            .handle("generic", &h, text2, &sub)
            .await
            .status
            .as_u16(),
        202
    );
    let h = headers(&[("authorization", "Basic t0ken")]);
    let r = bearer.handle("generic", &h, text, &never()).await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::MalformedHeader("authorization"))
    );
    let h = headers(&[("authorization", "Bearer t0ke")]);
    let r = bearer.handle("generic", &h, text, &never()).await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::TokenMismatch)
    );
    let none = common::hooks("generic: {}");
    let r = none
        .handle(
            "generic",
            &headers(&[("authorization", "Bearer ")]),
            text,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::NotConfigured)
    );
}

// ---------------------------------------------------------------- secrets never leak

#[tokio::test]
async fn no_secret_in_debug_display_or_responses() {
    let secrets = [
        "gh-SECRET-1",
        "gl-SECRET-2",
        "whsec_c2VjcmV0LWtleS1ieXRlcw==",
        "slack-SECRET-4",
        "gt-SECRET-5",
        "bb-SECRET-6",
        "tok-SECRET-7",
    ];
    let yaml = format!(
        "github: {{ secret: {} }}\ngitlab: {{ token: {}, signing_secret: \"{}\" }}\nslack: {{ signing_secret: {} }}\ngitea: {{ secret: {} }}\nbitbucket: {{ secret: {} }}\ngeneric: {{ token: {} }}\n",
        secrets[0], secrets[1], secrets[2], secrets[3], secrets[4], secrets[5], secrets[6]
    );
    let config: TriggersConfig = serde_norway::from_str(&yaml).expect("config");
    let hooks = Hooks::builder(config.clone(), common::engine().engine.clone())
        .build()
        .expect("builds");
    let mut texts = vec![
        format!("{config:?}"),
        format!("{hooks:?}"),
        format!(
            "{:?}",
            Hooks::builder(config, common::engine().engine.clone())
        ),
    ];
    let body = b"{\"action\":\"created\"}";
    for platform in ["github", "gitlab", "slack", "gitea", "bitbucket", "generic"] {
        // A signature made with the right secret but over other bytes: the expected one must
        // not be echoed.
        let h = headers(&[
            (
                "x-hub-signature-256",
                &format!("sha256={}", hmac_hex(secrets[0].as_bytes(), &[b"x"])),
            ),
            ("x-gitlab-token", "nope"),
            ("authorization", "Bearer nope"),
        ]);
        let r = hooks.handle(platform, &h, body).await;
        assert_eq!(r.status.as_u16(), 401, "{platform}");
        texts.push(String::from_utf8_lossy(r.body_bytes().expect("full body")).into_owned());
        texts.push(format!("{r:?}"));
        if let HookOutcome::Unauthorized(e) = &r.outcome {
            texts.push(e.to_string());
        }
    }
    let expected_sig = hmac_hex(secrets[0].as_bytes(), &[body]);
    for text in &texts {
        for s in secrets {
            assert!(!text.contains(s), "leaked {s} in {text}");
        }
        assert!(
            !text.contains("c2VjcmV0LWtleS1ieXRlcw"),
            "leaked key in {text}"
        );
        assert!(
            !text.contains(&expected_sig),
            "leaked the expected signature in {text}"
        );
    }
}

// ---------------------------------------------------------------- who may trigger

#[tokio::test]
async fn forges_without_associations_fail_closed_without_allowed_users() {
    // GitLab with only its token: nobody is authorized, comments and rules alike.
    let closed = hooks("gitlab: { token: gl-secret-token, rules: [ { event: pull_request, action: opened, workflow: review } ] }");
    let body = gl_note_on_mr("@aiwg review", "mallory", 15);
    let h = gl_headers("Note Hook", "gl-secret-token", "uuid-x");
    let r = closed.handle("gitlab", &h, &body, &never()).await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.json().expect("json"),
        json!({ "ignored": "not authorized" })
    );
    // The allowed user is accepted once the rule names them; an outsider is still ignored.
    let open = hooks(GL);
    let (sub, _) = capturing(1);
    let ok = gl_note_on_mr("@aiwg review", "alice", 15);
    let r = open
        .handle(
            "gitlab",
            &gl_headers("Note Hook", "gl-secret-token", "uuid-y"),
            &ok,
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let r = open.handle("gitlab", &h, &body, &never()).await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::UserNotAllowed("mallory".into()))
    );
}

#[tokio::test]
async fn slack_channels_teams_and_discord_servers_can_be_restricted() {
    let body = "token=x&team_id=T1&channel_id=C1&user_id=U1&command=%2Faiwg&text=fix&response_url=https%3A%2F%2Fhooks.slack.com%2Fx&trigger_id=9.9.9";
    let slack = |extra: &str| TestHooks {
        config: serde_norway::from_str(&format!(
            "slack: {{ signing_secret: \"{SLACK_SECRET}\", command: /aiwg, {extra} }}"
        ))
        .expect("config"),
        ..hooks_at("{}", SLACK_TS + 10)
    };
    let h = slack_headers(body.as_bytes(), SLACK_TS);
    for (extra, refused) in [
        (
            "allowed_channels: [C2]",
            Some("channel `C1` is not allowed to trigger workflows"),
        ),
        (
            "allowed_teams: [T2]",
            Some("workspace `T1` is not allowed to trigger workflows"),
        ),
        (
            "allowed_users: [U2]",
            Some("sender `U1` is not allowed to trigger workflows"),
        ),
        (
            "allowed_channels: [C1], allowed_teams: [T1], allowed_users: [U1]",
            None,
        ),
    ] {
        let hooks = slack(extra);
        match refused {
            Some(why) => {
                let r = hooks.handle("slack", &h, body.as_bytes(), &never()).await;
                let text = r.json().expect("json")["text"]
                    .as_str()
                    .expect("text")
                    .to_owned();
                assert!(text.contains(why), "{extra}: {text}");
            }
            None => {
                let (sub, _) = capturing(1);
                let r = hooks.handle("slack", &h, body.as_bytes(), &sub).await;
                assert!(
                    matches!(r.outcome, HookOutcome::Submitted { .. }),
                    "{extra}: {:?}",
                    r.outcome
                );
            }
        }
    }

    let command = json!({ "type": 2, "id": "5500", "application_id": "2200", "token": "t",
        "guild_id": "G1", "channel_id": "C1",
        "member": { "user": { "id": "77" }, "roles": ["42"] },
        "data": { "name": "aiwg", "options": [ { "name": "text", "type": 3, "value": "fix" } ] } })
    .to_string();
    let h = discord_headers(command.as_bytes(), "1700000000");
    let guarded = hooks(&format!(
        "discord: {{ public_key: \"{RFC8032_PUBLIC}\", allowed_guilds: [\"G2\"] }}"
    ));
    let r = guarded
        .handle("discord", &h, command.as_bytes(), &never())
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::PlaceNotAllowed("server `G1`".into()))
    );
    let open = hooks(&format!(
        "discord: {{ public_key: \"{RFC8032_PUBLIC}\", allowed_guilds: [\"G1\"] }}"
    ));
    let (sub, _) = capturing(1);
    let r = open.handle("discord", &h, command.as_bytes(), &sub).await;
    assert!(
        matches!(r.outcome, HookOutcome::Submitted { .. }),
        "{:?}",
        r.outcome
    );
}
