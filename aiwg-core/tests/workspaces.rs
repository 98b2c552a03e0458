//! Pull-request workspaces in the engine, against real git repositories (a bare origin over
//! `file://` whose `refs/pull/7/head` and `refs/pull/8/head` are commits of their own): a retry
//! gets a worktree of its own, a running job's worktree is never pruned, and a workspace that
//! never arrives ends its job at the job's timeout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aiwg_core::test_util::ScriptedExecutor;
use aiwg_core::workspace::WorkspaceSettings;
use aiwg_core::{
    Engine, EngineBuilder, JobEventKind, JobId, JobRequest, JobStatus, ProjectPolicy, Step,
    TriggerInfo, Workflow,
};
use futures_util::StreamExt;

const WAIT: Duration = Duration::from_secs(30);

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare origin with pull requests 7 and 8, and the engine's project root beside it.
struct Repo {
    dir: tempfile::TempDir,
    origin: PathBuf,
}

impl Repo {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("origin.git");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(
            dir.path(),
            &["init", "--bare", "-q", origin.to_str().unwrap()],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        for pr in ["7", "8"] {
            std::fs::write(work.join("README"), format!("pull request {pr}\n")).unwrap();
            git(&work, &["add", "README"]);
            git(&work, &["commit", "-q", "-m", pr]);
            let target = format!("HEAD:refs/pull/{pr}/head");
            git(&work, &["push", "-q", origin.to_str().unwrap(), &target]);
        }
        Self { dir, origin }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn settings(&self) -> WorkspaceSettings {
        WorkspaceSettings::new(self.cache()).protocols(vec!["file".into()])
    }

    fn builder(&self, settings: WorkspaceSettings) -> EngineBuilder {
        Engine::builder()
            .policy(
                ProjectPolicy::builder()
                    .root(self.dir.path())
                    .build()
                    .unwrap(),
            )
            .poll_interval(Duration::from_millis(10))
            .retry_backoff(Duration::from_millis(1), Duration::from_millis(1))
            .workspace(settings)
    }

    /// A job of `workflow` about pull request `pr` of the origin.
    fn request(&self, workflow: &str, pr: u64) -> JobRequest {
        let mut t = TriggerInfo::new("github");
        t.pr = Some(pr);
        t.extra.insert(
            "clone_url".into(),
            format!("file://{}", self.origin.display()),
        );
        JobRequest::new(workflow).trigger(t)
    }

    fn worktrees(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.cache().join("worktrees"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// Waits for the job's first `step_started` event.
async fn started(engine: &Engine, id: JobId) {
    let mut events = engine.subscribe(id, 0).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if matches!(ev.kind, JobEventKind::StepStarted { .. }) {
                return;
            }
        }
        panic!("the job ended before its step started");
    })
    .await
    .expect("the step starts");
}

#[tokio::test]
async fn a_retry_gets_a_worktree_of_its_own_while_the_failed_attempts_is_kept() {
    let repo = Repo::new();
    let flaky = ScriptedExecutor::succeeding("ok").fail_times(1);
    let engine = repo
        .builder(repo.settings().keep_failed_for(Duration::from_secs(3600)))
        .executor("agent", Arc::new(flaky.clone()))
        .workflow(
            Workflow::new("w")
                .with_max_attempts(2)
                .step(Step::prompt("s", "agent", "go")),
        )
        .build()
        .unwrap();
    let job = engine.submit(repo.request("w", 7)).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    // The failed attempt's worktree, kept for inspection, made the second attempt's
    // `git worktree add` fail (`workspace_failed`, not retried) when both had the job's id.
    assert_eq!(done.status, JobStatus::Completed, "{:?}", done.error);
    assert_eq!(done.attempt, 2);
    let paths: Vec<PathBuf> = flaky
        .requests()
        .iter()
        .map(|r| r.project_path.clone())
        .collect();
    assert_eq!(paths.len(), 2);
    assert_ne!(paths[0], paths[1], "each attempt has its own worktree");
    assert_eq!(
        std::fs::read_to_string(paths[0].join("README")).unwrap(),
        "pull request 7\n",
        "the failed attempt's worktree is kept"
    );
    assert!(!paths[1].exists(), "the completed attempt's is removed");
    assert_eq!(repo.worktrees(), [format!("{}-1", job.id)]);
}

#[tokio::test]
async fn a_running_jobs_worktree_is_never_pruned() {
    let repo = Repo::new();
    let hang = ScriptedExecutor::hanging();
    let quick = ScriptedExecutor::succeeding("ok");
    let engine = repo
        .builder(repo.settings().keep_failed_for(Duration::ZERO))
        .executor("hang", Arc::new(hang.clone()))
        .executor("quick", Arc::new(quick.clone()))
        .workflow(Workflow::new("long").step(Step::prompt("s", "hang", "go")))
        .workflow(Workflow::new("short").step(Step::prompt("s", "quick", "go")))
        .build()
        .unwrap();
    let long = engine.submit(repo.request("long", 7)).await.unwrap();
    started(&engine, long.id).await;
    let running = hang.requests()[0].project_path.clone();
    // The job has run for two minutes: its directory's own time does not move while the agent
    // edits files deeper down, and the prune keeps worktrees for at least a minute.
    std::fs::File::open(&running)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(120))
        .unwrap();
    // Another job's workspace prunes the expired worktrees before it is made.
    let short = engine.submit(repo.request("short", 8)).await.unwrap();
    let short = engine.wait(short.id, WAIT).await.unwrap();
    assert_eq!(short.status, JobStatus::Completed, "{:?}", short.error);
    assert_eq!(
        std::fs::read_to_string(running.join("README")).unwrap(),
        "pull request 7\n",
        "the running job's worktree is still there"
    );
    engine.cancel(long.id).await.unwrap();
    let long = engine.wait(long.id, WAIT).await.unwrap();
    assert_eq!(long.status, JobStatus::Cancelled);
    // A worktree nobody uses any more, older than the prune's minute, goes with the next
    // job's workspace (as after a restart, which forgets the kept worktrees' timers).
    let stale = repo.cache().join("worktrees").join("left-by-a-restart");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(120))
        .unwrap();
    let again = engine.submit(repo.request("short", 8)).await.unwrap();
    assert_eq!(
        engine.wait(again.id, WAIT).await.unwrap().status,
        JobStatus::Completed
    );
    assert!(!stale.exists(), "an expired worktree is pruned");
}

