//! The text of a tracking comment: the workflow's steps as a checklist, a link to the job, and
//! at the end its outcome (summary, duration, cost, the error's kind).

use aiwg_core::{Job, JobStatus};

use crate::event::Platform;

/// The marker every tracking comment ends with. A comment carrying it is ours: it never
/// starts a job, even where the forge does not tell us who wrote it.
pub const MARKER: &str = "<!-- aiwg:job:";

/// The longest comment a platform takes (with room to spare): GitHub's limit is 65 536
/// characters, Bitbucket's lower.
fn limit(platform: Platform) -> usize {
    match platform {
        Platform::Bitbucket => 30_000,
        _ => 60_000,
    }
}

fn status_line(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued => "⏳ queued",
        JobStatus::Running => "🏃 running",
        JobStatus::AwaitingApproval => "✋ awaiting approval",
        JobStatus::Completed => "✅ completed",
        JobStatus::Failed => "❌ failed",
        JobStatus::Cancelled => "🚫 cancelled",
        JobStatus::TimedOut => "⌛ timed out",
    }
}

fn cut(s: &str, max: usize) -> (&str, bool) {
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], true)
}

/// The most of an error's message a comment shows (it can carry an agent's standard error).
const ERROR_BYTES: usize = 2_000;

/// `text` as a fenced code block: shown as it is, never read as markdown or HTML (its fence is
/// longer than any run of backticks inside).
fn fenced(text: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat((longest + 1).max(3));
    format!("{fence}text\n{text}\n{fence}\n")
}

/// An agent's answer, kept as markdown, with what it could do beyond showing text taken away:
/// a mention (`@user`, `@org/team`) does not notify anyone (a word joiner after the `@`), and a
/// `</details>` cannot close the section it is shown in.
fn defused(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '@' && chars.peek().is_some_and(|n| n.is_ascii_alphanumeric()) {
            out.push('\u{2060}');
        }
    }
    out.replace("</details", "&lt;/details")
}

