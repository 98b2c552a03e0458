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
            out.push_str(&format!(
                "\n**Error** (`{}`): {}\n",
                e.kind,
                e.message.trim()
            ));
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
            out.push_str(text);
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
            "\n<details><summary>What step `{}` did before it stopped</summary>\n\n{text}\n",
            step.name
        ));
        if let Some(session) = &step.session_id {
            out.push_str(&format!("\nSession `{session}` can be resumed.\n"));
        }
        out.push_str("\n</details>\n");
    }
    out.push_str(&format!("\n{MARKER}{} -->", job.id));
    out
}
