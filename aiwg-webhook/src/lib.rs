//! # aiwg-webhook
//!
//! Inbound platform webhooks for aiwg: a GitHub or GitLab comment, a Slack slash command, a
//! Discord command, a Gitea, Bitbucket or Standard Webhooks delivery becomes a
//! [`JobRequest`](aiwg_core::JobRequest) submitted to the [`Engine`](aiwg_core::Engine).
//!
//! The path of a delivery is one way: router (`aiwg-axum`, `aiwg-actix`: body limit, buffering)
//! → the neutral HTTP layer (`aiwg_core::http::Api`, which hands `POST /hooks/{platform}` to its
//! [`HookHandler`](aiwg_core::http::HookHandler)) → [`Hooks`] (this crate: verify, parse,
//! authorize, de-duplicate) → [`Engine::submit`](aiwg_core::Engine::submit). The outcome is
//! one [`HookOutcome`], rendered once, in the platform's shape, into the
//! [`ApiResponse`](aiwg_core::http::ApiResponse) the router writes as is. Each platform is one
//! module of [`platform`] that supplies its verifier, its parser and its answer shapes.
//!
//! This tour follows a delivery through the pipeline, in order.
//!
//! ## 1. Verify
//!
//! Signatures are checked first, on the raw bytes, in constant time, before anything is
//! parsed. A platform with no secret configured (no section, or an empty `${VAR}`) refuses
//! everything: verification fails closed. Every verifier is a plain function in
//! [`platform`] (the clock is an argument), which is what the fuzz targets call:
//!
//! ```
//! use aiwg_webhook::{platform::github, Secret, VerifyError};
//! use http::HeaderMap;
//!
//! let secret = Secret::new("It's a Secret to Everybody");
//! let mut headers = HeaderMap::new();
//! headers.insert(
//!     "x-hub-signature-256",
//!     "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17".parse()?,
//! );
//! assert_eq!(github::verify(&secret, &headers, b"Hello, World!"), Ok(()));
//! assert_eq!(github::verify(&secret, &headers, b"Hello, World?"), Err(VerifyError::Mismatch));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Errors ([`VerifyError`]) and `Debug` output never contain a secret or an expected
//! signature; a failure is answered 401 `application/problem+json`.
//!
//! ## 2. Parse
//!
//! Each platform's payload becomes one [`InboundEvent`]: platform, delivery id, event kind,
//! actor (login, association or roles, bot or not), repository, pull request (head ref, head
//! sha, head repository for forks, base ref), issue, comment text, labels, and the handles
//! needed to answer later (Slack `response_url`, Discord interaction token and application
//! id). Only these fields are read; the rest of large forge payloads is tolerated. A verified
//! body that cannot be understood is answered 400.
//!
//! ## 3. Grammar
//!
//! Comments and chat commands go through the [`grammar`]:
//! `@aiwg <workflow> [--param value | --param=value]... [free text]`, with shell-style quoting
//! (typographic quotes included) and nothing ever executed. Free text becomes `guidance`;
//! `help` answers with the workflow list (forges: 200 `{"ignored": "help", "workflows":
//! [{"name", "description"}]}`; Slack and Discord: an ephemeral message). Other events
//! (pull request opened, issue labeled…) start a workflow only through configured
//! [rules](config::RuleConfig).
//!
//! ## 4. Authorize
//!
//! [`authorize`] decides who may start what: bots and our own app are ignored, GitHub author
//! associations are checked (default `OWNER`, `MEMBER`, `COLLABORATOR`), `allowed_users`,
//! Discord roles, allowed workflows per platform, and pull requests from forks are refused
//! unless `fork_policy: allow`. A refusal is answered 200 `{"ignored": "<reason>"}`.
//!
//! ## 5. De-duplicate
//!
//! The delivery id (GitHub `X-GitHub-Delivery`, GitLab `Idempotency-Key`, Slack `event_id` or
//! `trigger_id`, Discord interaction id, `webhook-id`…) is claimed in a [`DeliveryStore`]
//! ([`MemoryDeliveryStore`] by default, with a TTL): a redelivery gets the job created the
//! first time, in the same response, and submits nothing; a concurrent duplicate waits for the
//! first one's outcome instead of submitting twice.
//!
//! ## 6. Submit
//!
//! The request goes to [`Engine::submit`](aiwg_core::Engine::submit): `project` is the
//! repository's full name on forges
//! (the engine's mapping rules turn it into a directory) or `--project` on chat platforms,
//! `trigger` carries the platform, actor, delivery id, repository, pull request, issue and the
//! reply handles in `trigger.extra`. Forges get 202 `{"job_id"}`, Slack an ephemeral message
//! naming the job, Discord a deferred response (`{"type": 5}`). A refusal by the engine is
//! shown to the person who asked (the same problem the HTTP API would answer); a full queue, a
//! shutdown or a store failure is 503 with `Retry-After`, so the platform redelivers.
//!
//! ## All together
//!
//! ```
//! use std::sync::Arc;
//!
//! use aiwg_core::test_util::ScriptedExecutor;
//! use aiwg_core::{Engine, Parameter, ProjectPolicy, Step, Workflow};
//! use aiwg_webhook::{Hooks, HookOutcome, TriggersConfig};
//! use hmac::{Hmac, Mac};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! // An engine with a `review` workflow; every repository maps to one checkout.
//! let checkout = tempfile::tempdir()?;
//! let engine = Engine::builder()
//!     .executor("agent", Arc::new(ScriptedExecutor::succeeding("looks good")))
//!     .workflow(
//!         Workflow::new("review")
//!             .describe("Review a pull request")
//!             .param(Parameter::new("depth").with_default("1"))
//!             .step(Step::prompt("review", "agent", "Review at depth {{depth}}: {{guidance}}")),
//!     )
//!     .policy(ProjectPolicy::builder().root(checkout.path()).map(".*", ".").build()?)
//!     .build()?;
//!
//! let config: TriggersConfig = serde_norway::from_str(r#"
//! github: { secret: "s3cret", mention: "@aiwg" }
//! "#)?;
//! let hooks = Hooks::builder(config, engine.clone()).build()?;
//!
//! let body = serde_json::json!({
//!     "action": "created",
//!     "issue": { "number": 7, "pull_request": { "url": "…" } },
//!     "comment": { "id": 1, "body": "@aiwg review --depth 2 mind the auth code",
//!                  "user": { "login": "alice", "type": "User" },
//!                  "author_association": "MEMBER" },
//!     "repository": { "full_name": "octo/app", "clone_url": "https://github.com/octo/app.git" },
//!     "sender": { "login": "alice", "type": "User" }
//! }).to_string();
//! let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret")?;
//! mac.update(body.as_bytes());
//! let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
//!
//! let mut headers = http::HeaderMap::new();
//! headers.insert("x-github-event", "issue_comment".parse()?);
//! headers.insert("x-github-delivery", "d-1".parse()?);
//! headers.insert("x-hub-signature-256", signature.parse()?);
//!
//! let reply = hooks.handle("github", &headers, body.as_bytes()).await;
//! assert_eq!(reply.status, 202);
//! let HookOutcome::Submitted { job_id, .. } = reply.outcome else { panic!() };
//! assert_eq!(reply.json()?["job_id"], job_id.to_string());
//! let job = engine.get(job_id).await?;
//! assert_eq!(job.params["depth"], "2");
//! assert_eq!(job.guidance.as_deref(), Some("mind the auth code"));
//! assert_eq!(job.trigger.repo.as_deref(), Some("octo/app"));
//!
//! // Redelivered: the same job, nothing submitted.
//! let again = hooks.handle("github", &headers, body.as_bytes()).await;
//! assert_eq!(again.json()?, reply.json()?);
//!
//! // Tampered: 401 problem+json.
//! let bad = hooks.handle("github", &headers, b"{}").await;
//! assert_eq!(bad.status, 401);
//! assert_eq!(bad.header("content-type"), Some("application/problem+json"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## For router authors
//!
//! Nothing: give [`Hooks`] to the API (`Api::builder(engine).hooks(Arc::new(hooks))`), which
//! serves `POST /hooks/{platform}` for both routers after the body limit (413 beyond it). An
//! unknown platform is a 404 problem, a known one without configuration a 401 problem: nothing
//! is left to the router. [`Hooks`] is a cheap `Clone` handle and the future of
//! `handle` is `Send`.
//!
//! ## Metrics
//!
//! Through the `metrics` facade: `aiwg_webhook_requests_total{platform}` for every request and
//! `aiwg_webhook_errors_total{platform,reason}` for failures (bad signature, bad payload,
//! refused submissions…).
//!
//! ## Features
//!
//! One per platform (`github`, `gitlab`, `slack`, `discord`, `gitea`, `bitbucket`, `generic`,
//! all on by default), `postgres` for [`PgDeliveryStore`], and `test-util` for the
//! [dedup-store suite](dedupe::dedup_store_suite) and the router suite (`testing`).
#![cfg_attr(docsrs, feature(doc_auto_cfg))]
// With some platform features off, shared helpers have fewer (or no) callers.
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
    allow(dead_code)
)]

pub mod authorize;
pub mod config;
pub mod dedupe;
mod error;
pub mod event;
pub mod forge;
pub mod grammar;
mod hooks;
pub mod platform;
mod replies;
mod response;
mod secret;
pub mod tracking;
#[cfg(feature = "postgres")]
pub use dedupe::PgDeliveryStore;
#[cfg(all(
    feature = "test-util",
    feature = "github",
    feature = "slack",
    feature = "discord"
))]
pub mod testing;

pub use authorize::IgnoreReason;
pub use config::{ForkPolicy, PolicyConfig, RuleConfig, TriggersConfig};
pub use dedupe::{Claim, DeliveryStore, MemoryDeliveryStore};
pub use error::{BuildError, DeliveryStoreError, ParseError, VerifyError};
pub use event::{Actor, EventKind, InboundEvent, Platform, PullRequest, Repository};
pub use hooks::{Hooks, HooksBuilder, DEFAULT_DELIVERY_TTL};
pub use replies::{outcome_text, PlatformReplies, PlatformRepliesBuilder, RepliesError};
pub use response::{HookOutcome, HookReply, JSON, PROBLEM_JSON};
pub use secret::Secret;
pub use tracking::{Tracker, TrackerBuilder};
