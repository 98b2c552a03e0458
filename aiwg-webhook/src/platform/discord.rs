//! Discord interactions: `X-Signature-Ed25519` (hex) over `X-Signature-Timestamp` followed by
//! the raw body, checked with the application's public key. Discord sends bad signatures on
//! purpose to check that they are refused with 401.
//!
//! `type` 1 is PING (answered `{"type": 1}`); `type` 2 is an application command: its options
//! become the command. A first option of type SUB_COMMAND names the workflow; otherwise an
//! option `workflow` does; `guidance` and `project` are special, every other option is a
//! parameter; a single `text` (or `command`) option is parsed with the command grammar.

use http::HeaderMap;
use serde::Deserialize;

use super::required;
use crate::error::{ParseError, VerifyError};
use crate::event::{Actor, EventKind, InboundEvent, Platform};
use crate::grammar::Command;

pub use ed25519_dalek::VerifyingKey;

/// Decodes a public key written as 64 hex characters.
pub fn public_key(hex_key: &str) -> Result<VerifyingKey, &'static str> {
    let bytes = hex::decode(hex_key.trim()).map_err(|_| "not hex")?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| "not 32 bytes")?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| "not an Ed25519 public key")
}

/// Verifies the Ed25519 signature of `timestamp || body`.
pub fn verify(key: &VerifyingKey, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
    let sig_hex = required(headers, "x-signature-ed25519")?;
    let ts = required(headers, "x-signature-timestamp")?;
    if sig_hex.len() != 128 {
        return Err(VerifyError::MalformedSignature);
    }
    let sig = hex::decode(sig_hex).map_err(|_| VerifyError::MalformedSignature)?;
    let sig =
        ed25519_dalek::Signature::from_slice(&sig).map_err(|_| VerifyError::MalformedSignature)?;
    let mut message = Vec::with_capacity(ts.len() + body.len());
    message.extend_from_slice(ts.as_bytes());
    message.extend_from_slice(body);
    key.verify_strict(&message, &sig)
        .map_err(|_| VerifyError::Mismatch)
}

/// [`verify`], and the signed timestamp within
/// [`TIMESTAMP_TOLERANCE_SECS`](super::TIMESTAMP_TOLERANCE_SECS) of `now` (Unix seconds), both
/// ways, as for Slack: an old signed interaction replayed later is refused.
pub fn verify_at(
    key: &VerifyingKey,
    headers: &HeaderMap,
    body: &[u8],
    now: i64,
) -> Result<(), VerifyError> {
    verify(key, headers, body)?;
    let ts: i64 = required(headers, "x-signature-timestamp")?
        .parse()
        .map_err(|_| VerifyError::MalformedHeader("x-signature-timestamp"))?;
    super::check_window(ts, now)
}

#[derive(Deserialize)]
struct Interaction {
    #[serde(rename = "type")]
    kind: u8,
    id: Option<String>,
    application_id: Option<String>,
    token: Option<String>,
    guild_id: Option<String>,
    channel_id: Option<String>,
    data: Option<Data>,
    member: Option<Member>,
    user: Option<User>,
}

#[derive(Deserialize)]
struct Data {
    name: Option<String>,
    #[serde(default)]
    options: Vec<Opt>,
}

#[derive(Deserialize)]
struct Opt {
    name: String,
    #[serde(rename = "type")]
    kind: u8,
    value: Option<serde_json::Value>,
    #[serde(default)]
    options: Vec<Opt>,
}

#[derive(Deserialize)]
struct Member {
    user: Option<User>,
    #[serde(default)]
    roles: Vec<String>,
}

#[derive(Deserialize)]
struct User {
    id: String,
    username: Option<String>,
    #[serde(default)]
    bot: bool,
}

const SUB_COMMAND: u8 = 1;
const SUB_COMMAND_GROUP: u8 = 2;

fn value_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn command_from_options(options: &[Opt]) -> EventKind {
    // `/aiwg review depth:2 …` as a subcommand (possibly inside a group).
    if let [sub] = options {
        if sub.kind == SUB_COMMAND_GROUP {
            return command_from_options(&sub.options);
        }
        if sub.kind == SUB_COMMAND {
            let mut cmd = Command::new(sub.name.clone());
            fill(&mut cmd, &sub.options);
            return EventKind::Structured(cmd);
        }
    }
    if let Some(w) = options.iter().find(|o| o.name == "workflow") {
        let mut cmd = Command::new(value_text(w.value.as_ref()));
        fill(&mut cmd, options.iter().filter(|o| o.name != "workflow"));
        return EventKind::Structured(cmd);
    }
    EventKind::ChatCommand
}

