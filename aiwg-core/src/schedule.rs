//! Schedules: a workflow that runs on a timer.
//!
//! A workflow's `schedules` list holds cron expressions (five fields, or six with seconds
//! first), each with an IANA time zone and the request it submits:
//!
//! ```yaml
//! workflows:
//!   nightly-audit:
//!     steps: [{ name: audit, agent: claude, prompt: "Audit {{scope}}" }]
//!     parameters: [{ name: scope }]
//!     schedules:
//!       - cron: "0 3 * * 1-5"        # 03:00 on weekdays
//!         timezone: Europe/Paris     # default UTC
//!         params: { scope: deps }
//!         guidance: "only report"
//!         overlap: skip              # default: no new job while the last one still runs
//! ```
//!
//! The engine fires each tick once: every instance sharing a store computes the same ticks and
//! submits the tick's job under one idempotency key
//! (`schedule:<workflow>:<identity>:<unix seconds>.<milliseconds>`, where the identity names
//! what the schedule submits, not its place in the list: [`Schedule::tick_key`]), so whichever instance is first
//! creates it and the others find it. Ticks missed while no instance ran are skipped, not
//! replayed; a tick the wall clock jumped over while the runner waited for it fires, late. The runner is [`crate::engine`]'s (see
//! `engine/scheduler.rs`).
//!
//! ```
//! use aiwg_core::schedule::Schedule;
//! use chrono::{TimeZone, Utc};
//!
//! let s = Schedule::new("0 3 * * 1-5").timezone("Europe/Paris");
//! s.validate().unwrap();
//! // Monday 2026-12-07 00:00 UTC → 03:00 in Paris is 02:00 UTC.
//! let after = Utc.with_ymd_and_hms(2026, 12, 7, 0, 0, 0).unwrap();
//! assert_eq!(s.next_after(after).unwrap(), Utc.with_ymd_and_hms(2026, 12, 7, 2, 0, 0).unwrap());
//! assert!(Schedule::new("61 * * * *").validate().is_err());
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};

/// One schedule of a workflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Schedule {
    /// A cron expression: `min hour day-of-month month day-of-week`, or six fields with
    /// seconds first.
    pub cron: String,
    /// The IANA time zone the expression is read in (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Parameter values of the jobs it starts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Guidance of the jobs it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<String>,
    /// A project key (resolved through the mapping rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// A project directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_path: Option<String>,
    /// What a tick does while an earlier scheduled job of the workflow has not finished.
    #[serde(default)]
    pub overlap: Overlap,
}

/// What a tick does while an earlier scheduled job of the same workflow is unfinished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Overlap {
    /// Start nothing (the default).
    #[default]
    Skip,
    /// Start a job anyway.
    Allow,
}

impl Schedule {
    /// A schedule on `cron`, in UTC, with no parameters.
    #[must_use]
    pub fn new(cron: impl Into<String>) -> Self {
        Self {
            cron: cron.into(),
            timezone: None,
            params: BTreeMap::new(),
            guidance: None,
            project: None,
            project_path: None,
            overlap: Overlap::Skip,
        }
    }

