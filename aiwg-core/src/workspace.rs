//! Workspaces at the pull request's head: a job about a pull/merge request runs in its own git
//! worktree at the request's head commit, not in the shared project directory.
//!
//! With [`WorkspaceSettings`] on the engine (`projects.workspace: { kind: worktree, cache }` in
//! the example server), a job whose trigger names a pull request (`trigger.pr`) and a clone
//! URL (`trigger.clone_url`) gets, before its first step:
//!
//! 1. a bare mirror of the repository under `cache/mirrors/` (made once, shared by every job
//!    of the repository; fetches into one mirror are serialised);
//! 2. the request's head fetched into it: `refs/pull/N/head` (GitHub, Gitea/Forgejo),
//!    `refs/merge-requests/N/head` (GitLab), the source branch of the source repository
//!    (Bitbucket), and the base branch when it is known;
//! 3. a checkout of the head commit (the one the event named, fetched by itself when the pull
//!    request moved on, and the job fails when it is gone; the fetched head when the event
//!    names none) under `cache/worktrees/<job id>-<attempt>` (a retry gets one of its own; the
//!    failed attempt's may still be kept). It is a git repository of its own, with a detached
//!    `HEAD`, whose objects are borrowed read-only from the mirror (`objects/info/alternates`):
//!    an agent can `git diff`, `git commit` and so on there, under a sandbox too (which binds
//!    only the checkout writable), and nothing it does reaches the mirror other jobs share.
//!    (A `git worktree` kept its metadata in the mirror, where a sandboxed agent could not
//!    write it.) The mirror's fetches never prune objects (`gc.pruneExpire=never`), so a
//!    checkout's commit stays readable after its pull request is pushed over.
//!
//! The job's steps run there (`{{project_path}}` is the worktree; `{{trigger.sha}}`,
//! `{{trigger.branch}}`, `{{trigger.base}}` name the commit and branches). Afterwards the
//! worktree is removed — or, when the job did not complete, kept for `keep_failed_for` for
//! inspection. A workspace that cannot be made (the request is gone, the fetch is refused, the
//! disk is full) fails the job at once with kind `workspace_failed`; making it counts against
//! the job's `timeout` (a remote that stops answering ends the job `timed_out`). Kept worktrees
//! are removed by a timer, or, after a restart, by the next job of any repository once they are
//! older than `keep_failed_for` (at least a minute) counted from their job's end; a worktree in
//! use is never removed.
//!
//! Credentials never reach an argument vector or a log: a token configured for a host is
//! handed to git as an `http.<url>.extraHeader` through `GIT_CONFIG_*` environment variables
//! of the git process only, and git's error text is scrubbed of it. Only the URL schemes in
//! `protocols` (default `https`) are fetched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::job::Job;

/// Where and how workspaces are made. Its `Debug` output names the credentials' hosts, never
/// their tokens.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkspaceSettings {
    /// The directory holding the mirrors and the worktrees.
    pub cache: PathBuf,
    /// How long the worktree of a job that did not complete is kept (default 1 h).
    pub keep_failed_for: Duration,
    /// Tokens per host (`github.com` → token), sent to git as a basic-auth header.
    pub credentials: BTreeMap<String, String>,
    /// The URL schemes git may fetch (default `https`; tests add `file`).
    pub protocols: Vec<String>,
    /// The git program (default `git`).
    pub git: PathBuf,
}

impl std::fmt::Debug for WorkspaceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hosts: Vec<&str> = self.credentials.keys().map(String::as_str).collect();
        f.debug_struct("WorkspaceSettings")
            .field("cache", &self.cache)
            .field("keep_failed_for", &self.keep_failed_for)
            .field("credentials_for", &hosts)
            .field("protocols", &self.protocols)
            .field("git", &self.git)
            .finish()
    }
}

impl WorkspaceSettings {
    /// Worktrees under `cache`, with the defaults.
    #[must_use]
    pub fn new(cache: impl Into<PathBuf>) -> Self {
        Self {
            cache: cache.into(),
            keep_failed_for: Duration::from_secs(3600),
            credentials: BTreeMap::new(),
            protocols: vec!["https".into()],
            git: PathBuf::from("git"),
        }
    }

