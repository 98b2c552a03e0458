//! Subscriptions: who receives which events, with which signing keys.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::EVENT_TYPES;
use super::sign::SigningSecret;
use super::DispatchError;

/// A subscription's identifier (a UUID v7, rendered as a plain UUID string).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SubscriptionId(Uuid);

crate::util::uuid_v7_id!(SubscriptionId);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SubscriptionId({})", self.0)
    }
}

impl FromStr for SubscriptionId {
    type Err = DispatchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| DispatchError::NotFound)
    }
}

/// One key a subscription signs with. The current key has no expiry; after a rotation the
/// previous key keeps signing until `expires_at`.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// The secret (`whsec_…`).
    pub secret: SigningSecret,
    /// When this key stops signing (`None` for the current key).
    pub expires_at: Option<DateTime<Utc>>,
}

impl SigningKey {
    /// True while the key still signs at `now`.
    #[must_use]
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A subscription as stored, keys included. Its `Debug` never prints a secret; the HTTP layer
/// serialises [`WebhookSubscription`] (from [`Subscription::view`]) instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The id.
    pub id: SubscriptionId,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event filters: exact event names, `job.*` or `*`.
    pub events: Vec<String>,
    /// Free text for humans.
    pub description: Option<String>,
    /// Disabled subscriptions receive nothing new and their pending deliveries wait.
    pub enabled: bool,
    /// Why it was disabled, when the dispatcher disabled it.
    pub disabled_reason: Option<String>,
    /// Signing keys, the current one first.
    pub keys: Vec<SigningKey>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change by a caller.
    pub updated_at: DateTime<Utc>,
    /// Start of the current run of failed attempts (`None` when healthy).
    pub failing_since: Option<DateTime<Utc>>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
}

impl Subscription {
    /// A new enabled subscription with one key.
    #[must_use]
    pub fn new(
        url: impl Into<String>,
        events: Vec<String>,
        description: Option<String>,
        secret: SigningSecret,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id: SubscriptionId::new(),
            url: url.into(),
            events,
            description,
            enabled: true,
            disabled_reason: None,
            keys: vec![SigningKey {
                secret,
                expires_at: None,
            }],
            created_at: now,
            updated_at: now,
            failing_since: None,
            consecutive_failures: 0,
        }
    }

    /// True when one of the filters matches `event_type`.
    #[must_use]
    pub fn matches(&self, event_type: &str) -> bool {
        self.events.iter().any(|f| filter_matches(f, event_type))
    }

    /// The keys that sign at `now`, the current one first.
    pub fn live_keys(&self, now: DateTime<Utc>) -> impl Iterator<Item = &SigningSecret> + '_ {
        self.keys
            .iter()
            .filter(move |k| k.is_live(now))
            .map(|k| &k.secret)
    }

    /// The public view (no secrets).
    #[must_use]
    pub fn view(&self) -> WebhookSubscription {
        WebhookSubscription {
            id: self.id,
            url: self.url.clone(),
            events: self.events.clone(),
            description: self.description.clone(),
            enabled: self.enabled,
            disabled_reason: self.disabled_reason.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            failing_since: self.failing_since,
            consecutive_failures: self.consecutive_failures,
        }
    }
}

/// True when the filter `filter` (an exact name, `job.*` or `*`) matches `event_type`.
#[must_use]
pub fn filter_matches(filter: &str, event_type: &str) -> bool {
    match filter {
        "*" => true,
        "job.*" => event_type.starts_with("job."),
        exact => exact == event_type,
    }
}

