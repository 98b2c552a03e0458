//! Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:{timestamp}:{body}">` with
//! `X-Slack-Request-Timestamp` within 300 s of now, both ways.
//!
//! Two kinds of body: slash commands (form-encoded: `command`, `text`, `user_id`,
//! `response_url`, `trigger_id`…) and the Events API (JSON: `url_verification` with its
//! `challenge`, and `event_callback` whose `event_id` is the delivery id; Slack retries carry
//! `X-Slack-Retry-Num`, which the de-duplication absorbs). An `app_mention` event's text,
//! without the leading `<@U…>`, is a command.

use http::HeaderMap;
use serde::Deserialize;

use super::{check_window, form_decode, header, is_form, required, verify_hex_hmac};
use crate::error::{ParseError, VerifyError};
use crate::event::{Actor, EventKind, InboundEvent, Platform};
use crate::secret::Secret;

/// Verifies the `v0` signature and the timestamp window at `now` (Unix seconds).
pub fn verify(
    secret: &Secret,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    if !secret.is_configured() {
        return Err(VerifyError::NotConfigured);
    }
    let ts_text = required(headers, "x-slack-request-timestamp")?;
    let sig = required(headers, "x-slack-signature")?;
    let ts: i64 = ts_text
        .parse()
        .map_err(|_| VerifyError::MalformedHeader("x-slack-request-timestamp"))?;
    check_window(ts, now)?;
    let hex_sig = sig
        .strip_prefix("v0=")
        .ok_or(VerifyError::MalformedSignature)?;
    verify_hex_hmac(
        secret.expose().as_bytes(),
        &[b"v0:", ts_text.as_bytes(), b":", body],
        hex_sig,
    )
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: Option<String>,
    challenge: Option<String>,
    event_id: Option<String>,
    team_id: Option<String>,
    event: Option<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: Option<String>,
    user: Option<String>,
    text: Option<String>,
    channel: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
    bot_id: Option<String>,
    subtype: Option<String>,
}

/// Removes a leading `<@U123>` (or `<@U123|name>`) mention.
fn strip_user_mention(text: &str) -> &str {
    let t = text.trim_start();
    if let Some(rest) = t.strip_prefix("<@") {
        if let Some(end) = rest.find('>') {
            return &rest[end + 1..];
        }
    }
    t
}

/// Parses a verified delivery.
pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    if is_form(headers, body) {
        return parse_form(body);
    }
    let env: Envelope = serde_json::from_slice(body).map_err(|e| ParseError::json(&e))?;
    let kind = env.kind.as_deref().unwrap_or("");
    match kind {
        "url_verification" => {
            let challenge = env.challenge.ok_or(ParseError::MissingField("challenge"))?;
            Ok(InboundEvent::new(
                Platform::Slack,
                EventKind::Challenge(challenge),
                "url_verification",
                "url_verification",
            ))
        }
        "event_callback" => {
            let event = env.event.ok_or(ParseError::MissingField("event"))?;
            let event_type = event.kind.clone().unwrap_or_default();
            let is_mention = event_type == "app_mention";
            let kind = if is_mention {
                EventKind::ChatCommand
            } else {
                EventKind::Other
            };
            let neutral = if is_mention {
                "command"
            } else {
                event_type.as_str()
            };
            let mut ev = InboundEvent::new(Platform::Slack, kind, neutral, &event_type);
            ev.delivery_id = env.event_id;
            ev.text = event
                .text
                .as_deref()
                .map(|t| strip_user_mention(t).to_owned());
            let is_bot = event.bot_id.is_some() || event.subtype.as_deref() == Some("bot_message");
            ev.actor = event.user.clone().map(|login| Actor {
                login,
                is_bot,
                ..Actor::default()
            });
            if ev.actor.is_none() && is_bot {
                ev.actor = event.bot_id.clone().map(|login| Actor {
                    login,
                    is_bot,
                    ..Actor::default()
                });
            }
            for (k, v) in [
                ("slack_channel", event.channel),
                ("slack_thread_ts", event.thread_ts.or(event.ts)),
                ("slack_team", env.team_id),
                (
                    "slack_retry_num",
                    header(headers, "x-slack-retry-num").map(str::to_owned),
                ),
            ] {
                if let Some(v) = v {
                    ev.reply.insert(k.to_owned(), v);
                }
            }
            Ok(ev)
        }
        other => Ok(InboundEvent::new(
            Platform::Slack,
            EventKind::Other,
            other,
            other,
        )),
    }
}