    /// Keeps failed jobs' worktrees this long.
    #[must_use]
    pub fn keep_failed_for(mut self, d: Duration) -> Self {
        self.keep_failed_for = d;
        self
    }

    /// A token for `host`.
    #[must_use]
    pub fn credential(mut self, host: impl Into<String>, token: impl Into<String>) -> Self {
        self.credentials.insert(host.into(), token.into());
        self
    }

    /// The URL schemes git may fetch.
    #[must_use]
    pub fn protocols(mut self, protocols: Vec<String>) -> Self {
        self.protocols = protocols;
        self
    }
}

/// Why a workspace could not be made (the job fails with kind `workspace_failed`). Never
/// carries a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WorkspaceError {
    message: String,
    timed_out: bool,
}

impl WorkspaceError {
    fn new(message: String) -> Self {
        Self {
            message,
            timed_out: false,
        }
    }

    /// The workspace took the whole of the job's `timeout`.
    pub(crate) fn timed_out(timeout: Duration) -> Self {
        Self {
            message: format!("the workspace was not ready within the job's timeout of {timeout:?}"),
            timed_out: true,
        }
    }

    /// Whether this is [`timed_out`](Self::timed_out)'s error (the job ends `timed_out`).
    pub(crate) fn is_timeout(&self) -> bool {
        self.timed_out
    }
}

/// A job's worktree.
#[derive(Debug)]
pub(crate) struct Worktree {
    pub(crate) path: PathBuf,
}

/// Makes and removes worktrees; one per engine.
pub(crate) struct Workspaces {
    settings: WorkspaceSettings,
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Worktrees of jobs still running: never pruned, whatever their directory's age (an agent
    /// editing files deeper down does not change it).
    in_use: Mutex<HashSet<PathBuf>>,
}

/// Given to every fetch into a mirror (and so to the `gc --auto` a fetch may start): checkouts
/// borrow the mirror's objects, and one that a pushed-over pull request left unreachable must
/// stay for them.
const KEEP_OBJECTS: &str = "gc.pruneExpire=never";

fn valid_ref_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'+'))
}

impl Workspaces {
    pub(crate) fn new(settings: WorkspaceSettings) -> Self {
        Self {
            settings,
            locks: Mutex::default(),
            in_use: Mutex::default(),
        }
    }

