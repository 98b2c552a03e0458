//! Retry schedules: presets, custom lists, jitter and `Retry-After`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng as _;
use serde::{Deserialize, Deserializer};

use super::DispatchError;
use crate::util::parse_duration;

/// When to try a delivery again after a failed attempt.
///
/// The schedule lists the waits before the 2nd, 3rd, … attempt; a delivery gets
/// `1 + delays.len()` scheduled attempts, then it is `failed`. Each wait is spread by
/// ±`jitter` (20 % by default) so that many deliveries failing together do not retry together.
///
/// In configuration: `retry: long`, `retry: short` or `retry: ["1s", "30s", "5m"]`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    delays: Vec<Duration>,
    jitter: f64,
}

impl RetryPolicy {
    /// The Standard Webhooks recommendation: 5 s, 5 m, 30 m, 2 h, 5 h, 10 h, 10 h (8 attempts).
    #[must_use]
    pub fn long() -> Self {
        const M: u64 = 60;
        const H: u64 = 3600;
        Self::from_delays([5, 5 * M, 30 * M, 2 * H, 5 * H, 10 * H, 10 * H].map(Duration::from_secs))
    }

    /// The original design's schedule: 3 attempts in all, 5 s initial wait, doubling (5 s, 10 s).
    #[must_use]
    pub fn short() -> Self {
        Self::from_delays([Duration::from_secs(5), Duration::from_secs(10)])
    }

    /// A custom schedule, with the default ±20 % jitter.
    #[must_use]
    pub fn from_delays(delays: impl IntoIterator<Item = Duration>) -> Self {
        Self {
            delays: delays.into_iter().collect(),
            jitter: 0.2,
        }
    }

    /// No retries at all: one attempt.
    #[must_use]
    pub fn none() -> Self {
        Self::from_delays([])
    }

    /// Parses `long`, `short`, or a comma-separated list of durations (`"1s, 30s, 5m"`).
    pub fn parse(spec: &str) -> Result<Self, DispatchError> {
        match spec.trim() {
            "long" => Ok(Self::long()),
            "short" => Ok(Self::short()),
            "none" => Ok(Self::none()),
            list => Self::from_strs(list.split(',').map(str::trim).filter(|s| !s.is_empty())),
        }
    }

    /// A custom schedule from duration strings (`"1s"`, `"30s"`, `"5m"`).
    pub fn from_strs<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, DispatchError> {
        let delays = items
            .into_iter()
            .map(|s| parse_duration(s).map_err(|e| DispatchError::Invalid(format!("retry: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if delays.is_empty() {
            return Err(DispatchError::Invalid(
                "retry: expected `long`, `short` or a list of durations".into(),
            ));
        }
        Ok(Self::from_delays(delays))
    }

    /// Sets the jitter fraction (0.0 to 1.0; 0.2 means ±20 %).
    #[must_use]
    pub fn with_jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The waits, without jitter.
    #[must_use]
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The jitter fraction.
    #[must_use]
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Scheduled attempts in all (the first plus one per delay).
    #[must_use]
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }

    /// The wait after `attempts_made` scheduled attempts failed, with jitter applied, or `None`
    /// when the schedule is exhausted.
    #[must_use]
    pub fn delay_after(&self, attempts_made: u32) -> Option<Duration> {
        let idx = usize::try_from(attempts_made).ok()?.checked_sub(1)?;
        let base = *self.delays.get(idx)?;
        if self.jitter == 0.0 || base.is_zero() {
            return Some(base);
        }
        let factor = rand::rng().random_range((1.0 - self.jitter)..=(1.0 + self.jitter));
        Some(base.mul_f64(factor))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::long()
    }
}

impl<'de> Deserialize<'de> for RetryPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Name(s) => Self::parse(&s),
            Raw::List(v) => Self::from_strs(v.iter().map(String::as_str)),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Parses a `Retry-After` value (delay seconds or an HTTP date) into a wait from `now`.
#[must_use]
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let long = RetryPolicy::long();
        assert_eq!(long.max_attempts(), 8);
        assert_eq!(long.delays()[1], Duration::from_secs(300));
        assert_eq!(long.delays()[6], Duration::from_secs(36_000));
        let short = RetryPolicy::short();
        assert_eq!(short.max_attempts(), 3);
        assert_eq!(
            short.delays(),
            [Duration::from_secs(5), Duration::from_secs(10)]
        );
        assert_eq!(RetryPolicy::parse("long").unwrap(), long);
    }

    #[test]
    fn custom_lists_parse() {
        let p = RetryPolicy::parse("1s, 30s,5m").unwrap();
        assert_eq!(
            p.delays(),
            [
                Duration::from_secs(1),
                Duration::from_secs(30),
                Duration::from_secs(300)
            ]
        );
        let p: RetryPolicy = serde_json::from_str(r#"["20ms", "2"]"#).unwrap();
        assert_eq!(
            p.delays(),
            [Duration::from_millis(20), Duration::from_secs(2)]
        );
        let p: RetryPolicy = serde_json::from_str(r#""short""#).unwrap();
        assert_eq!(p, RetryPolicy::short());
        assert!(RetryPolicy::parse("soon").is_err());
        assert!(serde_json::from_str::<RetryPolicy>(r#"["1s", "never"]"#).is_err());
        assert!(RetryPolicy::parse("").is_err());
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let p = RetryPolicy::from_delays([Duration::from_secs(100)]);
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..2000 {
            let d = p.delay_after(1).unwrap();
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "{d:?}"
            );
            seen_low |= d < Duration::from_secs(95);
            seen_high |= d > Duration::from_secs(105);
        }
        assert!(seen_low && seen_high, "jitter is applied both ways");
        assert_eq!(p.delay_after(2), None);
        assert_eq!(p.delay_after(0), None);
        let flat = p.with_jitter(0.0);
        assert_eq!(flat.delay_after(1), Some(Duration::from_secs(100)));
    }

    #[test]
    fn retry_after_forms() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:30:00 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("later", now), None);
    }
}