/// Checks a list of filters; returns them de-duplicated in their original order.
pub(crate) fn validate_filters(events: &[String]) -> Result<Vec<String>, DispatchError> {
    if events.is_empty() {
        return Err(DispatchError::Invalid(
            "`events` must name at least one event (or `*`)".into(),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(events.len());
    for e in events {
        let e = e.trim();
        if !(e == "*" || e == "job.*" || EVENT_TYPES.contains(&e)) {
            return Err(DispatchError::Invalid(format!(
                "unknown event filter `{e}` (expected `*`, `job.*` or one of {})",
                EVENT_TYPES.join(", ")
            )));
        }
        if !out.iter().any(|o| o == e) {
            out.push(e.to_owned());
        }
    }
    Ok(out)
}

/// A subscription as the HTTP API shows it (no secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WebhookSubscription {
    /// The id.
    #[schema(value_type = String, format = Uuid)]
    pub id: SubscriptionId,
    /// Where deliveries are POSTed.
    pub url: String,
    /// Event filters.
    pub events: Vec<String>,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether it receives deliveries.
    pub enabled: bool,
    /// Why the dispatcher disabled it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Creation time.
    #[serde(with = "crate::timestamp")]
    pub created_at: DateTime<Utc>,
    /// Last change.
    #[serde(with = "crate::timestamp")]
    pub updated_at: DateTime<Utc>,
    /// Start of the current run of failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(default, with = "crate::timestamp::option")]
    pub failing_since: Option<DateTime<Utc>>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
}

/// What `POST /webhooks` answers: the subscription and, this once, its secret.
#[derive(Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CreatedSubscription {
    /// The subscription.
    #[serde(flatten)]
    pub subscription: WebhookSubscription,
    /// The signing secret (`whsec_…`); shown only here and by a rotation.
    pub secret: String,
}

impl fmt::Debug for CreatedSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedSubscription")
            .field("subscription", &self.subscription)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What `POST /webhooks/{id}/rotate-secret` answers.
#[derive(Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RotatedSecret {
    /// The subscription.
    #[schema(value_type = String, format = Uuid)]
    pub id: SubscriptionId,
    /// The new signing secret (`whsec_…`).
    pub secret: String,
    /// Until when the previous secret keeps signing alongside the new one.
    #[serde(with = "crate::timestamp")]
    pub previous_expires_at: DateTime<Utc>,
}

impl fmt::Debug for RotatedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatedSecret")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("previous_expires_at", &self.previous_expires_at)
            .finish()
    }
}

/// The body of `POST /webhooks`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    /// `http` or `https` URL.
    pub url: String,
    /// Event filters: exact names (`job.completed`), `job.*` or `*`.
    pub events: Vec<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// A `whsec_<base64>` secret of 24 to 64 bytes; generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
}

impl fmt::Debug for CreateSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateSubscription")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("description", &self.description)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The body of `PATCH /webhooks/{id}`; absent fields are left as they are.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscription {
    /// New URL.
    #[serde(default)]
    pub url: Option<String>,
    /// New filters.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Enable (which also clears the failure record) or disable.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// New description (an empty string clears it).
    #[serde(default)]
    pub description: Option<String>,
}

/// The list answer of `GET /webhooks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SubscriptionList {
    /// Every subscription, oldest first.
    pub webhooks: Vec<WebhookSubscription>,
}

/// A change applied atomically to one stored subscription (see
/// [`DispatchStore::update_subscription`](super::DispatchStore::update_subscription)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionChange {
    /// New URL.
    pub url: Option<String>,
    /// New filters.
    pub events: Option<Vec<String>>,
    /// `Some(true)` enables and clears `failing_since`, `consecutive_failures` and
    /// `disabled_reason`; `Some(false)` disables.
    pub enabled: Option<bool>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    /// Replaces the keys (rotation).
    pub keys: Option<Vec<SigningKey>>,
    /// The change time, written to `updated_at`.
    pub at: Option<DateTime<Utc>>,
}

impl SubscriptionChange {
    /// An empty change made at `at`.
    #[must_use]
    pub fn at(at: DateTime<Utc>) -> Self {
        Self {
            at: Some(at),
            ..Self::default()
        }
    }

    /// Sets the URL.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Sets the filters.
    #[must_use]
    pub fn events(mut self, events: Vec<String>) -> Self {
        self.events = Some(events);
        self
    }

