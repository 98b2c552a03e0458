//! How a timestamp is written to JSON and read back: RFC 3339, exactly as chrono's own `serde`
//! support writes and reads it, by chrono's quick paths.
//!
//! Every `DateTime<Utc>` the crate serialises goes through here (`#[serde(with =
//! "crate::timestamp")]`, or [`option`] for an `Option`). Chrono's `Serialize` formats through
//! `core::fmt` into the serializer's `collect_str`, which escapes every character as it is
//! written; its `Deserialize` parses with its relaxed grammar, item by item. Both were the
//! largest part of a read of jobs (issue 15: 28 % of the server's time for a page of fifty jobs
//! from the memory store; 21 % with the parse for the same page from PostgreSQL).
//!
//! Here a timestamp is written digit by digit into a buffer on the stack and handed over as one
//! string (a year outside 0–9999, which chrono writes with a sign, goes through chrono's
//! [`DateTime::to_rfc3339_opts`], the function its `Serialize` calls, with the same options),
//! and parsed by [`DateTime::parse_from_rfc3339`], falling back to chrono's relaxed grammar for
//! what only that accepts. The text written and the values read are chrono's own, byte for byte:
//! the tests compare both with chrono's over thousands of instants.

use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, SecondsFormat, Timelike, Utc};
use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

/// Writes `at` as chrono's `Serialize` does: RFC 3339 with `Z`, and 0, 3, 6 or 9 fractional
/// digits, as few as hold its nanoseconds.
pub(crate) fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; LONGEST];
    match write(at, &mut buf) {
        Some(text) => s.serialize_str(text),
        None => s.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// `2026-12-08T02:08:50.989798590Z`: the longest text [`write`] makes.
const LONGEST: usize = 30;

/// Writes `at` into `buf` as chrono's `to_rfc3339_opts(SecondsFormat::AutoSi, true)` does, for
/// the years it writes with four digits; `None` for the others.
fn write<'b>(at: &DateTime<Utc>, buf: &'b mut [u8; LONGEST]) -> Option<&'b str> {
    // The date and time as kept (`DateTime`'s own accessors each add the offset again).
    let naive = at.naive_utc();
    let (date, time) = (naive.date(), naive.time());
    let year = u32::try_from(date.year()).ok().filter(|y| *y <= 9999)?;
    let (mut second, mut nano) = (time.second(), time.nanosecond());
    // A leap second: chrono keeps it as nanoseconds past a billion and writes `:60`.
    if nano >= 1_000_000_000 {
        second += 1;
        nano -= 1_000_000_000;
    }
    let mut digits = |at: usize, value: u32, width: usize| {
        let mut value = value;
        for slot in buf[at..at + width].iter_mut().rev() {
            // A digit: `value % 10` is below ten.
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    digits(0, year, 4);
    digits(5, date.month(), 2);
    digits(8, date.day(), 2);
    digits(11, time.hour(), 2);
    digits(14, time.minute(), 2);
    digits(17, second, 2);
    // The fewest of 0, 3, 6 or 9 fractional digits that hold the nanoseconds.
    let fraction = match nano {
        0 => 0,
        n if n % 1_000_000 == 0 => {
            digits(20, n / 1_000_000, 3);
            3
        }
        n if n % 1_000 == 0 => {
            digits(20, n / 1_000, 6);
            6
        }
        n => {
            digits(20, n, 9);
            9
        }
    };
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
    ] {
        buf[i] = c;
    }
    let end = if fraction == 0 { 19 } else { 20 + fraction };
    buf[end] = b'Z';
    std::str::from_utf8(&buf[..=end]).ok()
}

/// Reads what chrono's `Deserialize` reads.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    d.deserialize_str(Rfc3339)
}

/// The text of a timestamp, parsed by RFC 3339's strict grammar first.
fn parse(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| text.parse::<DateTime<FixedOffset>>())
        .map(|at| at.with_timezone(&Utc))
}

struct Rfc3339;

impl Visitor<'_> for Rfc3339 {
    type Value = DateTime<Utc>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an RFC 3339 date and time")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        parse(text).map_err(E::custom)
    }
}

/// The same for an `Option`: `null` is `None`. Use with `#[serde(default)]`, so that a missing
/// field stays `None` as it is without `with`.
pub(crate) mod option {
    use super::*;

