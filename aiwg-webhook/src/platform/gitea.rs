//! Gitea and Forgejo: `X-Gitea-Signature` or `X-Forgejo-Signature` (hex HMAC-SHA256 of the
//! body, no prefix), the event in `X-Gitea-Event` / `X-Forgejo-Event`, the delivery id in
//! `X-Gitea-Delivery` / `X-Forgejo-Delivery`. Payloads follow GitHub's shape.

use http::HeaderMap;

use super::{forge_json, form_decode, header, is_form, verify_hex_hmac};
use crate::error::{ParseError, VerifyError};
use crate::event::{InboundEvent, Platform};
use crate::secret::Secret;

/// Verifies `X-Forgejo-Signature` (preferred when present) or `X-Gitea-Signature`.
pub fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    if !secret.is_configured() {
        return Err(VerifyError::NotConfigured);
    }
    let sig = header(headers, "x-forgejo-signature")
        .or_else(|| header(headers, "x-gitea-signature"))
        .ok_or(VerifyError::MissingHeader("x-gitea-signature"))?;
    verify_hex_hmac(secret.expose().as_bytes(), &[body], sig)
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let event = header(headers, "x-forgejo-event")
        .or_else(|| header(headers, "x-gitea-event"))
        .or_else(|| header(headers, "x-gogs-event"))
        .ok_or(ParseError::MissingHeader("X-Gitea-Event"))?;
    let mut ev = if is_form(headers, body) {
        let form = form_decode(body)?;
        let payload = form
            .get("payload")
            .ok_or(ParseError::MissingField("payload"))?;
        forge_json::parse(Platform::Gitea, event, payload.as_bytes())?
    } else {
        forge_json::parse(Platform::Gitea, event, body)?
    };
    ev.delivery_id = header(headers, "x-forgejo-delivery")
        .or_else(|| header(headers, "x-gitea-delivery"))
        .map(str::to_owned);
    Ok(ev)
}

/// Gitea's and Forgejo's [`Endpoint`](super::Endpoint).
pub(crate) struct Gitea {
    secret: Secret,
}

impl Gitea {
    pub(crate) fn new(config: &crate::config::GiteaConfig) -> Self {
        Self {
            secret: config.secret.clone(),
        }
    }
}

impl super::Endpoint for Gitea {
    fn platform(&self) -> Platform {
        Platform::Gitea
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], _now: i64) -> Result<(), VerifyError> {
        verify(&self.secret, headers, body)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
}
