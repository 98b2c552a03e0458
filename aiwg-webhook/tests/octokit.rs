//! Every payload of `@octokit/webhooks-examples` (path of its `index.json` in
//! `AIWG_TEST_OCTOKIT_EXAMPLES`) verifies and parses; `issue_comment`, `pull_request` and
//! `pull_request_review_comment` give the expected fields.

mod common;

use aiwg_webhook::platform::github;
use aiwg_webhook::{EventKind, Hooks, InboundEvent, Platform, TriggersConfig};
use common::{headers, hmac_hex};
use serde_json::Value;

fn examples() -> Option<Vec<Value>> {
    let Ok(path) = std::env::var("AIWG_TEST_OCTOKIT_EXAMPLES") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "AIWG_TEST_OCTOKIT_EXAMPLES must be set in CI (bash scripts/install-peers.sh; source .peers/env)"
        );
        eprintln!("skipping: AIWG_TEST_OCTOKIT_EXAMPLES is not set (source .peers/env)");
        return None;
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    match serde_json::from_str(&text).expect("index.json is JSON") {
        Value::Array(events) => Some(events),
        _ => panic!("index.json is not an array"),
    }
}

fn parse(event: &str, payload: &Value) -> InboundEvent {
    let body = serde_json::to_vec(payload).expect("serializes");
    let h = headers(&[
        ("x-github-event", event),
        ("x-github-delivery", "00000000-0000-0000-0000-000000000000"),
        ("content-type", "application/json"),
    ]);
    github::parse(&h, &body).unwrap_or_else(|e| panic!("{event}: {e}"))
}