    /// Reads the expression in the IANA time zone `tz`.
    #[must_use]
    pub fn timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = Some(tz.into());
        self
    }

    /// Adds a parameter value.
    #[must_use]
    pub fn param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    /// Sets the guidance.
    #[must_use]
    pub fn guidance(mut self, text: impl Into<String>) -> Self {
        self.guidance = Some(text.into());
        self
    }

    /// Sets the project key of the jobs it starts (resolved through the mapping rules).
    #[must_use]
    pub fn project(mut self, key: impl Into<String>) -> Self {
        self.project = Some(key.into());
        self
    }

    /// Sets the project directory of the jobs it starts.
    #[must_use]
    pub fn project_path(mut self, path: impl Into<String>) -> Self {
        self.project_path = Some(path.into());
        self
    }

    /// Sets what a tick does while an earlier job still runs.
    #[must_use]
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Checks the expression and the time zone.
    ///
    /// # Errors
    /// Why the expression or the time zone is not usable, in words.
    pub fn validate(&self) -> Result<(), String> {
        self.parsed().map(|_| ())
    }

    fn parsed(&self) -> Result<(Cron, chrono_tz::Tz), String> {
        let fields = self.cron.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron `{}` has {fields} fields; expected 5 (minute hour day month weekday) or 6 (seconds first)",
                self.cron
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(&self.cron)
            .map_err(|e| format!("cron `{}` is not valid: {e}", self.cron))?;
        let tz = match &self.timezone {
            None => chrono_tz::UTC,
            Some(name) => name
                .parse::<chrono_tz::Tz>()
                .map_err(|_| format!("`{name}` is not an IANA time zone (e.g. Europe/Paris)"))?,
        };
        Ok((cron, tz))
    }

    /// The first tick strictly after `after`, or `None` when the expression never matches
    /// again (or is invalid).
    #[must_use]
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (cron, tz) = self.parsed().ok()?;
        cron.find_next_occurrence(&after.with_timezone(&tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The idempotency key of the job of tick `at` of this schedule of `workflow`: the same on
    /// every instance, so a tick starts one job.
    ///
    /// A schedule is named by what it submits (its expression, time zone, parameters, guidance
    /// and project: [`identity`](Self::identity)), not by its place in the list, so instances
    /// of a rolling deploy that list the same schedules in another order, or with one added
    /// before them, still agree on each tick's job. (Keyed by position, a reordered list made
    /// one schedule's tick fire twice and another's not at all.) Editing what a schedule submits
    /// makes it another schedule: during a deploy that edits one, the old and the new may each
    /// start a job for the same tick. `overlap` is not part of the name.
    #[must_use]
    pub fn tick_key(&self, workflow: &str, at: DateTime<Utc>) -> String {
        format!(
            "schedule:{workflow}:{}:{}.{:03}",
            self.identity(),
            at.timestamp(),
            at.timestamp_subsec_millis()
        )
    }

    /// 16 hexadecimal digits naming what this schedule submits: a SHA-256 of its expression
    /// (fields separated by single spaces), time zone, parameters, guidance, project key and
    /// project path. Two schedules that submit the same request at the same times have the same
    /// identity (and so start one job a tick between them).
    #[must_use]
    pub fn identity(&self) -> String {
        use sha2::{Digest, Sha256};
        let cron = self.cron.split_whitespace().collect::<Vec<_>>().join(" ");
        // A JSON array: every field delimited and escaped, the parameters in key order.
        let named = serde_json::json!([
            cron,
            self.timezone.as_deref().unwrap_or("UTC"),
            self.params,
            self.guidance,
            self.project,
            self.project_path,
        ]);
        let digest = Sha256::digest(named.to_string().as_bytes());
        hex::encode(&digest[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn five_and_six_field_expressions_and_time_zones() {
        let t0 = Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 0).unwrap();
        let every_2s = Schedule::new("*/2 * * * * *");
        assert_eq!(
            every_2s.next_after(t0).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 2).unwrap()
        );
        let hourly = Schedule::new("30 * * * *");
        assert_eq!(
            hourly.next_after(t0).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 2, 10, 30, 0).unwrap()
        );
        // 03:00 in New York (UTC-5 in December) is 08:00 UTC.
        let ny = Schedule::new("0 3 * * *").timezone("America/New_York");
        assert_eq!(
            ny.next_after(t0).unwrap(),
            Utc.with_ymd_and_hms(2026, 12, 3, 8, 0, 0).unwrap()
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_reasons() {
        let e = Schedule::new("* * * *").validate().unwrap_err();
        assert!(e.contains("4 fields"), "{e}");
        let e = Schedule::new("0 0 0 1 1 * 2030").validate().unwrap_err();
        assert!(e.contains("7 fields"), "{e}");
        let e = Schedule::new("0 25 * * *").validate().unwrap_err();
        assert!(e.contains("not valid"), "{e}");
        let e = Schedule::new("0 3 * * *")
            .timezone("Mars/Olympus")
            .validate()
            .unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn tick_keys_name_the_schedule_by_what_it_submits_not_by_its_place() {
        let t = Utc.with_ymd_and_hms(2026, 12, 2, 10, 0, 2).unwrap();
        let nightly = Schedule::new("0 3 * * *").param("scope", "deps");
        let key = nightly.tick_key("wf", t);
        assert_eq!(
            key,
            format!("schedule:wf:{}:{}.000", nightly.identity(), t.timestamp())
        );
        assert_eq!(nightly.identity().len(), 16);
        // The same schedule written with other spacing, or with another overlap, is the same.
        let respaced = Schedule::new(" 0  3 * *\t* ")
            .param("scope", "deps")
            .overlap(Overlap::Allow);
        assert_eq!(respaced.tick_key("wf", t), key);
        assert_eq!(
            Schedule::new("0 3 * * *").timezone("UTC").identity(),
            Schedule::new("0 3 * * *").identity()
        );
        // What a tick submits, or when, changes the name; so do the workflow and the tick.
        for other in [
            Schedule::new("0 4 * * *").param("scope", "deps"),
            Schedule::new("0 3 * * *").param("scope", "all"),
            Schedule::new("0 3 * * *")
                .param("scope", "deps")
                .timezone("Europe/Paris"),
            Schedule::new("0 3 * * *")
                .param("scope", "deps")
                .guidance("only report"),
            Schedule::new("0 3 * * *")
                .param("scope", "deps")
                .project("a"),
            Schedule::new("0 3 * * *")
                .param("scope", "deps")
                .project_path("a"),
        ] {
            assert_ne!(other.tick_key("wf", t), key, "{other:?}");
        }
        assert_ne!(nightly.tick_key("wf2", t), key);
        assert_ne!(
            nightly.tick_key("wf", t + chrono::Duration::milliseconds(1)),
            key
        );
    }
}
