//! Who may trigger on forges without author associations: a permission lookup through the
//! platform's REST API.
//!
//! GitLab, Gitea/Forgejo and Bitbucket Cloud send no author association with a comment, so
//! a platform section either names `allowed_users` or configures `api_url` and `api_token`;
//! then the commenter's permission on the repository is asked for and compared with
//! `min_permission`:
//!
//! | platform | request | levels (default minimum **bold**) |
//! |---|---|---|
//! | GitLab | `GET {api_url}/projects/{path}/members/all/{user id}` (`PRIVATE-TOKEN`) | guest, reporter, **developer**, maintainer, owner |
//! | Gitea / Forgejo | `GET {api_url}/repos/{owner}/{repo}/collaborators/{login}/permission` (`Authorization: token …`) | read, **write**, admin, owner |
//! | Bitbucket Cloud | `GET {api_url}/workspaces/{workspace}/permissions/repositories/{slug}?q=user.uuid="{uuid}"` (bearer, or basic for `user:app-password`) | read, **write**, admin |
//!
//! A user who is no member answers `404`: level none. Answers are cached for a minute (both
//! ways, so a stranger commenting in a loop costs one request a minute); a lookup that fails
//! (the forge is down, refuses the token, rate-limits) refuses the trigger — fail closed —
//! and is not cached. Neither the token nor the request URL appears in an error or a log.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::BuildError;
use crate::event::{InboundEvent, Platform};
use crate::secret::Secret;

/// How long an answer is kept.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// At most this many answers are kept.
const CACHE_MAX: usize = 10_000;

/// Why a lookup gave no answer (the trigger is refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The event does not say who or where (no user id, no repository).
    #[error("the event does not name {0}")]
    Missing(&'static str),
    /// The forge could not be reached or did not answer in time.
    #[error("the {0} API could not be reached")]
    Unreachable(Platform),
    /// The forge answered with an unexpected status (token refused, rate limited, …).
    #[error("the {platform} API answered {status}")]
    Status {
        /// The platform.
        platform: Platform,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not the documented JSON.
    #[error("the {0} API answered something unexpected")]
    Unexpected(Platform),
}

/// A permission lookup for one platform section.
pub struct PermissionLookup {
    platform: Platform,
    base: String,
    token: Secret,
    min: u8,
    http: reqwest::Client,
    cache: Mutex<HashMap<(String, String), (Instant, u8)>>,
}

impl fmt::Debug for PermissionLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermissionLookup")
            .field("platform", &self.platform)
            .field("api_url", &self.base)
            .field("min", &self.min)
            .finish_non_exhaustive()
    }
}

/// The levels of `platform`, lowest first (index = rank; rank 0 is "none").
fn levels(platform: Platform) -> &'static [&'static str] {
    match platform {
        Platform::GitLab => &[
            "none",
            "guest",
            "reporter",
            "developer",
            "maintainer",
            "owner",
        ],
        Platform::Gitea => &["none", "read", "write", "admin", "owner"],
        _ => &["none", "read", "write", "admin"],
    }
}

fn default_min(platform: Platform) -> &'static str {
    match platform {
        Platform::GitLab => "developer",
        _ => "write",
    }
}

/// The rank of a level name (`None` for an unknown one).
fn rank(platform: Platform, name: &str) -> Option<u8> {
    levels(platform)
        .iter()
        .position(|l| l.eq_ignore_ascii_case(name))
        .and_then(|i| u8::try_from(i).ok())
}

/// GitLab's numeric access level as a rank.
fn gitlab_rank(access_level: u64) -> u8 {
    match access_level {
        0..=9 => 0,
        10..=19 => 1,
        20..=29 => 2,
        30..=39 => 3,
        40..=49 => 4,
        _ => 5,
    }
}

impl PermissionLookup {
    /// A lookup against `api_url` (GitLab: `https://gitlab.example.com/api/v4`; Gitea:
    /// `https://gitea.example.com/api/v1`; Bitbucket: `https://api.bitbucket.org/2.0`) with
    /// `token`, admitting users at `min_permission` or above (`None`: the platform's default).
    ///
    /// # Errors
    /// [`BuildError::Invalid`] naming `key` (the section) for a URL that is not http(s), an
    /// empty token, an unknown level, or a platform without lookups.
    pub fn new(
        key: &str,
        platform: Platform,
        api_url: &str,
        token: Secret,
        min_permission: Option<&str>,
    ) -> Result<Self, BuildError> {
        let invalid = |field: &str, reason: String| BuildError::Invalid {
            key: format!("{key}.{field}"),
            reason,
        };
        if !matches!(
            platform,
            Platform::GitLab | Platform::Gitea | Platform::Bitbucket
        ) {
            return Err(invalid(
                "api_url",
                "permission lookups exist for gitlab, gitea and bitbucket".into(),
            ));
        }
        let base = api_url.trim().trim_end_matches('/').to_owned();
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(invalid("api_url", "must be an http(s) URL".into()));
        }
        if !token.is_configured() {
            return Err(invalid(
                "api_token",
                "is empty (an unset variable?); the permission lookup needs it".into(),
            ));
        }
        let min_name = min_permission.unwrap_or(default_min(platform));
        let min = rank(platform, min_name).filter(|r| *r > 0).ok_or_else(|| {
            invalid(
                "min_permission",
                format!(
                    "`{min_name}` is not one of {}",
                    levels(platform)[1..].join(", ")
                ),
            )
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("aiwg/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| invalid("api_url", "the HTTP client could not be built".into()))?;
        Ok(Self {
            platform,
            base,
            token,
            min,
            http,
            cache: Mutex::default(),
        })
    }

    /// The minimum level's name.
    #[must_use]
    pub fn min_permission(&self) -> &'static str {
        levels(self.platform)[usize::from(self.min)]
    }

    /// Whether the event's actor has at least the minimum level on its repository: the
    /// level's name when they have not (`Ok(Err(level))`).
    ///
    /// # Errors
    /// [`LookupError`] when the forge gives no answer (the trigger is then refused).
    pub async fn check(
        &self,
        event: &InboundEvent,
    ) -> Result<Result<(), &'static str>, LookupError> {
        let repo = event
            .repository
            .as_ref()
            .map(|r| r.full_name.clone())
            .filter(|r| !r.is_empty())
            .ok_or(LookupError::Missing("a repository"))?;
        let actor = event.actor.as_ref().ok_or(LookupError::Missing("a user"))?;
        let user = match self.platform {
            Platform::Gitea => actor.login.clone(),
            _ => actor.id.clone().ok_or(LookupError::Missing("a user id"))?,
        };
        let key = (repo, user);
        if let Some(level) = self.cached(&key) {
            return Ok(self.verdict(level));
        }
        let level = self.fetch(&key.0, &key.1).await?;
        self.remember(key, level);
        Ok(self.verdict(level))
    }