fn s(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn n(v: &Value, pointer: &str) -> Option<u64> {
    v.pointer(pointer).and_then(Value::as_u64)
}

#[tokio::test]
async fn every_example_verifies_and_parses() {
    let Some(events) = examples() else { return };
    let config: TriggersConfig =
        serde_norway::from_str("github: { secret: octokit-test }").expect("config");
    let hooks = Hooks::builder(config, common::engine().engine.clone())
        .build()
        .expect("builds");
    let mut count = 0;
    for event in &events {
        let name = event["name"].as_str().expect("name");
        for payload in event["examples"].as_array().expect("examples") {
            let body = serde_json::to_vec(payload).expect("serializes");
            let sig = format!("sha256={}", hmac_hex(b"octokit-test", &[&body]));
            let h = headers(&[
                ("x-github-event", name),
                ("x-github-delivery", "d"),
                ("x-hub-signature-256", &sig),
            ]);
            let ev = hooks
                .verify_and_parse(Platform::GitHub, &h, &body)
                .unwrap_or_else(|o| panic!("{name}: {o:?}"));
            assert_eq!(ev.platform_event, name);
            assert_eq!(ev.delivery_id.as_deref(), Some("d"));
            // The typed parse (not the tolerant fallback) read these:
            assert_eq!(
                ev.repository.as_ref().map(|r| r.full_name.clone()),
                s(payload, "/repository/full_name"),
                "{name}: repository"
            );
            assert_eq!(
                ev.action,
                s(payload, "/action").map(|a| a.replace("synchronized", "synchronize")),
                "{name}: action"
            );
            if name == "ping" {
                assert_eq!(ev.kind, EventKind::Ping);
            }
            count += 1;
        }
    }
    assert!(count > 300, "only {count} examples");
}

#[test]
fn issue_comment_fields() {
    let Some(events) = examples() else { return };
    let list = events
        .iter()
        .find(|e| e["name"] == "issue_comment")
        .expect("issue_comment");
    let mut seen = 0;
    for p in list["examples"].as_array().expect("examples") {
        let ev = parse("issue_comment", p);
        let created = s(p, "/action").as_deref() == Some("created");
        assert_eq!(ev.kind == EventKind::Comment, created);
        assert_eq!(ev.event, "comment");
        assert_eq!(ev.text, s(p, "/comment/body"));
        let actor = ev.actor.as_ref().expect("actor");
        assert_eq!(Some(actor.login.clone()), s(p, "/comment/user/login"));
        assert_eq!(actor.association, s(p, "/comment/author_association"));
        assert_eq!(
            actor.is_bot,
            s(p, "/comment/user/type").as_deref() == Some("Bot")
        );
        let is_pr = p
            .pointer("/issue/pull_request")
            .is_some_and(|v| !v.is_null());
        assert_eq!(
            ev.pull_request.as_ref().map(|pr| pr.number),
            n(p, "/issue/number").filter(|_| is_pr)
        );
        assert_eq!(ev.issue, n(p, "/issue/number").filter(|_| !is_pr));
        assert_eq!(
            ev.reply.get("comment_id").cloned(),
            n(p, "/comment/id").map(|i| i.to_string())
        );
        let repo = ev.repository.as_ref().expect("repository");
        assert_eq!(repo.clone_url, s(p, "/repository/clone_url"));
        assert_eq!(repo.default_branch, s(p, "/repository/default_branch"));
        seen += 1;
    }
    assert!(seen >= 1);
}

#[test]
fn pull_request_fields() {
    let Some(events) = examples() else { return };
    let list = events
        .iter()
        .find(|e| e["name"] == "pull_request")
        .expect("pull_request");
    let mut seen = 0;
    for p in list["examples"].as_array().expect("examples") {
        let ev = parse("pull_request", p);
        assert_eq!(ev.event, "pull_request");
        assert_eq!(ev.kind, EventKind::Other);
        let pr = ev.pull_request.as_ref().expect("pull request");
        assert_eq!(Some(pr.number), n(p, "/pull_request/number"));
        assert_eq!(pr.head_ref, s(p, "/pull_request/head/ref"));
        assert_eq!(pr.head_sha, s(p, "/pull_request/head/sha"));
        assert_eq!(pr.base_ref, s(p, "/pull_request/base/ref"));
        assert_eq!(pr.head_repo, s(p, "/pull_request/head/repo/full_name"));
        assert_eq!(pr.head_clone_url, s(p, "/pull_request/head/repo/clone_url"));
        let fork =
            s(p, "/pull_request/head/repo/full_name") != s(p, "/pull_request/base/repo/full_name");
        assert_eq!(pr.from_fork, Some(fork));
        let actor = ev.actor.as_ref().expect("actor");
        assert_eq!(Some(actor.login.clone()), s(p, "/sender/login"));
        assert_eq!(actor.association, s(p, "/pull_request/author_association"));
        if ev.action.as_deref() == Some("labeled") {
            assert_eq!(ev.labels, vec![s(p, "/label/name").expect("label")]);
        }
        seen += 1;
    }
    assert!(seen >= 10);
}

#[test]
fn pull_request_review_comment_fields() {
    let Some(events) = examples() else { return };
    let list = events
        .iter()
        .find(|e| e["name"] == "pull_request_review_comment")
        .expect("pull_request_review_comment");
    let mut seen = 0;
    for p in list["examples"].as_array().expect("examples") {
        let ev = parse("pull_request_review_comment", p);
        assert_eq!(ev.event, "comment");
        assert_eq!(
            ev.kind == EventKind::Comment,
            s(p, "/action").as_deref() == Some("created")
        );
        assert_eq!(ev.text, s(p, "/comment/body"));
        let pr = ev.pull_request.as_ref().expect("pull request");
        assert_eq!(Some(pr.number), n(p, "/pull_request/number"));
        assert_eq!(pr.head_sha, s(p, "/pull_request/head/sha"));
        assert_eq!(pr.head_ref, s(p, "/pull_request/head/ref"));
        let actor = ev.actor.as_ref().expect("actor");
        assert_eq!(Some(actor.login.clone()), s(p, "/comment/user/login"));
        assert_eq!(actor.association, s(p, "/comment/author_association"));
        assert_eq!(
            ev.reply.get("commit_id").cloned(),
            s(p, "/comment/commit_id")
        );
        seen += 1;
    }
    assert!(seen >= 1);
}
