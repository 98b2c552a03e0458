//! The typed `agents:` configuration: unknown keys are refused naming them, good entries of
//! every kind build, pools come last and need existing members.

use aiwg_agents::config::{AgentConfig, AgentsConfig};
use serde_json::{json, Value};

fn err(agents: Value) -> aiwg_agents::ConfigError {
    AgentsConfig::from_value(&agents)
        .and_then(|a| a.build().map(drop))
        .expect_err("refused")
}

#[test]
fn an_unknown_key_under_each_kind_is_refused_naming_it() {
    for (kind, extra) in [
        ("command", json!({})),
        ("claude-code", json!({"path": "/bin/sh"})),
        ("opencode", json!({})),
        ("pool", json!({"members": ["x"]})),
    ] {
        let mut entry = extra.as_object().unwrap().clone();
        entry.insert("kind".into(), json!(kind));
        entry.insert("sandboxx".into(), json!("bwrap"));
        let e = err(json!({"sbx": entry, "x": {"kind": "command"}}));
        assert_eq!(e.key, "agents.sbx.sandboxx", "{kind}: {e}");
        assert!(e.reason.starts_with("unknown key"), "{kind}: {e}");
        assert!(e.to_string().contains("agents.sbx.sandboxx"), "{e}");
    }
    // Process keys belong to process-based kinds only.
    let e = err(json!({"oc": {"kind": "opencode", "grace": "1s"}}));
    assert_eq!(e.key, "agents.oc.grace");
    let e = err(
        json!({"p": {"kind": "pool", "members": ["x"], "sandbox": "bwrap"}, "x": {"kind": "command"}}),
    );
    assert_eq!(e.key, "agents.p.sandbox");
}

#[test]
fn wrong_values_name_their_key() {
    assert_eq!(
        err(json!({"a": {"kind": "command", "idle_timeout": "soon"}})).key,
        "agents.a.idle_timeout"
    );
    assert_eq!(
        err(json!({"a": {"kind": "command", "sandbox": "docker"}})).key,
        "agents.a.sandbox"
    );
    assert_eq!(
        err(json!({"a": {"kind": "command", "limits": {"cpu_time": "lots"}}})).key,
        "agents.a.limits.cpu_time"
    );
    assert_eq!(
        err(json!({"a": {"kind": "claude-code", "path": "/bin/sh", "model": "--evil"}})).key,
        "agents.a.model"
    );
    assert_eq!(
        err(json!({"a": {"kind": "claude-code", "path": "/bin/sh", "max_turns": 0}})).key,
        "agents.a.max_turns"
    );
    assert_eq!(
        err(json!({"a": {"kind": "opencode", "url": "ftp://x"}})).key,
        "agents.a.url"
    );
    assert_eq!(err(json!({"a": {"kind": "docker"}})).key, "agents.a.kind");
    assert_eq!(err(json!({"a": {"model": "x"}})).key, "agents.a.kind");
    assert_eq!(
        err(json!({"p": {"kind": "pool", "members": ["nobody"]}})).key,
        "agents.p.members[0]"
    );
    assert_eq!(
        err(json!({"p": {"kind": "pool", "members": []}})).key,
        "agents.p.members"
    );
    assert_eq!(
        err(json!({"a": {"kind": "command", "network": false}})).key,
        "agents.a.network"
    );
}

