//! One module per platform: `verify` on the raw bytes, then `parse` into an
//! [`InboundEvent`], and the platform's endpoint (the crate's `Endpoint` trait): its verifier
//! with the keys of its configuration section, its parser, its own allow-lists and the shape
//! of its answers.
//!
//! The verifiers are plain functions (the clock is a parameter) so they can be fuzzed and
//! tested on their own. Adding a platform means adding a module here that implements the
//! endpoint, and one line in [`Hooks`](crate::Hooks)' builder that registers it.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;

use aiwg_core::http::ApiResponse;

use crate::error::{ParseError, VerifyError};
use crate::event::{InboundEvent, Platform};
use crate::response::HookOutcome;

#[cfg(feature = "bitbucket")]
pub mod bitbucket;
#[cfg(feature = "discord")]
pub mod discord;
#[cfg(any(feature = "github", feature = "gitea"))]
mod forge_json;
#[cfg(feature = "generic")]
pub mod generic;
#[cfg(feature = "gitea")]
pub mod gitea;
#[cfg(feature = "github")]
pub mod github;
#[cfg(feature = "gitlab")]
pub mod gitlab;
#[cfg(feature = "slack")]
pub mod slack;
pub mod standard;

/// What one platform contributes to [`Hooks`](crate::Hooks): built from its configuration
/// section, it verifies and parses deliveries and renders outcomes in the platform's shape.
pub(crate) trait Endpoint: Send + Sync + 'static {
    /// Which platform this is.
    fn platform(&self) -> Platform;
    /// Checks the signature (or token) on the raw bytes at `now` (Unix seconds). Fails closed
    /// when no key is configured.
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), VerifyError>;
    /// Parses a verified delivery.
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError>;
    /// The slash or application command this platform answers to (Slack, Discord); deliveries
    /// for other commands are ignored.
    fn command(&self) -> Option<&str> {
        None
    }
    /// Roles whose members may trigger (Discord).
    fn allowed_roles(&self) -> &[String] {
        &[]
    }
    /// Platform-specific allow-lists (Slack channels and workspaces, Discord servers), checked
    /// with the rest of the trigger policy.
    fn authorize(&self, _event: &InboundEvent) -> Result<(), crate::IgnoreReason> {
        Ok(())
    }
    /// The answer to `outcome` (default: the forges' JSON answers).
    fn answer(&self, outcome: &HookOutcome) -> ApiResponse {
        crate::response::forge(outcome)
    }
}

/// `Ok` when `list` is empty or holds `value` of the event's `reply` field `field`.
pub(crate) fn allowed_place(
    event: &InboundEvent,
    field: &str,
    what: &str,
    list: &[String],
) -> Result<(), crate::IgnoreReason> {
    if list.is_empty() {
        return Ok(());
    }
    match event.reply.get(field) {
        Some(v) if list.iter().any(|a| a == v) => Ok(()),
        Some(v) => Err(crate::IgnoreReason::PlaceNotAllowed(format!(
            "{what} `{v}`"
        ))),
        None => Err(crate::IgnoreReason::PlaceNotAllowed(format!(
            "an unknown {what}"
        ))),
    }
}

/// The tolerance, both ways, for signed timestamps (Slack, Standard Webhooks): 300 s.
pub const TIMESTAMP_TOLERANCE_SECS: i64 = 300;

/// A header as text: `None` when absent, empty or not visible ASCII.
#[must_use]
pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// A header that must be present for verification.
pub(crate) fn required<'a>(
    headers: &'a HeaderMap,
    name: &'static str,
) -> Result<&'a str, VerifyError> {
    let value = headers.get(name).ok_or(VerifyError::MissingHeader(name))?;
    value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(VerifyError::MalformedHeader(name))
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// HMAC-SHA256 of `message` with `key`: the primitive behind the GitHub, GitLab-signing, Slack,
/// Gitea, Bitbucket and Standard Webhooks schemes (for senders, tests and benchmarks).
#[must_use]
pub fn hmac_sha256_bytes(key: &[u8], message: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[message]).finalize().into_bytes().into()
}