    /// Enables or disables.
    #[must_use]
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = Some(enabled);
        self
    }

    /// Sets or clears the description.
    #[must_use]
    pub fn description(mut self, description: Option<String>) -> Self {
        self.description = Some(description);
        self
    }

    /// Replaces the keys.
    #[must_use]
    pub fn keys(mut self, keys: Vec<SigningKey>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Applies the change to `sub` (what every store does, atomically).
    pub fn apply(&self, sub: &mut Subscription) {
        if let Some(url) = &self.url {
            sub.url.clone_from(url);
        }
        if let Some(events) = &self.events {
            sub.events.clone_from(events);
        }
        if let Some(enabled) = self.enabled {
            sub.enabled = enabled;
            if enabled {
                sub.failing_since = None;
                sub.consecutive_failures = 0;
                sub.disabled_reason = None;
            }
        }
        if let Some(description) = &self.description {
            sub.description.clone_from(description);
        }
        if let Some(keys) = &self.keys {
            sub.keys.clone_from(keys);
        }
        if let Some(at) = self.at {
            sub.updated_at = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_exact_prefix_and_star() {
        assert!(filter_matches("*", "job.completed"));
        assert!(filter_matches("job.*", "job.step.completed"));
        assert!(filter_matches("job.failed", "job.failed"));
        assert!(!filter_matches("job.failed", "job.completed"));
        assert!(!filter_matches("job.*", "other.thing"));
    }

    #[test]
    fn filters_are_validated_and_deduplicated() {
        let ok = validate_filters(&["job.completed".into(), "job.completed".into(), "*".into()])
            .unwrap();
        assert_eq!(ok, ["job.completed", "*"]);
        assert!(matches!(
            validate_filters(&[]),
            Err(DispatchError::Invalid(_))
        ));
        assert!(matches!(
            validate_filters(&["job.done".into()]),
            Err(DispatchError::Invalid(_))
        ));
        assert!(matches!(
            validate_filters(&["job.".into()]),
            Err(DispatchError::Invalid(_))
        ));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let secret = SigningSecret::generate();
        let text = secret.expose().to_owned();
        let sub = Subscription::new(
            "https://example.com/hook",
            vec!["*".into()],
            None,
            secret,
            Utc::now(),
        );
        let dbg = format!("{sub:?}");
        assert!(!dbg.contains(&text), "{dbg}");
        assert!(!dbg.contains(&text["whsec_".len()..]), "{dbg}");
        let created = CreatedSubscription {
            subscription: sub.view(),
            secret: text.clone(),
        };
        assert!(!format!("{created:?}").contains(&text));
        let json = serde_json::to_value(&created).unwrap();
        assert_eq!(json["secret"], text.as_str());
        assert_eq!(json["url"], "https://example.com/hook");
        assert!(serde_json::to_value(sub.view())
            .unwrap()
            .get("secret")
            .is_none());
    }

    #[test]
    fn openapi_schema_of_the_create_answer_has_every_field() {
        use utoipa::{PartialSchema as _, ToSchema as _};
        let created = serde_json::to_string(&CreatedSubscription::schema()).unwrap();
        assert!(created.contains("\"secret\""), "{created}");
        assert!(
            created.contains("#/components/schemas/WebhookSubscription"),
            "{created}"
        );
        // The referenced schema travels with it (utoipa collects it into the components).
        let mut deps = Vec::new();
        CreatedSubscription::schemas(&mut deps);
        let (name, sub) = deps
            .iter()
            .find(|(n, _)| n == "WebhookSubscription")
            .expect("WebhookSubscription collected");
        assert_eq!(name, "WebhookSubscription");
        let sub = serde_json::to_string(sub).unwrap();
        for field in [
            "\"id\"",
            "\"url\"",
            "\"events\"",
            "\"enabled\"",
            "\"created_at\"",
        ] {
            assert!(sub.contains(field), "{field} missing from {sub}");
        }
        assert!(!sub.contains("\"secret\""));
    }

    #[test]
    fn live_keys_drop_expired_ones() {
        let now = Utc::now();
        let mut sub = Subscription::new(
            "http://x",
            vec!["*".into()],
            None,
            SigningSecret::generate(),
            now,
        );
        sub.keys.push(SigningKey {
            secret: SigningSecret::generate(),
            expires_at: Some(now + chrono::Duration::seconds(10)),
        });
        assert_eq!(sub.live_keys(now).count(), 2);
        assert_eq!(
            sub.live_keys(now + chrono::Duration::seconds(11)).count(),
            1
        );
    }
}
