//! [`Hooks`]: the framework-neutral entry point of `POST /hooks/{platform}`.
// With some platform features off, parts of the dispatch have nothing to dispatch to.
#![cfg_attr(
    not(all(
        feature = "github",
        feature = "gitlab",
        feature = "slack",
        feature = "discord",
        feature = "gitea",
        feature = "bitbucket",
        feature = "generic"
    )),
    allow(
        unused_imports,
        unused_mut,
        unused_variables,
        unreachable_code,
        dead_code
    )
)]

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aiwg_core::{JobRequest, TriggerInfo};
use http::HeaderMap;

use crate::authorize::{authorize_actor, authorize_command, IgnoreReason};
use crate::config::{PolicyConfig, RuleConfig, TriggersConfig};
use crate::dedupe::{Claim, DeliveryStore, MemoryDeliveryStore};
use crate::error::{BuildError, ParseError, VerifyError};
use crate::event::{EventKind, InboundEvent, Platform};
use crate::grammar::{self, Command, Parsed};
use crate::platform;
use crate::response::{HookOutcome, HookResponse};
use crate::secret::Secret;
use crate::submit::JobSubmitter;

/// Default time delivery ids are remembered: 72 h.
pub const DEFAULT_DELIVERY_TTL: Duration = Duration::from_secs(72 * 3600);

type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The key material of one platform, decoded once at build time.
#[derive(Clone)]
enum Verifier {
    /// Never built: keeps the enum inhabited whatever the features.
    #[allow(dead_code)]
    Disabled,
    #[cfg(feature = "github")]
    GitHub(Secret),
    #[cfg(feature = "gitlab")]
    GitLab {
        token: Secret,
        signing: Option<platform::standard::SigningKey>,
    },
    #[cfg(feature = "slack")]
    Slack { secret: Secret, command: String },
    #[cfg(feature = "discord")]
    Discord {
        key: Option<platform::discord::VerifyingKey>,
        command: String,
    },
    #[cfg(feature = "gitea")]
    Gitea(Secret),
    #[cfg(feature = "bitbucket")]
    Bitbucket(Secret),
    #[cfg(feature = "generic")]
    Generic {
        key: Option<platform::standard::SigningKey>,
        token: Secret,
    },
}

#[derive(Clone)]
struct Setup {
    verifier: Verifier,
    policy: PolicyConfig,
    allowed_roles: Vec<String>,
}

struct Inner {
    setups: Vec<(Platform, Setup)>,
    store: Arc<dyn DeliveryStore>,
    ttl: Duration,
    lease: Duration,
    duplicate_wait: Duration,
    clock: Clock,
}

