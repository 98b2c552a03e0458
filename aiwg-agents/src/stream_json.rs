//! A fast, tolerant parser for the `--output-format stream-json` lines of the Claude Code CLI.
//!
//! Each line is one JSON object. [`parse_line`] turns it into [`AgentEvent`]s and, for the final
//! `result` line, a [`ClaudeResult`]. It deserialises only the fields it needs into borrowed
//! structs (everything else is skipped without being built), so it is faster than parsing into a
//! [`serde_json::Value`]. It never fails: an unknown `type` becomes [`AgentEvent::Raw`], a line
//! that is not JSON becomes an [`AgentEvent::Log`], a blank line yields nothing.
//!
//! ```
//! use aiwg_agents::stream_json::parse_line;
//! use aiwg_core::AgentEvent;
//!
//! let line = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"hi"}]},"session_id":"s1"}"#;
//! let parsed = parse_line(line);
//! assert_eq!(parsed.events, vec![AgentEvent::Text { text: "hi".into() }]);
//! assert_eq!(parsed.session_id.as_deref(), Some("s1"));
//!
//! let junk = parse_line("not json at all");
//! assert!(matches!(junk.events[0], AgentEvent::Log { .. }));
//! ```

use std::borrow::Cow;

use aiwg_core::{AgentEvent, LogStream, Usage};
use serde::Deserialize;

/// The final `result` line of a run.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ClaudeResult {
    /// `success`, `error_max_turns`, `error_during_execution`, `error_max_budget_usd`, …
    pub subtype: String,
    /// Whether the run failed.
    pub is_error: bool,
    /// The final text.
    pub result: Option<String>,
    /// The session the run ended in.
    pub session_id: Option<String>,
    /// Total cost in US dollars.
    pub total_cost_usd: Option<f64>,
    /// Token usage.
    pub usage: Option<Usage>,
    /// Agent turns.
    pub num_turns: Option<u32>,
    /// Wall time the CLI reports.
    pub duration_ms: Option<u64>,
    /// The answer validated against `--json-schema`, when one was given.
    pub structured_output: Option<serde_json::Value>,
}

impl ClaudeResult {
    /// True for a `success` result that is not an error.
    #[must_use]
    pub fn is_success(&self) -> bool {
        !self.is_error && self.subtype == "success"
    }
}

/// What one line produced.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ParsedLine {
    /// The events, in order.
    pub events: Vec<AgentEvent>,
    /// The session id the line carried, if any.
    pub session_id: Option<String>,
    /// The final result, for a `result` line.
    pub result: Option<ClaudeResult>,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subtype: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    tools: Option<Vec<String>>,
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    is_error: Option<bool>,
    #[serde(default)]
    total_cost_usd: Option<f64>,
    #[serde(default)]
    usage: Option<UsageIn>,
    #[serde(default)]
    num_turns: Option<u32>,
    #[serde(default)]
    duration_ms: Option<u64>,
    #[serde(default)]
    structured_output: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Content,
}

#[derive(Default)]
enum Content {
    Blocks(Vec<Block>),
    Text(String),
    #[default]
    None,
}

// A hand-written visitor instead of `#[serde(untagged)]`, which would buffer the whole content
// array before trying each variant.
impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("message content")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Content, E> {
                Ok(Content::None)
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Content, E> {
                Ok(Content::None)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Content, A::Error> {
                let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(b) = seq.next_element::<Block>()? {
                    blocks.push(b);
                }
                Ok(Content::Blocks(blocks))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Content, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Content::None)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    is_error: Option<bool>,
    #[serde(default)]
    thinking: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct UsageIn {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: u64,
}

impl From<UsageIn> for Usage {
    fn from(u: UsageIn) -> Self {
        let mut out = Usage::new(u.input_tokens, u.output_tokens);
        out.cache_read_input_tokens = u.cache_read_input_tokens;
        out.cache_creation_input_tokens = u.cache_creation_input_tokens;
        out
    }
}

fn raw(line: &str) -> AgentEvent {
    let value = serde_json::from_str(line).unwrap_or_else(|_| serde_json::Value::from(line));
    AgentEvent::Raw { value }
}

/// Parses one line of `stream-json` output. Never fails; see the module docs.
#[must_use]
pub fn parse_line(line: &str) -> ParsedLine {
    let line = line.trim_end_matches(['\r', '\n']);
    let mut out = ParsedLine::default();
    if line.trim().is_empty() {
        return out;
    }
    let parsed: Line<'_> = match serde_json::from_str(line) {
        Ok(l) => l,
        Err(_) => {
            // Valid JSON of an unexpected shape (an array, a field of an odd type) is kept raw;
            // anything else is a log line.
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(value) => out.events.push(AgentEvent::Raw { value }),
                Err(_) => out.events.push(AgentEvent::Log {
                    stream: LogStream::Stdout,
                    line: line.to_owned(),
                }),
            }
            return out;
        }
    };
    out.session_id = parsed.session_id.as_deref().map(str::to_owned);
    match (parsed.kind.as_deref(), parsed.subtype.as_deref()) {
        (Some("system"), Some("init")) => out.events.push(AgentEvent::Init {
            session_id: out.session_id.clone(),
            model: parsed.model.map(Cow::into_owned),
            tools: parsed.tools.unwrap_or_default(),
        }),
        (Some("assistant"), _) => {
            let Some(message) = parsed.message else {
                out.events.push(raw(line));
                return out;
            };
            match message.content {
                Content::Text(text) => out.events.push(AgentEvent::Text { text }),
                Content::None => out.events.push(raw(line)),
                Content::Blocks(blocks) => {
                    for block in blocks {
                        match block.kind.as_str() {
                            "text" => out.events.push(AgentEvent::Text {
                                text: block.text.unwrap_or_default(),
                            }),
                            "tool_use" | "server_tool_use" => out.events.push(AgentEvent::ToolUse {
                                id: block.id,
                                name: block.name.unwrap_or_default(),
                                input: block.input.unwrap_or(serde_json::Value::Null),
                            }),
                            "thinking" => out.events.push(AgentEvent::Raw {
                                value: serde_json::json!({
                                    "type": "thinking",
                                    "thinking": block.thinking.unwrap_or_default(),
                                }),
                            }),
                            other => out.events.push(AgentEvent::Raw {
                                value: serde_json::json!({ "type": other, "block": block_value(block.text, block.input) }),
                            }),
                        }
                    }
                }
            }
        }
        (Some("user"), _) => {
            let blocks = match parsed.message.map(|m| m.content) {
                Some(Content::Blocks(b)) => b,
                _ => {
                    out.events.push(raw(line));
                    return out;
                }
            };
            for block in blocks {
                if block.kind == "tool_result" {
                    out.events.push(AgentEvent::ToolResult {
                        tool_use_id: block.tool_use_id,
                        content: block.content.unwrap_or(serde_json::Value::Null),
                        is_error: block.is_error.unwrap_or(false),
                    });
                } else if block.kind == "text" {
                    // The prompt echoed back (e.g. after a compaction); keep it visible but apart
                    // from the agent's own text.
                    out.events.push(AgentEvent::Raw {
                        value: serde_json::json!({"type": "user_text", "text": block.text}),
                    });
                }
            }
        }
        (Some("result"), subtype) => {
            let usage = parsed.usage.map(Usage::from);
            let result = ClaudeResult {
                subtype: subtype.unwrap_or("unknown").to_owned(),
                is_error: parsed.is_error.unwrap_or(false),
                result: parsed.result,
                session_id: out.session_id.clone(),
                total_cost_usd: parsed.total_cost_usd,
                usage,
                num_turns: parsed.num_turns,
                duration_ms: parsed.duration_ms,
                structured_output: parsed.structured_output,
            };
            if result.total_cost_usd.is_some() || usage.is_some() {
                out.events.push(AgentEvent::Usage {
                    cost_usd: result.total_cost_usd,
                    usage: usage.unwrap_or_default(),
                });
            }
            out.result = Some(result);
        }
        _ => out.events.push(raw(line)),
    }
    out
}

