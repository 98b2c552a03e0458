//! A tolerant parser for the JSONL events of `codex exec --json` (the OpenAI Codex CLI).
//!
//! Each line is one JSON object with a `type`:
//!
//! | line | becomes |
//! |---|---|
//! | `thread.started` (`thread_id`) | [`AgentEvent::Init`] with the thread id as the session |
//! | `turn.started` | nothing |
//! | `item.started` / `item.completed` of an `agent_message` | [`AgentEvent::Text`] (on completion) |
//! | … of a `command_execution` (`command`, `aggregated_output`, `exit_code`) | [`AgentEvent::ToolUse`] named `command`, then [`AgentEvent::ToolResult`] |
//! | … of a `file_change` (`changes`: `path`, `kind`) | `ToolUse` named `file_change`, then its `ToolResult` |
//! | … of an `mcp_tool_call` (`server`, `tool`, `arguments`) | `ToolUse` named `mcp:<server>/<tool>`, then its `ToolResult` |
//! | … of a `web_search` (`query`) | `ToolUse` named `web_search` |
//! | … of an `error` item (a warning the run survives) | [`AgentEvent::Log`] on standard error |
//! | `turn.completed` (`usage`) | [`AgentEvent::Usage`], and the turn's [`CodexOutcome::Completed`] |
//! | `turn.failed` (`error.message`), `error` (`message`) | [`CodexOutcome::Failed`] with the message |
//! | anything else (`reasoning`, `todo_list`, `item.updated`, unknown types) | [`AgentEvent::Raw`] |
//!
//! A line that is not JSON becomes a [`AgentEvent::Log`] on standard output; a blank line yields
//! nothing. [`parse_line`] never fails.
//!
//! ```
//! use aiwg_agents::codex_json::{parse_line, CodexOutcome};
//! use aiwg_core::AgentEvent;
//!
//! let p = parse_line(r#"{"type":"thread.started","thread_id":"0199-abc"}"#);
//! assert_eq!(p.thread_id.as_deref(), Some("0199-abc"));
//!
//! let p = parse_line(r#"{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"hi"}}"#);
//! assert_eq!(p.events, vec![AgentEvent::Text { text: "hi".into() }]);
//! assert_eq!(p.message.as_deref(), Some("hi"));
//!
//! let p = parse_line(r#"{"type":"turn.completed","usage":{"input_tokens":10,"output_tokens":5}}"#);
//! assert!(matches!(p.outcome, Some(CodexOutcome::Completed { .. })));
//! ```

use aiwg_core::{AgentEvent, LogStream, Usage};
use serde::Deserialize;
use serde_json::{json, Value};

/// How a turn ended, from its last line.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum CodexOutcome {
    /// `turn.completed`.
    Completed {
        /// The token usage it reported.
        usage: Option<Usage>,
    },
    /// `turn.failed` or a top-level `error`.
    Failed {
        /// The message codex gave.
        message: String,
    },
}

