//! [`InboundEvent`]: one platform-neutral shape for every verified delivery.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::grammar::Command;

/// The platforms `aiwg-webhook` understands, named as in `POST /hooks/{platform}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Platform {
    /// GitHub (`/hooks/github`).
    GitHub,
    /// GitLab (`/hooks/gitlab`).
    GitLab,
    /// Slack (`/hooks/slack`).
    Slack,
    /// Discord (`/hooks/discord`).
    Discord,
    /// Gitea and Forgejo (`/hooks/gitea`, also accepted as `/hooks/forgejo`).
    Gitea,
    /// Bitbucket Cloud (`/hooks/bitbucket`).
    Bitbucket,
    /// Standard Webhooks or a bearer token (`/hooks/generic`).
    Generic,
}

impl Platform {
    /// Every platform, in path order.
    pub const ALL: [Platform; 7] = [
        Self::GitHub,
        Self::GitLab,
        Self::Slack,
        Self::Discord,
        Self::Gitea,
        Self::Bitbucket,
        Self::Generic,
    ];

    /// The path segment and the `trigger.source` of the jobs it starts.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GitHub => "github",
            Self::GitLab => "gitlab",
            Self::Slack => "slack",
            Self::Discord => "discord",
            Self::Gitea => "gitea",
            Self::Bitbucket => "bitbucket",
            Self::Generic => "generic",
        }
    }

    /// Whether its payloads carry no author association, so that `allowed_users` must say who
    /// may trigger (GitLab, Gitea/Forgejo, Bitbucket).
    #[must_use]
    pub fn needs_allowed_users(self) -> bool {
        matches!(self, Self::GitLab | Self::Gitea | Self::Bitbucket)
    }

    /// Whether this platform hosts repositories (and so answers like a forge).
    #[must_use]
    pub fn is_forge(self) -> bool {
        matches!(
            self,
            Self::GitHub | Self::GitLab | Self::Gitea | Self::Bitbucket
        )
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of [`Platform::from_str`]: the name is not one we serve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown platform")]
pub struct UnknownPlatform;

impl FromStr for Platform {
    type Err = UnknownPlatform;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "github" => Self::GitHub,
            "gitlab" => Self::GitLab,
            "slack" => Self::Slack,
            "discord" => Self::Discord,
            "gitea" | "forgejo" => Self::Gitea,
            "bitbucket" => Self::Bitbucket,
            "generic" => Self::Generic,
            _ => return Err(UnknownPlatform),
        })
    }
}

/// What kind of delivery this is, which decides how it is handled.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventKind {
    /// A connectivity check (GitHub `ping`, Discord PING, …): answered, never submitted.
    Ping,
    /// Slack's `url_verification`: the challenge to echo.
    Challenge(String),
    /// A comment whose text may address us with the mention (`@aiwg review …`).
    Comment,
    /// A chat command whose text is already addressed to us (Slack `/aiwg …`, an app mention,
    /// a Discord `text` option): the grammar without the mention.
    ChatCommand,
    /// A command already in structured form (Discord options, the generic JSON trigger).
    Structured(Command),
    /// Anything else (pull request opened, issue labeled, push…): only configured
    /// [rules](crate::config::RuleConfig) can turn it into a job.
    Other,
}

/// Who caused the event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Actor {
    /// Login, user name or user id.
    pub login: String,
    /// The platform's stable user id, when the payload has one (GitLab's numeric user id,
    /// Bitbucket's `{uuid}`): what permission lookups ask about.
    pub id: Option<String>,
    /// A display or user name, when it differs from `login` (Slack `user_name`, …).
    pub name: Option<String>,
    /// GitHub's `author_association` (`OWNER`, `MEMBER`, …) when the platform has one.
    pub association: Option<String>,
    /// Chat roles (Discord role ids) when the platform has them.
    pub roles: Vec<String>,
    /// Whether the platform marks the actor as a bot or an app.
    pub is_bot: bool,
}

/// The repository the event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Repository {
    /// `org/repo` (GitLab: `group/subgroup/project`). Becomes the job's `project` key.
    pub full_name: String,
    /// HTTPS clone URL, when the payload has one.
    pub clone_url: Option<String>,
    /// The default branch, when the payload has it.
    pub default_branch: Option<String>,
}

