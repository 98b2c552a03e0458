//! Trigger authorization: who may start what.
//!
//! Checked in this order, the first failure wins:
//! 1. the actor is not a bot (as the platform marks it, or a GitHub login ending in `[bot]`)
//!    and not in `ignore_users` (our own app), so our own comments never trigger us;
//! 2. `allowed_users`, when not empty, names the actor (login or user name);
//! 3. on platforms that report an author association (GitHub), it is in
//!    `allowed_associations`; for a rule on a label being added the check is skipped, since
//!    only people with triage rights can label;
//! 4. Discord: `allowed_roles`, when not empty, shares a role with the member;
//! 5. the workflow is in `allowed_workflows` (when set);
//! 6. a pull request from a fork passes the `fork_policy` (GitHub's `issue_comment` does not
//!    say where the head lives: with API access (`token` or a GitHub App) the hooks read the
//!    pull request first, and without it the commenter's association is the gate);
//! 7. forges take the project from the repository: `--project` is refused there.

use std::fmt;

use crate::config::{ForkPolicy, PolicyConfig};
use crate::event::{Actor, InboundEvent};
use crate::grammar::{Command, GrammarError};
use aiwg_core::http::Problem;

/// Why a verified, understood delivery starts nothing (answered 200 by forges).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoreReason {
    /// The text does not address us.
    NotAddressed,
    /// No command and no rule matches this event.
    NoRule {
        /// The neutral event name.
        event: String,
        /// The action, if any.
        action: Option<String>,
    },
    /// Another slash/application command than ours.
    OtherCommand(String),
    /// The actor is a bot or our own app.
    Bot(String),
    /// The actor is listed in `ignore_users`.
    IgnoredUser(String),
    /// The actor is not in `allowed_users`.
    UserNotAllowed(String),
    /// The actor's association is not allowed (`None`: the platform gave none).
    AssociationNotAllowed(Option<String>),
    /// The member has none of `allowed_roles`.
    RoleNotAllowed,
    /// The event has no actor while the policy needs one.
    NoActor,
    /// The platform gives no author association and no rule says who may trigger
    /// (`allowed_users` is not set): GitLab, Gitea/Forgejo and Bitbucket fail closed.
    NotAuthorized,
    /// The forge says the sender's permission on the repository is below `min_permission`.
    PermissionTooLow {
        /// The sender.
        user: String,
        /// Their level (`none` when they are no member).
        level: &'static str,
        /// The level needed.
        min: &'static str,
    },
    /// The permission lookup gave no answer (the forge is down, refused the token, …): the
    /// trigger is refused (fail closed).
    PermissionUnknown(String),
    /// The chat channel, workspace or server is not in the platform's allow-list.
    PlaceNotAllowed(String),
    /// The workflow may not be started from this platform.
    WorkflowNotAllowed(String),
    /// A pull request from a fork, refused by the fork policy.
    ForkRefused,
    /// A GitHub comment on a pull request whose head could not be read from the API (the
    /// forge is down, refused the token, …): neither its origin (`fork_policy`) nor the
    /// commit to run is known, so the trigger is refused (fail closed).
    PullRequestUnknown(String),
    /// `--project` on a forge, where the repository is the project.
    ProjectNotAccepted,
    /// The command could not be parsed.
    InvalidCommand(GrammarError),
    /// The engine refused the request for a reason that asking again will not fix (unknown
    /// workflow, invalid parameters, project refused…): the same problem the HTTP API answers.
    Rejected(Problem),
    /// `approve` / `reject` on a thread where no job waits for an approval.
    NothingAwaitingApproval,
    /// `approve` / `reject` on a thread where several jobs wait: the comment must name one.
    SeveralAwaitingApproval(usize),
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAddressed => f.write_str("no command addressed to us"),
            Self::NoRule {
                event,
                action: Some(a),
            } => write!(f, "no rule for event `{event}` ({a})"),
            Self::NoRule {
                event,
                action: None,
            } => write!(f, "no rule for event `{event}`"),
            Self::OtherCommand(c) => write!(f, "not our command: `{c}`"),
            Self::Bot(who) => write!(f, "sender `{who}` is a bot"),
            Self::IgnoredUser(who) => write!(f, "sender `{who}` is ignored"),
            Self::UserNotAllowed(who) => {
                write!(f, "sender `{who}` is not allowed to trigger workflows")
            }
            Self::AssociationNotAllowed(Some(a)) => {
                write!(
                    f,
                    "author association `{a}` is not allowed to trigger workflows"
                )
            }
            Self::AssociationNotAllowed(None) => f.write_str("author association unknown"),
            Self::RoleNotAllowed => f.write_str("member has no allowed role"),
            Self::NoActor => f.write_str("the event names no sender"),
            Self::NotAuthorized => f.write_str("not authorized"),
            Self::PermissionTooLow { user, level, min } => write!(
                f,
                "sender `{user}` has `{level}` permission on the repository; `{min}` is needed to trigger workflows"
            ),
            Self::PermissionUnknown(why) => {
                write!(f, "not authorized: the sender's permission could not be checked ({why})")
            }
            Self::PlaceNotAllowed(place) => {
                write!(f, "{place} is not allowed to trigger workflows")
            }
            Self::WorkflowNotAllowed(w) => write!(f, "workflow `{w}` may not be started from here"),
            Self::ForkRefused => f.write_str("pull requests from forks are refused"),
            Self::PullRequestUnknown(why) => {
                write!(f, "the pull request's head could not be read ({why})")
            }
            Self::ProjectNotAccepted => {
                f.write_str("`--project` is not accepted here: the repository is the project")
            }
            Self::InvalidCommand(e) => write!(f, "invalid command: {e}"),
            Self::Rejected(p) => f.write_str(p.detail()),
            Self::NothingAwaitingApproval => {
                f.write_str("no job started here is waiting for an approval")
            }
            Self::SeveralAwaitingApproval(n) => write!(
                f,
                "{n} jobs started here wait for an approval; name one: `approve <job id>`"
            ),
        }
    }
}