    /// Writes `Some` as [`serialize`](super::serialize) does, `None` as `null`.
    // `serde(with)` hands over `&Option<_>`.
    #[allow(clippy::ref_option)]
    pub(crate) fn serialize<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => super::serialize(at, s),
            None => s.serialize_none(),
        }
    }

    /// Reads `null` as `None`, a timestamp as [`deserialize`](super::deserialize) does.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        d.deserialize_option(Maybe)
    }

    struct Maybe;

    impl<'de> Visitor<'de> for Maybe {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 date and time or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, NaiveDate, TimeZone};
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Ours {
        #[serde(with = "super")]
        at: DateTime<Utc>,
        #[serde(default, with = "super::option")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Chronos {
        at: DateTime<Utc>,
        maybe: Option<DateTime<Utc>>,
    }

    /// Instants with every count of fractional digits, a leap second, the ends of the years
    /// chrono writes with four digits and beyond them, and a spread of ordinary ones.
    fn instants() -> Vec<DateTime<Utc>> {
        let mut all = vec![
            Utc.with_ymd_and_hms(2026, 12, 8, 2, 8, 50).unwrap(),
            Utc.timestamp_opt(1_765_159_730, 989_798_590).unwrap(),
            Utc.timestamp_opt(1_765_159_730, 989_000_000).unwrap(),
            Utc.timestamp_opt(1_765_159_730, 989_798_000).unwrap(),
            Utc.timestamp_opt(1_765_159_730, 1).unwrap(),
            Utc.timestamp_opt(0, 0).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            // 23:59:60.5, a leap second (nanoseconds past a billion).
            NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        ];
        let mut at = Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let nanos = i64::try_from(x % 1_000_000_000).unwrap();
            let nanos = match x % 4 {
                0 => nanos,
                1 => nanos / 1_000 * 1_000,
                2 => nanos / 1_000_000 * 1_000_000,
                _ => 0,
            };
            at += Duration::seconds(i64::try_from(x % 3_000_000).unwrap())
                + Duration::nanoseconds(nanos);
            all.push(at);
        }
        all
    }

    #[test]
    fn a_timestamp_is_written_as_chrono_writes_it() {
        for at in instants() {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chronos = serde_json::to_string(&Chronos { at, maybe }).unwrap();
                assert_eq!(ours, chronos, "{at:?}");
            }
        }
    }

    #[test]
    fn a_timestamp_is_read_as_chrono_reads_it() {
        for at in instants() {
            let text = serde_json::to_string(&Chronos {
                at,
                maybe: Some(at),
            })
            .unwrap();
            let ours: Ours = serde_json::from_str(&text).unwrap();
            assert_eq!((ours.at, ours.maybe), (at, Some(at)), "{text}");
        }
        // What only chrono's relaxed grammar takes (an offset without its colon, a one-digit
        // day), what both take (offsets, lower case, more than nine fractional digits), and
        // what neither does: each is read as chrono reads it, or refused as chrono refuses it.
        let mut relaxed = 0;
        for text in [
            "2026-12-08T03:08:50+0100",
            "2026-12-8T02:08:50Z",
            "2026-12-08 02:08:50Z",
            "2026-12-08 T 02:08:50 Z",
            "2026-12-08t02:08:50.5z",
            "2026-12-07T21:08:50.000123-05:00",
            "2026-12-08T02:08:50.1234567891Z",
            "2026-12-08T02:08:50UTC",
            "2026-12-08T02:08:50",
            "+12026-12-08T02:08:50Z",
        ] {
            let json = format!(r#"{{"at":"{text}","maybe":"{text}"}}"#);
            let chronos = serde_json::from_str::<Chronos>(&json).map(|c| (c.at, c.maybe));
            let ours = serde_json::from_str::<Ours>(&json).map(|o| (o.at, o.maybe));
            match (chronos, ours) {
                (Ok(chronos), Ok(ours)) => {
                    assert_eq!(ours, chronos, "{text}");
                    relaxed += usize::from(DateTime::parse_from_rfc3339(text).is_err());
                }
                (Err(_), Err(_)) => {}
                (chronos, ours) => panic!("{text}: chrono {chronos:?}, ours {ours:?}"),
            }
        }
        assert!(relaxed >= 2, "only {relaxed} took the relaxed grammar");
    }

    #[test]
    fn what_chrono_refuses_is_refused_and_null_or_missing_is_none() {
        for text in [
            "",
            "2026-12-08",
            "2026-13-08T02:08:50Z",
            "2026-12-08T02:08:50",
            "soon",
        ] {
            let json = format!(r#"{{"at":"{text}"}}"#);
            assert!(serde_json::from_str::<Chronos>(&json).is_err(), "{text}");
            let err = serde_json::from_str::<Ours>(&json).unwrap_err();
            assert!(err.is_data(), "{text}: {err}");
        }
        let err = serde_json::from_str::<Ours>(r#"{"at":12}"#).unwrap_err();
        assert!(
            err.to_string().contains("an RFC 3339 date and time"),
            "{err}"
        );
        let at = "2026-12-08T02:08:50Z";
        let none: Ours = serde_json::from_str(&format!(r#"{{"at":"{at}","maybe":null}}"#)).unwrap();
        let missing: Ours = serde_json::from_str(&format!(r#"{{"at":"{at}"}}"#)).unwrap();
        assert_eq!(none.maybe, None);
        assert_eq!(missing.maybe, None);
    }
}