/// Verifies, parses, authorizes, de-duplicates and submits platform webhooks.
///
/// A cheap `Clone` handle. Build it with [`Hooks::builder`]; call [`Hooks::handle`] from the
/// router with the raw body.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let platforms: Vec<&str> = self.inner.setups.iter().map(|(p, _)| p.as_str()).collect();
        f.debug_struct("Hooks")
            .field("platforms", &platforms)
            .field("delivery_ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Hooks`].
#[must_use]
pub struct HooksBuilder {
    config: TriggersConfig,
    store: Option<Arc<dyn DeliveryStore>>,
    clock: Option<Clock>,
    lease: Duration,
    duplicate_wait: Duration,
}

impl fmt::Debug for HooksBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HooksBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HooksBuilder {
    /// Where delivery ids are kept (default: a [`MemoryDeliveryStore`]).
    pub fn delivery_store(mut self, store: Arc<dyn DeliveryStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The clock used for timestamp windows, in Unix seconds (default: the system clock).
    pub fn clock(mut self, now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(now));
        self
    }

    /// How long a concurrent duplicate waits for the first request's outcome before answering
    /// 409 (default 10 s).
    pub fn duplicate_wait(mut self, wait: Duration) -> Self {
        self.duplicate_wait = wait;
        self
    }

    /// How long a claim on a delivery id may stay pending before a redelivery takes it over
    /// (default 60 s).
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Decodes the configured keys.
    ///
    /// # Errors
    /// A key that cannot be decoded (Discord public key, `whsec_` secret), or a platform that
    /// is configured but not compiled in.
    pub fn build(self) -> Result<Hooks, BuildError> {
        let c = self.config;
        let mut setups = Vec::new();
        let not_compiled = |key: &str| BuildError::Invalid {
            key: key.to_owned(),
            reason: "support for this platform is not compiled in (cargo feature)".to_owned(),
        };
        if let Some(g) = &c.github {
            #[cfg(feature = "github")]
            setups.push((
                Platform::GitHub,
                setup(Verifier::GitHub(g.secret.clone()), g.policy()),
            ));
            #[cfg(not(feature = "github"))]
            {
                let _ = g;
                return Err(not_compiled("github"));
            }
        }
        if let Some(g) = &c.gitlab {
            #[cfg(feature = "gitlab")]
            {
                let signing = signing_key(&g.signing_secret, "gitlab.signing_secret")?;
                setups.push((
                    Platform::GitLab,
                    setup(
                        Verifier::GitLab {
                            token: g.token.clone(),
                            signing,
                        },
                        g.policy(),
                    ),
                ));
            }
            #[cfg(not(feature = "gitlab"))]
            {
                let _ = g;
                return Err(not_compiled("gitlab"));
            }
        }
        if let Some(s) = &c.slack {
            #[cfg(feature = "slack")]
            setups.push((
                Platform::Slack,
                setup(
                    Verifier::Slack {
                        secret: s.signing_secret.clone(),
                        command: s.command.clone(),
                    },
                    s.policy(),
                ),
            ));
            #[cfg(not(feature = "slack"))]
            {
                let _ = s;
                return Err(not_compiled("slack"));
            }
        }
        if let Some(d) = &c.discord {
            #[cfg(feature = "discord")]
            {
                let key = if d.public_key.trim().is_empty() {
                    None
                } else {
                    Some(
                        platform::discord::public_key(&d.public_key).map_err(|reason| {
                            BuildError::InvalidKey {
                                key: "discord.public_key".to_owned(),
                                reason,
                            }
                        })?,
                    )
                };
                let mut s = setup(
                    Verifier::Discord {
                        key,
                        command: d.command.clone(),
                    },
                    d.policy(),
                );
                s.allowed_roles.clone_from(&d.allowed_roles);
                setups.push((Platform::Discord, s));
            }
            #[cfg(not(feature = "discord"))]
            {
                let _ = d;
                return Err(not_compiled("discord"));
            }
        }
        if let Some(g) = &c.gitea {
            #[cfg(feature = "gitea")]
            setups.push((
                Platform::Gitea,
                setup(Verifier::Gitea(g.secret.clone()), g.policy()),
            ));
            #[cfg(not(feature = "gitea"))]
            {
                let _ = g;
                return Err(not_compiled("gitea"));
            }
        }
        if let Some(b) = &c.bitbucket {
            #[cfg(feature = "bitbucket")]
            setups.push((
                Platform::Bitbucket,
                setup(Verifier::Bitbucket(b.secret.clone()), b.policy()),
            ));
            #[cfg(not(feature = "bitbucket"))]
            {
                let _ = b;
                return Err(not_compiled("bitbucket"));
            }
        }
        if let Some(g) = &c.generic {
            #[cfg(feature = "generic")]
            {
                let key = signing_key(&g.secret, "generic.secret")?;
                setups.push((
                    Platform::Generic,
                    setup(
                        Verifier::Generic {
                            key,
                            token: g.token.clone(),
                        },
                        g.policy(),
                    ),
                ));
            }
            #[cfg(not(feature = "generic"))]
            {
                let _ = g;
                return Err(not_compiled("generic"));
            }
        }
        let _ = not_compiled;
        let clock = self.clock.unwrap_or_else(|| {
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            })
        });
        Ok(Hooks {
            inner: Arc::new(Inner {
                setups,
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryDeliveryStore::new())),
                ttl: c.delivery_ttl.unwrap_or(DEFAULT_DELIVERY_TTL),
                lease: self.lease,
                duplicate_wait: self.duplicate_wait,
                clock,
            }),
        })
    }
}