/// The comment for `job` on `platform`; `status_url` links to its status document when the
/// server's public URL is known.
#[must_use]
pub fn render(job: &Job, platform: Platform, status_url: Option<&str>) -> String {
    let mut out = format!(
        "**aiwg** · `{}` · {}\n\n",
        job.workflow,
        status_line(job.status)
    );
    let p = &job.progress;
    for step in &p.completed {
        out.push_str(&format!("- [x] `{step}`\n"));
    }
    for step in &p.in_progress {
        out.push_str(&format!("- [ ] `{step}` — running\n"));
    }
    for step in &p.pending {
        out.push_str(&format!("- [ ] `{step}`\n"));
    }
    out.push('\n');
    match status_url {
        Some(url) => out.push_str(&format!("Job [`{}`]({url})", job.id)),
        None => out.push_str(&format!("Job `{}`", job.id)),
    }
    if job.max_attempts > 1 {
        out.push_str(&format!(
            " · attempt {} of {}",
            job.attempt.max(1),
            job.max_attempts
        ));
    }
    out.push('\n');
    if let Some(a) = job.pending_approval() {
        out.push_str(&format!(
            "\n✋ Step `{}` waits for an approval until {} UTC: an allowed user comments `approve` or `reject`, addressed to the bot as for any command.\n",
            a.step,
            a.expires_at.format("%Y-%m-%d %H:%M")
        ));
    }
    if job.is_terminal() {
        let mut facts = Vec::new();
        if let (Some(start), Some(end)) = (job.started_at, job.finished_at) {
            let secs = (end - start).num_milliseconds().max(0) as f64 / 1000.0;
            facts.push(format!("⏱ {secs:.1} s"));
        }
        if let Some(cost) = job.result.as_ref().and_then(|r| r.cost_usd) {
            facts.push(format!("💲 {cost:.4} USD"));
        }
        if !facts.is_empty() {
            out.push_str(&facts.join(" · "));
            out.push('\n');
        }
        if let Some(e) = &job.error {
            // The message may carry an agent's standard error: shown as text, and only its
            // start (a forge refuses a comment past its limit, and the comment would stay
            // "running").
            let (message, cut_off) = cut(e.message.trim(), ERROR_BYTES);
            out.push_str(&format!("\n**Error** (`{}`):\n\n", e.kind));
            out.push_str(&fenced(message));
            if cut_off {
                out.push_str("… (the whole message is in the job's status)\n");
            }
        }
        let summary = job
            .result
            .as_ref()
            .map(|r| r.summary.trim())
            .filter(|s| !s.is_empty());
        if let Some(summary) = summary {
            let room = limit(platform).saturating_sub(out.len() + 200);
            let (text, cut_off) = cut(summary, room);
            out.push_str("\n<details open><summary>Summary</summary>\n\n");
            out.push_str(&defused(text));
            if cut_off {
                out.push_str(
                    "\n\n… (cut to fit the comment; the whole result is in the job's status)",
                );
            }
            out.push_str("\n\n</details>\n");
        }
    }
    // A step stopped early (timeout, a turn or budget limit, an invalid answer): what it did.
    if let Some(step) = job
        .result
        .as_ref()
        .and_then(|r| r.steps.last())
        .filter(|s| s.partial && job.is_terminal())
    {
        let room = limit(platform).saturating_sub(out.len() + 400).min(4000);
        let (text, _) = cut(step.output.trim(), room);
        out.push_str(&format!(
            "\n<details><summary>What step `{}` did before it stopped</summary>\n\n{}",
            step.name,
            fenced(text)
        ));
        if let Some(session) = &step.session_id {
            out.push_str(&format!("\nSession `{session}` can be resumed.\n"));
        }
        out.push_str("\n</details>\n");
    }
    out.push_str(&format!("\n{MARKER}{} -->", job.id));
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use aiwg_core::test_util::ScriptedExecutor;
    use aiwg_core::{Engine, ExecutorError, JobRequest, Step, Workflow};

    use super::*;

    async fn finished(agent: ScriptedExecutor) -> aiwg_core::Job {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder()
            .policy(
                aiwg_core::ProjectPolicy::builder()
                    .root(dir.path())
                    .build()
                    .unwrap(),
            )
            .executor("agent", Arc::new(agent))
            .workflow(Workflow::new("review").step(Step::prompt("s", "agent", "go")))
            .build()
            .unwrap();
        let job = engine.submit(JobRequest::new("review")).await.unwrap();
        engine.wait(job.id, Duration::from_secs(20)).await.unwrap()
    }

    #[tokio::test]
    async fn an_error_is_shown_as_text_and_only_its_start() {
        // An agent's standard error of 70 000 characters, with markup and a fence of its own.
        let stderr = format!("```\n@octo/team <img src=x> {}", "e".repeat(70_000));
        let job = finished(
            ScriptedExecutor::succeeding("unused")
                .fail_times(1)
                .fail_with(ExecutorError::failed(stderr)),
        )
        .await;
        let text = render(&job, Platform::GitHub, None);
        assert!(text.chars().count() < 65_536, "{}", text.len());
        assert!(text.len() < ERROR_BYTES + 1_000, "{}", text.len());
        assert!(
            text.contains("the whole message is in the job's status"),
            "{text}"
        );
        // Inside a fence longer than the message's own: text, not markup.
        assert!(text.contains("````text\n"), "{text}");
        assert!(text.ends_with(&format!("{MARKER}{} -->", job.id)));
    }

    #[tokio::test]
    async fn an_answer_cannot_mention_anyone_or_close_its_section() {
        let job = finished(ScriptedExecutor::succeeding(
            "Done, @octo/team and @alice.\n</details>\n**APPROVED** by admin",
        ))
        .await;
        let text = render(&job, Platform::GitHub, None);
        assert!(
            !text.contains("@octo") && !text.contains("@alice"),
            "{text}"
        );
        assert!(
            text.contains("@\u{2060}octo/team and @\u{2060}alice"),
            "{text}"
        );
        assert_eq!(text.matches("</details>").count(), 1, "{text}");
        // The rest is markdown as the agent wrote it.
        assert!(text.contains("**APPROVED** by admin"), "{text}");
    }

    #[test]
    fn a_fence_is_longer_than_any_run_of_backticks_inside() {
        assert_eq!(fenced("a"), "```text\na\n```\n");
        assert_eq!(fenced("x ````` y"), "``````text\nx ````` y\n``````\n");
    }
}