impl IgnoreReason {
    /// A short, stable label for metrics.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotAddressed => "not_addressed",
            Self::NoRule { .. } => "no_rule",
            Self::OtherCommand(_) => "other_command",
            Self::Bot(_) | Self::IgnoredUser(_) => "bot",
            Self::UserNotAllowed(_)
            | Self::AssociationNotAllowed(_)
            | Self::RoleNotAllowed
            | Self::NotAuthorized
            | Self::PermissionTooLow { .. }
            | Self::PermissionUnknown(_)
            | Self::PlaceNotAllowed(_)
            | Self::NoActor => "not_allowed",
            Self::WorkflowNotAllowed(_) => "workflow_not_allowed",
            Self::ForkRefused => "fork",
            Self::PullRequestUnknown(_) => "pull_request_unknown",
            Self::ProjectNotAccepted => "project_option",
            Self::InvalidCommand(_) => "invalid_command",
            Self::Rejected(p) => p.slug(),
            Self::NothingAwaitingApproval | Self::SeveralAwaitingApproval(_) => "no_waiting_job",
        }
    }
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Whether `list` names the actor by login or display name: for lists that keep people out
/// (`ignore_users`), where matching more is the safe side.
fn names(actor: &Actor, list: &[String]) -> bool {
    list.iter()
        .any(|u| same(u, &actor.login) || actor.name.as_deref().is_some_and(|n| same(u, n)))
}

/// Whether `list` names the actor by login: for lists that let people in (`allowed_users`).
/// Never by display name, which anyone sets to anything (GitLab's `name`, Bitbucket's
/// `display_name`, Slack's `user_name`): a sender renamed `alice` is not `alice`.
fn admits(actor: &Actor, list: &[String]) -> bool {
    list.iter().any(|u| same(u, &actor.login))
}

/// What [`authorize_actor`] leaves to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActorCheck {
    /// Nothing: the actor may trigger.
    Allowed,
    /// Ask the forge for the actor's permission (they are not in `allowed_users`).
    AskForge,
}

/// Checks the actor (steps 1–4). `skip_association` is set for label rules; `lookup` says
/// whether the section can ask the forge for a permission.
pub(crate) fn authorize_actor(
    policy: &PolicyConfig,
    allowed_roles: &[String],
    event: &InboundEvent,
    skip_association: bool,
    lookup: bool,
) -> Result<ActorCheck, IgnoreReason> {
    // Forges whose payloads carry no author association: only an explicit list of users, or
    // the forge's own permissions, may trigger (fail closed), for comments and rules alike.
    let gated = event.platform.needs_allowed_users();
    if gated && policy.allowed_users.is_empty() && !lookup {
        return Err(IgnoreReason::NotAuthorized);
    }
    let needs_actor = gated || !policy.allowed_users.is_empty() || !allowed_roles.is_empty();
    let Some(actor) = &event.actor else {
        return if needs_actor || event.platform.is_forge() && !skip_association {
            Err(IgnoreReason::NoActor)
        } else {
            Ok(ActorCheck::Allowed)
        };
    };
    if actor.is_bot {
        return Err(IgnoreReason::Bot(actor.login.clone()));
    }
    if names(actor, &policy.ignore_users) {
        return Err(IgnoreReason::IgnoredUser(actor.login.clone()));
    }
    let mut check = ActorCheck::Allowed;
    if (gated || !policy.allowed_users.is_empty()) && !admits(actor, &policy.allowed_users) {
        if gated && lookup {
            check = ActorCheck::AskForge;
        } else {
            return Err(IgnoreReason::UserNotAllowed(actor.login.clone()));
        }
    }
    if event.platform == crate::event::Platform::GitHub && !skip_association {
        let ok = actor
            .association
            .as_deref()
            .is_some_and(|a| policy.allowed_associations.iter().any(|x| same(x, a)));
        if !ok {
            return Err(IgnoreReason::AssociationNotAllowed(
                actor.association.clone(),
            ));
        }
    }
    if !allowed_roles.is_empty() && !actor.roles.iter().any(|r| allowed_roles.contains(r)) {
        return Err(IgnoreReason::RoleNotAllowed);
    }
    Ok(check)
}

/// Checks the request (steps 5–7).
pub(crate) fn authorize_command(
    policy: &PolicyConfig,
    event: &InboundEvent,
    command: &Command,
) -> Result<(), IgnoreReason> {
    if let Some(allowed) = &policy.allowed_workflows {
        if !allowed.iter().any(|w| w == &command.workflow) {
            return Err(IgnoreReason::WorkflowNotAllowed(command.workflow.clone()));
        }
    }
    // A pull request whose origin the payload does not establish counts as a fork (fail
    // closed), except GitHub's comment events, which never carry it and are gated by the
    // author's association instead.
    let unknown_is_fork = event.platform != crate::event::Platform::GitHub;
    if policy.fork_policy == ForkPolicy::Refuse
        && event
            .pull_request
            .as_ref()
            .is_some_and(|pr| pr.from_fork.unwrap_or(unknown_is_fork))
    {
        return Err(IgnoreReason::ForkRefused);
    }
    if event.platform.is_forge() && command.project.is_some() {
        return Err(IgnoreReason::ProjectNotAccepted);
    }
    Ok(())
}
