//! [`ForgeClient`]: comments, reactions and identity on one forge.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::github_app::GitHubApp;
use super::send::{send, ATTEMPTS};
use crate::error::BuildError;
use crate::event::Platform;
use crate::secret::Secret;

/// Why a forge request gave up. Names neither the token nor the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ForgeError {
    /// The forge could not be reached (after retries).
    #[error("{platform}: {what}: the API could not be reached")]
    Unreachable {
        /// The platform.
        platform: Platform,
        /// What was asked.
        what: &'static str,
    },
    /// The forge answered an error status (after retries, for 5xx).
    #[error("{platform}: {what}: the API answered {status}")]
    Status {
        /// The platform.
        platform: Platform,
        /// What was asked.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// A rate limit asked for a longer wait than we give a reply.
    #[error("{platform}: {what}: rate limited for {}s", wait.as_secs())]
    RateLimited {
        /// The platform.
        platform: Platform,
        /// What was asked.
        what: &'static str,
        /// How long the forge asked us to wait.
        wait: Duration,
    },
    /// The answer was not the documented JSON.
    #[error("{platform}: {what}: unexpected answer")]
    Unexpected {
        /// The platform.
        platform: Platform,
        /// What was asked.
        what: &'static str,
    },
    /// What the job names is not enough to address the forge (no repository, no number).
    #[error("{0}")]
    Target(&'static str),
}

/// How a client authenticates.
#[derive(Clone)]
pub enum ForgeAuth {
    /// A token: GitHub and Gitea personal or bot tokens, GitLab `PRIVATE-TOKEN`, Bitbucket
    /// bearer (or `user:app-password`, sent as basic).
    Token(Secret),
    /// A GitHub App (installation tokens made from its JWT).
    App(Arc<GitHubApp>),
}

impl fmt::Debug for ForgeAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(_) => f.write_str("Token(..)"),
            Self::App(app) => f.debug_tuple("App").field(app).finish(),
        }
    }
}

/// Where a job's comment goes: a pull/merge request or an issue of a repository.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommentTarget {
    /// `owner/repo` (GitLab: the project path).
    pub repo: String,
    /// The pull request's or issue's number (GitLab: `iid`).
    pub number: u64,
    /// A pull/merge request (not an issue).
    pub pull_request: bool,
    /// GitHub Apps: the installation that delivered the event.
    pub installation: Option<u64>,
}

impl CommentTarget {
    /// A target on `repo`.
    #[must_use]
    pub fn new(repo: impl Into<String>, number: u64, pull_request: bool) -> Self {
        Self {
            repo: repo.into(),
            number,
            pull_request,
            installation: None,
        }
    }

    /// With the GitHub App installation.
    #[must_use]
    pub fn installation(mut self, id: Option<u64>) -> Self {
        self.installation = id;
        self
    }

    fn owner_repo(&self) -> Result<(&str, &str), ForgeError> {
        self.repo
            .split_once('/')
            .ok_or(ForgeError::Target("the repository is not owner/name"))
    }
}

/// A REST client for one forge.
pub struct ForgeClient {
    platform: Platform,
    base: String,
    auth: ForgeAuth,
    http: reqwest::Client,
    retry_base: Duration,
    /// The bot's login, and when it was asked (a failed lookup is asked again after a while).
    identity: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl fmt::Debug for ForgeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForgeClient")
            .field("platform", &self.platform)
            .field("api_url", &self.base)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// A GitHub pull request document's head and base (`GET /repos/{owner}/{repo}/pulls/{n}`);
/// `None` when it is not one, or its head commit is not a commit id.
fn pull_request_of(v: &Value) -> Option<crate::event::PullRequest> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let (head, base) = (&v["head"], &v["base"]);
    let sha = text(&head["sha"])
        .filter(|s| (40..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()))?;
    let (head_repo, base_repo) = (&head["repo"], &base["repo"]);
    // A head whose repository is gone (`null`) was a fork that was deleted; otherwise the two
    // repositories are compared by id, which a rename or a transfer does not change.
    let from_fork = if head_repo.is_null() {
        true
    } else {
        match (head_repo["id"].as_u64(), base_repo["id"].as_u64()) {
            (Some(h), Some(b)) => h != b,
            _ => !head_repo["full_name"]
                .as_str()
                .zip(base_repo["full_name"].as_str())
                .is_some_and(|(h, b)| h.eq_ignore_ascii_case(b)),
        }
    };
    Some(crate::event::PullRequest {
        number: v["number"].as_u64()?,
        head_ref: text(&head["ref"]),
        head_sha: Some(sha),
        head_repo: text(&head_repo["full_name"]),
        head_clone_url: text(&head_repo["clone_url"]),
        base_ref: text(&base["ref"]),
        from_fork: Some(from_fork),
    })
}