    fn verdict(&self, level: u8) -> Result<(), &'static str> {
        if level >= self.min {
            Ok(())
        } else {
            Err(levels(self.platform)[usize::from(level)])
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<u8> {
        let cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, level)| *level)
    }

    fn remember(&self, key: (String, String), level: u8) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), level));
    }

    async fn fetch(&self, repo: &str, user: &str) -> Result<u8, LookupError> {
        let enc = super::client::seg;
        let request = match self.platform {
            Platform::GitLab => self
                .http
                .get(format!(
                    "{}/projects/{}/members/all/{}",
                    self.base,
                    enc(repo),
                    enc(user)
                ))
                .header("PRIVATE-TOKEN", self.token.expose()),
            Platform::Gitea => {
                let (owner, name) = repo
                    .split_once('/')
                    .ok_or(LookupError::Missing("an owner/repository"))?;
                self.http
                    .get(format!(
                        "{}/repos/{}/{}/collaborators/{}/permission",
                        self.base,
                        enc(owner),
                        enc(name),
                        enc(user)
                    ))
                    .header("Authorization", format!("token {}", self.token.expose()))
            }
            _ => {
                let (workspace, slug) = repo
                    .split_once('/')
                    .ok_or(LookupError::Missing("a workspace/repository"))?;
                let rb = self
                    .http
                    .get(format!(
                        "{}/workspaces/{}/permissions/repositories/{}",
                        self.base,
                        enc(workspace),
                        enc(slug)
                    ))
                    .query(&[("q", format!("user.uuid=\"{}\"", user.replace('"', "")))]);
                match self.token.expose().split_once(':') {
                    Some((u, p)) => rb.basic_auth(u, Some(p)),
                    None => rb.bearer_auth(self.token.expose()),
                }
            }
        };
        let platform = self.platform;
        let res = request.send().await.map_err(|e| {
            tracing::warn!(%platform, error = %e.without_url(), "permission lookup failed");
            LookupError::Unreachable(platform)
        })?;
        let status = res.status().as_u16();
        if status == 404 {
            return Ok(0);
        }
        if status != 200 {
            tracing::warn!(%platform, status, "permission lookup refused");
            return Err(LookupError::Status { platform, status });
        }
        let body: serde_json::Value = res
            .json()
            .await
            .map_err(|_| LookupError::Unexpected(platform))?;
        let unexpected = || LookupError::Unexpected(platform);
        match platform {
            Platform::GitLab => body["access_level"]
                .as_u64()
                .map(gitlab_rank)
                .ok_or_else(unexpected),
            Platform::Gitea => body["permission"]
                .as_str()
                .and_then(|p| rank(platform, p))
                .ok_or_else(unexpected),
            _ => {
                let values = body["values"].as_array().ok_or_else(unexpected)?;
                Ok(values
                    .iter()
                    .filter_map(|v| v["permission"].as_str())
                    .filter_map(|p| rank(platform, p))
                    .max()
                    .unwrap_or(0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_defaults() {
        let l = |p, m: Option<&str>| {
            PermissionLookup::new(
                "triggers.x",
                p,
                "https://f.example/api",
                Secret::new("t"),
                m,
            )
        };
        assert_eq!(
            l(Platform::GitLab, None).unwrap().min_permission(),
            "developer"
        );
        assert_eq!(l(Platform::Gitea, None).unwrap().min_permission(), "write");
        assert_eq!(
            l(Platform::Bitbucket, Some("ADMIN"))
                .unwrap()
                .min_permission(),
            "admin"
        );
        let e = l(Platform::Gitea, Some("root")).unwrap_err().to_string();
        assert!(e.contains("triggers.x.min_permission"), "{e}");
        assert!(e.contains("read, write, admin, owner"), "{e}");
        assert!(l(Platform::Gitea, Some("none")).is_err());
        assert!(l(Platform::GitHub, None).is_err());
        let e = PermissionLookup::new("k", Platform::Gitea, "ftp://x", Secret::new("t"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("k.api_url"), "{e}");
        let e = PermissionLookup::new("k", Platform::Gitea, "https://x", Secret::new(""), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("k.api_token"), "{e}");
        assert_eq!(gitlab_rank(30), 3);
        assert_eq!(gitlab_rank(50), 5);
        assert_eq!(gitlab_rank(5), 0);
        assert_eq!(
            super::super::client::seg("group/sub proj"),
            "group%2Fsub%20proj"
        );
    }
}
