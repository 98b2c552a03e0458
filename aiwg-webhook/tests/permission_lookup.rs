//! Who may trigger on GitLab, Gitea/Forgejo and Bitbucket when a section names `api_url` and
//! `api_token`: the commenter's permission is asked of the forge (here a local fake serving the
//! documented REST paths over loopback, checking the token as each platform sends it), compared
//! with `min_permission`, cached, and a forge that is down or refuses the token refuses the
//! trigger (fail closed).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aiwg_webhook::{HookOutcome, IgnoreReason};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap as AxHeaders, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use common::*;
use serde_json::{json, Value};

const TOKEN: &str = "forge-api-token-0123456789";

/// What the fake forge was asked: `platform path?query`.
type Log = Arc<Mutex<Vec<String>>>;

fn authorized(headers: &AxHeaders, name: &str, want: &str) -> bool {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == want)
}

async fn gitlab_member(
    State(log): State<Log>,
    headers: AxHeaders,
    Path((project, user)): Path<(String, String)>,
) -> (StatusCode, Json<Value>) {
    log.lock().unwrap().push(format!("gitlab {project} {user}"));
    if !authorized(&headers, "private-token", TOKEN) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "401 Unauthorized"})),
        );
    }
    let level = match (project.as_str(), user.as_str()) {
        ("group/sub/app", "1") => 30,
        ("group/sub/app", "2") => 20,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"message": "404 Not found"})),
            )
        }
    };
    (
        StatusCode::OK,
        Json(
            json!({"id": user.parse::<u64>().unwrap(), "username": "x", "state": "active", "access_level": level}),
        ),
    )
}

async fn gitea_permission(
    State(log): State<Log>,
    headers: AxHeaders,
    Path((owner, repo, user)): Path<(String, String, String)>,
) -> (StatusCode, Json<Value>) {
    log.lock()
        .unwrap()
        .push(format!("gitea {owner}/{repo} {user}"));
    if !authorized(&headers, "authorization", &format!("token {TOKEN}")) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "token is required"})),
        );
    }
    let permission = match user.as_str() {
        "alice" => "write",
        "mallory" => "read",
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"message": "user is not a collaborator"})),
            )
        }
    };
    (
        StatusCode::OK,
        Json(json!({"permission": permission, "role_name": permission, "user": {"login": user}})),
    )
}

async fn bitbucket_permissions(
    State(log): State<Log>,
    headers: AxHeaders,
    Path((workspace, slug)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let q = q.get("q").cloned().unwrap_or_default();
    log.lock()
        .unwrap()
        .push(format!("bitbucket {workspace}/{slug} {q}"));
    if !authorized(&headers, "authorization", &format!("Bearer {TOKEN}")) {
        return (StatusCode::UNAUTHORIZED, Json(json!({"type": "error"})));
    }
    let values = match q.as_str() {
        r#"user.uuid="{alice-uuid}""# => {
            // Effective permissions may list several grants; the highest counts.
            json!([{"type": "repository_permission", "permission": "read"},
                   {"type": "repository_permission", "permission": "write"}])
        }
        r#"user.uuid="{bob-uuid}""# => {
            json!([{"type": "repository_permission", "permission": "read"}])
        }
        _ => json!([]),
    };
    (
        StatusCode::OK,
        Json(json!({"pagelen": 10, "values": values, "page": 1, "size": 1})),
    )
}

/// The fake forge on a loopback port; returns its base URL and request log.
async fn fake_forge() -> (String, Log) {
    let log: Log = Arc::default();
    let app = Router::new()
        .route(
            "/gl/api/v4/projects/{project}/members/all/{user}",
            get(gitlab_member),
        )
        .route(
            "/gt/api/v1/repos/{owner}/{repo}/collaborators/{user}/permission",
            get(gitea_permission),
        )
        .route(
            "/bb/2.0/workspaces/{workspace}/permissions/repositories/{slug}",
            get(bitbucket_permissions),
        )
        .with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), log)
}

fn gitlab_note(user_id: u64, username: &str, note_id: u64) -> Vec<u8> {
    let project = json!({ "id": 15, "path_with_namespace": "group/sub/app", "default_branch": "main",
        "git_http_url": "https://gitlab.example.com/group/sub/app.git" });
    json!({
        "object_kind": "note", "event_type": "note",
        "user": { "id": user_id, "name": username, "username": username },
        "project_id": 15, "project": project,
        "object_attributes": { "id": note_id, "note": "@aiwg review", "noteable_type": "Issue",
            "project_id": 15, "noteable_id": 7, "system": false, "action": "create" },
        "issue": { "id": 7, "iid": 3, "title": "x" }
    })
    .to_string()
    .into_bytes()
}

