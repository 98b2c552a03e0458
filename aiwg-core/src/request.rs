//! [`JobRequest`]: what every trigger (HTTP call, forge comment, chat command) turns into.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::job::{ReplyCredentials, TriggerInfo};

/// A request to run a workflow. The HTTP API, the platform webhooks and host code all submit
/// one of these to [`Engine::submit`](crate::Engine::submit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JobRequest {
    /// The workflow's name.
    pub workflow: String,
    /// An explicit project directory (absolute, or relative to the project root).
    pub project_path: Option<String>,
    /// A project key (repository name or keyword) resolved through the mapping rules.
    pub project: Option<String>,
    /// Free text for the agent (`{{guidance}}`).
    pub guidance: Option<String>,
    /// Parameter values.
    pub params: BTreeMap<String, String>,
    /// Overrides the workflow's priority (higher runs first).
    pub priority: Option<i32>,
    /// Same key and same request → the same job; same key, other request → a conflict.
    pub idempotency_key: Option<String>,
    /// What started it.
    pub trigger: TriggerInfo,
    /// What lets the job reply as the bot (set by platform hooks; never deserialized from a
    /// request body, never shown). See [`ReplyCredentials`].
    #[serde(skip)]
    pub reply_credentials: ReplyCredentials,
    /// The spending cap its trigger source sets by default (a platform section's
    /// `max_budget_usd`); the workflow's own `max_budget_usd` wins. Never read from a request
    /// body: a caller cannot raise a cap.
    #[serde(skip)]
    pub max_budget_usd: Option<f64>,
}

impl JobRequest {
    /// A request to run `workflow`, triggered through the API.
    #[must_use]
    pub fn new(workflow: impl Into<String>) -> Self {
        Self {
            workflow: workflow.into(),
            trigger: TriggerInfo::new("api"),
            ..Self::default()
        }
    }

    /// Sets the project directory.
    #[must_use]
    pub fn project_path(mut self, path: impl Into<String>) -> Self {
        self.project_path = Some(path.into());
        self
    }

    /// Sets the project key (resolved through the mapping rules).
    #[must_use]
    pub fn project(mut self, key: impl Into<String>) -> Self {
        self.project = Some(key.into());
        self
    }

    /// Sets the guidance.
    #[must_use]
    pub fn guidance(mut self, text: impl Into<String>) -> Self {
        self.guidance = Some(text.into());
        self
    }

    /// Adds a parameter.
    #[must_use]
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    /// Keeps a reply credential (a Slack `response_url`, a Discord interaction token) with the
    /// job, privately.
    #[must_use]
    pub fn reply_credential(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.reply_credentials.insert(name, value);
        self
    }

    /// Sets the default spending cap (see [`max_budget_usd`](Self::max_budget_usd)).
    #[must_use]
    pub fn default_budget_usd(mut self, usd: f64) -> Self {
        self.max_budget_usd = Some(usd);
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn priority(mut self, p: i32) -> Self {
        self.priority = Some(p);
        self
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the trigger metadata.
    #[must_use]
    pub fn trigger(mut self, trigger: TriggerInfo) -> Self {
        self.trigger = trigger;
        self
    }

    /// A stable fingerprint of what the request asks for (everything but the idempotency key
    /// and the delivery metadata), used to tell a replay from a conflicting reuse of a key.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        /// The fingerprinted fields, in the order of their names (the JSON object a
        /// fingerprint has always hashed), written straight into the hash.
        #[derive(Serialize)]
        struct Canonical<'a> {
            guidance: &'a Option<String>,
            params: &'a BTreeMap<String, String>,
            priority: &'a Option<i32>,
            project: &'a Option<String>,
            project_path: &'a Option<String>,
            workflow: &'a str,
        }
        let mut hash = Sha256::new();
        // Writing into a hash cannot fail, nor can serialising strings and numbers.
        let _ = serde_json::to_writer(
            &mut hash,
            &Canonical {
                guidance: &self.guidance,
                params: &self.params,
                priority: &self.priority,
                project: &self.project,
                project_path: &self.project_path,
                workflow: &self.workflow,
            },
        );
        hex::encode(hash.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_key_and_trigger_but_not_content() {
        let a = JobRequest::new("w").param("x", "1").idempotency_key("k");
        let mut b = a.clone().idempotency_key("other");
        b.trigger.actor = Some("someone".into());
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), a.clone().param("x", "2").fingerprint());
    }

    #[test]
    fn fingerprint_is_the_hash_of_the_sorted_json_object() {
        // What earlier versions hashed (and stores keep): keep it, or keys stored before an
        // upgrade would conflict with their own replays.
        use sha2::{Digest, Sha256};
        let mut r = JobRequest::new("w").param("b", "2").param("a", "1");
        r.guidance = Some("look at \"this\"\n".into());
        r.project = Some("org/repo".into());
        r.priority = Some(-3);
        let object = serde_json::json!({
            "workflow": r.workflow, "project_path": r.project_path, "project": r.project,
            "guidance": r.guidance, "params": r.params, "priority": r.priority,
        });
        let expected = hex::encode(Sha256::digest(object.to_string().as_bytes()));
        assert_eq!(r.fingerprint(), expected);
        assert_eq!(JobRequest::new("w").fingerprint(), {
            let o = serde_json::json!({"guidance": null, "params": {}, "priority": null,
                "project": null, "project_path": null, "workflow": "w"});
            hex::encode(Sha256::digest(o.to_string().as_bytes()))
        });
    }
}