fn fill<'a>(cmd: &mut Command, options: impl IntoIterator<Item = &'a Opt>) {
    for o in options {
        let v = value_text(o.value.as_ref());
        match o.name.as_str() {
            "guidance" | "text" => cmd.guidance = Some(v),
            "project" => cmd.project = Some(v),
            name => {
                cmd.params.insert(name.to_owned(), v);
            }
        }
    }
}

/// Parses a verified interaction.
pub fn parse(_headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
    let i: Interaction = serde_json::from_slice(body).map_err(|e| ParseError::json(&e))?;
    let mut ev = match i.kind {
        1 => InboundEvent::new(Platform::Discord, EventKind::Ping, "ping", "PING"),
        2 => {
            let data = i.data.as_ref().ok_or(ParseError::MissingField("data"))?;
            let kind = command_from_options(&data.options);
            let mut ev =
                InboundEvent::new(Platform::Discord, kind, "command", "APPLICATION_COMMAND");
            if ev.kind == EventKind::ChatCommand {
                let text = data
                    .options
                    .iter()
                    .find(|o| o.name == "text" || o.name == "command")
                    .map(|o| value_text(o.value.as_ref()))
                    .unwrap_or_default();
                ev.text = Some(text);
            }
            if let Some(name) = &data.name {
                ev.reply.insert("discord_command".into(), name.clone());
            }
            ev
        }
        n => {
            let name = format!("interaction_{n}");
            InboundEvent::new(Platform::Discord, EventKind::Other, &name, &name)
        }
    };
    ev.delivery_id = i.id.clone();
    let (user, roles) = match (i.member, i.user) {
        (Some(m), _) => (m.user, m.roles),
        (None, u) => (u, Vec::new()),
    };
    ev.actor = user.map(|u| Actor {
        login: u.id,
        name: u.username,
        roles,
        is_bot: u.bot,
        ..Actor::default()
    });
    for (k, v) in [
        ("discord_interaction_id", i.id),
        ("discord_application_id", i.application_id),
        ("discord_token", i.token),
        ("discord_guild", i.guild_id),
        ("discord_channel", i.channel_id),
    ] {
        if let Some(v) = v {
            ev.reply.insert(k.to_owned(), v);
        }
    }
    Ok(ev)
}

/// Discord's [`Endpoint`](super::Endpoint): PING is answered `{"type": 1}`, a started job
/// with a deferred answer (`{"type": 5}`, edited when the job ends), anything else with an
/// ephemeral message.
pub(crate) struct Discord {
    key: Option<VerifyingKey>,
    command: String,
    allowed_roles: Vec<String>,
    allowed_guilds: Vec<String>,
}

impl Discord {
    pub(crate) fn new(config: &crate::config::DiscordConfig) -> Result<Self, crate::BuildError> {
        let key = if config.public_key.trim().is_empty() {
            None
        } else {
            Some(public_key(&config.public_key).map_err(|reason| {
                crate::BuildError::InvalidKey {
                    key: "discord.public_key".to_owned(),
                    reason,
                }
            })?)
        };
        Ok(Self {
            key,
            command: config.command.clone(),
            allowed_roles: config.allowed_roles.clone(),
            allowed_guilds: config.allowed_guilds.clone(),
        })
    }
}

impl super::Endpoint for Discord {
    fn platform(&self) -> Platform {
        Platform::Discord
    }
    fn verify(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), VerifyError> {
        match &self.key {
            Some(key) => verify_at(key, headers, body, now),
            None => Err(VerifyError::NotConfigured),
        }
    }
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<InboundEvent, ParseError> {
        parse(headers, body)
    }
    fn command(&self) -> Option<&str> {
        Some(&self.command)
    }
    fn allowed_roles(&self) -> &[String] {
        &self.allowed_roles
    }
    fn authorize(&self, event: &InboundEvent) -> Result<(), crate::IgnoreReason> {
        super::allowed_place(event, "discord_guild", "server", &self.allowed_guilds)
    }
    fn answer(&self, outcome: &crate::HookOutcome) -> aiwg_core::http::ApiResponse {
        use crate::response::{chat_text, errors, json};
        use crate::HookOutcome;
        use serde_json::json as j;
        if let Some(r) = errors(outcome) {
            return r;
        }
        match outcome {
            HookOutcome::Pong => json(200, &j!({ "type": 1 })),
            HookOutcome::Submitted { .. } => json(200, &j!({ "type": 5 })),
            // Type 4: a message shown only to the person who asked (flag 64: ephemeral).
            _ => json(
                200,
                &j!({ "type": 4, "data": { "content": chat_text(outcome), "flags": 64 } }),
            ),
        }
    }
}