fn gl_headers(uuid: &str) -> http::HeaderMap {
    headers(&[
        ("x-gitlab-event", "Note Hook"),
        ("x-gitlab-token", "gl-hook-token"),
        ("x-gitlab-event-uuid", uuid),
    ])
}

#[tokio::test]
async fn gitlab_members_at_developer_or_above_may_trigger() {
    let (base, log) = fake_forge().await;
    let yaml = format!(
        "gitlab: {{ token: gl-hook-token, api_url: \"{base}/gl/api/v4\", api_token: {TOKEN} }}"
    );
    let hooks = hooks(&yaml);
    // A developer (user 1): accepted.
    let (sub, seen) = capturing(1);
    let r = hooks
        .handle(
            "gitlab",
            &gl_headers("u-1"),
            &gitlab_note(1, "alice", 1),
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    assert_eq!(seen.lock().unwrap()[0].workflow, "review");
    // A reporter (user 2) and a stranger (user 3, 404): refused with the level.
    for (id, name, level) in [(2, "bob", "reporter"), (3, "eve", "none")] {
        let r = hooks
            .handle(
                "gitlab",
                &gl_headers(&format!("u-{id}")),
                &gitlab_note(id, name, 10 + id),
                &never(),
            )
            .await;
        assert_eq!(
            r.outcome,
            HookOutcome::Ignored(IgnoreReason::PermissionTooLow {
                user: name.into(),
                level,
                min: "developer",
            })
        );
        assert_eq!(r.status.as_u16(), 200);
        let text = r.json().unwrap()["ignored"].as_str().unwrap().to_owned();
        assert!(text.contains("`developer` is needed"), "{text}");
    }
    // The project path travels as one encoded segment; the user by id.
    assert_eq!(
        log.lock().unwrap().clone(),
        [
            "gitlab group/sub/app 1",
            "gitlab group/sub/app 2",
            "gitlab group/sub/app 3"
        ]
    );
    // The same stranger again within a minute: answered from the cache, no request.
    let quiet = never();
    let built = hooks.build(&quiet);
    for n in 0..3 {
        let r = built
            .handle(
                "gitlab",
                &gl_headers(&format!("u-3-{n}")),
                &gitlab_note(3, "eve", 99 + n),
            )
            .await;
        assert!(matches!(
            r.outcome,
            HookOutcome::Ignored(IgnoreReason::PermissionTooLow { .. })
        ));
    }
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.ends_with(" 3"))
            .count(),
        2,
        "one more request for three comments"
    );
    // allowed_users still admits without asking; a higher minimum refuses the developer.
    let listed = common::hooks(&format!(
        "gitlab: {{ token: gl-hook-token, api_url: \"{base}/gl/api/v4\", api_token: {TOKEN}, allowed_users: [carol] }}"
    ));
    let (sub, _) = capturing(1);
    let r = listed
        .handle(
            "gitlab",
            &gl_headers("u-c"),
            &gitlab_note(77, "carol", 500),
            &sub,
        )
        .await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    assert!(!log.lock().unwrap().iter().any(|l| l.ends_with(" 77")));
    let strict = common::hooks(&format!(
        "gitlab: {{ token: gl-hook-token, api_url: \"{base}/gl/api/v4\", api_token: {TOKEN}, min_permission: maintainer }}"
    ));
    let r = strict
        .handle(
            "gitlab",
            &gl_headers("u-s"),
            &gitlab_note(1, "alice", 501),
            &never(),
        )
        .await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::PermissionTooLow {
            user: "alice".into(),
            level: "developer",
            min: "maintainer",
        })
    );
}

#[tokio::test]
async fn a_forge_that_refuses_the_token_or_is_down_refuses_the_trigger() {
    let (base, _log) = fake_forge().await;
    let wrong = common::hooks(&format!(
        "gitlab: {{ token: gl-hook-token, api_url: \"{base}/gl/api/v4\", api_token: not-the-token }}"
    ));
    let r = wrong
        .handle(
            "gitlab",
            &gl_headers("d-1"),
            &gitlab_note(1, "alice", 1),
            &never(),
        )
        .await;
    let HookOutcome::Ignored(IgnoreReason::PermissionUnknown(why)) = &r.outcome else {
        panic!("{:?}", r.outcome);
    };
    assert!(why.contains("401"), "{why}");
    let text = r.json().unwrap()["ignored"].as_str().unwrap().to_owned();
    assert!(
        !text.contains("not-the-token") && !text.contains(&base),
        "{text}"
    );
    // Nothing listens on this port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = common::hooks(&format!(
        "gitlab: {{ token: gl-hook-token, api_url: \"http://127.0.0.1:{port}/api/v4\", api_token: {TOKEN} }}"
    ));
    let r = down
        .handle(
            "gitlab",
            &gl_headers("d-2"),
            &gitlab_note(1, "alice", 2),
            &never(),
        )
        .await;
    assert!(
        matches!(&r.outcome, HookOutcome::Ignored(IgnoreReason::PermissionUnknown(w)) if w.contains("could not be reached")),
        "{:?}",
        r.outcome
    );
    // A bad configuration is refused at build, naming the key.
    let bad: aiwg_webhook::TriggersConfig = serde_norway::from_str(
        "gitea: { secret: s, api_url: \"https://gitea.example.com/api/v1\", token: t, min_permission: root }",
    )
    .unwrap();
    let err = aiwg_webhook::Hooks::builder(bad, engine().engine.clone())
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("triggers.gitea.min_permission"), "{err}");
}

