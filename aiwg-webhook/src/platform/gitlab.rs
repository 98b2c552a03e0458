//! GitLab: the secret token in `X-Gitlab-Token` (compared in constant time) and, when a signing
//! secret is configured, GitLab's Standard Webhooks signature (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature`). The delivery id is `Idempotency-Key`, else
//! `X-Gitlab-Event-UUID`, else `webhook-id`.
//!
//! Note Hook (comments on merge requests, issues, commits), Merge Request Hook and Issue Hook
//! are parsed in full; other hooks keep only their name, project and user.

use http::HeaderMap;
use serde::Deserialize;

use super::{header, required, standard};
use crate::error::{ParseError, VerifyError};
use crate::event::{Actor, EventKind, InboundEvent, Platform, PullRequest, Repository};
use crate::secret::Secret;

/// Verifies the token and, when `signing_key` is given, the Standard Webhooks signature.
/// Fails closed when neither is configured.
pub fn verify(
    token: &Secret,
    signing_key: Option<&standard::SigningKey>,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    if !token.is_configured() && signing_key.is_none() {
        return Err(VerifyError::NotConfigured);
    }
    if token.is_configured() {
        let given = required(headers, "x-gitlab-token")?;
        if !token.matches(given.as_bytes()) {
            return Err(VerifyError::TokenMismatch);
        }
    }
    if let Some(key) = signing_key {
        standard::verify(key, headers, body, now)?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct Payload {
    object_kind: Option<String>,
    user: Option<User>,
    user_username: Option<String>,
    project: Option<Project>,
    object_attributes: Option<Attributes>,
    merge_request: Option<MergeRequest>,
    issue: Option<IssueRef>,
    #[serde(default)]
    labels: Option<Vec<Label>>,
    changes: Option<Changes>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
}

#[derive(Deserialize)]
struct User {
    id: Option<u64>,
    username: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
    default_branch: Option<String>,
}

#[derive(Deserialize)]
struct LastCommit {
    id: Option<String>,
}

#[derive(Deserialize)]
struct Attributes {
    id: Option<u64>,
    note: Option<String>,
    noteable_type: Option<String>,
    url: Option<String>,
    action: Option<String>,
    oldrev: Option<String>,
    /// `iid`, branches, commits: the merge request fields (also the issue's `iid`).
    #[serde(flatten)]
    mr: MergeRequest,
}

#[derive(Deserialize, Default)]
struct MergeRequest {
    iid: Option<u64>,
    source_branch: Option<String>,
    target_branch: Option<String>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
    last_commit: Option<LastCommit>,
    source: Option<Project>,
}

#[derive(Deserialize)]
struct IssueRef {
    iid: Option<u64>,
}

#[derive(Deserialize)]
struct Label {
    title: Option<String>,
}

#[derive(Deserialize)]
struct Changes {
    labels: Option<LabelChange>,
}

#[derive(Deserialize)]
struct LabelChange {
    #[serde(default)]
    previous: Vec<Label>,
    #[serde(default)]
    current: Vec<Label>,
}

fn merge_request(mr: &MergeRequest) -> Option<PullRequest> {
    let number = mr.iid?;
    let from_fork = match (mr.source_project_id, mr.target_project_id) {
        (Some(s), Some(t)) => Some(s != t),
        _ => None,
    };
    Some(PullRequest {
        number,
        head_ref: mr.source_branch.clone(),
        head_sha: mr.last_commit.as_ref().and_then(|c| c.id.clone()),
        head_repo: mr
            .source
            .as_ref()
            .and_then(|p| p.path_with_namespace.clone()),
        head_clone_url: mr.source.as_ref().and_then(|p| p.git_http_url.clone()),
        base_ref: mr.target_branch.clone(),
        from_fork,
    })
}

fn is_bot(username: &str) -> bool {
    // GitLab's project, group and service-account bots.
    let u = username.to_ascii_lowercase();
    (u.starts_with("project_") || u.starts_with("group_")) && u.contains("_bot")
        || u == "ghost"
        || u.starts_with("service_account")
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let header_event = header(headers, "x-gitlab-event");
    let value: Payload = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            // Hooks we do not act on may carry fields of other shapes: keep only the name.
            let loose: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(body).map_err(|_| ParseError::json(&e))?;
            let kind = loose
                .get("object_kind")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            if matches!(kind, "note" | "merge_request" | "issue") {
                return Err(ParseError::json(&e));
            }
            let name = header_event.unwrap_or(kind);
            let mut ev = InboundEvent::new(Platform::GitLab, EventKind::Other, kind, name);
            ev.delivery_id = delivery_id(headers);
            return Ok(ev);
        }
    };
    let kind = value
        .object_kind
        .clone()
        .ok_or(ParseError::MissingField("object_kind"))?;
    let platform_event = header_event.unwrap_or(&kind).to_owned();
    let attrs = value.object_attributes.as_ref();
    let (event_kind, neutral) = match kind.as_str() {
        "note" => (EventKind::Comment, "comment"),
        "merge_request" => (EventKind::Other, "pull_request"),
        "issue" | "work_item" => (EventKind::Other, "issues"),
        "push" => (EventKind::Other, "push"),
        other => (EventKind::Other, other),
    };
    let mut ev = InboundEvent::new(Platform::GitLab, event_kind, neutral, &platform_event);
    ev.delivery_id = delivery_id(headers);
    ev.repository = value.project.as_ref().and_then(|p| {
        Some(Repository {
            full_name: p.path_with_namespace.clone()?,
            clone_url: p.git_http_url.clone(),
            default_branch: p.default_branch.clone(),
        })
    });
    let login = value
        .user
        .as_ref()
        .and_then(|u| u.username.clone())
        .or_else(|| value.user_username.clone());
    ev.actor = login.map(|login| Actor {
        is_bot: is_bot(&login),
        login,
        ..Actor::default()
    });
    if let Some(a) = ev.actor.as_mut() {
        a.name = value.user.as_ref().and_then(|u| u.name.clone());
        a.id = value
            .user
            .as_ref()
            .and_then(|u| u.id)
            .map(|id| id.to_string());
    }
    let added_labels: Vec<String> = value
        .changes
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .map(|l| {
            l.current
                .iter()
                .filter_map(|c| c.title.clone())
                .filter(|t| !l.previous.iter().any(|p| p.title.as_ref() == Some(t)))
                .collect()
        })
        .unwrap_or_default();
    ev.labels = value
        .labels
        .as_ref()
        .map(|l| l.iter().filter_map(|l| l.title.clone()).collect())
        .unwrap_or_default();
    match kind.as_str() {
        "note" => {
            let attrs = attrs.ok_or(ParseError::MissingField("object_attributes"))?;
            ev.action = Some("created".into());
            ev.text = attrs.note.clone();
            if let Some(id) = attrs.id {
                ev.reply.insert("comment_id".into(), id.to_string());
            }
            if let Some(url) = &attrs.url {
                ev.reply.insert("comment_url".into(), url.clone());
            }
            match attrs.noteable_type.as_deref() {
                Some("MergeRequest") => {
                    ev.pull_request = value.merge_request.as_ref().and_then(merge_request);
                }
                Some("Issue") => ev.issue = value.issue.as_ref().and_then(|i| i.iid),
                _ => {}
            }
        }
        "merge_request" | "issue" | "work_item" => {
            let attrs = attrs.ok_or(ParseError::MissingField("object_attributes"))?;
            let action = attrs.action.as_deref().unwrap_or("");
            let normal = match action {
                "open" => "opened",
                "reopen" => "reopened",
                "close" => "closed",
                "merge" => "merged",
                "approved" => "approved",
                "update" if attrs.oldrev.is_some() => "synchronize",
                "update" if !added_labels.is_empty() => "labeled",
                "update" => "edited",
                other => other,
            };
            ev.action = Some(normal.to_owned());
            if normal == "labeled" {
                ev.labels = added_labels;
            }
            if kind == "merge_request" {
                ev.pull_request = merge_request(&attrs.mr);
            } else {
                ev.issue = attrs.mr.iid;
            }
        }
        "push" => {
            if let Some(r) = value.git_ref {
                ev.reply.insert("ref".into(), r);
            }
            if let Some(sha) = value.after {
                ev.reply.insert("head_sha".into(), sha);
            }
        }
        _ => {}
    }
    Ok(ev)
}

fn delivery_id(headers: &HeaderMap) -> Option<String> {
    header(headers, "idempotency-key")
        .or_else(|| header(headers, "x-gitlab-event-uuid"))
        .or_else(|| header(headers, "webhook-id"))
        .map(str::to_owned)
}

/// GitLab's [`Endpoint`](super::Endpoint).
pub(crate) struct GitLab {
    token: Secret,
    signing: Option<standard::SigningKey>,
}

impl GitLab {
    pub(crate) fn new(config: &crate::config::GitLabConfig) -> Result<Self, crate::BuildError> {
        Ok(Self {
            token: config.token.clone(),
            signing: standard::signing_key(&config.signing_secret, "gitlab.signing_secret")?,
        })
    }
}

impl super::Endpoint for GitLab {
    fn platform(&self) -> Platform {
        Platform::GitLab
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(&self.token, self.signing.as_ref(), headers, body, now)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
}
