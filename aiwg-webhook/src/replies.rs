//! Answers that come later: when a job started from Slack or Discord ends, tell the person who
//! asked. A Discord command was answered "thinking…" (a deferred response), so its original
//! message is edited with the outcome; a Slack slash command's `response_url` receives an
//! ephemeral message.
//!
//! [`PlatformReplies`] is a [`JobObserver`]: register it on the engine.
//!
//! ```no_run
//! # fn doc() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let replies = aiwg_webhook::PlatformReplies::builder().build()?;
//! let builder = aiwg_core::Engine::builder().observer(Arc::new(replies));
//! # let _ = builder; Ok(()) }
//! ```

use std::time::Duration;

use aiwg_core::{Job, JobEvent, JobEventKind, JobObserver, JobStatus};
use async_trait::async_trait;
use serde_json::json;

/// The longest text put in a chat message.
const MAX_TEXT: usize = 1800;

/// Why [`PlatformReplies`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepliesError {
    /// The HTTP client could not be built; the cause is its source.
    #[error("could not build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// Builds [`PlatformReplies`].
#[derive(Debug)]
#[must_use]
pub struct PlatformRepliesBuilder {
    discord_api: String,
    slack_hosts: Vec<String>,
    timeout: Duration,
}

impl PlatformRepliesBuilder {
    /// The Discord API base (default `https://discord.com/api/v10`; tests point it at loopback).
    pub fn discord_api(mut self, base: impl Into<String>) -> Self {
        self.discord_api = base.into().trim_end_matches('/').to_owned();
        self
    }

    /// Hosts a Slack `response_url` may point at (default `hooks.slack.com`); an empty list
    /// allows any host (tests).
    pub fn slack_hosts(mut self, hosts: Vec<String>) -> Self {
        self.slack_hosts = hosts;
        self
    }

    /// Timeout of one reply (default 10 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Builds the observer.
    pub fn build(self) -> Result<PlatformReplies, RepliesError> {
        let http = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("aiwg/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(RepliesError::Client)?;
        Ok(PlatformReplies {
            http,
            discord_api: self.discord_api,
            slack_hosts: self.slack_hosts,
        })
    }
}

/// Posts a job's outcome back to the Slack or Discord conversation that started it.
#[derive(Debug, Clone)]
pub struct PlatformReplies {
    http: reqwest::Client,
    discord_api: String,
    slack_hosts: Vec<String>,
}

impl PlatformReplies {
    /// A builder with the production endpoints.
    pub fn builder() -> PlatformRepliesBuilder {
        PlatformRepliesBuilder {
            discord_api: "https://discord.com/api/v10".into(),
            slack_hosts: vec!["hooks.slack.com".into()],
            timeout: Duration::from_secs(10),
        }
    }

    fn slack_url_allowed(&self, url: &reqwest::Url) -> bool {
        if self.slack_hosts.is_empty() {
            return true;
        }
        url.scheme() == "https"
            && url
                .host_str()
                .is_some_and(|h| self.slack_hosts.iter().any(|a| a == h))
    }

    /// Sends the reply, trying again (up to [`ATTEMPTS`] times) when the platform asks to
    /// wait (429, its `Retry-After` up to a minute) or, for a request that may be repeated
    /// (`idempotent`: Discord's edit of its deferred message), after a 5xx or a lost
    /// connection; a Slack message is posted again only when it surely never arrived (the
    /// connection was refused). The reply's handle expires (Discord: 15 minutes, Slack: 30),
    /// so the tries are few and short.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        job: &Job,
        platform: &str,
        idempotent: bool,
    ) {
        for n in 0..ATTEMPTS {
            let Some(attempt) = req.try_clone() else {
                return;
            };
            let wait = match attempt.send().await {
                Ok(res) if res.status().is_success() => return,
                Ok(res) => {
                    let status = res.status().as_u16();
                    let asked = res
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(Duration::from_secs_f64);
                    match (status, asked) {
                        (429, Some(w)) if w <= MAX_WAIT => Some(w),
                        (429, None) => Some(backoff(n)),
                        (500..=599, _) if idempotent => Some(backoff(n)),
                        _ => {
                            tracing::warn!(job = %job.id, platform, status, "the platform refused the job's reply");
                            return;
                        }
                    }
                }
                Err(e) => {
                    // The URL is a capability (Slack response_url, Discord token): never logged.
                    let retry = idempotent || e.is_connect();
                    let e = e.without_url();
                    tracing::warn!(job = %job.id, platform, error = %e, "could not send the job's reply");
                    retry.then(|| backoff(n))
                }
            };
            match wait {
                Some(w) if n + 1 < ATTEMPTS => tokio::time::sleep(w).await,
                _ => break,
            }
        }
        tracing::warn!(job = %job.id, platform, "the job's reply was given up");
    }
}

/// How many times a reply is tried.
const ATTEMPTS: u32 = 4;
/// The longest `Retry-After` waited for.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// The pause before try `n + 2` after a failure: 1 s, 2 s, 4 s (as the forges' requests).
fn backoff(n: u32) -> Duration {
    crate::forge::send::backoff(n, Duration::from_secs(1))
}

/// The text a person reads about a finished job.
#[must_use]
pub fn outcome_text(job: &Job) -> String {
    let head = format!("aiwg job `{}` ({}) {}", job.id, job.workflow, job.status);
    let detail = match job.status {
        JobStatus::Completed => job.result.as_ref().map(|r| r.summary.trim().to_owned()),
        _ => job.error.as_ref().map(|e| e.message.clone()),
    };
    let mut text = match detail.filter(|d| !d.is_empty()) {
        Some(d) => format!("{head}:\n{d}"),
        None => head,
    };
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[async_trait]
impl JobObserver for PlatformReplies {
    async fn on_event(&self, job: &Job, event: &JobEvent) {
        if !matches!(&event.kind, JobEventKind::Status { to, .. } if to.is_terminal()) {
            return;
        }
        let extra = &job.trigger.extra;
        let credentials = &job.reply_credentials;
        match job.trigger.source.as_str() {
            "discord" => {
                let (Some(app), Some(token)) = (
                    extra.get("discord_application_id"),
                    credentials.get("discord_token"),
                ) else {
                    return;
                };
                let url = format!(
                    "{}/webhooks/{app}/{token}/messages/@original",
                    self.discord_api
                );
                let req = self
                    .http
                    .patch(url)
                    .json(&json!({ "content": outcome_text(job) }));
                self.send(req, job, "discord", true).await;
            }
            "slack" => {
                let Some(url) = credentials
                    .get("slack_response_url")
                    .and_then(|u| reqwest::Url::parse(u).ok())
                else {
                    return;
                };
                if !self.slack_url_allowed(&url) {
                    tracing::warn!(job = %job.id, "refusing a Slack response_url outside the allowed hosts");
                    return;
                }
                let body = json!({ "response_type": "ephemeral", "text": outcome_text(job) });
                self.send(self.http.post(url).json(&body), job, "slack", false)
                    .await;
            }
            _ => {}
        }
    }
}
