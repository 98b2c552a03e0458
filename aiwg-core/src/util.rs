//! Small shared helpers: duration parsing for configuration, and times a duration after or
//! before another that never overflow (the durations configuration accepts reach `u64::MAX`
//! seconds).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The length of a value's compact JSON text, counted as it is written (nothing is kept).
pub(crate) fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail; a value that cannot be serialised counts what was
    // written before it failed.
    let _ = serde_json::to_writer(&mut count, v);
    count.0
}

/// `d` after `at`, or the last time there is: a duration meant as "forever" (a timeout or a
/// retention of `u64::MAX` seconds, which configuration accepts) does not overflow the
/// calendar's range (`DateTime + TimeDelta` panics past it).
pub(crate) fn later(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `d` before `at`, or the first time there is (a retention of "forever" keeps everything).
#[must_use]
pub fn earlier(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| at.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `d` from `now` on the monotonic clock, or thirty years from it (as tokio's timers take a
/// deadline past the clock's range) when a duration meant as "forever" (a TTL or a timeout of
/// `u64::MAX` seconds, which configuration accepts) overflows it: `Instant + Duration` panics
/// there.
#[must_use]
pub fn deadline(now: tokio::time::Instant, d: Duration) -> tokio::time::Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// Parses `"5m"`, `"1h 30m"`, `"250ms"` (humantime) or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

/// Serde for `Option<Duration>` written as `"5m"` or as seconds.
pub(crate) mod opt_duration {
    use serde::{de, Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Secs(n)) => Ok(Some(Duration::from_secs(n))),
            Some(Raw::Text(t)) => super::parse_duration(&t)
                .map(Some)
                .map_err(de::Error::custom),
        }
    }
}

/// Gives a `struct Name(Uuid)` identifier `new` (a fresh, time-ordered UUID v7), `as_uuid`,
/// `Default`, `From<Uuid>`, and `Ord` and `Hash` that read the UUID as one 128-bit integer.
/// Display, parsing and serde stay with each type, since their wire forms differ (`msg_…` for
/// deliveries).
///
/// The order is the UUID's own (its bytes compared in turn, which for big-endian bytes is the
/// integer's order), and so creation order for v7 ids; only the way it is computed differs: a
/// UUID's derived `Ord` compares two byte arrays with a `memcmp` call, and the stores' ordered
/// maps and sets (jobs, leases, deliveries) compare ids a dozen times a lookup.
macro_rules! uuid_v7_id {
    ($name:ident) => {
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.0.as_u128().cmp(&other.0.as_u128())
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                state.write_u128(self.0.as_u128());
            }
        }

        impl $name {
            /// A fresh, time-ordered id.
            #[must_use]
            pub fn new() -> Self {
                Self(uuid::Uuid::now_v7())
            }

            /// The underlying UUID.
            #[must_use]
            pub fn as_uuid(&self) -> &uuid::Uuid {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<uuid::Uuid> for $name {
            fn from(value: uuid::Uuid) -> Self {
                Self(value)
            }
        }
    };
}
pub(crate) use uuid_v7_id;

/// A 64-bit key for PostgreSQL's `pg_advisory_xact_lock`, from a scope (the schema's channel)
/// and a name, so locks of different schemas and concepts never collide.
#[cfg(feature = "postgres")]
pub(crate) fn advisory_lock_key(scope: &str, name: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// The pool's current schema (the first existing schema of its `search_path`), which scopes
/// every PostgreSQL store's tables, locks and channel.
#[cfg(feature = "postgres")]
pub(crate) async fn current_schema(pool: &sqlx::PgPool) -> Result<String, crate::BackendError> {
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await
        .map_err(|e| crate::BackendError::with_source("postgres", e))?;
    schema.ok_or_else(|| {
        crate::BackendError::new(
            "postgres: no schema selected (the search_path names no existing schema)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys SQL computes too (`aiwg_lock_key`, migration 0012; the PostgreSQL store's
    /// tests check the same values there), so both lock the same project or group.
    #[cfg(feature = "postgres")]
    #[test]
    fn advisory_lock_keys_are_the_first_eight_bytes_of_sha256() {
        assert_eq!(
            advisory_lock_key("aiwg_test", "/srv/repo"),
            -3_471_333_599_544_597_417
        );
        assert_eq!(
            advisory_lock_key("aiwg_test", "/srv/café ☕"),
            -7_271_841_739_584_437_555
        );
        assert_eq!(
            advisory_lock_key("aiwg_test", "concurrency:octo/app#7"),
            -4_914_039_854_066_763_211
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }
}
