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

use aiwg_core::audit::{AuditRecord, Decision};
use aiwg_core::http::{ApiResponse, HookHandler, Problem};
use aiwg_core::{Engine, JobRequest, TriggerInfo};
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderMap;

use crate::authorize::{authorize_actor, authorize_command, ActorCheck, IgnoreReason};
use crate::config::{PolicyConfig, RuleConfig, TriggersConfig};
use crate::dedupe::{Claim, DeliveryStore, MemoryDeliveryStore};
use crate::error::{BuildError, VerifyError};
use crate::event::{EventKind, InboundEvent, Platform};
use crate::forge::{ForgeClient, PermissionLookup};
use crate::grammar::{self, Command, Parsed};
use crate::platform::{self, Endpoint};
use crate::response::{HookOutcome, HookReply};

/// Default time delivery ids are remembered: 72 h.
pub const DEFAULT_DELIVERY_TTL: Duration = Duration::from_secs(72 * 3600);

type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// One configured platform: its endpoint and its trigger policy.
struct Setup {
    endpoint: Box<dyn Endpoint>,
    policy: PolicyConfig,
    /// Asks the forge who may trigger (GitLab, Gitea, Bitbucket with `api_url`).
    lookup: Option<PermissionLookup>,
    /// The forge's REST client, to learn the bot's own identity.
    client: Option<Arc<ForgeClient>>,
}

struct Inner {
    setups: Vec<Setup>,
    engine: Engine,
    store: Arc<dyn DeliveryStore>,
    ttl: Duration,
    lease: Duration,
    duplicate_wait: Duration,
    clock: Clock,
}

/// `POST /hooks/{platform}`: verifies, parses, authorizes, de-duplicates and submits platform
/// webhooks to an [`Engine`], and answers as the platform expects.
///
/// A cheap `Clone` handle. Build it with [`Hooks::builder`] and give it to the HTTP API
/// (`aiwg_core::http::ApiBuilder::hooks`): it is the API's [`HookHandler`], so both routers
/// serve it. [`Hooks::handle`] is the same call with the typed outcome, for tests.
#[derive(Clone)]
pub struct Hooks {
    inner: Arc<Inner>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let platforms: Vec<&str> = self
            .inner
            .setups
            .iter()
            .map(|s| s.endpoint.platform().as_str())
            .collect();
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
    engine: Engine,
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
        let mut setups: Vec<Setup> = Vec::new();
        // One line per platform: its module builds its endpoint from its section.
        #[cfg(feature = "github")]
        if let Some(g) = &c.github {
            setups.push(Setup::new(platform::github::GitHub::new(g), g.policy()));
        }
        #[cfg(feature = "gitlab")]
        if let Some(g) = &c.gitlab {
            setups.push(
                Setup::new(platform::gitlab::GitLab::new(g)?, g.policy()).lookup(
                    "triggers.gitlab",
                    g.api_url.as_ref(),
                    &g.api_token,
                    g.min_permission.as_ref(),
                )?,
            );
        }
        #[cfg(feature = "slack")]
        if let Some(s) = &c.slack {
            setups.push(Setup::new(platform::slack::Slack::new(s), s.policy()));
        }
        #[cfg(feature = "discord")]
        if let Some(d) = &c.discord {
            setups.push(Setup::new(platform::discord::Discord::new(d)?, d.policy()));
        }
        #[cfg(feature = "gitea")]
        if let Some(g) = &c.gitea {
            setups.push(
                Setup::new(platform::gitea::Gitea::new(g), g.policy()).lookup(
                    "triggers.gitea",
                    g.api_url.as_ref(),
                    &g.api_token,
                    g.min_permission.as_ref(),
                )?,
            );
        }
        #[cfg(feature = "bitbucket")]
        if let Some(b) = &c.bitbucket {
            setups.push(
                Setup::new(platform::bitbucket::Bitbucket::new(b), b.policy()).lookup(
                    "triggers.bitbucket",
                    b.api_url.as_ref(),
                    &b.api_token,
                    b.min_permission.as_ref(),
                )?,
            );
        }
        #[cfg(feature = "generic")]
        if let Some(g) = &c.generic {
            setups.push(Setup::new(platform::generic::Generic::new(g)?, g.policy()));
        }
        for client in c.forge_clients()? {
            if let Some(setup) = setups
                .iter_mut()
                .find(|s| s.endpoint.platform() == client.platform())
            {
                setup.client = Some(client);
            }
        }
        for setup in &setups {
            let platform = setup.endpoint.platform();
            if platform.needs_allowed_users()
                && setup.policy.allowed_users.is_empty()
                && setup.lookup.is_none()
            {
                tracing::warn!(
                    "triggers.{platform}: comments and rules from {platform} are ignored (\"not authorized\") until triggers.{platform}.allowed_users names who may trigger, or triggers.{platform}.api_url and api_token let the server ask {platform} for each sender's permission"
                );
            }
        }
        for (name, platform, configured) in c.sections() {
            if configured && !compiled_in(platform) {
                return Err(BuildError::Invalid {
                    key: name.to_owned(),
                    reason: "support for this platform is not compiled in (cargo feature)"
                        .to_owned(),
                });
            }
        }
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
                engine: self.engine,
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

impl Setup {
    fn new(endpoint: impl Endpoint, policy: PolicyConfig) -> Self {
        Self {
            endpoint: Box::new(endpoint),
            policy,
            lookup: None,
            client: None,
        }
    }