#[test]
fn a_good_config_of_each_kind_builds() {
    let agents = AgentsConfig::from_value(&json!({
        "sh": {
            "kind": "command",
            "command": ["git", "ls-files"],
            "allow_failure": true,
            "env": {"A": "b"},
            "pass_env": ["LANG"],
            "idle_timeout": "30s",
            "grace": 2,
            "limits": {"cpu_time": 60, "address_space": 1_073_741_824u64},
            "die_with_server": true,
        },
        "claude": {
            "kind": "claude-code",
            "path": "/bin/sh",
            "model": "sonnet",
            "permission_mode": "acceptEdits",
            "allowed_tools": ["Read", "Bash"],
            "disallowed_tools": ["WebFetch"],
            "max_turns": 30,
            "max_budget_usd": 1.5,
            "append_system_prompt": "be brief",
            "env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:1"},
            "idle_timeout": "5m",
        },
        "missing": {"kind": "claude-code", "path": "/nonexistent/claude"},
        "oc": {
            "kind": "opencode",
            "url": "http://127.0.0.1:4096",
            "password": "pw",
            "username": "me",
            "model": "anthropic/claude-sonnet-4-5",
            "agent": "build",
            "idle_timeout": "1m",
            "abort_wait": "5s",
            "connect_timeout": 3,
        },
        "a_pool": {
            "kind": "pool",
            "strategy": "weighted",
            "members": ["sh", {"agent": "oc", "weight": 3}],
            "failure_threshold": 2,
            "cool_down": "10s",
        },
        "b_pool": {"kind": "pool", "members": ["missing"]},
    }))
    .unwrap();
    assert!(matches!(agents.agents["sh"], AgentConfig::Command(..)));
    assert_eq!(agents.agents["claude"].kind(), "claude-code");
    let built = agents.build().unwrap();
    let names: Vec<&str> = built.executors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["claude", "oc", "sh", "a_pool"], "pools last");
    let kinds: Vec<&str> = built.executors.iter().map(|(_, e)| e.kind()).collect();
    assert_eq!(kinds, ["claude-code", "opencode", "command", "pool"]);
    assert_eq!(built.skipped.len(), 2, "{:?}", built.skipped);
    assert!(built.skipped[0].contains("missing"));
    assert!(built.skipped[1].contains("b_pool"));
    // No secret in Debug output.
    assert!(!format!("{agents:?}").contains("\"pw\""));
}

#[test]
fn a_sandboxed_agent_builds_when_bwrap_is_installed() {
    let cfg = json!({
        "sbx": {"kind": "command", "sandbox": "bwrap", "network": false},
        "claude": {"kind": "claude-code", "path": "/bin/sh", "sandbox": "bwrap"},
    });
    let res = AgentsConfig::from_value(&cfg).unwrap().build();
    if aiwg_agents_has_bwrap() {
        assert_eq!(res.unwrap().executors.len(), 2);
    } else {
        assert_eq!(res.unwrap_err().key, "agents.claude.sandbox");
    }
}

fn aiwg_agents_has_bwrap() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bwrap").is_file()))
}

#[test]
fn the_serve_section_of_opencode_is_checked_too() {
    let e = err(json!({"oc": {"kind": "opencode", "serve": {"dir": "/tmp", "sandboxx": "bwrap"}}}));
    assert_eq!(e.key, "agents.oc.serve.sandboxx");
    let e = err(json!({"oc": {"kind": "opencode", "serve": {"port": 1}}}));
    assert_eq!(e.key, "agents.oc.serve.dir");
    let e = err(json!({"oc": {"kind": "opencode", "url": "http://x", "serve": {"dir": "/tmp"}}}));
    assert_eq!(e.key, "agents.oc.serve");
    let e = err(json!({"oc": {"kind": "opencode", "serve": {"dir": "/tmp", "grace": "never"}}}));
    assert_eq!(e.key, "agents.oc.serve.grace");
    // Parsed fine, but only `start` starts servers.
    let e = err(json!({"oc": {"kind": "opencode", "serve": {"dir": "/tmp", "sandbox": "none"}}}));
    assert_eq!(e.key, "agents.oc.serve");
}

#[tokio::test]
async fn start_skips_a_supervised_opencode_whose_binary_is_missing() {
    let agents = AgentsConfig::from_value(&json!({
        "oc": {"kind": "opencode", "serve": {"dir": "/tmp", "binary": "/nonexistent/opencode"}},
        "p": {"kind": "pool", "members": ["oc"]},
        "sh": {"kind": "command"},
    }))
    .unwrap();
    let built = agents.start().await.unwrap();
    let names: Vec<&str> = built.executors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sh"]);
    assert_eq!(built.skipped.len(), 2, "{:?}", built.skipped);
    assert!(built.skipped[0].contains("/nonexistent/opencode"));
}
