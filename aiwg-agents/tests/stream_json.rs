//! The stream-json parser over a real capture of `claude -p … --output-format stream-json
//! --verbose` (version 2.1.197, a Write tool call then a text answer, against a fake model).

use aiwg_agents::stream_json::parse_line;
use aiwg_core::AgentEvent;

const CAPTURE: &str = include_str!("fixtures/claude-tool-use.jsonl");

#[test]
fn the_real_capture_parses_into_the_expected_events() {
    let mut events = Vec::new();
    let mut results = Vec::new();
    let mut sessions = std::collections::BTreeSet::new();
    for line in CAPTURE.lines() {
        let p = parse_line(line);
        events.extend(p.events);
        results.extend(p.result);
        sessions.extend(p.session_id);
    }
    assert_eq!(sessions.len(), 1, "one session throughout: {sessions:?}");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            AgentEvent::Init { .. } => "init",
            AgentEvent::Text { .. } => "text",
            AgentEvent::ToolUse { .. } => "tool_use",
            AgentEvent::ToolResult { .. } => "tool_result",
            AgentEvent::Usage { .. } => "usage",
            AgentEvent::Log { .. } => "log",
            AgentEvent::Raw { .. } => "raw",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["init", "tool_use", "tool_result", "text", "usage"]);
    match &events[0] {
        AgentEvent::Init { tools, model, .. } => {
            assert!(tools.iter().any(|t| t == "Write"));
            assert!(model.is_some());
        }
        _ => unreachable!(),
    }
    match &events[1] {
        AgentEvent::ToolUse { name, input, id } => {
            assert_eq!(name, "Write");
            assert_eq!(id.as_deref(), Some("toolu_01"));
            assert_eq!(input["file_path"], "/tmp/capture/proj/hello.txt");
        }
        _ => unreachable!(),
    }
    let r = &results[0];
    assert!(r.is_success());
    assert_eq!(r.result.as_deref(), Some("Hello from fake"));
    assert_eq!(r.num_turns, Some(2));
    assert_eq!(r.total_cost_usd, Some(0.00035));
    assert_eq!(r.usage.map(|u| u.input_tokens), Some(20));
}

#[test]
fn every_truncation_of_every_line_is_handled() {
    for line in CAPTURE.lines() {
        for (i, _) in line.char_indices() {
            let p = parse_line(&line[..i]);
            // Cut JSON is not JSON: it becomes a log line (or nothing, when empty).
            assert!(p.result.is_none() || i == line.len());
            if i > 0 {
                assert_eq!(p.events.len(), 1, "{}", &line[..i]);
            }
        }
    }
}
