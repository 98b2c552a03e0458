//! The command grammar on arbitrary text: never panics, and what it returns is consistent.
#![no_main]

use aiwg_webhook::grammar::{parse_command, parse_comment, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first line, when short, doubles as the mention.
    let mention = text
        .lines()
        .next()
        .filter(|l| l.len() <= 16)
        .unwrap_or("@aiwg");
    for parsed in [
        parse_comment(text, "@aiwg"),
        parse_comment(text, mention),
        parse_command(text),
    ] {
        if let Ok(Parsed::Run(cmd)) = parsed {
            assert!(!cmd.workflow.is_empty());
            assert!(cmd.workflow.is_ascii());
            assert!(!cmd.params.contains_key("project") && !cmd.params.contains_key("guidance"));
            if let Some(g) = &cmd.guidance {
                assert!(!g.is_empty());
            }
        }
    }
});
