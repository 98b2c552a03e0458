//! The command grammar of comments and chat commands.
//!
//! ```text
//! @aiwg <workflow> [--param value | --param=value]... [free text]
//! ```
//!
//! * The mention is configurable and matched case-insensitively as a whole word, anywhere in a
//!   comment, except in quoted lines (`> …`) and fenced code blocks, so quoting someone's command
//!   in a reply does not run it again. Everything after the mention is the command.
//! * The workflow name comes first; `help` (or nothing at all: a bare mention) asks for the list.
//! * Options are `--name value` or `--name=value`; values use shell-style quoting (`'…'`, `"…"`
//!   with `\` escapes, typographic `“…”`, `„…“`, `‘…’`, `«…»`); an option with no value is
//!   `"true"`. `--project` names the project (chat platforms only), `--guidance` sets the
//!   guidance, `--` ends the options.
//! * The first word that is not an option starts the free text, which becomes the guidance
//!   verbatim (trimmed; one fully quoted string is unquoted). Nothing is ever executed: the
//!   grammar only splits text.
//!
//! ```
//! use aiwg_webhook::grammar::{parse_comment, Parsed};
//!
//! let Parsed::Run(cmd) = parse_comment("LGTM. @aiwg review --depth=2 --focus “auth flow” be strict", "@aiwg")?
//! else { panic!("not a command") };
//! assert_eq!(cmd.workflow, "review");
//! assert_eq!(cmd.params["depth"], "2");
//! assert_eq!(cmd.params["focus"], "auth flow");
//! assert_eq!(cmd.guidance.as_deref(), Some("be strict"));
//! # Ok::<(), aiwg_webhook::grammar::GrammarError>(())
//! ```

use std::collections::BTreeMap;

use thiserror::Error;

/// A command addressed to us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Command {
    /// The workflow to run.
    pub workflow: String,
    /// `--name value` options (without `project` and `guidance`).
    pub params: BTreeMap<String, String>,
    /// Free text (and/or `--guidance`).
    pub guidance: Option<String>,
    /// `--project`.
    pub project: Option<String>,
}

impl Command {
    /// A command running `workflow`.
    #[must_use]
    pub fn new(workflow: impl Into<String>) -> Self {
        Self {
            workflow: workflow.into(),
            ..Self::default()
        }
    }
}

/// The result of parsing text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Parsed {
    /// The text does not mention us.
    NotAddressed,
    /// `help`, or a bare mention.
    Help,
    /// A command.
    Run(Command),
}

/// A command that mentions us but cannot be understood.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum GrammarError {
    /// A quote was opened and never closed.
    #[error("unterminated quote")]
    UnterminatedQuote,
    /// The workflow name is not `[A-Za-z0-9][A-Za-z0-9._:-]*` (at most 128 characters).
    #[error("`{0}` is not a workflow name")]
    InvalidWorkflow(String),
    /// An option name is not `[A-Za-z_][A-Za-z0-9._-]*` (at most 64 characters).
    #[error("`--{0}` is not a valid option")]
    InvalidOption(String),
    /// The same option twice.
    #[error("option `--{0}` given twice")]
    DuplicateOption(String),
}

/// Finds `mention` in a comment and parses what follows it.
pub fn parse_comment(text: &str, mention: &str) -> Result<Parsed, GrammarError> {
    match find_mention(text, mention) {
        Some(rest) => parse_command(rest),
        None => Ok(Parsed::NotAddressed),
    }
}

