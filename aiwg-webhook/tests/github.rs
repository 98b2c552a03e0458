//! GitHub: GitHub's published test vector, negatives, and the whole pipeline through `Hooks::handle`.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use aiwg_core::test_util::MetricsCapture;
use aiwg_webhook::platform::github;
use aiwg_webhook::{HookOutcome, IgnoreReason, Secret, VerifyError};
use common::*;
use http::HeaderMap;
use serde_json::json;

const SECRET: &str = "It's a Secret to Everybody";
const CONFIG: &str = r#"
github:
  secret: "It's a Secret to Everybody"
  mention: "@aiwg"
  ignore_users: ["aiwg-app"]
  rules:
    - { event: pull_request, action: [opened, reopened], workflow: review, params: { depth: "1" } }
    - { event: issues, action: labeled, label: "aiwg:fix", workflow: fix }
"#;

fn signed(event: &str, delivery: &str, body: &[u8]) -> HeaderMap {
    let sig = format!("sha256={}", hmac_hex(SECRET.as_bytes(), &[body]));
    headers(&[
        ("x-github-event", event),
        ("x-github-delivery", delivery),
        ("x-hub-signature-256", &sig),
        ("content-type", "application/json"),
    ])
}

fn comment(text: &str, login: &str, kind: &str, association: &str) -> Vec<u8> {
    json!({
        "action": "created",
        "issue": { "number": 42, "pull_request": { "url": "https://api.github.com/repos/octo/app/pulls/42" },
                   "labels": [ { "name": "bug" } ] },
        "comment": { "id": 9001, "body": text, "html_url": "https://github.com/octo/app/pull/42#issuecomment-9001",
                     "user": { "login": login, "type": kind }, "author_association": association },
        "repository": { "full_name": "octo/app", "clone_url": "https://github.com/octo/app.git", "default_branch": "main" },
        "sender": { "login": login, "type": kind }
    })
    .to_string()
    .into_bytes()
}

fn pull_request(action: &str, head_repo: &str, association: &str) -> Vec<u8> {
    json!({
        "action": action,
        "number": 5,
        "pull_request": {
            "number": 5, "author_association": association, "user": { "login": "bob", "type": "User" },
            "head": { "ref": "feature", "sha": "abc123", "repo": { "full_name": head_repo, "clone_url": format!("https://github.com/{head_repo}.git") } },
            "base": { "ref": "main", "sha": "def456", "repo": { "full_name": "octo/app" } },
            "labels": []
        },
        "repository": { "full_name": "octo/app" },
        "sender": { "login": "bob", "type": "User" }
    })
    .to_string()
    .into_bytes()
}

#[test]
fn peers_vector_and_negatives() {
    let secret = Secret::new(SECRET);
    let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let h = headers(&[("x-hub-signature-256", good)]);
    assert_eq!(github::verify(&secret, &h, b"Hello, World!"), Ok(()));
    assert_eq!(github::sign(SECRET, b"Hello, World!"), good);
    // tampered body
    assert_eq!(
        github::verify(&secret, &h, b"Hello, World"),
        Err(VerifyError::Mismatch)
    );
    // wrong secret
    assert_eq!(
        github::verify(
            &Secret::new("It's a secret to everybody"),
            &h,
            b"Hello, World!"
        ),
        Err(VerifyError::Mismatch)
    );
    // truncated signature
    let truncated = headers(&[("x-hub-signature-256", &good[..70])]);
    assert_eq!(
        github::verify(&secret, &truncated, b"Hello, World!"),
        Err(VerifyError::MalformedSignature)
    );
    // no prefix, or the SHA-1 header only
    let bare = headers(&[("x-hub-signature-256", &good[7..])]);
    assert_eq!(
        github::verify(&secret, &bare, b"Hello, World!"),
        Err(VerifyError::MalformedSignature)
    );
    let sha1 = headers(&[("x-hub-signature", "sha1=0123")]);
    assert_eq!(
        github::verify(&secret, &sha1, b"Hello, World!"),
        Err(VerifyError::MissingHeader("x-hub-signature-256"))
    );
    // empty header
    let empty = headers(&[("x-hub-signature-256", "")]);
    assert_eq!(
        github::verify(&secret, &empty, b"Hello, World!"),
        Err(VerifyError::MalformedHeader("x-hub-signature-256"))
    );
    // empty secret: fail closed, even with a signature made with the empty key
    let sig_empty_key = format!("sha256={}", hmac_hex(b"", &[b"Hello, World!"]));
    let h = headers(&[("x-hub-signature-256", &sig_empty_key)]);
    assert_eq!(
        github::verify(&Secret::new(""), &h, b"Hello, World!"),
        Err(VerifyError::NotConfigured)
    );
}