/// Percent-encodes one path segment.
pub(crate) fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ForgeClient {
    /// A client for `platform` at `api_url` (default: `https://api.github.com` for GitHub,
    /// `https://api.bitbucket.org/2.0` for Bitbucket; required for GitLab and Gitea). `key`
    /// names the configuration section in errors.
    ///
    /// # Errors
    /// [`BuildError::Invalid`] for a missing or non-http(s) URL or an empty token.
    pub fn new(
        key: &str,
        platform: Platform,
        api_url: Option<&str>,
        auth: ForgeAuth,
    ) -> Result<Self, BuildError> {
        let invalid = |field: &str, reason: &str| BuildError::Invalid {
            key: format!("{key}.{field}"),
            reason: reason.to_owned(),
        };
        let base = match (api_url, platform) {
            (Some(u), _) => u.trim().trim_end_matches('/').to_owned(),
            (None, Platform::GitHub) => "https://api.github.com".to_owned(),
            (None, Platform::Bitbucket) => "https://api.bitbucket.org/2.0".to_owned(),
            (None, _) => return Err(invalid("api_url", "is required to reply on this forge")),
        };
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(invalid("api_url", "must be an http(s) URL"));
        }
        if let ForgeAuth::Token(t) = &auth {
            if !t.is_configured() {
                return Err(invalid("api_token", "is empty (an unset variable?)"));
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("aiwg/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| invalid("api_url", "the HTTP client could not be built"))?;
        Ok(Self {
            platform,
            base,
            auth,
            http,
            retry_base: Duration::from_secs(1),
            identity: std::sync::Mutex::new(None),
        })
    }

    /// The first backoff delay between retries (default 1 s; tests shorten it).
    #[must_use]
    pub fn retry_base(mut self, delay: Duration) -> Self {
        self.retry_base = delay;
        self
    }

    /// The platform.
    #[must_use]
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// A request made with `token` failed with `e`: a 401 to a GitHub App's installation token
    /// drops it from the cache (it was revoked, or the installation's key rotated), so the
    /// next request buys another instead of failing until the token's hour is up.
    fn refused(&self, token: &str, e: ForgeError) -> ForgeError {
        if let (ForgeError::Status { status: 401, .. }, ForgeAuth::App(app)) = (&e, &self.auth) {
            app.forget(token);
        }
        e
    }

    fn authed(&self, rb: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
        match self.platform {
            Platform::GitHub => rb
                .bearer_auth(token)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28"),
            Platform::GitLab => rb.header("PRIVATE-TOKEN", token),
            Platform::Gitea => rb.header("authorization", format!("token {token}")),
            _ => match token.split_once(':') {
                Some((u, p)) => rb.basic_auth(u, Some(p)),
                None => rb.bearer_auth(token),
            },
        }
    }

    async fn json(
        &self,
        what: &'static str,
        method: reqwest::Method,
        url: String,
        token: &str,
        body: Option<&Value>,
    ) -> Result<Value, ForgeError> {
        self.json_tries(what, method, url, token, body, ATTEMPTS)
            .await
    }

    async fn json_tries(
        &self,
        what: &'static str,
        method: reqwest::Method,
        url: String,
        token: &str,
        body: Option<&Value>,
        attempts: u32,
    ) -> Result<Value, ForgeError> {
        let res = send(self.platform, what, self.retry_base, attempts, || {
            let mut rb = self.authed(self.http.request(method.clone(), &url), token);
            if let Some(b) = body {
                rb = rb.json(b);
            }
            rb
        })
        .await?;
        let text = res.text().await.unwrap_or_default();
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|_| ForgeError::Unexpected {
            platform: self.platform,
            what,
        })
    }

    /// The token for requests about `target` (a GitHub App's installation token).
    async fn token(&self, target: Option<&CommentTarget>) -> Result<String, ForgeError> {
        let app = match &self.auth {
            ForgeAuth::Token(t) => return Ok(t.expose().to_owned()),
            ForgeAuth::App(app) => app,
        };
        let jwt = app.jwt(chrono::Utc::now());
        let installation = match target.and_then(|t| t.installation) {
            Some(id) => id,
            None => {
                let t = target.ok_or(ForgeError::Target(
                    "no repository to find the installation of",
                ))?;
                let (owner, repo) = t.owner_repo()?;
                let v = self
                    .json(
                        "find the app installation",
                        reqwest::Method::GET,
                        format!(
                            "{}/repos/{}/{}/installation",
                            self.base,
                            seg(owner),
                            seg(repo)
                        ),
                        &jwt,
                        None,
                    )
                    .await?;
                v["id"].as_u64().ok_or(ForgeError::Unexpected {
                    platform: self.platform,
                    what: "find the app installation",
                })?
            }
        };
        if let Some(token) = app.cached(installation) {
            return Ok(token);
        }
        let what = "create an installation token";
        let v = self
            .json(
                what,
                reqwest::Method::POST,
                format!(
                    "{}/app/installations/{installation}/access_tokens",
                    self.base
                ),
                &jwt,
                None,
            )
            .await?;
        let unexpected = ForgeError::Unexpected {
            platform: self.platform,
            what,
        };
        let token = v["token"].as_str().ok_or(unexpected.clone())?.to_owned();
        let expires = v["expires_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.with_timezone(&chrono::Utc))
            .ok_or(unexpected)?;
        app.remember(installation, token.clone(), expires);
        Ok(token)
    }

    fn comments_url(&self, t: &CommentTarget) -> Result<String, ForgeError> {
        let b = &self.base;
        Ok(match self.platform {
            Platform::GitLab => format!(
                "{b}/projects/{}/{}/{}/notes",
                seg(&t.repo),
                if t.pull_request {
                    "merge_requests"
                } else {
                    "issues"
                },
                t.number
            ),
            Platform::Bitbucket => {
                let (w, r) = t.owner_repo()?;
                format!(
                    "{b}/repositories/{}/{}/{}/{}/comments",
                    seg(w),
                    seg(r),
                    if t.pull_request {
                        "pullrequests"
                    } else {
                        "issues"
                    },
                    t.number
                )
            }
            _ => {
                let (o, r) = t.owner_repo()?;
                format!(
                    "{b}/repos/{}/{}/issues/{}/comments",
                    seg(o),
                    seg(r),
                    t.number
                )
            }
        })
    }

    fn comment_url(&self, t: &CommentTarget, id: &str) -> Result<String, ForgeError> {
        Ok(match self.platform {
            Platform::GitLab | Platform::Bitbucket => {
                format!("{}/{}", self.comments_url(t)?, seg(id))
            }
            _ => {
                let (o, r) = t.owner_repo()?;
                format!(
                    "{}/repos/{}/{}/issues/comments/{}",
                    self.base,
                    seg(o),
                    seg(r),
                    seg(id)
                )
            }
        })
    }

    fn comment_body(&self, text: &str) -> Value {
        match self.platform {
            Platform::Bitbucket => json!({ "content": { "raw": text } }),
            _ => json!({ "body": text }),
        }
    }

    /// Posts a comment on the target; returns its id.
    ///
    /// # Errors
    /// [`ForgeError`] when the forge does not take it.
    pub async fn create_comment(
        &self,
        t: &CommentTarget,
        text: &str,
    ) -> Result<String, ForgeError> {
        let what = "create a comment";
        let token = self.token(Some(t)).await?;
        let v = self
            .json(
                what,
                reqwest::Method::POST,
                self.comments_url(t)?,
                &token,
                Some(&self.comment_body(text)),
            )
            .await
            .map_err(|e| self.refused(&token, e))?;
        self.comment_id_of(&v, what)
    }

    /// Posts a comment holding `marker` on the target, unless one is there already; returns
    /// its id. A POST is not repeated blindly: after a 5xx answer or a lost connection the
    /// forge may have stored the comment anyway, so the thread is searched for `marker`
    /// ([`find_comment`](Self::find_comment)) before each new try. (A rate limit's refusal
    /// stored nothing: the POST is sent again once it lifts.)
    ///
    /// # Errors
    /// [`ForgeError`] when the forge does not take it.
    pub async fn create_comment_marked(
        &self,
        t: &CommentTarget,
        text: &str,
        marker: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<String, ForgeError> {
        let what = "create a comment";
        let mut last = ForgeError::Unreachable {
            platform: self.platform,
            what,
        };
        let mut maybe_stored = false;
        for n in 0..ATTEMPTS {
            if maybe_stored {
                tokio::time::sleep(super::send::backoff(n - 1, self.retry_base)).await;
                if let Some(id) = self.find_comment(t, marker, since).await? {
                    return Ok(id);
                }
            }
            let token = self.token(Some(t)).await?;
            let sent = self
                .json_tries(
                    what,
                    reqwest::Method::POST,
                    self.comments_url(t)?,
                    &token,
                    Some(&self.comment_body(text)),
                    1,
                )
                .await
                .map_err(|e| self.refused(&token, e));
            match sent {
                Ok(v) => return self.comment_id_of(&v, what),
                Err(e @ ForgeError::RateLimited { .. }) => last = e,
                Err(
                    e @ (ForgeError::Unreachable { .. }
                    | ForgeError::Status {
                        status: 500..=599, ..
                    }),
                ) => {
                    maybe_stored = true;
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The id of the bot's comment on the target that holds `marker` (the newest, if several),
    /// looking at comments made since `since` (GitHub and Gitea; GitLab and Bitbucket: the
    /// newest hundred). Only the bot's own comments count when its identity is known, so a
    /// comment quoting the marker is never taken for ours.
    ///
    /// # Errors
    /// [`ForgeError`] when the forge cannot list the comments.
    pub async fn find_comment(
        &self,
        t: &CommentTarget,
        marker: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<String>, ForgeError> {
        let what = "list the comments";
        let me = self.identity().await;
        let url = self.comments_url(t)?;
        let since = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let token = self.token(Some(t)).await?;
        let (author, body) = match self.platform {
            Platform::GitLab => ("/author/username", "/body"),
            Platform::Bitbucket => ("/user/nickname", "/content/raw"),
            _ => ("/user/login", "/body"),
        };
        let mut found = None;
        for page in 1..=5u32 {
            let query = match self.platform {
                Platform::GitLab => {
                    format!("?sort=desc&order_by=created_at&per_page=100&page={page}")
                }
                Platform::Bitbucket => format!("?sort=-created_on&pagelen=100&page={page}"),
                Platform::Gitea => format!("?since={since}&page={page}&limit=50"),
                _ => format!("?since={since}&per_page=100&page={page}"),
            };
            let v = self
                .json_tries(
                    what,
                    reqwest::Method::GET,
                    format!("{url}{query}"),
                    &token,
                    None,
                    2,
                )
                .await
                .map_err(|e| self.refused(&token, e))?;
            let list = match self.platform {
                Platform::Bitbucket => v["values"].as_array().cloned().unwrap_or_default(),
                _ => v.as_array().cloned().unwrap_or_default(),
            };
            for c in &list {
                let ours = me.as_deref().is_none_or(|me| {
                    c.pointer(author)
                        .and_then(Value::as_str)
                        .is_some_and(|a| a.eq_ignore_ascii_case(me))
                });
                let marked = c
                    .pointer(body)
                    .and_then(Value::as_str)
                    .is_some_and(|b| b.contains(marker));
                if ours && marked {
                    found = match &c["id"] {
                        Value::Number(n) => Some(n.to_string()),
                        Value::String(s) => Some(s.clone()),
                        _ => found,
                    };
                    // Newest first there: the first match is the newest.
                    if matches!(self.platform, Platform::GitLab | Platform::Bitbucket) {
                        return Ok(found);
                    }
                }
            }
            let more = match self.platform {
                Platform::Bitbucket => v["next"].is_string(),
                Platform::Gitea => list.len() == 50,
                _ => list.len() == 100,
            };
            if !more {
                break;
            }
        }
        Ok(found)
    }

    fn comment_id_of(&self, v: &Value, what: &'static str) -> Result<String, ForgeError> {
        match &v["id"] {
            Value::Number(n) => Ok(n.to_string()),
            Value::String(s) => Ok(s.clone()),
            _ => Err(ForgeError::Unexpected {
                platform: self.platform,
                what,
            }),
        }
    }

    /// Replaces the text of comment `id`.
    ///
    /// # Errors
    /// [`ForgeError`] when the forge does not take it.
    pub async fn edit_comment(
        &self,
        t: &CommentTarget,
        id: &str,
        text: &str,
    ) -> Result<(), ForgeError> {
        let token = self.token(Some(t)).await?;
        let method = match self.platform {
            Platform::GitLab | Platform::Bitbucket => reqwest::Method::PUT,
            _ => reqwest::Method::PATCH,
        };
        self.json(
            "edit a comment",
            method,
            self.comment_url(t, id)?,
            &token,
            Some(&self.comment_body(text)),
        )
        .await
        .map(drop)
        .map_err(|e| self.refused(&token, e))
    }

    /// Reacts 👀 to the comment `comment_id` that triggered a job (GitHub and Gitea
    /// reactions, a GitLab award emoji; Bitbucket has none). `review_comment`: a GitHub
    /// pull-request review comment, whose reactions live elsewhere.
    ///
    /// # Errors
    /// [`ForgeError`] when the forge does not take it.
    pub async fn react(
        &self,
        t: &CommentTarget,
        comment_id: &str,
        review_comment: bool,
    ) -> Result<(), ForgeError> {
        let what = "react to the comment";
        let (url, body) = match self.platform {
            Platform::Bitbucket => return Ok(()),
            Platform::GitLab => (
                format!("{}/award_emoji", self.comment_url(t, comment_id)?),
                json!({ "name": "eyes" }),
            ),
            Platform::GitHub if review_comment => {
                let (o, r) = t.owner_repo()?;
                (
                    format!(
                        "{}/repos/{}/{}/pulls/comments/{}/reactions",
                        self.base,
                        seg(o),
                        seg(r),
                        seg(comment_id)
                    ),
                    json!({ "content": "eyes" }),
                )
            }
            _ => (
                format!("{}/reactions", self.comment_url(t, comment_id)?),
                json!({ "content": "eyes" }),
            ),
        };
        let token = self.token(Some(t)).await?;
        self.json(what, reqwest::Method::POST, url, &token, Some(&body))
            .await
            .map(drop)
            .map_err(|e| self.refused(&token, e))
    }

    /// A GitHub pull request as it is now: its head (commit, branch, repository) and base, and
    /// whether the head lives in another repository. GitHub's `issue_comment` names none of
    /// these, so a comment's job learns them here before it is authorized (`fork_policy`) and
    /// run (the worktree is made at this commit). Two quick tries: a webhook is not held up
    /// long by a forge that is down.
    ///
    /// # Errors
    /// [`ForgeError`] when the forge does not answer with a pull request, or its head commit
    /// is not a commit id.
    pub async fn pull_request(
        &self,
        t: &CommentTarget,
    ) -> Result<crate::event::PullRequest, ForgeError> {
        let what = "read the pull request";
        if self.platform != Platform::GitHub {
            return Err(ForgeError::Target("only GitHub's pull requests are read"));
        }
        let (o, r) = t.owner_repo()?;
        let url = format!(
            "{}/repos/{}/{}/pulls/{}",
            self.base,
            seg(o),
            seg(r),
            t.number
        );
        let token = self.token(Some(t)).await?;
        let v = self
            .json_tries(what, reqwest::Method::GET, url, &token, None, 2)
            .await
            .map_err(|e| self.refused(&token, e))?;
        pull_request_of(&v).ok_or(ForgeError::Unexpected {
            platform: self.platform,
            what,
        })
    }

    /// The bot's own login, asked of the forge once (a GitHub App: `<slug>[bot]`; a token: its
    /// user), so our own comments never start a job. `None` when the forge does not say; then
    /// it is asked again at most every five minutes. One quick try: a webhook is never held up
    /// by a forge that is down.
    pub async fn identity(&self) -> Option<String> {
        const RETRY_AFTER: Duration = Duration::from_secs(300);
        if let Some((at, known)) = self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            if known.is_some() || at.elapsed() < RETRY_AFTER {
                return known;
            }
        }
        let found = self.fetch_identity().await;
        match &found {
            Ok(login) => {
                tracing::info!(platform = %self.platform, login, "the bot's identity on the forge")
            }
            Err(e) => {
                tracing::warn!(platform = %self.platform, error = %e, "could not learn the bot's identity; relying on ignore_users and the comment marker")
            }
        }
        let found = found.ok();
        *self
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), found.clone()));
        found
    }

    async fn fetch_identity(&self) -> Result<String, ForgeError> {
        let what = "learn the bot's identity";
        let unexpected = ForgeError::Unexpected {
            platform: self.platform,
            what,
        };
        if let ForgeAuth::App(app) = &self.auth {
            let jwt = app.jwt(chrono::Utc::now());
            let v = self
                .json_tries(
                    what,
                    reqwest::Method::GET,
                    format!("{}/app", self.base),
                    &jwt,
                    None,
                    1,
                )
                .await?;
            return v["slug"]
                .as_str()
                .map(|s| format!("{s}[bot]"))
                .ok_or(unexpected);
        }
        let token = self.token(None).await?;
        let v = self
            .json_tries(
                what,
                reqwest::Method::GET,
                format!("{}/user", self.base),
                &token,
                None,
                1,
            )
            .await?;
        let field = match self.platform {
            Platform::GitLab => "username",
            Platform::Bitbucket => "nickname",
            _ => "login",
        };
        v[field].as_str().map(str::to_owned).ok_or(unexpected)
    }
}
