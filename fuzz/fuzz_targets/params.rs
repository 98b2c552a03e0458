//! Parameter validation on arbitrary patterns, choices and values: never panics, and whatever
//! it accepts keeps its promises (within the length limit, no control characters, one of the
//! choices, and no leading `-` unless the parameter's pattern admits it).
#![no_main]

use std::collections::BTreeMap;

use aiwg_core::{Parameter, Step, Workflow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // `pattern \0 choice,choice \0 value` (missing parts mean "not set").
    let mut parts = text.splitn(3, '\0');
    let (pattern, choices, value) = match (parts.next(), parts.next(), parts.next()) {
        (Some(v), None, None) => (None, None, v),
        (Some(p), Some(v), None) => (Some(p), None, v),
        (Some(p), Some(c), Some(v)) => (Some(p), Some(c), v),
        _ => return,
    };
    let mut param = Parameter::new("p").with_max_length(64);
    if let Some(p) = pattern.filter(|p| !p.is_empty() && p.len() < 64) {
        param = param.with_pattern(p);
    }
    if let Some(c) = choices.filter(|c| !c.is_empty()) {
        param = param.with_choices(c.split(','));
    }
    let wf = Workflow::new("w")
        .param(param.clone())
        .step(Step::command("s", "sh", ["echo", "{{p}}"]));
    let given = BTreeMap::from([("p".to_owned(), value.to_owned())]);
    if let Ok(resolved) = wf.resolve_params(&given) {
        let v = &resolved["p"];
        assert!(v.len() <= 64);
        assert!(!v.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
        if !param.choices.is_empty() {
            assert!(param.choices.iter().any(|c| c == v));
        }
        if v.starts_with('-') {
            assert!(param.pattern.is_some(), "a dash value passed without a pattern");
        }
    }
    // The check itself never panics either (its reason is checked by the unit tests).
    let _ = param.check(value);
});
