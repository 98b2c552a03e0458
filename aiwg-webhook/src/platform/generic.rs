//! The generic endpoint: Standard Webhooks `v1` signatures (preferred) or
//! `Authorization: Bearer <token>`.
//!
//! The body is JSON. `{"workflow", "project"?, "guidance"?, "params"?: {}}` is a command;
//! `{"text": "review --depth 2 …"}` is parsed with the command grammar (no mention needed);
//! anything else is an event named by its `type` field, which only [rules] can map to a
//! workflow. The delivery id is `webhook-id`, else `Idempotency-Key`.
//!
//! [rules]: crate::config::RuleConfig

use std::collections::BTreeMap;

use http::HeaderMap;
use serde::Deserialize;

use super::{header, required, standard};
use crate::error::{ParseError, VerifyError};
use crate::event::{Actor, EventKind, InboundEvent, Platform, Repository};
use crate::grammar::Command;
use crate::secret::Secret;

/// Verifies the Standard Webhooks signature (when `key` is set) or else the bearer token.
pub fn verify(
    key: Option<&standard::SigningKey>,
    token: &Secret,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    if let Some(key) = key {
        return standard::verify(key, headers, body, now);
    }
    if !token.is_configured() {
        return Err(VerifyError::NotConfigured);
    }
    let auth = required(headers, "authorization")?;
    // The scheme is case-insensitive (RFC 9110, 11.1), as on the API's endpoints.
    let given = auth
        .trim()
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .ok_or(VerifyError::MalformedHeader("authorization"))?;
    if token.matches(given.trim().as_bytes()) {
        Ok(())
    } else {
        Err(VerifyError::TokenMismatch)
    }
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: Option<String>,
    workflow: Option<String>,
    text: Option<String>,
    project: Option<String>,
    guidance: Option<String>,
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
    actor: Option<String>,
    repo: Option<String>,
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let p: Payload = serde_json::from_slice(body).map_err(|e| ParseError::json(&e))?;
    let mut ev = if let Some(workflow) = p.workflow {
        let mut cmd = Command::new(workflow);
        cmd.project = p.project;
        cmd.guidance = p.guidance;
        cmd.params = p
            .params
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        InboundEvent::new(
            Platform::Generic,
            EventKind::Structured(cmd),
            "command",
            "command",
        )
    } else if let Some(text) = p.text {
        let mut ev = InboundEvent::new(
            Platform::Generic,
            EventKind::ChatCommand,
            "command",
            "command",
        );
        ev.text = Some(text);
        ev
    } else {
        let name = p.kind.unwrap_or_else(|| "event".to_owned());
        InboundEvent::new(Platform::Generic, EventKind::Other, &name, &name)
    };
    ev.delivery_id = header(headers, "webhook-id")
        .or_else(|| header(headers, "idempotency-key"))
        .map(str::to_owned);
    ev.actor = p.actor.map(|login| Actor {
        login,
        ..Actor::default()
    });
    ev.repository = p.repo.map(|full_name| Repository {
        full_name,
        ..Repository::default()
    });
    Ok(ev)
}

/// The generic [`Endpoint`](super::Endpoint): Standard Webhooks or a bearer token.
pub(crate) struct Generic {
    key: Option<standard::SigningKey>,
    token: Secret,
}

impl Generic {
    pub(crate) fn new(config: &crate::config::GenericConfig) -> Result<Self, crate::BuildError> {
        Ok(Self {
            key: standard::signing_key(&config.secret, "generic.secret")?,
            token: config.token.clone(),
        })
    }
}

impl super::Endpoint for Generic {
    fn platform(&self) -> Platform {
        Platform::Generic
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(self.key.as_ref(), &self.token, headers, body, now)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
}