/// A pull request (merge request) the event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PullRequest {
    /// Its number (GitLab: `iid`).
    pub number: u64,
    /// The source branch.
    pub head_ref: Option<String>,
    /// The source commit.
    pub head_sha: Option<String>,
    /// The source repository's full name, when known.
    pub head_repo: Option<String>,
    /// The source repository's clone URL, when known.
    pub head_clone_url: Option<String>,
    /// The target branch.
    pub base_ref: Option<String>,
    /// Whether the source lives in another repository. `None` when the payload does not say
    /// (GitHub `issue_comment` on a pull request carries no head).
    pub from_fork: Option<bool>,
}

/// A verified delivery, parsed into the fields `aiwg` uses. Forge payloads are large and
/// change: only these are read, the rest is tolerated and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InboundEvent {
    /// Where it came from.
    pub platform: Platform,
    /// The platform's delivery id (GitHub `X-GitHub-Delivery`, Slack `event_id`, Discord
    /// interaction id, …): the de-duplication key.
    pub delivery_id: Option<String>,
    /// How it is handled.
    pub kind: EventKind,
    /// The platform-neutral event name that [rules](crate::config::RuleConfig) match on:
    /// `pull_request`, `issues`, `comment`, `push`, `ping`, `command`, or the platform's name for
    /// anything else.
    pub event: String,
    /// The platform's own event name (`issue_comment`, `Merge Request Hook`,
    /// `pullrequest:created`, …). Rules match this too.
    pub platform_event: String,
    /// The action, normalised to GitHub's words where one exists (`opened`, `closed`,
    /// `reopened`, `synchronize`, `labeled`, `created`, …).
    pub action: Option<String>,
    /// Who caused it.
    pub actor: Option<Actor>,
    /// The repository.
    pub repository: Option<Repository>,
    /// The pull/merge request.
    pub pull_request: Option<PullRequest>,
    /// The issue number.
    pub issue: Option<u64>,
    /// The comment body, or the chat command's text.
    pub text: Option<String>,
    /// Labels relevant to the event: the label just added (`labeled`), else the item's labels.
    pub labels: Vec<String>,
    /// Handles needed to answer later (Slack `response_url`, Discord interaction token and
    /// application id, comment id…). Copied into the job's `trigger.extra`.
    pub reply: BTreeMap<String, String>,
}

impl InboundEvent {
    /// The de-duplication key of this event, taken from what the signature covers, so the same
    /// signed body sent again under any delivery header starts nothing new:
    ///
    /// - a forge comment: its id and action (`github:comment:9001:created`), so even two
    ///   deliveries of one comment event count once (nothing from the headers, which the
    ///   signature does not cover, goes into the key);
    /// - Slack (`trigger_id` / `event_id`), Discord (the interaction id) and Standard Webhooks
    ///   (`webhook-id`, part of what is signed): the delivery id, which lives in the signed
    ///   content there;
    /// - any other event: a hash of the signed body.
    #[must_use]
    pub fn replay_key(&self, body: &[u8]) -> String {
        let p = self.platform;
        if p.is_forge() {
            if let Some(id) = self.reply.get("comment_id") {
                let action = self.action.as_deref().unwrap_or("");
                return format!("{p}:comment:{id}:{action}");
            }
        } else if let Some(id) = &self.delivery_id {
            return format!("{p}:{id}");
        }
        use sha2::Digest;
        format!("{p}:body:{}", hex::encode(sha2::Sha256::digest(body)))
    }
}

impl InboundEvent {
    pub(crate) fn new(
        platform: Platform,
        kind: EventKind,
        event: &str,
        platform_event: &str,
    ) -> Self {
        Self {
            platform,
            delivery_id: None,
            kind,
            event: event.to_owned(),
            platform_event: platform_event.to_owned(),
            action: None,
            actor: None,
            repository: None,
            pull_request: None,
            issue: None,
            text: None,
            labels: Vec::new(),
            reply: BTreeMap::new(),
        }
    }
}