#[tokio::test]
async fn comment_submits_the_expected_request() {
    let hooks = hooks(CONFIG);
    let body = comment(
        "Looks good.\n@aiwg review --depth=2 --focus \"auth flow\" please check the tokens",
        "alice",
        "User",
        "MEMBER",
    );
    let (sub, seen) = capturing(1);
    let r = hooks
        .handle(
            "github",
            &signed("issue_comment", "d-100", &body),
            &body,
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    assert_eq!(
        r.header("content-type").unwrap_or_default(),
        "application/json"
    );
    let HookOutcome::Submitted {
        job_id,
        workflow,
        replayed,
    } = &r.outcome
    else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!((workflow.as_str(), *replayed), ("review", false));
    assert_eq!(
        r.json().expect("json"),
        json!({ "job_id": job_id.to_string() })
    );

    let req = seen.lock().expect("lock").pop().expect("one request");
    assert_eq!(req.workflow, "review");
    assert_eq!(req.project.as_deref(), Some("octo/app"));
    assert_eq!(req.params["depth"], "2");
    assert_eq!(req.params["focus"], "auth flow");
    assert_eq!(req.guidance.as_deref(), Some("please check the tokens"));
    assert_eq!(
        req.idempotency_key.as_deref(),
        Some("github:comment:9001:created")
    );
    let t = &req.trigger;
    assert_eq!(t.source, "github");
    assert_eq!(t.actor.as_deref(), Some("alice"));
    assert_eq!(t.delivery_id.as_deref(), Some("d-100"));
    assert_eq!(t.repo.as_deref(), Some("octo/app"));
    assert_eq!(t.pr, Some(42));
    assert_eq!(t.issue, None);
    assert_eq!(t.extra["comment_id"], "9001");
    assert_eq!(t.extra["clone_url"], "https://github.com/octo/app.git");
    assert_eq!(t.extra["association"], "MEMBER");
    assert_eq!(t.extra["event"], "comment");
}

#[tokio::test]
async fn redelivery_returns_the_same_job_and_submits_nothing() {
    let hooks = hooks(CONFIG);
    let body = comment("@aiwg fix", "alice", "User", "OWNER");
    let h = signed("issue_comment", "d-replay", &body);
    let (sub, _) = capturing(1); // a second submit would fail the mock
    let first = hooks.handle("github", &h, &body, &sub).await;
    let second = hooks.handle("github", &h, &body, &sub).await;
    assert_eq!(first.status.as_u16(), 202);
    assert_eq!(second.status.as_u16(), 202);
    assert_eq!(first.json().expect("json"), second.json().expect("json"));
    assert!(matches!(
        second.outcome,
        HookOutcome::Submitted { replayed: true, .. }
    ));
    // The same signed body under a fresh delivery header: still the same job, nothing new.
    let third = hooks
        .handle(
            "github",
            &signed("issue_comment", "d-other", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(third.status.as_u16(), 202);
    assert_eq!(third.json().expect("json"), first.json().expect("json"));
    assert!(matches!(
        third.outcome,
        HookOutcome::Submitted { replayed: true, .. }
    ));
    // Another comment (another id) is a new job.
    let mut other: serde_json::Value = serde_json::from_slice(&body).expect("json");
    other["comment"]["id"] = json!(9002);
    let other = other.to_string().into_bytes();
    let (sub2, _) = capturing(1);
    let fourth = hooks
        .handle(
            "github",
            &signed("issue_comment", "d-other", &other),
            &other,
            &sub2,
        )
        .await;
    assert_eq!(fourth.status.as_u16(), 202);
    assert_ne!(fourth.json().expect("json"), first.json().expect("json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_submit_once() {
    let hooks = hooks(CONFIG);
    let body = comment("@aiwg fix", "alice", "User", "OWNER");
    let h = signed("issue_comment", "d-race", &body);
    let gate = Arc::new(Gate::default());
    let gated = Arc::new(common::gated(Arc::clone(&gate)));
    let first = {
        let (hooks, h, body, gated) = (hooks.clone(), h.clone(), body.clone(), Arc::clone(&gated));
        tokio::spawn(async move { hooks.handle("github", &h, &body, &gated).await })
    };
    gate.entered.notified().await; // the first request is inside submit, holding the claim
    let second = {
        let (hooks, h, body, gated) = (hooks.clone(), h.clone(), body.clone(), Arc::clone(&gated));
        tokio::spawn(async move { hooks.handle("github", &h, &body, &gated).await })
    };
    gate.release.add_permits(10);
    let (a, b) = (first.await.expect("joins"), second.await.expect("joins"));
    assert_eq!(gate.calls.load(Ordering::SeqCst), 1);
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (202, 202));
    assert_eq!(a.json().expect("json"), b.json().expect("json"));
}

#[tokio::test]
async fn transient_rejection_is_not_remembered() {
    let hooks = hooks(CONFIG);
    let body = comment("@aiwg fix", "alice", "User", "OWNER");
    let h = signed("issue_comment", "d-busy", &body);
    let busy = common::busy().await;
    let r = hooks.handle("github", &h, &body, &busy).await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(
        r.header("content-type").unwrap_or_default(),
        "application/problem+json"
    );
    assert!(r.header("retry-after").is_some());
    let (ok, _) = capturing(1);
    assert_eq!(
        hooks.handle("github", &h, &body, &ok).await.status.as_u16(),
        202
    );
}

#[tokio::test]
async fn engine_refusals_are_ignored_with_the_reason() {
    let hooks = hooks(CONFIG);
    let body = comment("@aiwg nosuch", "alice", "User", "OWNER");
    let m = never();
    let r = hooks
        .handle(
            "github",
            &signed("issue_comment", "d-unk", &body),
            &body,
            &m,
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(
        r.json().expect("json")["ignored"],
        "unknown workflow `nosuch`"
    );
}

#[tokio::test]
async fn ping_help_and_not_addressed() {
    let hooks = hooks(CONFIG);
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let r = hooks
        .handle("github", &signed("ping", "p", ping), ping, &never())
        .await;
    assert_eq!((r.status.as_u16(), &r.outcome), (200, &HookOutcome::Pong));

    let body = comment("@aiwg help", "alice", "User", "OWNER");
    let r = hooks
        .handle(
            "github",
            &signed("issue_comment", "h", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    let j = r.json().expect("json");
    assert_eq!(j["ignored"], "help");
    assert_eq!(
        j["workflows"][2],
        json!({ "name": "review", "description": "Review a pull request" })
    );

    let body = comment("just a normal comment", "alice", "User", "OWNER");
    let r = hooks
        .handle(
            "github",
            &signed("issue_comment", "n", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.outcome, HookOutcome::Ignored(IgnoreReason::NotAddressed));
}

#[tokio::test]
async fn authorization_refusals() {
    let hooks = hooks(CONFIG);
    let cases = [
        (
            comment("@aiwg fix", "dependabot[bot]", "Bot", "NONE"),
            "bot",
        ),
        (comment("@aiwg fix", "renovate", "Bot", "MEMBER"), "bot"),
        (comment("@aiwg fix", "aiwg-app", "User", "OWNER"), "ignored"),
        (
            comment("@aiwg fix", "mallory", "User", "CONTRIBUTOR"),
            "CONTRIBUTOR",
        ),
        (comment("@aiwg fix", "mallory", "User", "NONE"), "NONE"),
        (
            comment("@aiwg fix --project other/repo", "alice", "User", "OWNER"),
            "--project",
        ),
        (
            comment("@aiwg fix --a 'unterminated", "alice", "User", "OWNER"),
            "unterminated",
        ),
    ];
    for (i, (body, reason)) in cases.iter().enumerate() {
        let r = hooks
            .handle(
                "github",
                &signed("issue_comment", &format!("a-{i}"), body),
                body,
                &never(),
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "case {i}");
        let ignored = r.json().expect("json")["ignored"]
            .as_str()
            .expect("reason")
            .to_owned();
        assert!(ignored.contains(reason), "case {i}: {ignored}");
    }

    let restricted = common::hooks(
        "github: { secret: \"It's a Secret to Everybody\", allowed_workflows: [review], allowed_associations: [OWNER] }",
    );
    let body = comment("@aiwg deploy now", "alice", "User", "OWNER");
    let r = restricted
        .handle(
            "github",
            &signed("issue_comment", "w", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::WorkflowNotAllowed("deploy".into()))
    );
    let body = comment("@aiwg review", "carol", "User", "MEMBER");
    let r = restricted
        .handle(
            "github",
            &signed("issue_comment", "m", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::AssociationNotAllowed(Some("MEMBER".into())))
    );
    // help lists only the allowed workflows
    let body = comment("@aiwg help", "alice", "User", "OWNER");
    let r = restricted
        .handle(
            "github",
            &signed("issue_comment", "hh", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(
        r.json().expect("json")["workflows"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}

#[tokio::test]
async fn rules_map_events_and_refuse_forks() {
    let hooks = hooks(CONFIG);
    let body = pull_request("opened", "octo/app", "MEMBER");
    let (sub, seen) = capturing(1);
    let r = hooks
        .handle(
            "github",
            &signed("pull_request", "pr-1", &body),
            &body,
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!(req.workflow, "review");
    assert_eq!(req.params["depth"], "1");
    assert_eq!(req.trigger.pr, Some(5));
    assert_eq!(req.trigger.extra["head_sha"], "abc123");
    assert_eq!(req.trigger.extra["head_ref"], "feature");
    assert_eq!(req.trigger.extra["base_ref"], "main");

    let fork = pull_request("opened", "mallory/app", "MEMBER");
    let r = hooks
        .handle(
            "github",
            &signed("pull_request", "pr-2", &fork),
            &fork,
            &never(),
        )
        .await;
    assert_eq!(r.outcome, HookOutcome::Ignored(IgnoreReason::ForkRefused));

    let stranger = pull_request("opened", "octo/app", "FIRST_TIME_CONTRIBUTOR");
    let r = hooks
        .handle(
            "github",
            &signed("pull_request", "pr-3", &stranger),
            &stranger,
            &never(),
        )
        .await;
    assert!(matches!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::AssociationNotAllowed(_))
    ));

    let closed = pull_request("closed", "octo/app", "MEMBER");
    let r = hooks
        .handle(
            "github",
            &signed("pull_request", "pr-4", &closed),
            &closed,
            &never(),
        )
        .await;
    assert_eq!(
        r.json().expect("json")["ignored"],
        "no rule for event `pull_request` (closed)"
    );

    let allow = common::hooks(
        "github: { secret: \"It's a Secret to Everybody\", fork_policy: allow, rules: [ { event: pull_request, action: opened, workflow: review } ] }",
    );
    let (sub, seen) = capturing(1);
    let r = allow
        .handle(
            "github",
            &signed("pull_request", "pr-5", &fork),
            &fork,
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202);
    assert_eq!(
        seen.lock().expect("lock")[0].trigger.extra["head_repo"],
        "mallory/app"
    );

    // a label rule: only triagers can label, so the issue author's association is not checked
    let labeled = json!({
        "action": "labeled", "label": { "name": "aiwg:fix" },
        "issue": { "number": 8, "author_association": "NONE", "labels": [ { "name": "aiwg:fix" } ] },
        "repository": { "full_name": "octo/app" }, "sender": { "login": "maintainer", "type": "User" }
    })
    .to_string();
    let (sub, seen) = capturing(1);
    let r = hooks
        .handle(
            "github",
            &signed("issues", "l-1", labeled.as_bytes()),
            labeled.as_bytes(),
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let req = seen.lock().expect("lock").pop().expect("request");
    assert_eq!((req.workflow.as_str(), req.trigger.issue), ("fix", Some(8)));
}

#[tokio::test]
async fn bad_requests_and_fail_closed() {
    let hooks = hooks(CONFIG);
    let body = comment("@aiwg fix", "alice", "User", "OWNER");
    // missing / empty event header after a good signature → 400
    let mut h = signed("issue_comment", "x", &body);
    h.remove("x-github-event");
    let r = hooks.handle("github", &h, &body, &never()).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("content-type").unwrap_or_default()
        ),
        (400, "application/problem+json")
    );
    h.insert("x-github-event", "".parse().expect("value"));
    assert_eq!(
        hooks
            .handle("github", &h, &body, &never())
            .await
            .status
            .as_u16(),
        400
    );
    // unparseable payload after a good signature → 400
    let junk = b"{not json";
    let r = hooks
        .handle(
            "github",
            &signed("issue_comment", "j", junk),
            junk,
            &never(),
        )
        .await;
    assert_eq!(r.status.as_u16(), 400);
    // missing signature → 401 problem
    let mut h = signed("issue_comment", "x", &body);
    h.remove("x-hub-signature-256");
    let r = hooks.handle("github", &h, &body, &never()).await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("content-type").unwrap_or_default()
        ),
        (401, "application/problem+json")
    );
    let j = r.json().expect("json");
    assert_eq!(j["status"], 401);
    assert_eq!(j["title"], "Unauthorized");
    assert!(j["type"].is_string() && j["detail"].is_string());
    // empty secret, and no section at all → 401
    let empty = common::hooks("github: { secret: \"\" }");
    let r = empty
        .handle(
            "github",
            &signed("issue_comment", "x", &body),
            &body,
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Unauthorized(VerifyError::NotConfigured)
    );
    let none = common::hooks("slack: { signing_secret: x }");
    assert_eq!(
        none.handle(
            "github",
            &signed("issue_comment", "x", &body),
            &body,
            &never()
        )
        .await
        .status
        .as_u16(),
        401
    );
    // unknown platform → 404 problem
    let r = hooks
        .handle("gitgud", &HeaderMap::new(), b"", &never())
        .await;
    assert_eq!(
        (
            r.status.as_u16(),
            r.header("content-type").unwrap_or_default()
        ),
        (404, "application/problem+json")
    );
    assert_eq!(r.outcome, HookOutcome::UnknownPlatform);
}

#[tokio::test]
async fn form_encoded_deliveries_are_accepted() {
    let hooks = hooks(CONFIG);
    let json_body =
        String::from_utf8(comment("@aiwg fix it", "alice", "User", "OWNER")).expect("utf8");
    let mut form = String::from("payload=");
    for b in json_body.bytes() {
        if b.is_ascii_alphanumeric() {
            form.push(b as char);
        } else {
            form.push_str(&format!("%{b:02X}"));
        }
    }
    let mut h = signed("issue_comment", "f-1", form.as_bytes());
    h.insert(
        "content-type",
        "application/x-www-form-urlencoded".parse().expect("value"),
    );
    let (sub, seen) = capturing(1);
    let r = hooks.handle("github", &h, form.as_bytes(), &sub).await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    assert_eq!(
        seen.lock().expect("lock")[0].guidance.as_deref(),
        Some("it")
    );
}

#[test]
fn metrics_are_counted() {
    let capture = MetricsCapture::default();
    let hooks = hooks(CONFIG);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    metrics::with_local_recorder(&capture, || {
        rt.block_on(async {
            let body = comment("@aiwg fix", "alice", "User", "OWNER");
            let (sub, _) = capturing(1);
            hooks
                .handle(
                    "github",
                    &signed("issue_comment", "m-1", &body),
                    &body,
                    &sub,
                )
                .await;
            hooks
                .handle("github", &HeaderMap::new(), &body, &never())
                .await;
            hooks
                .handle("nope", &HeaderMap::new(), &body, &never())
                .await;
        });
    });
    assert_eq!(
        capture.get("aiwg_webhook_requests_total{platform=github}"),
        2
    );
    assert_eq!(
        capture.get("aiwg_webhook_requests_total{platform=unknown}"),
        1
    );
    assert_eq!(
        capture.get("aiwg_webhook_errors_total{platform=github,reason=missing_header}"),
        1
    );
    assert_eq!(
        capture.get("aiwg_webhook_errors_total{platform=unknown,reason=unknown_platform}"),
        1
    );
}

#[tokio::test]
async fn handle_is_send_and_responses_convert_to_http() {
    fn assert_send<T: Send>(t: T) -> T {
        t
    }
    fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    assert_clone_send_sync::<aiwg_webhook::Hooks>();

    let hooks = hooks(CONFIG);
    let body = comment("@aiwg fix", "alice", "User", "OWNER");
    let h = signed("issue_comment", "s", &body);
    let busy = common::busy().await;
    // axum and actix need the future to be Send.
    let r = assert_send(hooks.build(&busy).handle("github", &h, &body)).await;
    assert_eq!(r.status.as_u16(), 503);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.header("retry-after"), Some("30"));
    let problem = r.json().expect("json");
    assert_eq!(problem["status"], 503);
    let response: aiwg_core::http::ApiResponse = r.into();
    assert_eq!(response.status.as_u16(), 503);
}