fn setup(verifier: Verifier, policy: PolicyConfig) -> Setup {
    Setup {
        verifier,
        policy,
        allowed_roles: Vec::new(),
    }
}

#[cfg(any(feature = "gitlab", feature = "generic"))]
fn signing_key(
    secret: &Secret,
    key: &str,
) -> Result<Option<platform::standard::SigningKey>, BuildError> {
    if !secret.is_configured() {
        return Ok(None);
    }
    platform::standard::SigningKey::from_secret(secret.expose())
        .map(Some)
        .map_err(|reason| BuildError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
}

/// What a rule or a command asks for, before authorization.
enum Origin {
    Command,
    Rule { label: bool },
}

impl Hooks {
    /// A builder over the `triggers:` configuration.
    pub fn builder(config: TriggersConfig) -> HooksBuilder {
        HooksBuilder {
            config,
            store: None,
            clock: None,
            lease: Duration::from_secs(60),
            duplicate_wait: Duration::from_secs(10),
        }
    }

    /// The platforms that have a configuration section.
    #[must_use]
    pub fn platforms(&self) -> Vec<Platform> {
        self.inner.setups.iter().map(|(p, _)| *p).collect()
    }

    /// Handles `POST /hooks/{platform}` with the raw (already size-limited) body.
    ///
    /// Never fails: every outcome, including a bad signature or an unknown platform, is a
    /// [`HookResponse`] to send as is.
    pub async fn handle(
        &self,
        platform: &str,
        headers: &HeaderMap,
        body: &[u8],
        submitter: &dyn JobSubmitter,
    ) -> HookResponse {
        let parsed = platform
            .parse::<Platform>()
            .ok()
            .filter(|p| compiled_in(*p));
        let label = parsed.map_or("unknown", Platform::as_str);
        metrics::counter!("aiwg_webhook_requests_total", "platform" => label).increment(1);
        let outcome = match parsed {
            None => HookOutcome::UnknownPlatform,
            Some(p) => self.process(p, headers, body, submitter).await,
        };
        if let Some(reason) = outcome.error_reason() {
            metrics::counter!("aiwg_webhook_errors_total", "platform" => label, "reason" => reason)
                .increment(1);
        }
        tracing::debug!(platform = label, ?outcome, "webhook handled");
        HookResponse::render(parsed, outcome)
    }

    /// Verification and parsing only (no authorization, no submission).
    ///
    /// # Errors
    /// [`HookOutcome::Unauthorized`], [`HookOutcome::BadRequest`] or
    /// [`HookOutcome::UnknownPlatform`].
    pub fn verify_and_parse(
        &self,
        platform: Platform,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<InboundEvent, HookOutcome> {
        if !compiled_in(platform) {
            return Err(HookOutcome::UnknownPlatform);
        }
        let setup = self
            .setup(platform)
            .ok_or(HookOutcome::Unauthorized(VerifyError::NotConfigured))?;
        let now = (self.inner.clock)();
        verify(&setup.verifier, headers, body, now).map_err(HookOutcome::Unauthorized)?;
        parse(platform, headers, body).map_err(HookOutcome::BadRequest)
    }

    fn setup(&self, platform: Platform) -> Option<&Setup> {
        self.inner
            .setups
            .iter()
            .find(|(p, _)| *p == platform)
            .map(|(_, s)| s)
    }

    async fn process(
        &self,
        platform: Platform,
        headers: &HeaderMap,
        body: &[u8],
        submitter: &dyn JobSubmitter,
    ) -> HookOutcome {
        let event = match self.verify_and_parse(platform, headers, body) {
            Ok(ev) => ev,
            Err(outcome) => return outcome,
        };
        let Some(setup) = self.setup(platform) else {
            return HookOutcome::Unauthorized(VerifyError::NotConfigured);
        };
        match self.decide(setup, &event, submitter) {
            Ok((command, origin)) => self.run(setup, &event, command, origin, submitter).await,
            Err(outcome) => outcome,
        }
    }

    /// Grammar (or rules): what is asked for.
    fn decide(
        &self,
        setup: &Setup,
        event: &InboundEvent,
        submitter: &dyn JobSubmitter,
    ) -> Result<(Command, Origin), HookOutcome> {
        let ignore = |r| Err(HookOutcome::Ignored(r));
        let parsed = match &event.kind {
            EventKind::Ping => return Err(HookOutcome::Pong),
            EventKind::Challenge(c) => return Err(HookOutcome::Challenge(c.clone())),
            EventKind::Comment => {
                grammar::parse_comment(event.text.as_deref().unwrap_or(""), &setup.policy.mention)
            }
            EventKind::ChatCommand => {
                if let Some(other) = other_command(setup, event) {
                    return ignore(IgnoreReason::OtherCommand(other));
                }
                grammar::parse_command(event.text.as_deref().unwrap_or(""))
            }
            EventKind::Structured(cmd) => {
                if let Some(other) = other_command(setup, event) {
                    return ignore(IgnoreReason::OtherCommand(other));
                }
                if cmd.workflow.is_empty() || cmd.workflow.eq_ignore_ascii_case("help") {
                    Ok(Parsed::Help)
                } else {
                    Ok(Parsed::Run(cmd.clone()))
                }
            }
            _ => {
                return match match_rule(&setup.policy.rules, event) {
                    Some(rule) => {
                        let mut cmd = Command::new(rule.workflow.clone());
                        cmd.params.clone_from(&rule.params);
                        cmd.guidance.clone_from(&rule.guidance);
                        let label =
                            event.action.as_deref() == Some("labeled") && rule.label.is_some();
                        Ok((cmd, Origin::Rule { label }))
                    }
                    None => ignore(IgnoreReason::NoRule {
                        event: event.event.clone(),
                        action: event.action.clone(),
                    }),
                };
            }
        };
        match parsed {
            Ok(Parsed::NotAddressed) => ignore(IgnoreReason::NotAddressed),
            Err(e) => {
                authorize_actor(&setup.policy, &setup.allowed_roles, event, false)
                    .map_err(HookOutcome::Ignored)?;
                ignore(IgnoreReason::InvalidCommand(e))
            }
            Ok(Parsed::Help) => {
                authorize_actor(&setup.policy, &setup.allowed_roles, event, false)
                    .map_err(HookOutcome::Ignored)?;
                let list = submitter
                    .workflows()
                    .into_iter()
                    .filter(|(name, _)| {
                        setup
                            .policy
                            .allowed_workflows
                            .as_ref()
                            .is_none_or(|allowed| allowed.contains(name))
                    })
                    .collect();
                Err(HookOutcome::Help(list))
            }
            Ok(Parsed::Run(cmd)) => Ok((cmd, Origin::Command)),
        }
    }

    /// Authorize → build the request → de-duplicate → submit.
    async fn run(
        &self,
        setup: &Setup,
        event: &InboundEvent,
        command: Command,
        origin: Origin,
        submitter: &dyn JobSubmitter,
    ) -> HookOutcome {
        let skip_association = matches!(origin, Origin::Rule { label: true });
        if let Err(r) =
            authorize_actor(&setup.policy, &setup.allowed_roles, event, skip_association)
                .and_then(|()| authorize_command(&setup.policy, event, &command))
        {
            return HookOutcome::Ignored(r);
        }
        let workflow = command.workflow.clone();
        let key = event
            .delivery_id
            .as_ref()
            .map(|id| format!("{}:{id}", event.platform));
        let request = job_request(event, command, key.clone());
        self.submit_once(key, request, workflow, submitter).await
    }

    async fn submit_once(
        &self,
        key: Option<String>,
        request: JobRequest,
        workflow: String,
        submitter: &dyn JobSubmitter,
    ) -> HookOutcome {
        let submitted = |job_id, replayed| HookOutcome::Submitted {
            job_id,
            workflow: workflow.clone(),
            replayed,
        };
        let rejected = |r: crate::SubmitRejection| {
            if r.is_transient() {
                HookOutcome::Unavailable(r)
            } else {
                HookOutcome::Ignored(IgnoreReason::Rejected(r))
            }
        };
        let Some(key) = key else {
            return match submitter.submit(request).await {
                Ok(job) => submitted(job, false),
                Err(r) => rejected(r),
            };
        };
        let store = &self.inner.store;
        let mut request = Some(request);
        for _ in 0..3 {
            match store.claim(&key, self.inner.lease, self.inner.ttl).await {
                Err(e) => return store_unavailable(&key, &e),
                Ok(Claim::Done(job)) => return submitted(job, true),
                Ok(Claim::Fresh) => {
                    let Some(request) = request.take() else { break };
                    return match submitter.submit(request).await {
                        Ok(job) => {
                            if let Err(e) = store.complete(&key, job, self.inner.ttl).await {
                                tracing::warn!(key, error = %e, "could not record a delivery");
                            }
                            submitted(job, false)
                        }
                        Err(r) => {
                            if let Err(e) = store.release(&key).await {
                                tracing::warn!(key, error = %e, "could not release a delivery");
                            }
                            rejected(r)
                        }
                    };
                }
                Ok(Claim::Pending) => match store.wait(&key, self.inner.duplicate_wait).await {
                    Ok(Some(job)) => return submitted(job, true),
                    Ok(None) => {}
                    Err(e) => return store_unavailable(&key, &e),
                },
            }
        }
        HookOutcome::DuplicateInProgress
    }
}

/// Logs a delivery-store failure with its cause; the answer says only "try again later".
fn store_unavailable(key: &str, e: &crate::DeliveryStoreError) -> HookOutcome {
    tracing::warn!(key, error = %e, source = ?std::error::Error::source(e), "delivery store failed");
    HookOutcome::StoreUnavailable
}

fn compiled_in(p: Platform) -> bool {
    match p {
        Platform::GitHub => cfg!(feature = "github"),
        Platform::GitLab => cfg!(feature = "gitlab"),
        Platform::Slack => cfg!(feature = "slack"),
        Platform::Discord => cfg!(feature = "discord"),
        Platform::Gitea => cfg!(feature = "gitea"),
        Platform::Bitbucket => cfg!(feature = "bitbucket"),
        Platform::Generic => cfg!(feature = "generic"),
    }
}

/// The slash/application command name, when it is not ours.
#[allow(unused_variables)]
fn other_command(setup: &Setup, event: &InboundEvent) -> Option<String> {
    let (given, ours): (&String, &String) = match &setup.verifier {
        #[cfg(feature = "slack")]
        Verifier::Slack { command, .. } => (event.reply.get("slack_command")?, command),
        #[cfg(feature = "discord")]
        Verifier::Discord { command, .. } => (event.reply.get("discord_command")?, command),
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    let norm = |s: &str| s.trim().trim_start_matches('/').to_ascii_lowercase();
    (norm(given) != norm(ours)).then(|| given.clone())
}

fn match_rule<'a>(rules: &'a [RuleConfig], event: &InboundEvent) -> Option<&'a RuleConfig> {
    rules.iter().find(|r| {
        let event_ok = r.event == event.event || r.event == event.platform_event;
        let action_ok = r.action.is_empty()
            || event
                .action
                .as_ref()
                .is_some_and(|a| r.action.iter().any(|x| x == a));
        let label_ok = r
            .label
            .as_ref()
            .is_none_or(|l| event.labels.iter().any(|x| x == l));
        event_ok && action_ok && label_ok
    })
}

#[allow(unused_variables)]
fn verify(
    verifier: &Verifier,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    match verifier {
        Verifier::Disabled => Err(VerifyError::NotConfigured),
        #[cfg(feature = "github")]
        Verifier::GitHub(secret) => platform::github::verify(secret, headers, body),
        #[cfg(feature = "gitlab")]
        Verifier::GitLab { token, signing } => {
            platform::gitlab::verify(token, signing.as_ref(), headers, body, now)
        }
        #[cfg(feature = "slack")]
        Verifier::Slack { secret, .. } => platform::slack::verify(secret, headers, body, now),
        #[cfg(feature = "discord")]
        Verifier::Discord { key, .. } => match key {
            Some(key) => platform::discord::verify(key, headers, body),
            None => Err(VerifyError::NotConfigured),
        },
        #[cfg(feature = "gitea")]
        Verifier::Gitea(secret) => platform::gitea::verify(secret, headers, body),
        #[cfg(feature = "bitbucket")]
        Verifier::Bitbucket(secret) => platform::bitbucket::verify(secret, headers, body),
        #[cfg(feature = "generic")]
        Verifier::Generic { key, token } => {
            platform::generic::verify(key.as_ref(), token, headers, body, now)
        }
    }
}

#[allow(unused_variables)]
fn parse(platform: Platform, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    match platform {
        #[cfg(feature = "github")]
        Platform::GitHub => platform::github::parse(headers, body),
        #[cfg(feature = "gitlab")]
        Platform::GitLab => platform::gitlab::parse(headers, body),
        #[cfg(feature = "slack")]
        Platform::Slack => platform::slack::parse(headers, body),
        #[cfg(feature = "discord")]
        Platform::Discord => platform::discord::parse(headers, body),
        #[cfg(feature = "gitea")]
        Platform::Gitea => platform::gitea::parse(headers, body),
        #[cfg(feature = "bitbucket")]
        Platform::Bitbucket => platform::bitbucket::parse(headers, body),
        #[cfg(feature = "generic")]
        Platform::Generic => platform::generic::parse(headers, body),
        #[allow(unreachable_patterns)]
        _ => Err(ParseError::Unsupported(
            "platform not compiled in".to_owned(),
        )),
    }
}

/// The request submitted for an authorized command. `project` is the repository's full name
/// on forges (the engine's mapping rules resolve it) and `--project` elsewhere; the reply
/// handles go to `trigger.extra`.
fn job_request(event: &InboundEvent, command: Command, key: Option<String>) -> JobRequest {
    let mut trigger = TriggerInfo::new(event.platform.as_str());
    trigger.actor = event.actor.as_ref().map(|a| a.login.clone());
    trigger.delivery_id.clone_from(&event.delivery_id);
    trigger.repo = event.repository.as_ref().map(|r| r.full_name.clone());
    trigger.pr = event.pull_request.as_ref().map(|p| p.number);
    trigger.issue = event.issue;
    let mut extra = event.reply.clone();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            extra.insert(k.to_owned(), v.clone());
        }
    };
    put("event", Some(&event.event));
    put("platform_event", Some(&event.platform_event));
    put("action", event.action.as_ref());
    if let Some(a) = &event.actor {
        put("actor_name", a.name.as_ref());
        put("association", a.association.as_ref());
    }
    if let Some(r) = &event.repository {
        put("clone_url", r.clone_url.as_ref());
        put("default_branch", r.default_branch.as_ref());
    }
    if let Some(p) = &event.pull_request {
        put("head_ref", p.head_ref.as_ref());
        put("head_sha", p.head_sha.as_ref());
        put("head_repo", p.head_repo.as_ref());
        put("head_clone_url", p.head_clone_url.as_ref());
        put("base_ref", p.base_ref.as_ref());
    }
    if !event.labels.is_empty() {
        extra.insert("labels".to_owned(), event.labels.join(","));
    }
    trigger.extra = extra;
    let project = if event.platform.is_forge() {
        trigger.repo.clone()
    } else {
        command.project.or_else(|| trigger.repo.clone())
    };
    let mut request = JobRequest::new(command.workflow).trigger(trigger);
    request.params = command.params;
    request.guidance = command.guidance;
    request.project = project;
    request.idempotency_key = key;
    request
}