/// Checks a hex HMAC-SHA256 signature in constant time.
pub(crate) fn verify_hex_hmac(
    key: &[u8],
    parts: &[&[u8]],
    hex_sig: &str,
) -> Result<(), VerifyError> {
    let expected_len = 32;
    if hex_sig.len() != expected_len * 2 {
        return Err(VerifyError::MalformedSignature);
    }
    let sig = hex::decode(hex_sig).map_err(|_| VerifyError::MalformedSignature)?;
    hmac_sha256(key, parts)
        .verify_slice(&sig)
        .map_err(|_| VerifyError::Mismatch)
}

/// `|now - ts| <= tolerance`.
pub(crate) fn check_window(ts: i64, now: i64) -> Result<(), VerifyError> {
    if ts < now.saturating_sub(TIMESTAMP_TOLERANCE_SECS) {
        Err(VerifyError::StaleTimestamp)
    } else if ts > now.saturating_add(TIMESTAMP_TOLERANCE_SECS) {
        Err(VerifyError::FutureTimestamp)
    } else {
        Ok(())
    }
}

/// Whether the body is declared (or looks like) `application/x-www-form-urlencoded`.
#[cfg_attr(
    not(any(feature = "github", feature = "gitea", feature = "slack")),
    allow(dead_code)
)]
pub(crate) fn is_form(headers: &HeaderMap, body: &[u8]) -> bool {
    match header(headers, "content-type") {
        Some(ct) => ct
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded"),
        None => !body
            .first()
            .is_some_and(|b| matches!(b, b'{' | b'[' | b' ' | b'\n')),
    }
}

/// Decodes `application/x-www-form-urlencoded` (`+` is a space, `%XX` a byte, UTF-8 required).
/// A repeated key keeps its first value.
#[cfg_attr(
    not(any(feature = "github", feature = "gitea", feature = "slack")),
    allow(dead_code)
)]
pub(crate) fn form_decode(body: &[u8]) -> Result<BTreeMap<String, String>, ParseError> {
    fn decode(raw: &[u8]) -> Result<String, ParseError> {
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = raw
                        .get(i + 1..i + 3)
                        .ok_or(ParseError::Form("truncated percent escape"))?;
                    let s = std::str::from_utf8(hex).map_err(|_| ParseError::Form("bad escape"))?;
                    let b =
                        u8::from_str_radix(s, 16).map_err(|_| ParseError::Form("bad escape"))?;
                    out.push(b);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ParseError::Form("not UTF-8"))
    }
    let mut map = BTreeMap::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        map.entry(decode(k)?).or_insert(decode(v)?);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let m = form_decode(b"a=1&b=hello+world&c=%2Fx%C3%A9&d&a=2").expect("decodes");
        assert_eq!(m["a"], "1");
        assert_eq!(m["b"], "hello world");
        assert_eq!(m["c"], "/xé");
        assert_eq!(m["d"], "");
        assert!(form_decode(b"a=%2").is_err());
        assert!(form_decode(b"a=%zz").is_err());
        assert!(form_decode(b"a=%ff").is_err());
    }

    #[test]
    fn window_both_ways() {
        assert_eq!(check_window(1000, 1300), Ok(()));
        assert_eq!(check_window(1000, 700), Ok(()));
        assert_eq!(check_window(1000, 1301), Err(VerifyError::StaleTimestamp));
        assert_eq!(check_window(1000, 699), Err(VerifyError::FutureTimestamp));
    }

    #[test]
    fn hex_hmac_rejects_truncated_and_non_hex() {
        let sig = hex::encode(hmac_sha256(b"k", &[b"body"]).finalize().into_bytes());
        assert_eq!(verify_hex_hmac(b"k", &[b"body"], &sig), Ok(()));
        assert_eq!(verify_hex_hmac(b"k", &[b"bod", b"y"], &sig), Ok(()));
        assert_eq!(
            verify_hex_hmac(b"k", &[b"body"], &sig[..62]),
            Err(VerifyError::MalformedSignature)
        );
        assert_eq!(
            verify_hex_hmac(b"k", &[b"body"], &"zz".repeat(32)),
            Err(VerifyError::MalformedSignature)
        );
        assert_eq!(
            verify_hex_hmac(b"K", &[b"body"], &sig),
            Err(VerifyError::Mismatch)
        );
    }
}
