//! The JSON shape GitHub and Gitea/Forgejo share (Gitea mirrors GitHub's payloads).
//!
//! Only the fields aiwg uses are read; everything else is skipped. Events aiwg acts on
//! (comments, pull requests, issues) are parsed strictly; for any other event a payload whose
//! fields surprise us still parses, as an event with only its name.

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::error::ParseError;
use crate::event::{Actor, EventKind, InboundEvent, Platform, PullRequest, Repository};

#[derive(Deserialize)]
struct Payload {
    action: Option<String>,
    sender: Option<User>,
    repository: Option<Repo>,
    issue: Option<Issue>,
    comment: Option<Comment>,
    pull_request: Option<Pull>,
    review: Option<Review>,
    label: Option<Label>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    /// Gitea: whether an `issue_comment` is on a pull request.
    is_pull: Option<bool>,
    /// GitHub Apps: the installation that delivered the event.
    installation: Option<Installation>,
}

#[derive(Deserialize)]
struct Installation {
    id: Option<u64>,
}

#[derive(Deserialize)]
struct User {
    login: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Repo {
    full_name: Option<String>,
    clone_url: Option<String>,
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct Label {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Issue {
    number: Option<u64>,
    pull_request: Option<IgnoredAny>,
    author_association: Option<String>,
    #[serde(default)]
    labels: Option<Vec<Label>>,
}

#[derive(Deserialize)]
struct Comment {
    id: Option<u64>,
    body: Option<String>,
    user: Option<User>,
    author_association: Option<String>,
    html_url: Option<String>,
    commit_id: Option<String>,
}

#[derive(Deserialize)]
struct Review {
    id: Option<u64>,
    body: Option<String>,
    user: Option<User>,
    author_association: Option<String>,
}

#[derive(Deserialize)]
struct GitRef {
    #[serde(rename = "ref")]
    name: Option<String>,
    sha: Option<String>,
    repo: Option<Repo>,
}

#[derive(Deserialize)]
struct Pull {
    number: Option<u64>,
    head: Option<GitRef>,
    base: Option<GitRef>,
    author_association: Option<String>,
    user: Option<User>,
    #[serde(default)]
    labels: Option<Vec<Label>>,
    draft: Option<bool>,
}

fn actor(user: Option<&User>, association: Option<&String>) -> Option<Actor> {
    let user = user?;
    let login = user.login.clone()?;
    let is_bot = user.kind.as_deref() == Some("Bot") || login.ends_with("[bot]");
    Some(Actor {
        login,
        association: association.cloned(),
        is_bot,
        ..Actor::default()
    })
}

fn pull(p: &Pull) -> Option<PullRequest> {
    let number = p.number?;
    let head = p.head.as_ref();
    let base = p.base.as_ref();
    let head_repo = head.and_then(|h| h.repo.as_ref());
    let base_repo = base.and_then(|b| b.repo.as_ref());
    let from_fork = match (head, head_repo, base_repo) {
        (Some(_), None, _) => Some(true), // the fork was deleted
        (_, Some(h), Some(b)) => Some(h.full_name != b.full_name),
        _ => None,
    };
    Some(PullRequest {
        number,
        head_ref: head.and_then(|h| h.name.clone()),
        head_sha: head.and_then(|h| h.sha.clone()),
        head_repo: head_repo.and_then(|r| r.full_name.clone()),
        head_clone_url: head_repo.and_then(|r| r.clone_url.clone()),
        base_ref: base.and_then(|b| b.name.clone()),
        from_fork,
    })
}

fn labels(list: Option<&Vec<Label>>) -> Vec<String> {
    list.map(|l| l.iter().filter_map(|l| l.name.clone()).collect())
        .unwrap_or_default()
}

/// Gitea's actions, in GitHub's words.
fn normalise_action(action: &str) -> String {
    match action {
        "synchronized" => "synchronize",
        "label_updated" => "labeled",
        "label_cleared" => "unlabeled",
        other => other,
    }
    .to_owned()
}

/// Events aiwg acts on: their payloads must parse.
fn strict(event: &str) -> bool {
    matches!(
        event,
        "issue_comment"
            | "pull_request_review_comment"
            | "pull_request_review"
            | "commit_comment"
            | "pull_request"
            | "issues"
            | "ping"
    )
}

pub(crate) fn parse(
    platform: Platform,
    event: &str,
    body: &[u8],
) -> Result<InboundEvent, ParseError> {
    let p: Payload = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) if strict(event) => return Err(ParseError::json(&e)),
        Err(e) => {
            // Not an event we act on: accept any JSON object, keep only the name.
            let _: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(body).map_err(|_| ParseError::json(&e))?;
            return Ok(InboundEvent::new(platform, EventKind::Other, event, event));
        }
    };
    let action = p.action.as_deref().map(normalise_action);
    let created = action.as_deref() == Some("created");
    let (kind, neutral) = match event {
        "ping" => (EventKind::Ping, "ping"),
        "issue_comment" | "pull_request_review_comment" | "commit_comment" if created => {
            (EventKind::Comment, "comment")
        }
        "pull_request_review" if action.as_deref() == Some("submitted") => {
            (EventKind::Comment, "comment")
        }
        "issue_comment"
        | "pull_request_review_comment"
        | "commit_comment"
        | "pull_request_review" => (EventKind::Other, "comment"),
        "pull_request" => (EventKind::Other, "pull_request"),
        "issues" => (EventKind::Other, "issues"),
        "push" => (EventKind::Other, "push"),
        other => (EventKind::Other, other),
    };
    let mut ev = InboundEvent::new(platform, kind, neutral, event);
    ev.action = action;
    ev.repository = p.repository.as_ref().and_then(|r| {
        Some(Repository {
            full_name: r.full_name.clone()?,
            clone_url: r.clone_url.clone(),
            default_branch: r.default_branch.clone(),
        })
    });
    ev.actor = actor(p.sender.as_ref(), None);
    if let Some(pr) = &p.pull_request {
        ev.pull_request = pull(pr);
        ev.labels = labels(pr.labels.as_ref());
        if pr.draft == Some(true) {
            ev.reply.insert("draft".into(), "true".into());
        }
        if event == "pull_request" {
            // The code's author decides whether an automatic run is allowed.
            let assoc = pr.author_association.as_ref();
            ev.actor = actor(p.sender.as_ref(), assoc).or_else(|| actor(pr.user.as_ref(), assoc));
        }
    }
    if let Some(issue) = &p.issue {
        let is_pull = issue.pull_request.is_some() || p.is_pull == Some(true);
        match (is_pull, issue.number) {
            (true, Some(n)) if ev.pull_request.is_none() => {
                ev.pull_request = Some(PullRequest {
                    number: n,
                    ..PullRequest::default()
                });
            }
            (false, Some(n)) => ev.issue = Some(n),
            _ => {}
        }
        if ev.labels.is_empty() {
            ev.labels = labels(issue.labels.as_ref());
        }
        if event == "issues" {
            ev.actor = actor(p.sender.as_ref(), issue.author_association.as_ref());
        }
    }
    if let Some(id) = p.installation.as_ref().and_then(|i| i.id) {
        ev.reply.insert("installation_id".into(), id.to_string());
    }
    if let Some(c) = &p.comment {
        ev.text = c.body.clone();
        if let Some(a) = actor(c.user.as_ref(), c.author_association.as_ref()) {
            ev.actor = Some(a);
        }
        if let Some(id) = c.id {
            ev.reply.insert("comment_id".into(), id.to_string());
        }
        if let Some(url) = &c.html_url {
            ev.reply.insert("comment_url".into(), url.clone());
        }
        if let Some(sha) = &c.commit_id {
            ev.reply.insert("commit_id".into(), sha.clone());
        }
    }
    if let (Some(r), "pull_request_review") = (&p.review, event) {
        ev.text = r.body.clone();
        if let Some(a) = actor(r.user.as_ref(), r.author_association.as_ref()) {
            ev.actor = Some(a);
        }
        if let Some(id) = r.id {
            ev.reply.insert("review_id".into(), id.to_string());
        }
    }
    if let Some(label) = p.label.as_ref().and_then(|l| l.name.clone()) {
        if ev.action.as_deref() == Some("labeled") {
            ev.labels = vec![label];
        }
    }
    if event == "push" {
        if let Some(r) = p.git_ref {
            ev.reply.insert("ref".into(), r);
        }
        if let Some(sha) = p.after {
            ev.reply.insert("head_sha".into(), sha);
        }
    }
    Ok(ev)
}