/// Parses text that is already addressed to us (what follows the mention or the slash command).
pub fn parse_command(text: &str) -> Result<Parsed, GrammarError> {
    let mut cur = Cursor { s: text, pos: 0 };
    cur.skip_ws();
    let Some(workflow) = cur.raw_word() else {
        return Ok(Parsed::Help);
    };
    if workflow.eq_ignore_ascii_case("help") {
        return Ok(Parsed::Help);
    }
    if !valid_workflow(workflow) {
        return Err(GrammarError::InvalidWorkflow(truncate(workflow, 64)));
    }
    let mut cmd = Command::new(workflow);
    let mut guidance_opt: Option<String> = None;
    let mut free: Option<String> = None;
    loop {
        cur.skip_ws();
        let rest = cur.rest();
        if rest.is_empty() {
            break;
        }
        if rest == "--" || rest.starts_with("--") && rest[2..].starts_with(char::is_whitespace) {
            cur.pos += 2;
            free = Some(cur.rest().trim().to_owned());
            break;
        }
        if !rest.starts_with("--") {
            free = Some(unquote_whole(rest.trim()));
            break;
        }
        cur.pos += 2;
        let token = cur.token()?.unwrap_or_default();
        let (name, value) = match token.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                cur.skip_ws();
                let next = cur.rest();
                if next.is_empty() || next.starts_with("--") {
                    (token, "true".to_owned())
                } else {
                    let v = cur.token()?.unwrap_or_default();
                    (token, v)
                }
            }
        };
        if !valid_option(&name) {
            return Err(GrammarError::InvalidOption(truncate(&name, 64)));
        }
        let duplicate = match name.as_str() {
            "project" => cmd.project.replace(value).is_some(),
            "guidance" => guidance_opt.replace(value).is_some(),
            _ => cmd.params.insert(name.clone(), value).is_some(),
        };
        if duplicate {
            return Err(GrammarError::DuplicateOption(name));
        }
    }
    let free = free.filter(|f| !f.is_empty());
    let guidance_opt = guidance_opt.filter(|g| !g.trim().is_empty());
    cmd.guidance = match (guidance_opt, free) {
        (Some(g), Some(f)) => Some(format!("{g}\n\n{f}")),
        (g, f) => g.or(f),
    };
    Ok(Parsed::Run(cmd))
}

/// The text after the first live mention, or `None`.
fn find_mention<'a>(text: &'a str, mention: &str) -> Option<&'a str> {
    let mention = mention.trim();
    if mention.is_empty() {
        return None;
    }
    let lower_mention = mention.to_ascii_lowercase();
    let mut in_fence = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let start = offset;
        offset += line.len();
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || trimmed.starts_with('>') {
            continue;
        }
        let lower = line.to_ascii_lowercase();
        let mut from = 0;
        while let Some(i) = lower[from..].find(&lower_mention) {
            let at = from + i;
            let end = at + lower_mention.len();
            let before_ok = line[..at].chars().next_back().is_none_or(|c| {
                !(c.is_alphanumeric() || c == '@' || c == '_' || c == '-' || c == '/')
            });
            let after_ok = line[end..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '/'));
            if before_ok && after_ok {
                let mut rest = &text[start + end..];
                // `@aiwg: review`, `@aiwg, review`
                rest = rest.strip_prefix([':', ',']).unwrap_or(rest);
                return Some(rest);
            }
            from = at + lower_mention.len().max(1);
        }
    }
    None
}

fn valid_workflow(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 128
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
}