    fn lock_for(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(mirror.to_path_buf()).or_default())
    }

    /// The git command with a clean environment and the credentials for `url`'s host.
    fn git(&self, url: Option<&str>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.settings.git);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &self.settings.cache)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_ALLOW_PROTOCOL", self.settings.protocols.join(":"))
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        let host = url
            .and_then(|u| u.split_once("://"))
            .map(|(_, rest)| rest.split(['/', ':', '@']).next().unwrap_or(""));
        if let Some(token) = host.and_then(|h| self.settings.credentials.get(h)) {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
            let scope = format!("https://{}/", host.unwrap_or_default());
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", format!("http.{scope}.extraHeader"))
                .env(
                    "GIT_CONFIG_VALUE_0",
                    format!("Authorization: Basic {basic}"),
                );
        }
        cmd
    }

    /// Runs git; its error text (scrubbed of credentials) on failure.
    async fn run(&self, url: Option<&str>, args: &[&str]) -> Result<String, WorkspaceError> {
        let out = self
            .git(url)
            .args(args)
            .output()
            .await
            .map_err(|e| WorkspaceError::new(format!("git could not be started: {e}")))?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let mut err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        for token in self.settings.credentials.values() {
            if !token.is_empty() {
                err = err.replace(token.as_str(), "***");
            }
        }
        err.truncate(err.char_indices().nth(500).map_or(err.len(), |(i, _)| i));
        // Named by its subcommand, past the options that take a value.
        let mut words = args.iter();
        let sub = loop {
            match words.next() {
                Some(&("-c" | "-C")) => {
                    words.next();
                }
                Some(w) => break *w,
                None => break "",
            }
        };
        Err(WorkspaceError::new(format!("git {sub}: {err}")))
    }

    /// The worktree for `job`, when it is about a pull request with a clone URL.
    pub(crate) async fn prepare(&self, job: &Job) -> Result<Option<Worktree>, WorkspaceError> {
        let t = &job.trigger;
        let (Some(pr), Some(url)) = (t.pr, t.extra.get("clone_url")) else {
            return Ok(None);
        };
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        if !self.settings.protocols.iter().any(|p| p == scheme) || url.starts_with('-') {
            return Err(WorkspaceError::new(format!(
                "the repository URL's scheme `{scheme}` is not allowed (projects.workspace.protocols)"
            )));
        }
        let (fetch_url, head_ref) = match t.source.as_str() {
            "gitlab" => (url.clone(), format!("refs/merge-requests/{pr}/head")),
            "bitbucket" => match (t.extra.get("head_clone_url"), t.extra.get("head_ref")) {
                (Some(u), Some(b)) if valid_ref_part(b) && !u.starts_with('-') => {
                    (u.clone(), format!("refs/heads/{b}"))
                }
                _ => {
                    return Err(WorkspaceError::new(
                        "the pull request names no source branch".into(),
                    ))
                }
            },
            _ => (url.clone(), format!("refs/pull/{pr}/head")),
        };
        let digest = hex::encode(Sha256::digest(url.as_bytes()));
        let mirror = self
            .settings
            .cache
            .join("mirrors")
            .join(format!("{}.git", &digest[..24]));
        let worktree = self
            .settings
            .cache
            .join("worktrees")
            .join(format!("{}-{}", job.id, job.attempt));
        let io = |what: &str, e: std::io::Error| WorkspaceError::new(format!("{what}: {e}"));
        std::fs::create_dir_all(self.settings.cache.join("worktrees"))
            .map_err(|e| io("cannot create the workspace cache", e))?;
        let lock = self.lock_for(&mirror);
        let _held = lock.lock().await;
        // Claimed before anything is made there: another job's prune passes over it. Given back
        // by `release`, or when it cannot be made, or when making it is given up (the job
        // cancelled or out of time drops this future): what was made is then an old directory
        // like any other, for a later prune.
        let claim = Claim::new(self, &worktree);
        self.make(&mirror, &worktree, pr, &fetch_url, &head_ref, job)
            .await?;
        claim.keep();
        Ok(Some(Worktree { path: worktree }))
    }

    fn unclaim(&self, worktree: &Path) {
        self.in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(worktree);
    }

    /// Fetches the head into the mirror and adds the worktree (under the mirror's lock).
    async fn make(
        &self,
        mirror: &Path,
        worktree: &Path,
        pr: u64,
        fetch_url: &str,
        head_ref: &str,
        job: &Job,
    ) -> Result<(), WorkspaceError> {
        let t = &job.trigger;
        let io = |what: &str, e: std::io::Error| WorkspaceError::new(format!("{what}: {e}"));
        self.prune_expired(mirror).await;
        let m = mirror.to_string_lossy().into_owned();
        if !mirror.join("HEAD").exists() {
            std::fs::create_dir_all(mirror).map_err(|e| io("cannot create the mirror", e))?;
            self.run(None, &["init", "--bare", "-q", &m]).await?;
        }
        let local = format!("refs/aiwg/pr/{pr}");
        let mut refspecs = vec![format!("+{head_ref}:{local}")];
        if let Some(base) = t.extra.get("base_ref").filter(|b| valid_ref_part(b)) {
            refspecs.push(format!("+refs/heads/{base}:refs/aiwg/base/{base}"));
        }
        // A git killed part way (a job cancelled or timed out while it fetched) leaves its ref
        // locks behind, and every later fetch of the pull request would fail on them; under
        // the mirror's lock no other git of this process works here.
        remove_lock_files(&mirror.join("refs").join("aiwg"));
        let _ = std::fs::remove_file(mirror.join("packed-refs.lock"));
        let mut args: Vec<&str> = vec![
            "-c",
            KEEP_OBJECTS,
            "-C",
            &m,
            "fetch",
            "--no-tags",
            "--force",
            "-q",
            "--",
            fetch_url,
        ];
        args.extend(refspecs.iter().map(String::as_str));
        if let Err(e) = self.run(Some(fetch_url), &args).await {
            // The base branch may be gone; the head is what matters.
            let head_only = [
                "-c",
                KEEP_OBJECTS,
                "-C",
                &m,
                "fetch",
                "--no-tags",
                "--force",
                "-q",
                "--",
                fetch_url,
                &refspecs[0],
            ];
            self.run(Some(fetch_url), &head_only).await.map_err(|_| {
                WorkspaceError::new(format!(
                    "the pull request's head could not be fetched ({e})"
                ))
            })?;
        }
        let fetched = self
            .run(
                None,
                &[
                    "-C",
                    &m,
                    "rev-parse",
                    "--verify",
                    "-q",
                    &format!("{local}^{{commit}}"),
                ],
            )
            .await?;
        // The commit the event named, never another: a pull request pushed again after the
        // event (after a maintainer's label or approval of what it showed) must not have its
        // new code run in the event's name. Fetched by itself when the head moved on (forges
        // serve reachable commits by id); gone, the job fails. An event that names no commit
        // (a GitHub comment when the hooks have no API access to read its pull request) runs
        // the head fetched now.
        let named = t
            .extra
            .get("head_sha")
            .filter(|s| s.len() >= 7 && s.bytes().all(|b| b.is_ascii_hexdigit()));
        let sha = match named {
            None => fetched,
            Some(s) => {
                let commit = format!("{s}^{{commit}}");
                let have = ["-C", m.as_str(), "cat-file", "-e", commit.as_str()];
                if self.run(None, &have).await.is_err() {
                    let _ = self
                        .run(
                            Some(fetch_url),
                            &[
                                "-c",
                                KEEP_OBJECTS,
                                "-C",
                                &m,
                                "fetch",
                                "--no-tags",
                                "-q",
                                "--",
                                fetch_url,
                                s,
                            ],
                        )
                        .await;
                }
                if self.run(None, &have).await.is_err() {
                    return Err(WorkspaceError::new(format!(
                        "the commit the event named ({s}) is no longer in the pull request \
                         (it was pushed again since); its head is now {fetched}"
                    )));
                }
                s.clone()
            }
        };
        self.check_out(mirror, worktree, &sha).await
    }

    /// Makes `worktree` a repository of its own at `sha`, its objects the mirror's (read through
    /// `objects/info/alternates`, never written: new ones go to its own store).
    async fn check_out(
        &self,
        mirror: &Path,
        worktree: &Path,
        sha: &str,
    ) -> Result<(), WorkspaceError> {
        let io = |what: &str, e: std::io::Error| WorkspaceError::new(format!("{what}: {e}"));
        // A directory left by an attempt given up part way is made again from nothing.
        if worktree.exists() {
            std::fs::remove_dir_all(worktree).map_err(|e| io("cannot clear the checkout", e))?;
        }
        let w = worktree.to_string_lossy().into_owned();
        self.run(None, &["init", "-q", "--", &w]).await?;
        let git_dir = worktree.join(".git");
        let info = git_dir.join("objects").join("info");
        std::fs::create_dir_all(&info).map_err(|e| io("cannot make the checkout", e))?;
        let mut alternates = mirror.join("objects").into_os_string();
        alternates.push("\n");
        std::fs::write(info.join("alternates"), alternates.as_encoded_bytes())
            .map_err(|e| io("cannot make the checkout", e))?;
        // An identity for an agent's commits there (its own configuration wins).
        let mut config = std::fs::OpenOptions::new()
            .append(true)
            .open(git_dir.join("config"))
            .map_err(|e| io("cannot make the checkout", e))?;
        std::io::Write::write_all(
            &mut config,
            b"[user]\n\tname = aiwg\n\temail = aiwg@localhost\n",
        )
        .map_err(|e| io("cannot make the checkout", e))?;
        self.run(
            None,
            &[
                "-C",
                &w,
                "-c",
                "advice.detachedHead=false",
                "checkout",
                "-q",
                "--detach",
                sha,
            ],
        )
        .await?;
        Ok(())
    }

    /// Removes the worktree now, or after `keep_failed_for` when the job did not complete.
    pub(crate) async fn release(self: &Arc<Self>, wt: Worktree, completed: bool) {
        if completed || self.settings.keep_failed_for.is_zero() {
            self.remove(&wt).await;
            self.unclaim(&wt.path);
            return;
        }
        // Kept: its age, for a prune after a restart, counts from now.
        if let Err(e) = std::fs::File::open(&wt.path)
            .and_then(|dir| dir.set_modified(std::time::SystemTime::now()))
        {
            tracing::debug!(worktree = %wt.path.display(), error = %e, "could not mark a kept worktree's end");
        }
        self.unclaim(&wt.path);
        let me = Arc::clone(self);
        let keep = self.settings.keep_failed_for;
        tokio::spawn(async move {
            tokio::time::sleep(keep).await;
            me.remove(&wt).await;
        });
    }

    /// Removes a checkout: its directory (no git runs there once an agent has: its
    /// configuration is the agent's to change).
    async fn remove(&self, wt: &Worktree) {
        if let Err(e) = tokio::fs::remove_dir_all(&wt.path).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(worktree = %wt.path.display(), error = %e, "could not remove a checkout");
            }
        }
    }

    /// Removes worktrees kept past `keep_failed_for` (a restart forgets the timers).
    async fn prune_expired(&self, mirror: &Path) {
        let dir = self.settings.cache.join("worktrees");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let keep = self.settings.keep_failed_for.max(Duration::from_secs(60));
        let in_use = self
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for e in entries.flatten() {
            if in_use.contains(&e.path()) {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        if mirror.join("HEAD").exists() {
            let m = mirror.to_string_lossy().into_owned();
            let _ = self.run(None, &["-C", &m, "worktree", "prune"]).await;
        }
    }
}

/// A worktree claimed while it is made: given back when dropped unless [`kept`](Self::keep).
struct Claim<'a> {
    workspaces: &'a Workspaces,
    path: Option<PathBuf>,
}

