//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, the event name in
//! `X-GitHub-Event` (required), the delivery id in `X-GitHub-Delivery`.
//!
//! JSON bodies and `application/x-www-form-urlencoded` ones (`payload=<json>`) are both
//! accepted; the signature covers the raw bytes either way.

use http::HeaderMap;

use super::{forge_json, form_decode, header, is_form, required, verify_hex_hmac};
use crate::error::{ParseError, VerifyError};
use crate::event::{InboundEvent, Platform};
use crate::secret::Secret;

/// Verifies `X-Hub-Signature-256` over the raw body.
pub fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    if !secret.is_configured() {
        return Err(VerifyError::NotConfigured);
    }
    let sig = required(headers, "x-hub-signature-256")?;
    let hex_sig = sig
        .strip_prefix("sha256=")
        .ok_or(VerifyError::MalformedSignature)?;
    verify_hex_hmac(secret.expose().as_bytes(), &[body], hex_sig)
}

/// The `X-Hub-Signature-256` value GitHub would send for `body` (for tests of routers and
/// hosts).
#[must_use]
pub fn sign(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(super::hmac_sha256_bytes(secret.as_bytes(), body))
    )
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let event =
        header(headers, "x-github-event").ok_or(ParseError::MissingHeader("X-GitHub-Event"))?;
    let mut ev = if is_form(headers, body) {
        let form = form_decode(body)?;
        let payload = form
            .get("payload")
            .ok_or(ParseError::MissingField("payload"))?;
        forge_json::parse(Platform::GitHub, event, payload.as_bytes())?
    } else {
        forge_json::parse(Platform::GitHub, event, body)?
    };
    ev.delivery_id = header(headers, "x-github-delivery").map(str::to_owned);
    Ok(ev)
}

/// GitHub's [`Endpoint`](super::Endpoint).
pub(crate) struct GitHub {
    secret: Secret,
}

impl GitHub {
    pub(crate) fn new(config: &crate::config::GitHubConfig) -> Self {
        Self {
            secret: config.secret.clone(),
        }
    }
}

impl super::Endpoint for GitHub {
    fn platform(&self) -> Platform {
        Platform::GitHub
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], _now: i64) -> Result<(), VerifyError> {
        verify(&self.secret, headers, body)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
}