#[tokio::test]
async fn gitea_collaborators_with_write_may_trigger() {
    let (base, log) = fake_forge().await;
    // `token` is accepted for `api_token` on Gitea and Bitbucket.
    let hooks = hooks(&format!(
        "gitea: {{ secret: gt-secret, api_url: \"{base}/gt/api/v1\", token: {TOKEN} }}"
    ));
    let comment = |login: &str, id: u64| {
        json!({
            "action": "created", "is_pull": false,
            "issue": { "number": 4, "user": { "login": login } },
            "comment": { "id": id, "body": "@aiwg fix", "user": { "login": login } },
            "repository": { "full_name": "org/repo", "clone_url": "https://gitea.example.com/org/repo.git" },
            "sender": { "login": login }
        })
        .to_string()
    };
    let send = |body: String, sub: TestEngine| {
        let hooks = hooks.clone();
        async move {
            let sig = hmac_hex(b"gt-secret", &[body.as_bytes()]);
            let h = headers(&[
                ("x-gitea-signature", &sig),
                ("x-gitea-event", "issue_comment"),
            ]);
            hooks.handle("gitea", &h, body.as_bytes(), &sub).await
        }
    };
    let (sub, _) = capturing(1);
    let r = send(comment("alice", 1), sub).await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let r = send(comment("mallory", 2), never()).await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::PermissionTooLow {
            user: "mallory".into(),
            level: "read",
            min: "write",
        })
    );
    let r = send(comment("stranger", 3), never()).await;
    assert!(matches!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::PermissionTooLow { level: "none", .. })
    ));
    assert_eq!(
        log.lock().unwrap().clone(),
        [
            "gitea org/repo alice",
            "gitea org/repo mallory",
            "gitea org/repo stranger"
        ]
    );
}

#[tokio::test]
async fn bitbucket_users_with_write_may_trigger() {
    let (base, log) = fake_forge().await;
    let hooks = hooks(&format!(
        "bitbucket: {{ secret: bb-secret, api_url: \"{base}/bb/2.0\", api_token: {TOKEN}, fork_policy: allow }}"
    ));
    let comment = |nick: &str, uuid: &str, id: u64| {
        json!({
            "actor": { "display_name": nick, "nickname": nick, "uuid": uuid, "type": "user" },
            "repository": { "full_name": "team/repo", "links": { "html": { "href": "https://bitbucket.org/team/repo" } } },
            "issue": { "id": 9 },
            "comment": { "id": id, "content": { "raw": "@aiwg review" } }
        })
        .to_string()
    };
    let send = |body: String, sub: TestEngine| {
        let hooks = hooks.clone();
        async move {
            let sig = format!("sha256={}", hmac_hex(b"bb-secret", &[body.as_bytes()]));
            let h = headers(&[
                ("x-hub-signature", &sig),
                ("x-event-key", "issue:comment_created"),
            ]);
            hooks.handle("bitbucket", &h, body.as_bytes(), &sub).await
        }
    };
    let (sub, _) = capturing(1);
    let r = send(comment("alice", "{alice-uuid}", 1), sub).await;
    assert_eq!(r.status.as_u16(), 202, "{:?}", r.outcome);
    let r = send(comment("bob", "{bob-uuid}", 2), never()).await;
    assert_eq!(
        r.outcome,
        HookOutcome::Ignored(IgnoreReason::PermissionTooLow {
            user: "bob".into(),
            level: "read",
            min: "write",
        })
    );
    assert_eq!(
        log.lock().unwrap().clone(),
        [
            r#"bitbucket team/repo user.uuid="{alice-uuid}""#,
            r#"bitbucket team/repo user.uuid="{bob-uuid}""#
        ]
    );
}