fn parse_form(body: &[u8]) -> Result<InboundEvent, ParseError> {
    let mut form = form_decode(body)?;
    if form.contains_key("payload") {
        // Interactive components (buttons, modals): not a command.
        return Ok(InboundEvent::new(
            Platform::Slack,
            EventKind::Other,
            "interactive",
            "interactive",
        ));
    }
    let command = form
        .remove("command")
        .ok_or(ParseError::MissingField("command"))?;
    let user_id = form
        .remove("user_id")
        .ok_or(ParseError::MissingField("user_id"))?;
    let mut ev = InboundEvent::new(
        Platform::Slack,
        EventKind::ChatCommand,
        "command",
        "slash_command",
    );
    ev.text = Some(form.remove("text").unwrap_or_default());
    ev.delivery_id = form.get("trigger_id").cloned();
    ev.actor = Some(Actor {
        login: user_id,
        name: form.remove("user_name"),
        ..Actor::default()
    });
    ev.reply.insert("slack_command".into(), command);
    for (from, to) in [
        ("response_url", "slack_response_url"),
        ("channel_id", "slack_channel"),
        ("team_id", "slack_team"),
        ("trigger_id", "slack_trigger_id"),
    ] {
        if let Some(v) = form.remove(from) {
            ev.reply.insert(to.to_owned(), v);
        }
    }
    Ok(ev)
}

/// Slack's [`Endpoint`](super::Endpoint): answers are ephemeral messages to the person who
/// asked (`url_verification` echoes its challenge).
pub(crate) struct Slack {
    secret: Secret,
    command: String,
    allowed_channels: Vec<String>,
    allowed_teams: Vec<String>,
}

impl Slack {
    pub(crate) fn new(config: &crate::config::SlackConfig) -> Self {
        Self {
            secret: config.signing_secret.clone(),
            command: config.command.clone(),
            allowed_channels: config.allowed_channels.clone(),
            allowed_teams: config.allowed_teams.clone(),
        }
    }
}

impl super::Endpoint for Slack {
    fn platform(&self) -> Platform {
        Platform::Slack
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), VerifyError> {
        verify(&self.secret, headers, body, now)
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
    fn command(&self) -> Option<&str> {
        Some(&self.command)
    }
    fn authorize(&self, event: &InboundEvent) -> Result<(), crate::IgnoreReason> {
        super::allowed_place(event, "slack_team", "workspace", &self.allowed_teams)?;
        super::allowed_place(event, "slack_channel", "channel", &self.allowed_channels)
    }
    fn answer(&self, outcome: &crate::HookOutcome) -> aiwg_core::http::ApiResponse {
        use crate::response::{chat_text, errors, json};
        use crate::HookOutcome;
        if let Some(r) = errors(outcome) {
            return r;
        }
        match outcome {
            HookOutcome::Challenge(c) => json(200, &serde_json::json!({ "challenge": c })),
            _ => json(
                200,
                &serde_json::json!({ "response_type": "ephemeral", "text": chat_text(outcome) }),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_leading_user_mention() {
        assert_eq!(strip_user_mention("<@U123> review now"), " review now");
        assert_eq!(strip_user_mention("<@U1|bot>review"), "review");
        assert_eq!(strip_user_mention("no mention"), "no mention");
        assert_eq!(strip_user_mention("<@unterminated"), "<@unterminated");
    }
}
