//! Configuration: the `triggers:` section of the aiwg config file (see the README).
//!
//! ```yaml
//! triggers:
//!   github:
//!     secret: "${GITHUB_WEBHOOK_SECRET}"
//!     mention: "@aiwg"
//!     allowed_associations: [OWNER, MEMBER, COLLABORATOR]
//!     allowed_workflows: [review, fix]          # default: every workflow
//!     ignore_users: ["aiwg-bot[bot]"]           # our own app: never trigger ourselves
//!     fork_policy: refuse                       # or allow
//!     rules:
//!       - { event: pull_request, action: [opened, reopened], workflow: review }
//!       - { event: issues, action: labeled, label: "aiwg:fix", workflow: fix }
//!   gitlab:    { token: "${GITLAB_WEBHOOK_TOKEN}", signing_secret: "whsec_…" }
//!   slack:     { signing_secret: "${SLACK_SIGNING_SECRET}", command: "/aiwg" }
//!   discord:   { public_key: "${DISCORD_PUBLIC_KEY}", command: aiwg }
//!   gitea:     { secret: "…" }
//!   bitbucket: { secret: "…" }
//!   generic:   { secret: "whsec_…" }                # or token: "…" (Authorization: Bearer)
//!   delivery_ttl: 72h
//! ```
//!
//! Every platform section accepts the policy keys of [`PolicyConfig`] (`mention`,
//! `allowed_associations`, `allowed_users`, `ignore_users`, `allowed_workflows`, `fork_policy`,
//! `rules`). A platform without a section, or whose secret is empty (an unset `${VAR}`), answers
//! every delivery with 401: verification fails closed. Unknown keys are errors.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::secret::Secret;

fn default_mention() -> String {
    "@aiwg".to_owned()
}

fn default_associations() -> Vec<String> {
    ["OWNER", "MEMBER", "COLLABORATOR"]
        .map(str::to_owned)
        .to_vec()
}

fn default_slack_command() -> String {
    "/aiwg".to_owned()
}

fn default_discord_command() -> String {
    "aiwg".to_owned()
}

/// What to do with a pull request whose head lives in another repository.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ForkPolicy {
    /// Ignore it (the default): its code is not ours to run agents on.
    #[default]
    Refuse,
    /// Treat it like any other pull request.
    Allow,
}

/// Maps a non-command event to a workflow, e.g. pull request opened → `review`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// The event: a neutral name (`pull_request`, `issues`, `push`, `comment`) or the platform's
    /// own (`Merge Request Hook`, `pullrequest:created`, `release`…).
    pub event: String,
    /// Actions that match (one or a list; empty: any). Neutral words: `opened`, `reopened`,
    /// `synchronize`, `closed`, `merged`, `labeled`, `created`, `edited`…
    #[serde(default, deserialize_with = "one_or_many")]
    pub action: Vec<String>,
    /// Only when this label is the one added (`labeled`) or among the item's labels.
    #[serde(default)]
    pub label: Option<String>,
    /// The workflow to run.
    pub workflow: String,
    /// Parameters to pass.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Guidance to pass.
    #[serde(default)]
    pub guidance: Option<String>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Raw>::deserialize(d)? {
        None => Vec::new(),
        Some(Raw::One(s)) => vec![s],
        Some(Raw::Many(v)) => v,
    })
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Secs(n)) => Ok(Some(Duration::from_secs(n))),
        Some(Raw::Text(t)) => aiwg_core::util::parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Who may trigger what: the keys every platform section accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// The mention that addresses us in comments (default `@aiwg`).
    pub mention: String,
    /// GitHub `author_association` values allowed to trigger (default `OWNER`, `MEMBER`,
    /// `COLLABORATOR`). Applies where the platform reports one (GitHub); elsewhere use
    /// `allowed_users` or the platform's own permissions.
    pub allowed_associations: Vec<String>,
    /// When not empty, only these users (login, user name or chat user id) may trigger.
    pub allowed_users: Vec<String>,
    /// Users whose events are always ignored (our own app's login), besides anything the
    /// platform marks as a bot.
    pub ignore_users: Vec<String>,
    /// When set, only these workflows may be started from this platform.
    pub allowed_workflows: Option<Vec<String>>,
    /// Pull requests from forks.
    pub fork_policy: ForkPolicy,
    /// Event → workflow rules, first match wins.
    pub rules: Vec<RuleConfig>,
    /// The spending cap of the jobs this platform starts, for workflows without their own
    /// `max_budget_usd`.
    pub max_budget_usd: Option<Usd>,
}