    /// With a permission lookup when the section names `api_url`.
    fn lookup(
        mut self,
        key: &str,
        api_url: Option<&String>,
        token: &crate::Secret,
        min: Option<&String>,
    ) -> Result<Self, BuildError> {
        if let Some(url) = api_url {
            let platform = self.endpoint.platform();
            self.lookup = Some(PermissionLookup::new(
                key,
                platform,
                url,
                token.clone(),
                min.map(String::as_str),
            )?);
        }
        Ok(self)
    }

    /// Who may trigger: the section's policy, the platform's own allow-lists, then (for a
    /// sender not in `allowed_users` on a forge without author associations) the forge's
    /// permission on the repository.
    async fn authorize_actor(
        &self,
        event: &InboundEvent,
        skip_association: bool,
    ) -> Result<(), HookOutcome> {
        let check = authorize_actor(
            &self.policy,
            self.endpoint.allowed_roles(),
            event,
            skip_association,
            self.lookup.is_some(),
        )
        .map_err(HookOutcome::Ignored)?;
        self.endpoint
            .authorize(event)
            .map_err(HookOutcome::Ignored)?;
        // Our own comments and edits never start a job: the bot's login comes from the API.
        if let (Some(client), Some(actor)) = (&self.client, &event.actor) {
            if let Some(me) = client.identity().await {
                if me.eq_ignore_ascii_case(&actor.login) {
                    return Err(HookOutcome::Ignored(IgnoreReason::Bot(actor.login.clone())));
                }
            }
        }
        if let (ActorCheck::AskForge, Some(lookup)) = (check, &self.lookup) {
            let user = event
                .actor
                .as_ref()
                .map(|a| a.login.clone())
                .unwrap_or_default();
            match lookup.check(event).await {
                Ok(Ok(())) => {}
                Ok(Err(level)) => {
                    return Err(HookOutcome::Ignored(IgnoreReason::PermissionTooLow {
                        user,
                        level,
                        min: lookup.min_permission(),
                    }))
                }
                Err(e) => {
                    return Err(HookOutcome::Ignored(IgnoreReason::PermissionUnknown(
                        e.to_string(),
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The longest a webhook waits for the forge to describe a pull request (GitHub gives a
/// delivery ten seconds in all).
const PULL_REQUEST_WAIT: Duration = Duration::from_secs(5);

impl Setup {
    /// A GitHub comment on a pull request names neither its head commit nor where the head
    /// lives. With API access the pull request is read, so that `fork_policy` judges its real
    /// origin and the job runs the commit that was there when it was asked for (not whatever
    /// the head is when a worker gets to it). `Ok(None)`: nothing to read (not such a comment,
    /// or no API access: the commenter's association is then the gate, and the head is
    /// fetched when the job starts).
    async fn read_pull_request(
        &self,
        event: &InboundEvent,
    ) -> Result<Option<InboundEvent>, IgnoreReason> {
        let (Some(client), Some(pr), Some(repo)) =
            (&self.client, &event.pull_request, &event.repository)
        else {
            return Ok(None);
        };
        if event.platform != Platform::GitHub || pr.head_sha.is_some() {
            return Ok(None);
        }
        let installation = event
            .reply
            .get("installation_id")
            .and_then(|i| i.parse().ok());
        let target = crate::forge::CommentTarget::new(repo.full_name.clone(), pr.number, true)
            .installation(installation);
        let read = tokio::time::timeout(PULL_REQUEST_WAIT, client.pull_request(&target))
            .await
            .map_err(|_| "the forge did not answer in time".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match read {
            Ok(found) if found.number == pr.number => {
                let mut complete = event.clone();
                complete.pull_request = Some(found);
                Ok(Some(complete))
            }
            Ok(_) => Err(IgnoreReason::PullRequestUnknown(
                "the forge answered with another pull request".into(),
            )),
            // Where forks may trigger, the origin decides nothing: the job runs the head
            // fetched when it starts, as without API access.
            Err(why) if self.policy.fork_policy == crate::config::ForkPolicy::Allow => {
                tracing::warn!(repo = %repo.full_name, pr = pr.number, error = %why, "could not read a pull request; its job will run the head fetched when it starts");
                Ok(None)
            }
            Err(why) => {
                tracing::warn!(repo = %repo.full_name, pr = pr.number, error = %why, "could not read a pull request; its comment starts nothing (fork_policy: refuse)");
                Err(IgnoreReason::PullRequestUnknown(why))
            }
        }
    }
}

/// What a rule or a command asks for, before authorization.
enum Origin {
    Command,
    Rule { label: bool },
}

impl Hooks {
    /// The forge clients of the configured sections (for a [`Tracker`](crate::Tracker)
    /// answering on the same forges).
    #[must_use]
    pub fn forge_clients(&self) -> Vec<Arc<ForgeClient>> {
        self.inner
            .setups
            .iter()
            .filter_map(|s| s.client.clone())
            .collect()
    }

    /// A builder over the `triggers:` configuration, submitting to `engine`.
    pub fn builder(config: TriggersConfig, engine: Engine) -> HooksBuilder {
        HooksBuilder {
            config,
            engine,
            store: None,
            clock: None,
            lease: Duration::from_secs(60),
            duplicate_wait: Duration::from_secs(10),
        }
    }

    /// The platforms that have a configuration section.
    #[must_use]
    pub fn platforms(&self) -> Vec<Platform> {
        self.inner
            .setups
            .iter()
            .map(|s| s.endpoint.platform())
            .collect()
    }

    /// Handles `POST /hooks/{platform}` with the raw (already size-limited) body.
    ///
    /// Never fails: every outcome, including a bad signature or an unknown platform, is a
    /// [`HookReply`] whose response is sent as is.
    pub async fn handle(&self, platform: &str, headers: &HeaderMap, body: &[u8]) -> HookReply {
        let parsed = platform
            .parse::<Platform>()
            .ok()
            .filter(|p| compiled_in(*p));
        let label = parsed.map_or("unknown", Platform::as_str);
        metrics::counter!("aiwg_webhook_requests_total", "platform" => label).increment(1);
        let setup = parsed.and_then(|p| self.setup(p));
        let mut attempt = AuditRecord::new(label, Decision::Refused);
        let outcome = match (parsed, setup) {
            (None, _) => HookOutcome::UnknownPlatform,
            (Some(_), None) => HookOutcome::Unauthorized(VerifyError::NotConfigured),
            (Some(_), Some(setup)) => self.process(setup, headers, body, &mut attempt).await,
        };
        if let Some((decision, reason)) = audit_decision(&outcome) {
            attempt.decision = decision;
            attempt.reason = reason;
            if let HookOutcome::Submitted { job_id, .. } | HookOutcome::Decided { job_id, .. } =
                &outcome
            {
                attempt.job_id = Some(*job_id);
            }
            self.inner.engine.audit().record(attempt).await;
        }
        if let Some(reason) = outcome.error_reason() {
            metrics::counter!("aiwg_webhook_errors_total", "platform" => label, "reason" => reason)
                .increment(1);
        }
        tracing::debug!(platform = label, ?outcome, "webhook handled");
        let response = match setup {
            Some(setup) => setup.endpoint.answer(&outcome),
            None => crate::response::forge(&outcome),
        };
        HookReply { outcome, response }
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
        Self::verified(setup, headers, body, (self.inner.clock)())
    }

    fn verified(
        setup: &Setup,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<InboundEvent, HookOutcome> {
        setup
            .endpoint
            .verify(headers, body, now)
            .map_err(HookOutcome::Unauthorized)?;
        setup
            .endpoint
            .parse(headers, body)
            .map_err(HookOutcome::BadRequest)
    }

    fn setup(&self, platform: Platform) -> Option<&Setup> {
        self.inner
            .setups
            .iter()
            .find(|s| s.endpoint.platform() == platform)
    }

    /// Verify → decide → run; `attempt` collects who asked and for what, for the audit trail.
    async fn process(
        &self,
        setup: &Setup,
        headers: &HeaderMap,
        body: &[u8],
        attempt: &mut AuditRecord,
    ) -> HookOutcome {
        let event = match Self::verified(setup, headers, body, (self.inner.clock)()) {
            Ok(ev) => ev,
            Err(outcome) => return outcome,
        };
        attempt.actor = event.actor.as_ref().map(|a| a.login.clone());
        attempt.delivery_id.clone_from(&event.delivery_id);
        attempt.repo = event.repository.as_ref().map(|r| r.full_name.clone());
        match self.decide(setup, &event).await {
            Ok((command, origin)) => {
                attempt.workflow = Some(command.workflow.clone());
                self.run(setup, &event, body, command, origin).await
            }
            Err(outcome) => outcome,
        }
    }

    /// Grammar (or rules): what is asked for.
    async fn decide(
        &self,
        setup: &Setup,
        event: &InboundEvent,
    ) -> Result<(Command, Origin), HookOutcome> {
        let ignore = |r| Err(HookOutcome::Ignored(r));
        let parsed = match &event.kind {
            EventKind::Ping => return Err(HookOutcome::Pong),
            EventKind::Challenge(c) => return Err(HookOutcome::Challenge(c.clone())),
            EventKind::Comment => {
                let text = event.text.as_deref().unwrap_or("");
                // A tracking comment of ours, whoever the forge says wrote it.
                if text.contains(crate::tracking::MARKER) {
                    return ignore(IgnoreReason::Bot("aiwg".into()));
                }
                grammar::parse_comment(text, &setup.policy.mention)
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
                setup.authorize_actor(event, false).await?;
                ignore(IgnoreReason::InvalidCommand(e))
            }
            Ok(Parsed::Help) => {
                setup.authorize_actor(event, false).await?;
                let list = self
                    .inner
                    .engine
                    .catalog()
                    .iter()
                    .map(|w| (w.name.clone(), w.description.clone()))
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
            Ok(Parsed::Run(cmd))
                if matches!(event.kind, EventKind::Comment)
                    && (cmd.workflow.eq_ignore_ascii_case("approve")
                        || cmd.workflow.eq_ignore_ascii_case("reject")) =>
            {
                let approve = cmd.workflow.eq_ignore_ascii_case("approve");
                Err(self.approval_comment(setup, event, approve, &cmd).await)
            }
            Ok(Parsed::Run(cmd)) => Ok((cmd, Origin::Command)),
        }
    }

    /// `@aiwg approve` / `@aiwg reject` (optionally followed by a job id) on a forge thread:
    /// decides the job started on that thread that waits for an approval, when the sender is
    /// someone the platform's trigger policy admits. `approve` and `reject` are therefore not
    /// usable as workflow names in comments.
    async fn approval_comment(
        &self,
        setup: &Setup,
        event: &InboundEvent,
        approve: bool,
        cmd: &Command,
    ) -> HookOutcome {
        if let Err(refused) = setup.authorize_actor(event, false).await {
            return refused;
        }
        let Some(login) = event.actor.as_ref().map(|a| a.login.clone()) else {
            return HookOutcome::Ignored(IgnoreReason::NoActor);
        };
        let named = cmd
            .guidance
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let repo = event.repository.as_ref().map(|r| r.full_name.as_str());
        let number = event
            .pull_request
            .as_ref()
            .map(|p| p.number)
            .or(event.issue);
        let query = aiwg_core::store::JobQuery::default()
            .status(aiwg_core::JobStatus::AwaitingApproval)
            .limit(500);
        let engine = &self.inner.engine;
        let waiting: Vec<_> = match engine.list(&query).await {
            Ok(page) => page
                .jobs
                .into_iter()
                .filter(|j| {
                    j.trigger.source == event.platform.as_str()
                        && j.trigger.repo.as_deref() == repo
                        && repo.is_some()
                        && j.trigger.pr.or(j.trigger.issue) == number
                        && number.is_some()
                        && named.is_none_or(|n| j.id.to_string().starts_with(n))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing jobs awaiting approval failed");
                return HookOutcome::StoreUnavailable;
            }
        };
        let job = match waiting.as_slice() {
            [] => return HookOutcome::Ignored(IgnoreReason::NothingAwaitingApproval),
            [job] => job.id,
            many => return HookOutcome::Ignored(IgnoreReason::SeveralAwaitingApproval(many.len())),
        };
        let via = event.platform.as_str();
        let decided = if approve {
            engine.approve(job, &login, via).await
        } else {
            engine.reject(job, &login, via).await
        };
        match decided {
            Ok(_) => HookOutcome::Decided {
                job_id: job,
                approved: approve,
            },
            // Decided by someone else a moment ago.
            Err(aiwg_core::engine::EngineError::NotAwaitingApproval { .. }) => {
                HookOutcome::Ignored(IgnoreReason::NothingAwaitingApproval)
            }
            Err(e) => {
                tracing::warn!(error = %e, job = %job, "recording an approval failed");
                HookOutcome::StoreUnavailable
            }
        }
    }

    /// Authorize → build the request → de-duplicate → submit.
    async fn run(
        &self,
        setup: &Setup,
        event: &InboundEvent,
        body: &[u8],
        command: Command,
        origin: Origin,
    ) -> HookOutcome {
        let skip_association = matches!(origin, Origin::Rule { label: true });
        if let Err(outcome) = setup.authorize_actor(event, skip_association).await {
            return outcome;
        }
        let read;
        let event = match setup.read_pull_request(event).await {
            Ok(None) => event,
            Ok(Some(complete)) => {
                read = complete;
                &read
            }
            Err(r) => return HookOutcome::Ignored(r),
        };
        if let Err(r) = authorize_command(&setup.policy, event, &command) {
            return HookOutcome::Ignored(r);
        }
        let workflow = command.workflow.clone();
        let key = Some(event.replay_key(body));
        let mut request = job_request(event, command, key.clone());
        request.max_budget_usd = setup.policy.max_budget_usd.map(crate::config::Usd::get);
        self.submit_once(key, request, workflow).await
    }

    async fn submit_once(
        &self,
        key: Option<String>,
        request: JobRequest,
        workflow: String,
    ) -> HookOutcome {
        let submitted = |job_id, replayed| HookOutcome::Submitted {
            job_id,
            workflow: workflow.clone(),
            replayed,
        };
        // The API's own answer to the same refusal: transient ones are 503 (the platform
        // redelivers), the others are reported and not retried.
        let rejected = |e: aiwg_core::SubmitError| {
            let problem = Problem::from(&e);
            if e.is_transient() {
                HookOutcome::Unavailable(problem)
            } else {
                HookOutcome::Ignored(IgnoreReason::Rejected(problem))
            }
        };
        let engine = &self.inner.engine;
        let Some(key) = key else {
            return match engine.submit(request).await.map(|job| job.id) {
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
                    return match engine.submit(request).await.map(|job| job.id) {
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

/// What the audit trail records for `outcome` (an approval or rejection as such, with its job):
/// `None` for deliveries that were no trigger
/// attempt (a comment not addressed to us, an event no rule matches, another bot's command, a
/// ping, a URL check, `help`, an unknown platform).
fn audit_decision(outcome: &HookOutcome) -> Option<(Decision, Option<String>)> {
    let refused = |reason: String| Some((Decision::Refused, Some(reason)));
    match outcome {
        HookOutcome::Submitted {
            replayed: false, ..
        } => Some((Decision::Accepted, None)),
        HookOutcome::Decided { approved: true, .. } => Some((Decision::Approved, None)),
        HookOutcome::Decided {
            approved: false, ..
        } => Some((Decision::Rejected, None)),
        HookOutcome::Submitted { replayed: true, .. } => Some((
            Decision::Duplicate,
            Some("delivered before: the same job, nothing new started".into()),
        )),
        HookOutcome::DuplicateInProgress => Some((
            Decision::Duplicate,
            Some("the same delivery is being handled".into()),
        )),
        HookOutcome::Ignored(
            IgnoreReason::NotAddressed
            | IgnoreReason::NoRule { .. }
            | IgnoreReason::OtherCommand(_),
        )
        | HookOutcome::Help(_)
        | HookOutcome::Pong
        | HookOutcome::Challenge(_)
        | HookOutcome::UnknownPlatform => None,
        HookOutcome::Ignored(reason) => refused(reason.to_string()),
        HookOutcome::Unauthorized(e) => refused(e.to_string()),
        HookOutcome::BadRequest(e) => refused(e.to_string()),
        HookOutcome::Unavailable(p) => refused(p.detail().to_owned()),
        HookOutcome::StoreUnavailable => refused("the delivery store is unavailable".into()),
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
fn other_command(setup: &Setup, event: &InboundEvent) -> Option<String> {
    let ours = setup.endpoint.command()?;
    let given = event
        .reply
        .get("slack_command")
        .or_else(|| event.reply.get("discord_command"))?;
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
    // What lets its holder post as the bot stays private to the job.
    let mut credentials = aiwg_core::ReplyCredentials::default();
    for name in REPLY_CREDENTIALS {
        if let Some(value) = extra.remove(*name) {
            credentials.insert(*name, value);
        }
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
    request.reply_credentials = credentials;
    request
}

/// The reply handles that let their holder act as the bot: kept in the job's
/// [`ReplyCredentials`](aiwg_core::ReplyCredentials), never in `trigger.extra`.
pub(crate) const REPLY_CREDENTIALS: &[&str] = &["slack_response_url", "discord_token"];

#[async_trait]
impl HookHandler for Hooks {
    async fn handle(&self, platform: &str, headers: &HeaderMap, body: Bytes) -> ApiResponse {
        Hooks::handle(self, platform, headers, &body).await.response
    }
}