/// What one line produced.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ParsedLine {
    /// The events, in order.
    pub events: Vec<AgentEvent>,
    /// The thread id of a `thread.started` line (what `codex exec resume` takes).
    pub thread_id: Option<String>,
    /// The text of a completed `agent_message` (the last one is the run's answer).
    pub message: Option<String>,
    /// How the turn ended, for `turn.completed`, `turn.failed` and `error` lines.
    pub outcome: Option<CodexOutcome>,
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    item: Option<Value>,
    #[serde(default)]
    usage: Option<UsageIn>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct UsageIn {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    cached_input_tokens: u64,
    #[serde(default)]
    cache_write_input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

impl From<UsageIn> for Usage {
    fn from(u: UsageIn) -> Self {
        let mut out = Usage::new(u.input_tokens, u.output_tokens);
        out.cache_read_input_tokens = u.cached_input_tokens;
        out.cache_creation_input_tokens = u.cache_write_input_tokens;
        out
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Parses one line of `codex exec --json` output.
#[must_use]
pub fn parse_line(line: &str) -> ParsedLine {
    let mut out = ParsedLine::default();
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return out;
    }
    let Ok(parsed) = serde_json::from_str::<Line>(trimmed) else {
        out.events.push(AgentEvent::Log {
            stream: LogStream::Stdout,
            line: line.to_owned(),
        });
        return out;
    };
    match parsed.kind.as_str() {
        "thread.started" => {
            out.events.push(AgentEvent::Init {
                session_id: parsed.thread_id.clone(),
                model: None,
                tools: Vec::new(),
            });
            out.thread_id = parsed.thread_id;
        }
        "turn.started" => {}
        "turn.completed" => {
            let usage = parsed.usage.map(Usage::from);
            if let Some(u) = usage {
                out.events.push(AgentEvent::Usage {
                    cost_usd: None,
                    usage: u,
                });
            }
            out.outcome = Some(CodexOutcome::Completed { usage });
        }
        "turn.failed" => {
            let message = parsed
                .error
                .as_ref()
                .and_then(|e| str_of(e, "message").map(str::to_owned))
                .or(parsed.message)
                .unwrap_or_else(|| "the turn failed".to_owned());
            out.outcome = Some(CodexOutcome::Failed { message });
        }
        "error" => {
            let message = parsed
                .message
                .unwrap_or_else(|| "codex reported an error".to_owned());
            out.outcome = Some(CodexOutcome::Failed { message });
        }
        "item.started" | "item.completed" => {
            let done = parsed.kind == "item.completed";
            match parsed.item {
                Some(item) => item_events(&item, done, &mut out),
                None => out.events.push(raw(trimmed)),
            }
        }
        _ => out.events.push(raw(trimmed)),
    }
    out
}

fn raw(line: &str) -> AgentEvent {
    AgentEvent::Raw {
        value: serde_json::from_str(line).unwrap_or_else(|_| Value::String(line.to_owned())),
    }
}

/// The events of an `item.started` (`done == false`) or `item.completed` line.
fn item_events(item: &Value, done: bool, out: &mut ParsedLine) {
    let id = str_of(item, "id").map(str::to_owned);
    let failed = str_of(item, "status") == Some("failed");
    match str_of(item, "type").unwrap_or_default() {
        "agent_message" => {
            if done {
                let text = str_of(item, "text").unwrap_or_default().to_owned();
                out.events.push(AgentEvent::Text { text: text.clone() });
                out.message = Some(text);
            }
        }
        "command_execution" => {
            let command = item.get("command").cloned().unwrap_or(Value::Null);
            if !done {
                out.events.push(AgentEvent::ToolUse {
                    id,
                    name: "command".into(),
                    input: json!({ "command": command }),
                });
            } else {
                let exit_code = item.get("exit_code").and_then(Value::as_i64);
                out.events.push(AgentEvent::ToolResult {
                    tool_use_id: id,
                    content: json!({
                        "command": command,
                        "exit_code": exit_code,
                        "output": str_of(item, "aggregated_output").unwrap_or_default(),
                    }),
                    is_error: failed || exit_code.is_some_and(|c| c != 0),
                });
            }
        }
        "file_change" => {
            // Codex reports a patch once, when it was applied (or failed).
            let changes = item.get("changes").cloned().unwrap_or(Value::Null);
            if !done {
                return;
            }
            out.events.push(AgentEvent::ToolUse {
                id: id.clone(),
                name: "file_change".into(),
                input: json!({ "changes": changes }),
            });
            out.events.push(AgentEvent::ToolResult {
                tool_use_id: id,
                content: json!({ "status": str_of(item, "status") }),
                is_error: failed,
            });
        }
        "mcp_tool_call" => {
            if !done {
                let name = format!(
                    "mcp:{}/{}",
                    str_of(item, "server").unwrap_or_default(),
                    str_of(item, "tool").unwrap_or_default()
                );
                out.events.push(AgentEvent::ToolUse {
                    id,
                    name,
                    input: item.get("arguments").cloned().unwrap_or(Value::Null),
                });
            } else {
                let error = item.get("error").filter(|e| !e.is_null());
                out.events.push(AgentEvent::ToolResult {
                    tool_use_id: id,
                    content: error
                        .or_else(|| item.get("result"))
                        .cloned()
                        .unwrap_or(Value::Null),
                    is_error: failed || error.is_some(),
                });
            }
        }
        "web_search" => {
            if !done {
                out.events.push(AgentEvent::ToolUse {
                    id,
                    name: "web_search".into(),
                    input: json!({ "query": item.get("query") }),
                });
            }
        }
        "error" => {
            if done {
                out.events.push(AgentEvent::Log {
                    stream: LogStream::Stderr,
                    line: str_of(item, "message").unwrap_or_default().to_owned(),
                });
            }
        }
        _ => out.events.push(AgentEvent::Raw {
            value: json!({ "type": if done { "item.completed" } else { "item.started" }, "item": item }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_becomes_a_tool_use_and_its_result() {
        let start = parse_line(
            r#"{"type":"item.started","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"","exit_code":null,"status":"in_progress"}}"#,
        );
        assert_eq!(
            start.events,
            vec![AgentEvent::ToolUse {
                id: Some("item_1".into()),
                name: "command".into(),
                input: json!({"command": "bash -lc ls"}),
            }]
        );
        let done = parse_line(
            r#"{"type":"item.completed","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"a\n","exit_code":2,"status":"failed"}}"#,
        );
        match &done.events[..] {
            [AgentEvent::ToolResult {
                tool_use_id,
                content,
                is_error,
            }] => {
                assert_eq!(tool_use_id.as_deref(), Some("item_1"));
                assert_eq!(content["output"], "a\n");
                assert_eq!(content["exit_code"], 2);
                assert!(is_error);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn usage_failures_warnings_and_junk() {
        let p = parse_line(
            r#"{"type":"turn.completed","usage":{"input_tokens":20,"cached_input_tokens":4,"cache_write_input_tokens":1,"output_tokens":10,"reasoning_output_tokens":2}}"#,
        );
        let Some(CodexOutcome::Completed { usage: Some(u) }) = p.outcome else {
            panic!("{p:?}")
        };
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cache_read_input_tokens,
                u.cache_creation_input_tokens
            ),
            (20, 10, 4, 1)
        );
        assert!(matches!(p.events[0], AgentEvent::Usage { .. }));

        let p = parse_line(r#"{"type":"turn.failed","error":{"message":"stream disconnected"}}"#);
        assert_eq!(
            p.outcome,
            Some(CodexOutcome::Failed {
                message: "stream disconnected".into()
            })
        );
        let p = parse_line(r#"{"type":"error","message":"unexpected status 400"}"#);
        assert!(
            matches!(p.outcome, Some(CodexOutcome::Failed { message }) if message.contains("400"))
        );

        let p = parse_line(
            r#"{"type":"item.completed","item":{"id":"item_0","type":"error","message":"Model metadata not found"}}"#,
        );
        assert!(p.outcome.is_none(), "a warning item does not end the run");
        assert!(
            matches!(&p.events[0], AgentEvent::Log { stream: LogStream::Stderr, line } if line.contains("metadata"))
        );

        assert!(matches!(
            parse_line("WARNING: not json").events[0],
            AgentEvent::Log {
                stream: LogStream::Stdout,
                ..
            }
        ));
        assert!(parse_line("   ").events.is_empty());
        assert!(matches!(
            parse_line(r#"{"type":"something.new","x":1}"#).events[0],
            AgentEvent::Raw { .. }
        ));
    }

    #[test]
    fn file_changes_and_mcp_calls() {
        let p = parse_line(
            r#"{"type":"item.completed","item":{"id":"item_3","type":"file_change","changes":[{"path":"a.txt","kind":"add"}],"status":"completed"}}"#,
        );
        assert!(
            matches!(&p.events[0], AgentEvent::ToolUse { name, input, .. } if name == "file_change" && input["changes"][0]["path"] == "a.txt")
        );
        assert!(matches!(
            p.events[1],
            AgentEvent::ToolResult {
                is_error: false,
                ..
            }
        ));
        let p = parse_line(
            r#"{"type":"item.started","item":{"id":"item_4","type":"mcp_tool_call","server":"gh","tool":"search","arguments":{"q":"x"},"status":"in_progress"}}"#,
        );
        assert!(
            matches!(&p.events[0], AgentEvent::ToolUse { name, .. } if name == "mcp:gh/search")
        );
    }
}