/// An amount of US dollars: finite and greater than zero.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct Usd(f64);

impl Usd {
    /// The amount, or `None` unless it is finite and greater than zero.
    #[must_use]
    pub fn new(amount: f64) -> Option<Self> {
        (amount.is_finite() && amount > 0.0).then_some(Self(amount))
    }

    /// The amount.
    #[must_use]
    pub fn get(self) -> f64 {
        self.0
    }
}

// Never NaN (see `new`), so equality is total.
impl Eq for Usd {}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = f64::deserialize(d)?;
        Usd::new(n)
            .ok_or_else(|| serde::de::Error::custom("must be a positive number of US dollars"))
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            mention: default_mention(),
            allowed_associations: default_associations(),
            allowed_users: Vec::new(),
            ignore_users: Vec::new(),
            allowed_workflows: None,
            fork_policy: ForkPolicy::Refuse,
            rules: Vec::new(),
            max_budget_usd: None,
        }
    }
}

macro_rules! platform_config {
    (
        $(#[$m:meta])*
        $name:ident {
            $( $(#[$fm:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $( $(#[$fm])* pub $field: $ty, )*
            /// See [`PolicyConfig::mention`].
            #[serde(default = "default_mention")]
            pub mention: String,
            /// See [`PolicyConfig::allowed_associations`].
            #[serde(default = "default_associations")]
            pub allowed_associations: Vec<String>,
            /// See [`PolicyConfig::allowed_users`].
            #[serde(default)]
            pub allowed_users: Vec<String>,
            /// See [`PolicyConfig::ignore_users`].
            #[serde(default)]
            pub ignore_users: Vec<String>,
            /// See [`PolicyConfig::allowed_workflows`].
            #[serde(default)]
            pub allowed_workflows: Option<Vec<String>>,
            /// See [`PolicyConfig::fork_policy`].
            #[serde(default)]
            pub fork_policy: ForkPolicy,
            /// See [`PolicyConfig::rules`].
            #[serde(default)]
            pub rules: Vec<RuleConfig>,
            /// See [`PolicyConfig::max_budget_usd`].
            #[serde(default)]
            pub max_budget_usd: Option<Usd>,
        }

        impl Default for $name {
            fn default() -> Self {
                let p = PolicyConfig::default();
                Self {
                    $( $field: $default, )*
                    mention: p.mention,
                    allowed_associations: p.allowed_associations,
                    allowed_users: p.allowed_users,
                    ignore_users: p.ignore_users,
                    allowed_workflows: p.allowed_workflows,
                    fork_policy: p.fork_policy,
                    rules: p.rules,
                    max_budget_usd: p.max_budget_usd,
                }
            }
        }

        impl $name {
            /// The policy keys of this section.
            #[must_use]
            pub fn policy(&self) -> PolicyConfig {
                PolicyConfig {
                    mention: self.mention.clone(),
                    allowed_associations: self.allowed_associations.clone(),
                    allowed_users: self.allowed_users.clone(),
                    ignore_users: self.ignore_users.clone(),
                    allowed_workflows: self.allowed_workflows.clone(),
                    fork_policy: self.fork_policy,
                    rules: self.rules.clone(),
                    max_budget_usd: self.max_budget_usd,
                }
            }
        }
    };
}

platform_config! {
    /// `triggers.github`.
    GitHubConfig {
        /// The webhook secret (`X-Hub-Signature-256`).
        #[serde(default)]
        secret: Secret = Secret::default(),
        /// The REST API (default `https://api.github.com`; GitHub Enterprise:
        /// `https://github.example.com/api/v3`).
        #[serde(default)]
        api_url: Option<String> = None,
        /// A token for the REST API (a bot account's or a fine-grained token): jobs answer on
        /// the pull request (see [`crate::Tracker`]).
        #[serde(default)]
        token: Secret = Secret::default(),
        /// A GitHub App's id: with `private_key`, the app's installation tokens are used
        /// instead of `token`.
        #[serde(default)]
        app_id: Option<String> = None,
        /// The GitHub App's private key (PEM).
        #[serde(default)]
        private_key: Secret = Secret::default(),
    }
}

platform_config! {
    /// `triggers.gitlab`.
    GitLabConfig {
        /// The secret token (`X-Gitlab-Token`).
        #[serde(default)]
        token: Secret = Secret::default(),
        /// The signing token (`whsec_…`): when set, the Standard Webhooks headers GitLab adds
        /// (`webhook-id`, `webhook-timestamp`, `webhook-signature`) are required and verified.
        #[serde(default)]
        signing_secret: Secret = Secret::default(),
        /// The platform's REST API (`https://gitlab.example.com/api/v4`,
        /// `https://gitea.example.com/api/v1`, `https://api.bitbucket.org/2.0`): with
        /// `api_token`, whoever is not in `allowed_users` may trigger when their permission on
        /// the repository is at least `min_permission` (see [`crate::forge`]).
        #[serde(default)]
        api_url: Option<String> = None,
        /// The API token for `api_url`.
        #[serde(default)]
        api_token: Secret = Secret::default(),
        /// The lowest permission that may trigger (GitLab: `guest`, `reporter`, `developer`
        /// (default), `maintainer`, `owner`; Gitea/Forgejo: `read`, `write` (default), `admin`,
        /// `owner`; Bitbucket: `read`, `write` (default), `admin`).
        #[serde(default)]
        min_permission: Option<String> = None,
    }
}

platform_config! {
    /// `triggers.slack`.
    SlackConfig {
        /// The app's signing secret.
        #[serde(default)]
        signing_secret: Secret = Secret::default(),
        /// The slash command (default `/aiwg`); other commands are ignored.
        #[serde(default = "default_slack_command")]
        command: String = default_slack_command(),
        /// When not empty, only these channel ids may trigger.
        #[serde(default)]
        allowed_channels: Vec<String> = Vec::new(),
        /// When not empty, only these workspace (team) ids may trigger.
        #[serde(default)]
        allowed_teams: Vec<String> = Vec::new(),
    }
}

platform_config! {
    /// `triggers.discord`.
    DiscordConfig {
        /// The application's public key (64 hex characters).
        #[serde(default)]
        public_key: String = String::new(),
        /// The application command's name (default `aiwg`); other commands are ignored.
        #[serde(default = "default_discord_command")]
        command: String = default_discord_command(),
        /// When not empty, only members having one of these role ids may trigger.
        #[serde(default)]
        allowed_roles: Vec<String> = Vec::new(),
        /// When not empty, only these servers (guild ids) may trigger.
        #[serde(default)]
        allowed_guilds: Vec<String> = Vec::new(),
    }
}

platform_config! {
    /// `triggers.gitea` (also serves Forgejo).
    GiteaConfig {
        /// The webhook secret (`X-Gitea-Signature` / `X-Forgejo-Signature`).
        #[serde(default)]
        secret: Secret = Secret::default(),
        /// The platform's REST API (`https://gitlab.example.com/api/v4`,
        /// `https://gitea.example.com/api/v1`, `https://api.bitbucket.org/2.0`): with
        /// `api_token`, whoever is not in `allowed_users` may trigger when their permission on
        /// the repository is at least `min_permission` (see [`crate::forge`]).
        #[serde(default)]
        api_url: Option<String> = None,
        /// The API token for `api_url` (also accepted as `token`).
        #[serde(default, alias = "token")]
        api_token: Secret = Secret::default(),
        /// The lowest permission that may trigger (GitLab: `guest`, `reporter`, `developer`
        /// (default), `maintainer`, `owner`; Gitea/Forgejo: `read`, `write` (default), `admin`,
        /// `owner`; Bitbucket: `read`, `write` (default), `admin`).
        #[serde(default)]
        min_permission: Option<String> = None,
    }
}

platform_config! {
    /// `triggers.bitbucket` (Bitbucket Cloud).
    BitbucketConfig {
        /// The webhook secret (`X-Hub-Signature: sha256=…`).
        #[serde(default)]
        secret: Secret = Secret::default(),
        /// The platform's REST API (`https://gitlab.example.com/api/v4`,
        /// `https://gitea.example.com/api/v1`, `https://api.bitbucket.org/2.0`): with
        /// `api_token`, whoever is not in `allowed_users` may trigger when their permission on
        /// the repository is at least `min_permission` (see [`crate::forge`]).
        #[serde(default)]
        api_url: Option<String> = None,
        /// The API token for `api_url` (also accepted as `token`).
        #[serde(default, alias = "token")]
        api_token: Secret = Secret::default(),
        /// The lowest permission that may trigger (GitLab: `guest`, `reporter`, `developer`
        /// (default), `maintainer`, `owner`; Gitea/Forgejo: `read`, `write` (default), `admin`,
        /// `owner`; Bitbucket: `read`, `write` (default), `admin`).
        #[serde(default)]
        min_permission: Option<String> = None,
    }
}

platform_config! {
    /// `triggers.generic`: Standard Webhooks `v1` signatures or a bearer token.
    GenericConfig {
        /// A Standard Webhooks secret (`whsec_<base64>`).
        #[serde(default)]
        secret: Secret = Secret::default(),
        /// A bearer token (`Authorization: Bearer …`), used when `secret` is not set.
        #[serde(default)]
        token: Secret = Secret::default(),
    }
}

/// The whole `triggers:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggersConfig {
    /// GitHub.
    #[serde(default)]
    pub github: Option<GitHubConfig>,
    /// GitLab.
    #[serde(default)]
    pub gitlab: Option<GitLabConfig>,
    /// Slack.
    #[serde(default)]
    pub slack: Option<SlackConfig>,
    /// Discord.
    #[serde(default)]
    pub discord: Option<DiscordConfig>,
    /// Gitea / Forgejo.
    #[serde(default)]
    pub gitea: Option<GiteaConfig>,
    /// Bitbucket Cloud.
    #[serde(default)]
    pub bitbucket: Option<BitbucketConfig>,
    /// Generic (Standard Webhooks or bearer token).
    #[serde(default)]
    pub generic: Option<GenericConfig>,
    /// How long delivery ids are remembered for de-duplication (default 72 h; GitHub lets a
    /// delivery be redelivered for 3 days).
    #[serde(default, deserialize_with = "opt_duration")]
    pub delivery_ttl: Option<Duration>,
}

impl TriggersConfig {
    /// The REST clients the sections configure (GitHub: `token` or `app_id` +
    /// `private_key`; GitLab, Gitea, Bitbucket: `api_url` + `api_token`), for
    /// [`Tracker`](crate::Tracker) and for recognising the bot's own comments.
    ///
    /// # Errors
    /// [`BuildError::Invalid`](crate::BuildError::Invalid) naming the key of a bad URL, key
    /// or token.
    pub fn forge_clients(
        &self,
    ) -> Result<Vec<std::sync::Arc<crate::forge::ForgeClient>>, crate::BuildError> {
        use crate::forge::{ForgeAuth, ForgeClient, GitHubApp};
        use crate::Platform as P;
        let mut out = Vec::new();
        if let Some(g) = &self.github {
            let auth = match &g.app_id {
                Some(app) => {
                    let app =
                        GitHubApp::new(app.clone(), g.private_key.expose()).map_err(|reason| {
                            crate::BuildError::Invalid {
                                key: "triggers.github.private_key".into(),
                                reason,
                            }
                        })?;
                    Some(ForgeAuth::App(std::sync::Arc::new(app)))
                }
                None if g.token.is_configured() => Some(ForgeAuth::Token(g.token.clone())),
                None => None,
            };
            if let Some(auth) = auth {
                out.push(ForgeClient::new(
                    "triggers.github",
                    P::GitHub,
                    g.api_url.as_deref(),
                    auth,
                )?);
            }
        }
        let token_sections = [
            (
                "triggers.gitlab",
                P::GitLab,
                self.gitlab.as_ref().map(|c| (&c.api_url, &c.api_token)),
            ),
            (
                "triggers.gitea",
                P::Gitea,
                self.gitea.as_ref().map(|c| (&c.api_url, &c.api_token)),
            ),
            (
                "triggers.bitbucket",
                P::Bitbucket,
                self.bitbucket.as_ref().map(|c| (&c.api_url, &c.api_token)),
            ),
        ];
        for (key, platform, section) in token_sections {
            if let Some((Some(url), token)) = section {
                out.push(ForgeClient::new(
                    key,
                    platform,
                    Some(url),
                    ForgeAuth::Token(token.clone()),
                )?);
            }
        }
        Ok(out.into_iter().map(std::sync::Arc::new).collect())
    }

    /// Every platform section: its key, its platform, and whether it is present.
    #[must_use]
    pub fn sections(&self) -> [(&'static str, crate::Platform, bool); 7] {
        use crate::Platform as P;
        [
            ("github", P::GitHub, self.github.is_some()),
            ("gitlab", P::GitLab, self.gitlab.is_some()),
            ("slack", P::Slack, self.slack.is_some()),
            ("discord", P::Discord, self.discord.is_some()),
            ("gitea", P::Gitea, self.gitea.is_some()),
            ("bitbucket", P::Bitbucket, self.bitbucket.is_some()),
            ("generic", P::Generic, self.generic.is_some()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_design_section_5_parses_with_defaults() {
        let yaml = r#"
github:  { secret: "s3cr3t-gh", mention: "@bot", allowed_associations: [OWNER],
           rules: [ { event: pull_request, action: [opened, reopened], workflow: review },
                    { event: issues, action: labeled, label: "aiwg:fix", workflow: fix } ] }
gitlab:  { token: "gl-token" }
slack:   { signing_secret: "slack-secret", command: "/aiwg" }
discord: { public_key: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a" }
delivery_ttl: 1h
"#;
        let c: TriggersConfig = serde_norway::from_str(yaml).expect("parses");
        let gh = c.github.as_ref().expect("github");
        assert_eq!(gh.mention, "@bot");
        assert_eq!(gh.rules[0].action, vec!["opened", "reopened"]);
        assert_eq!(gh.rules[1].action, vec!["labeled"]);
        assert_eq!(gh.fork_policy, ForkPolicy::Refuse);
        assert_eq!(
            c.gitlab
                .as_ref()
                .expect("gitlab")
                .allowed_associations
                .len(),
            3
        );
        assert_eq!(c.slack.as_ref().expect("slack").command, "/aiwg");
        assert_eq!(c.discord.as_ref().expect("discord").command, "aiwg");
        assert_eq!(c.delivery_ttl, Some(Duration::from_secs(3600)));
        assert!(c.gitea.is_none());
        let debug = format!("{c:?}");
        for secret in ["s3cr3t-gh", "gl-token", "slack-secret"] {
            assert!(!debug.contains(secret), "Debug leaks {secret}");
        }
    }

    #[test]
    fn a_platform_budget_is_a_positive_amount() {
        let c: TriggersConfig =
            serde_norway::from_str("github: { secret: s, max_budget_usd: 0.5 }").expect("parses");
        let policy = c.github.expect("github").policy();
        assert_eq!(policy.max_budget_usd.map(Usd::get), Some(0.5));
        for bad in ["0", "-1", ".nan", "free"] {
            let err = serde_norway::from_str::<TriggersConfig>(&format!(
                "gitlab: {{ token: t, max_budget_usd: {bad} }}"
            ))
            .expect_err(bad);
            assert!(
                err.to_string().contains("max_budget_usd")
                    || err.to_string().contains("US dollars"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let err = serde_norway::from_str::<TriggersConfig>("github: { secert: x }")
            .expect_err("typo must fail");
        assert!(err.to_string().contains("secert"), "{err}");
        let err = serde_norway::from_str::<TriggersConfig>("githib: {}").expect_err("typo");
        assert!(err.to_string().contains("githib"), "{err}");
    }
}
