//! Talking back to the forges: REST clients for GitHub, GitLab, Gitea/Forgejo and Bitbucket
//! Cloud.
//!
//! - [`ForgeClient`]: comments (create, edit in place), reactions, and the bot's own identity,
//!   with each platform's authentication. GitHub takes a plain token or a GitHub App
//!   (`app_id` + `private_key`: an RS256 JWT, signed by the `jsonwebtoken` crate, is exchanged
//!   for an installation token, cached until shortly before it expires).
//! - Every request goes through one sender that honours the platforms' rate limits
//!   (`Retry-After`, `x-ratelimit-remaining: 0` with `x-ratelimit-reset`, GitHub's secondary
//!   limits) and retries 5xx answers and network errors with exponential backoff, giving up
//!   with a [`ForgeError`] that names neither the token nor the URL.
//! - [`PermissionLookup`]: who may trigger on forges without author associations.
//!
//! The job-facing side — the 👀 reaction and the tracking comment — is
//! [`Tracker`](crate::Tracker).

mod client;
mod github_app;
mod permission;
pub(crate) mod send;

pub use client::{CommentTarget, ForgeAuth, ForgeClient, ForgeError};
pub use github_app::GitHubApp;
pub use permission::{LookupError, PermissionLookup};
