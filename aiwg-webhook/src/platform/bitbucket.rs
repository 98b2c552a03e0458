//! Bitbucket Cloud: `X-Hub-Signature: sha256=<hex HMAC-SHA256 of the body>`, the event in
//! `X-Event-Key` (`pullrequest:comment_created`, `pullrequest:created`, `repo:push`…), the
//! delivery id in `X-Request-UUID`.

use http::HeaderMap;
use serde::Deserialize;

use super::{header, required, verify_hex_hmac};
use crate::error::{ParseError, VerifyError};
use crate::event::{Actor, EventKind, InboundEvent, Platform, PullRequest, Repository};
use crate::secret::Secret;

/// Verifies `X-Hub-Signature` over the raw body.
pub fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    if !secret.is_configured() {
        return Err(VerifyError::NotConfigured);
    }
    let sig = required(headers, "x-hub-signature")?;
    let hex_sig = sig
        .strip_prefix("sha256=")
        .ok_or(VerifyError::MalformedSignature)?;
    verify_hex_hmac(secret.expose().as_bytes(), &[body], hex_sig)
}

#[derive(Deserialize)]
struct Payload {
    actor: Option<User>,
    repository: Option<Repo>,
    pullrequest: Option<Pull>,
    comment: Option<Comment>,
    issue: Option<Issue>,
}

#[derive(Deserialize)]
struct User {
    nickname: Option<String>,
    account_id: Option<String>,
    uuid: Option<String>,
    display_name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Links {
    html: Option<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: Option<String>,
}

#[derive(Deserialize)]
struct Branch {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Repo {
    full_name: Option<String>,
    links: Option<Links>,
    mainbranch: Option<Branch>,
}

#[derive(Deserialize)]
struct Commit {
    hash: Option<String>,
}

#[derive(Deserialize)]
struct End {
    branch: Option<Branch>,
    commit: Option<Commit>,
    repository: Option<Repo>,
}

#[derive(Deserialize)]
struct Pull {
    id: Option<u64>,
    source: Option<End>,
    destination: Option<End>,
}

#[derive(Deserialize)]
struct Content {
    raw: Option<String>,
}

#[derive(Deserialize)]
struct Comment {
    id: Option<u64>,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct Issue {
    id: Option<u64>,
}

fn repository(r: &Repo) -> Option<Repository> {
    let full_name = r.full_name.clone()?;
    let clone_url = r
        .links
        .as_ref()
        .and_then(|l| l.html.as_ref())
        .and_then(|h| h.href.clone())
        .map(|h| format!("{}.git", h.trim_end_matches('/')));
    Some(Repository {
        full_name,
        clone_url,
        default_branch: r.mainbranch.as_ref().and_then(|b| b.name.clone()),
    })
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let key = header(headers, "x-event-key").ok_or(ParseError::MissingHeader("X-Event-Key"))?;
    let p: Payload = serde_json::from_slice(body).map_err(|e| ParseError::json(&e))?;
    let (kind, neutral, action) = match key {
        "diagnostics:ping" => (EventKind::Ping, "ping", None),
        "pullrequest:comment_created" | "issue:comment_created" | "repo:commit_comment_created" => {
            (EventKind::Comment, "comment", Some("created"))
        }
        "pullrequest:created" => (EventKind::Other, "pull_request", Some("opened")),
        "pullrequest:updated" => (EventKind::Other, "pull_request", Some("synchronize")),
        "pullrequest:fulfilled" => (EventKind::Other, "pull_request", Some("merged")),
        "pullrequest:rejected" => (EventKind::Other, "pull_request", Some("closed")),
        "issue:created" => (EventKind::Other, "issues", Some("opened")),
        "repo:push" => (EventKind::Other, "push", None),
        other => (EventKind::Other, other, None),
    };
    let mut ev = InboundEvent::new(Platform::Bitbucket, kind, neutral, key);
    ev.action = action.map(str::to_owned);
    ev.delivery_id = header(headers, "x-request-uuid").map(str::to_owned);
    ev.repository = p.repository.as_ref().and_then(repository);
    ev.actor = p.actor.and_then(|u| {
        let id = u.uuid.clone();
        let login = u.nickname.or(u.account_id).or(u.uuid)?;
        Some(Actor {
            login,
            id,
            name: u.display_name,
            is_bot: matches!(u.kind.as_deref(), Some("app_user" | "team")),
            ..Actor::default()
        })
    });
    if let Some(pr) = p.pullrequest {
        if let Some(number) = pr.id {
            let src_repo = pr.source.as_ref().and_then(|s| s.repository.as_ref());
            let dst_repo = pr.destination.as_ref().and_then(|d| d.repository.as_ref());
            let from_fork = match (src_repo, dst_repo) {
                (Some(s), Some(d)) => Some(s.full_name != d.full_name),
                _ => None,
            };
            let src_repo = src_repo.and_then(repository);
            ev.pull_request = Some(PullRequest {
                number,
                head_ref: pr
                    .source
                    .as_ref()
                    .and_then(|s| s.branch.as_ref())
                    .and_then(|b| b.name.clone()),
                head_sha: pr
                    .source
                    .as_ref()
                    .and_then(|s| s.commit.as_ref())
                    .and_then(|c| c.hash.clone()),
                head_repo: src_repo.as_ref().map(|r| r.full_name.clone()),
                head_clone_url: src_repo.and_then(|r| r.clone_url),
                base_ref: pr
                    .destination
                    .as_ref()
                    .and_then(|d| d.branch.as_ref())
                    .and_then(|b| b.name.clone()),
                from_fork,
            });
        }
    }
    if ev.pull_request.is_none() {
        ev.issue = p.issue.and_then(|i| i.id);
    }
    if let Some(c) = p.comment {
        ev.text = c.content.and_then(|c| c.raw);
        if let Some(id) = c.id {
            ev.reply.insert("comment_id".into(), id.to_string());
        }
    }
    Ok(ev)
}

/// Bitbucket Cloud's [`Endpoint`](super::Endpoint).
pub(crate) struct Bitbucket {
    secret: Secret,
}

impl Bitbucket {
    pub(crate) fn new(config: &crate::config::BitbucketConfig) -> Self {
        Self {
            secret: config.secret.clone(),
        }
    }
}

impl super::Endpoint for Bitbucket {
    fn platform(&self) -> Platform {
        Platform::Bitbucket
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], _now: i64) -> Result<(), VerifyError> {
        verify(&self.secret, headers, body)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
}