fn block_value(text: Option<String>, input: Option<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({ "text": text, "input": input })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_assistant_user_result_are_recognised() {
        let init = parse_line(
            r#"{"type":"system","subtype":"init","session_id":"abc","tools":["Bash","Write"],"model":"m","extra":{"a":[1,2]}}"#,
        );
        assert_eq!(
            init.events,
            vec![AgentEvent::Init {
                session_id: Some("abc".into()),
                model: Some("m".into()),
                tools: vec!["Bash".into(), "Write".into()],
            }]
        );
        let tool = parse_line(
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","id":"t1","name":"Write","input":{"file_path":"a"}}]}}"#,
        );
        assert_eq!(
            tool.events,
            vec![AgentEvent::ToolUse {
                id: Some("t1".into()),
                name: "Write".into(),
                input: serde_json::json!({"file_path": "a"}),
            }]
        );
        let res = parse_line(
            r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"t1","type":"tool_result","content":"ok","is_error":true}]}}"#,
        );
        assert_eq!(
            res.events,
            vec![AgentEvent::ToolResult {
                tool_use_id: Some("t1".into()),
                content: serde_json::json!("ok"),
                is_error: true,
            }]
        );
        let fin = parse_line(
            r#"{"type":"result","subtype":"success","is_error":false,"result":"done","session_id":"abc","total_cost_usd":0.5,"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":1},"num_turns":2,"duration_ms":10}"#,
        );
        let r = fin.result.expect("a result");
        assert!(r.is_success());
        assert_eq!(r.result.as_deref(), Some("done"));
        assert_eq!(r.total_cost_usd, Some(0.5));
        assert_eq!(r.num_turns, Some(2));
        assert_eq!(r.usage.map(|u| u.cache_read_input_tokens), Some(1));
        assert!(matches!(fin.events[0], AgentEvent::Usage { cost_usd: Some(c), .. } if c == 0.5));
    }

    #[test]
    fn junk_and_unknown_are_events_not_errors() {
        assert!(parse_line("").events.is_empty());
        assert!(parse_line("   \r\n").events.is_empty());
        assert_eq!(
            parse_line("{not json").events,
            vec![AgentEvent::Log {
                stream: LogStream::Stdout,
                line: "{not json".into()
            }]
        );
        assert_eq!(
            parse_line(r#"{"type":"brand_new","x":1}"#).events,
            vec![AgentEvent::Raw {
                value: serde_json::json!({"type": "brand_new", "x": 1})
            }]
        );
        assert_eq!(
            parse_line("[1,2]").events,
            vec![AgentEvent::Raw {
                value: serde_json::json!([1, 2])
            }]
        );
        // A known type with a field of an unexpected type is kept raw rather than lost.
        assert!(matches!(
            parse_line(r#"{"type":"result","num_turns":"many"}"#).events[0],
            AgentEvent::Raw { .. }
        ));
        let sys = parse_line(r#"{"type":"system","subtype":"task_started","session_id":"s"}"#);
        assert!(matches!(sys.events[0], AgentEvent::Raw { .. }));
        assert_eq!(sys.session_id.as_deref(), Some("s"));
    }

    #[test]
    fn error_results_are_not_success() {
        let r = parse_line(r#"{"type":"result","subtype":"error_max_turns","is_error":true}"#)
            .result
            .expect("result");
        assert!(!r.is_success());
        assert_eq!(r.subtype, "error_max_turns");
    }
}