impl<'a> Claim<'a> {
    fn new(workspaces: &'a Workspaces, path: &Path) -> Self {
        workspaces
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_path_buf());
        Self {
            workspaces,
            path: Some(path.to_path_buf()),
        }
    }

    /// The worktree is made: it stays claimed until its job releases it.
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            self.workspaces.unclaim(&path);
        }
    }
}

/// Removes the `*.lock` files under `dir` (ref locks a killed git left).
fn remove_lock_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() {
            remove_lock_files(&e.path());
        } else if kind.is_file() && e.file_name().to_string_lossy().ends_with(".lock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace whose making is given up (the job cancelled or out of time drops the future
    /// mid-fetch) gives its claim back: claimed for ever, its directory would never be pruned.
    #[tokio::test]
    async fn a_workspace_given_up_while_it_is_made_is_not_claimed_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let stuck = dir.path().join("git");
        std::fs::write(&stuck, "#!/bin/sh\nexec sleep 600\n").unwrap();
        let mut perms = std::fs::metadata(&stuck).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&stuck, perms).unwrap();
        let mut settings = WorkspaceSettings::new(dir.path().join("cache"));
        settings.git = stuck;
        let ws = Workspaces::new(settings.protocols(vec!["file".into()]));
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": crate::job::JobId::new(), "workflow": "w", "project_path": "/srv/p", "params": {},
            "guidance": null, "priority": 0, "status": "running", "attempt": 1, "max_attempts": 1,
            "timeout": 1000, "created_at": "2026-01-01T00:00:00Z", "started_at": null,
            "finished_at": null, "retry_at": null,
            "progress": {"completed": [], "in_progress": [], "pending": []},
            "result": null, "error": null, "dead_letter": false,
            "trigger": {"source": "github", "repo": "o/r", "pr": 7}, "history": [],
            "cancel_requested": false, "idempotency_key": null
        }))
        .unwrap();
        Arc::make_mut(&mut job.trigger)
            .extra
            .insert("clone_url".into(), "file:///nowhere.git".into());
        let mut making = Box::pin(ws.prepare(&job));
        // Under way (git started, the worktree claimed), then given up.
        let given_up = tokio::time::timeout(Duration::from_millis(300), &mut making).await;
        assert!(given_up.is_err(), "the stuck git never answers");
        assert_eq!(
            ws.in_use.lock().unwrap().len(),
            1,
            "claimed while it is made"
        );
        drop(making);
        assert!(
            ws.in_use.lock().unwrap().is_empty(),
            "given back when given up"
        );
    }
}