fn valid_option(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// `"quoted text"` → `quoted text` when the whole free text is one quoted token; otherwise the
/// text unchanged.
fn unquote_whole(s: &str) -> String {
    let starts_quoted = s.chars().next().is_some_and(|c| closing_quote(c).is_some());
    if starts_quoted {
        let mut cur = Cursor { s, pos: 0 };
        if let Ok(Some(tok)) = cur.token() {
            if cur.rest().trim().is_empty() {
                return tok;
            }
        }
    }
    s.to_owned()
}

/// The closing quotes accepted for an opening quote.
fn closing_quote(open: char) -> Option<&'static [char]> {
    match open {
        '\'' => Some(&['\'']),
        '"' => Some(&['"']),
        '\u{201C}' | '\u{201E}' => Some(&['\u{201D}', '\u{201C}']),
        '\u{2018}' => Some(&['\u{2019}']),
        '\u{00AB}' => Some(&['\u{00BB}']),
        _ => None,
    }
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// A run of non-whitespace, without quote processing.
    fn raw_word(&mut self) -> Option<&'a str> {
        let rest = self.rest();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        self.pos += end;
        Some(&rest[..end])
    }

    /// One shell-style word: quotes removed, `\` escapes applied.
    fn token(&mut self) -> Result<Option<String>, GrammarError> {
        self.skip_ws();
        let mut out = String::new();
        let mut any = false;
        let mut chars = self.rest().char_indices();
        let base = self.pos;
        let mut end = self.s.len() - base;
        while let Some((i, c)) = chars.next() {
            if c.is_whitespace() {
                end = i;
                break;
            }
            any = true;
            if c == '\\' {
                if let Some((_, n)) = chars.next() {
                    out.push(n);
                }
                continue;
            }
            let Some(closers) = closing_quote(c) else {
                out.push(c);
                continue;
            };
            let mut closed = false;
            while let Some((_, q)) = chars.next() {
                if closers.contains(&q) {
                    closed = true;
                    break;
                }
                if c == '"' && q == '\\' {
                    match chars.next() {
                        Some((_, e @ ('"' | '\\'))) => out.push(e),
                        Some((_, e)) => {
                            out.push('\\');
                            out.push(e);
                        }
                        None => break,
                    }
                    continue;
                }
                out.push(q);
            }
            if !closed {
                return Err(GrammarError::UnterminatedQuote);
            }
        }
        self.pos = base + end;
        Ok(any.then_some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> Command {
        match parse_comment(text, "@aiwg").expect("parses") {
            Parsed::Run(c) => c,
            other => panic!("expected a command, got {other:?}"),
        }
    }

    #[test]
    fn options_both_forms_and_free_text() {
        let c = run("@aiwg review --depth 2 --mode=fast --dry-run --x=\"a b\" please be careful");
        assert_eq!(c.workflow, "review");
        assert_eq!(c.params["depth"], "2");
        assert_eq!(c.params["mode"], "fast");
        assert_eq!(c.params["dry-run"], "true");
        assert_eq!(c.params["x"], "a b");
        assert_eq!(c.guidance.as_deref(), Some("please be careful"));
    }

    #[test]
    fn flag_at_end_is_true() {
        let c = run("@aiwg review --verbose");
        assert_eq!(c.params["verbose"], "true");
        assert_eq!(c.guidance, None);
    }

    #[test]
    fn quotes_single_double_typographic() {
        let c = run(
            "@aiwg w --a 'x y' --b \"p \\\"q\\\"\" --c “left right” --d ‘s t’ --e „de“ --f «fr»",
        );
        assert_eq!(c.params["a"], "x y");
        assert_eq!(c.params["b"], "p \"q\"");
        assert_eq!(c.params["c"], "left right");
        assert_eq!(c.params["d"], "s t");
        assert_eq!(c.params["e"], "de");
        assert_eq!(c.params["f"], "fr");
    }

    #[test]
    fn unterminated_quote_in_option_is_an_error_but_not_in_prose() {
        assert_eq!(
            parse_comment("@aiwg w --a 'oops", "@aiwg"),
            Err(GrammarError::UnterminatedQuote)
        );
        let c = run("@aiwg w don't break \"it");
        assert_eq!(c.guidance.as_deref(), Some("don't break \"it"));
    }

    #[test]
    fn whole_quoted_guidance_is_unquoted() {
        assert_eq!(
            run("@aiwg w \"focus on auth\"").guidance.as_deref(),
            Some("focus on auth")
        );
        assert_eq!(
            run("@aiwg w \"a\" and \"b\"").guidance.as_deref(),
            Some("\"a\" and \"b\"")
        );
    }

    #[test]
    fn double_dash_ends_options() {
        let c = run("@aiwg w --a 1 -- --not-an-option here");
        assert_eq!(c.params.len(), 1);
        assert_eq!(c.guidance.as_deref(), Some("--not-an-option here"));
    }

    #[test]
    fn help_bare_mention_and_not_addressed() {
        assert_eq!(parse_comment("@aiwg help", "@aiwg"), Ok(Parsed::Help));
        assert_eq!(parse_comment("@AIWG HELP me", "@aiwg"), Ok(Parsed::Help));
        assert_eq!(parse_comment("thanks @aiwg", "@aiwg"), Ok(Parsed::Help));
        assert_eq!(parse_comment("@aiwg", "@aiwg"), Ok(Parsed::Help));
        assert_eq!(parse_comment("", "@aiwg"), Ok(Parsed::NotAddressed));
        assert_eq!(parse_comment("   ", "@aiwg"), Ok(Parsed::NotAddressed));
        assert_eq!(parse_command(""), Ok(Parsed::Help));
        assert_eq!(
            parse_comment("mail me at x@aiwg.dev", "@aiwg"),
            Ok(Parsed::NotAddressed)
        );
        assert_eq!(
            parse_comment("@aiwg-bot review", "@aiwg"),
            Ok(Parsed::NotAddressed)
        );
        assert_eq!(parse_comment("@aiwg review", ""), Ok(Parsed::NotAddressed));
    }

    #[test]
    fn mention_mid_text_and_after_punctuation() {
        assert_eq!(run("Hey (@aiwg: fix the bug)").workflow, "fix");
        let c = run("line one\n@aiwg review --n 1\nSecond line\nthird");
        assert_eq!(c.params["n"], "1");
        assert_eq!(c.guidance.as_deref(), Some("Second line\nthird"));
    }

    #[test]
    fn quoted_lines_and_code_fences_are_skipped() {
        let text = "> @aiwg deploy\n```\n@aiwg deploy\n```\nthanks";
        assert_eq!(parse_comment(text, "@aiwg"), Ok(Parsed::NotAddressed));
        let text = "> @aiwg deploy\n@aiwg review";
        assert_eq!(run(text).workflow, "review");
    }

    #[test]
    fn unicode_values_and_guidance() {
        let c = run("@aiwg fix --lang 日本語 --note=“naïve café” ünïcødé ✓ text");
        assert_eq!(c.params["lang"], "日本語");
        assert_eq!(c.params["note"], "naïve café");
        assert_eq!(c.guidance.as_deref(), Some("ünïcødé ✓ text"));
    }

    #[test]
    fn invalid_names() {
        assert!(matches!(
            parse_comment("@aiwg résumé", "@aiwg"),
            Err(GrammarError::InvalidWorkflow(_))
        ));
        assert!(matches!(
            parse_comment("@aiwg ok --$(rm) x", "@aiwg"),
            Err(GrammarError::InvalidOption(_))
        ));
        assert!(matches!(
            parse_comment("@aiwg ok --a 1 --a 2", "@aiwg"),
            Err(GrammarError::DuplicateOption(n)) if n == "a"
        ));
    }

    #[test]
    fn shell_looking_text_stays_text() {
        let c = run("@aiwg w --file '$(cat /etc/passwd)' ; rm -rf / && `reboot` | tee >x");
        assert_eq!(c.params["file"], "$(cat /etc/passwd)");
        assert_eq!(
            c.guidance.as_deref(),
            Some("; rm -rf / && `reboot` | tee >x")
        );
    }

    #[test]
    fn ten_thousand_characters_of_guidance() {
        let long = "é".repeat(10_000);
        let c = run(&format!("@aiwg w {long}"));
        assert_eq!(
            c.guidance.as_deref().map(|g| g.chars().count()),
            Some(10_000)
        );
    }

    #[test]
    fn project_and_guidance_options() {
        let c = run("@aiwg w --project org/repo --guidance 'be brief' and more");
        assert_eq!(c.project.as_deref(), Some("org/repo"));
        assert_eq!(c.guidance.as_deref(), Some("be brief\n\nand more"));
        assert!(c.params.is_empty());
        assert_eq!(run("@aiwg w --guidance ''").guidance, None);
        assert_eq!(
            run("@aiwg w --guidance= text").guidance.as_deref(),
            Some("text")
        );
    }
}
