//! The `webhooks:` section of the configuration.

use std::time::Duration;

use serde::Deserialize;

use super::retry::RetryPolicy;

/// `webhooks: { retry: long, workers: 10, allow_private_targets: false, … }`.
///
/// Durations are written `"5s"`, `"24h"` or as seconds; absent keys keep the defaults of
/// [`DispatcherBuilder`](super::DispatcherBuilder). Apply with
/// [`DispatcherBuilder::config`](super::DispatcherBuilder::config).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DispatchConfig {
    /// `long`, `short`, or a list of durations (`["1s", "30s"]`).
    pub retry: Option<RetryPolicy>,
    /// Worker tasks (default 10).
    pub workers: Option<usize>,
    /// Concurrent attempts per subscription (default 5).
    pub max_in_flight_per_subscription: Option<usize>,
    /// Allow private, loopback and link-local targets (default false).
    pub allow_private_targets: Option<bool>,
    /// Networks allowed although not public (`["10.1.0.0/16"]`).
    pub allowed_subnets: Vec<String>,
    /// Connect timeout (default 5 s).
    #[serde(with = "crate::util::opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Whole-attempt timeout (default 15 s).
    #[serde(with = "crate::util::opt_duration")]
    pub timeout: Option<Duration>,
    /// Largest body in bytes (default 262 144).
    pub max_payload_bytes: Option<usize>,
    /// Disable a subscription failing continuously for this long (default 5 days).
    #[serde(with = "crate::util::opt_duration")]
    pub disable_after: Option<Duration>,
    /// How long the previous secret keeps signing after a rotation (default 24 h).
    #[serde(with = "crate::util::opt_duration")]
    pub rotation_grace: Option<Duration>,
    /// The longest `Retry-After` honoured (default 1 h).
    #[serde(with = "crate::util::opt_duration")]
    pub retry_after_max: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_example() {
        let c: DispatchConfig = serde_json::from_str(
            r#"{"retry": "long", "workers": 10, "allow_private_targets": false}"#,
        )
        .unwrap();
        assert_eq!(c.retry, Some(RetryPolicy::long()));
        assert_eq!(c.workers, Some(10));
        let c: DispatchConfig = serde_json::from_str(
            r#"{"retry": ["1s", "30s"], "disable_after": "2d", "rotation_grace": 60,
                "allowed_subnets": ["10.0.0.0/8"]}"#,
        )
        .unwrap();
        assert_eq!(c.retry.unwrap().delays().len(), 2);
        assert_eq!(c.disable_after, Some(Duration::from_secs(2 * 86_400)));
        assert_eq!(c.rotation_grace, Some(Duration::from_secs(60)));
        assert!(serde_json::from_str::<DispatchConfig>(r#"{"retries": "long"}"#).is_err());
    }
}