#[tokio::test]
async fn a_workspace_that_never_arrives_ends_the_job_at_its_timeout() {
    let repo = Repo::new();
    // A git whose fetch never ends (a remote that stopped sending).
    let bin = repo.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let stuck = bin.join("git");
    std::fs::write(&stuck, "#!/bin/sh\nexec sleep 600\n").unwrap();
    let mut perms = std::fs::metadata(&stuck).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&stuck, perms).unwrap();
    let mut settings = repo.settings();
    settings.git = stuck;
    let agent = ScriptedExecutor::succeeding("ok");
    let engine = repo
        .builder(settings)
        .executor("agent", Arc::new(agent.clone()))
        .workflow(
            Workflow::new("w")
                .with_timeout(Duration::from_millis(500))
                .step(Step::prompt("s", "agent", "go")),
        )
        .build()
        .unwrap();
    let job = engine.submit(repo.request("w", 7)).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::TimedOut, "{:?}", done.error);
    let error = done.error.unwrap();
    assert_eq!(error.kind, "timed_out");
    assert!(error.message.contains("workspace"), "{}", error.message);
    assert_eq!(agent.calls(), 0, "no step ran");
    // The repository's lock was given back: the next job of it gets as far as its own timeout.
    let next = engine.submit(repo.request("w", 8)).await.unwrap();
    let next = engine.wait(next.id, WAIT).await.unwrap();
    assert_eq!(next.status, JobStatus::TimedOut, "{:?}", next.error);
}

#[tokio::test]
async fn a_job_runs_the_commit_its_event_named_or_not_at_all() {
    let repo = Repo::new();
    let work = repo.dir.path().join("work");
    let first = git(&work, &["rev-parse", "HEAD~1"]);
    let agent = ScriptedExecutor::hanging();
    let engine = repo
        .builder(repo.settings())
        .executor("agent", Arc::new(agent.clone()))
        .workflow(Workflow::new("w").step(Step::prompt("s", "agent", "go")))
        .build()
        .unwrap();
    // Pull request 8 was pushed again since the event, which named its earlier commit (that of
    // pull request 7, its parent): the job runs that commit, not the head.
    let mut named = repo.request("w", 8);
    named.trigger.extra.insert("head_sha".into(), first.clone());
    let job = engine.submit(named).await.unwrap();
    started(&engine, job.id).await;
    let at = agent.requests()[0].project_path.clone();
    assert_eq!(
        std::fs::read_to_string(at.join("README")).unwrap(),
        "pull request 7\n"
    );
    engine.cancel(job.id).await.unwrap();
    // The commit the event named is gone (pushed over): the job fails; it ran the new head
    // in the event's name before.
    let mut gone = repo.request("w", 8);
    gone.trigger.extra.insert(
        "head_sha".into(),
        "0123456789abcdef0123456789abcdef01234567".into(),
    );
    let job = engine.submit(gone).await.unwrap();
    let done = engine.wait(job.id, WAIT).await.unwrap();
    assert_eq!(done.status, JobStatus::Failed);
    let error = done.error.unwrap();
    assert_eq!(error.kind, "workspace_failed");
    assert!(
        error.message.contains("no longer in the pull request"),
        "{}",
        error.message
    );
    assert_eq!(agent.calls(), 1, "the second job ran nothing");
}
