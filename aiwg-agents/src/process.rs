//! Subprocess supervision shared by the process-based executors.
//!
//! A child is started from an argument vector (never a shell) in its own process group, with a
//! scrubbed environment. While it runs, its descendants are tracked by reading `/proc` (a tool
//! such as Claude Code's `Bash` puts its commands into process groups of their own, so killing
//! the child's group alone would leave them behind). Stopping sends `SIGTERM` to every known
//! group, waits a grace period, then sends `SIGKILL`, and returns only when every known process is
//! gone.
//!
//! Limits of the tracking: a descendant that is started, detaches (double fork) and leaves the
//! child's process group between two scans (every 100 ms) cannot be found afterwards.

// With only the `opencode` feature, the run loop is unused (only spawning is).
#![cfg_attr(
    not(any(feature = "claude-code", feature = "command")),
    allow(dead_code)
)]

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use aiwg_core::ExecutorError;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Variables a child inherits from the server when they are set (everything else is dropped).
pub const DEFAULT_ENV_ALLOW_LIST: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TMPDIR",
    "TZ",
];

/// Optional resource limits for a child, applied by running it under util-linux `prlimit`
/// (`prlimit --as=… --cpu=… -- program args…`): the limits are in place before the program's
/// first instruction, with no race and no `unsafe` code. Requires `prlimit` on the `PATH`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResourceLimits {
    /// Address-space limit in bytes (`RLIMIT_AS`).
    pub address_space_bytes: Option<u64>,
    /// CPU-time limit in whole seconds (`RLIMIT_CPU`).
    pub cpu_seconds: Option<u64>,
}

impl ResourceLimits {
    /// No limits.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits the address space to `bytes`.
    #[must_use]
    pub fn address_space(mut self, bytes: u64) -> Self {
        self.address_space_bytes = Some(bytes);
        self
    }

    /// Limits CPU time to `seconds`.
    #[must_use]
    pub fn cpu_time(mut self, seconds: u64) -> Self {
        self.cpu_seconds = Some(seconds);
        self
    }

    fn is_empty(&self) -> bool {
        self.address_space_bytes.is_none() && self.cpu_seconds.is_none()
    }
}

/// How a child is supervised: environment, limits, watchdogs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub(crate) struct Supervision {
    /// Variables copied from the server's environment when set.
    pub(crate) env_allow: Vec<String>,
    /// Variables set explicitly (after the allow-list; they win).
    pub(crate) env: BTreeMap<String, String>,
    /// Stop a run that printed nothing for this long.
    pub(crate) idle_timeout: Option<Duration>,
    /// Time between `SIGTERM` and `SIGKILL`.
    pub(crate) grace: Duration,
    /// Resource limits.
    pub(crate) limits: ResourceLimits,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            env_allow: DEFAULT_ENV_ALLOW_LIST
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            env: BTreeMap::new(),
            idle_timeout: None,
            grace: Duration::from_secs(5),
            limits: ResourceLimits::default(),
        }
    }
}

impl Supervision {
    /// The environment a child gets.
    pub(crate) fn child_env(&self) -> Vec<(OsString, OsString)> {
        let mut out: BTreeMap<OsString, OsString> = BTreeMap::new();
        for name in &self.env_allow {
            if let Some(v) = std::env::var_os(name) {
                out.insert(name.into(), v);
            }
        }
        for (k, v) in &self.env {
            out.insert(k.into(), v.into());
        }
        out.into_iter().collect()
    }
}

/// One line a child printed.
#[derive(Debug)]
pub(crate) enum OutputLine {
    Stdout(String),
    Stderr(String),
}

/// How a supervised run ended.
#[derive(Debug)]
pub(crate) struct Finished {
    /// Exit code (128 + signal for a child killed by a signal).
    pub(crate) exit_code: Option<i32>,
    /// The last lines of standard error.
    pub(crate) stderr_tail: String,
}

const STDERR_TAIL_LINES: usize = 20;
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// Runs `program args…` in `cwd` under `sup`, feeding each output line to `on_line`, until it
/// exits, `cancel` fires, `timeout` passes or the idle watchdog fires. On any of the last three
/// every process of the run is stopped before the error is returned.
pub(crate) async fn run(
    program: &Path,
    args: &[String],
    cwd: &Path,
    sup: &Supervision,
    cancel: &CancellationToken,
    timeout: Duration,
    mut on_line: impl FnMut(OutputLine),
) -> Result<Finished, ExecutorError> {
    let (mut child, mut tree) = spawn(program, args, cwd, sup)?;
    let mut stdout = LineReader::new(child.stdout.take());
    let mut stderr = LineReader::new(child.stderr.take());
    let mut tail: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let deadline = Instant::now() + timeout;
    let mut idle_deadline = sup.idle_timeout.map(|d| Instant::now() + d);
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = None;
    let mut exited_at: Option<Instant> = None;

    let stop: Option<ExecutorError> = loop {
        if status.is_some() && stdout.done && stderr.done {
            break None;
        }
        let idle_sleep = async {
            match idle_deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        // Once the child exited, leftovers holding the pipes open get a short while to finish.
        let drain_sleep = async {
            match exited_at {
                Some(t) => tokio::time::sleep_until(t + Duration::from_millis(500)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => break Some(ExecutorError::Cancelled),
            () = tokio::time::sleep_until(deadline) => break Some(ExecutorError::TimedOut(timeout)),
            () = idle_sleep => break Some(ExecutorError::Idle(sup.idle_timeout.unwrap_or_default())),
            line = stdout.next(), if !stdout.done => {
                if let Some(l) = line {
                    idle_deadline = sup.idle_timeout.map(|d| Instant::now() + d);
                    on_line(OutputLine::Stdout(l));
                }
            }
            line = stderr.next(), if !stderr.done => {
                if let Some(l) = line {
                    idle_deadline = sup.idle_timeout.map(|d| Instant::now() + d);
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(l.clone());
                    on_line(OutputLine::Stderr(l));
                }
            }
            st = child.wait(), if status.is_none() => {
                tree.scan();
                status = Some(st.map_err(|e| ExecutorError::Spawn(format!("waiting for the child: {e}")))?);
                exited_at = Some(Instant::now());
            }
            () = drain_sleep => {
                // Something the child left behind keeps its output open: stop it.
                terminate(&mut child, &mut tree, sup.grace).await;
                exited_at = None;
                stdout.done = true;
                stderr.done = true;
            }
            _ = scan.tick() => {
                if status.is_none() {
                    tree.scan();
                }
            }
        }
    };

    // Stopped or exited: either way nothing of the run may outlive it.
    terminate(&mut child, &mut tree, sup.grace).await;
    if let Some(err) = stop {
        return Err(err);
    }
    let code = status.and_then(|s| exit_code(&s));
    Ok(Finished {
        exit_code: code,
        stderr_tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}

/// Starts `program args…` in `cwd` in a new process group with the scrubbed environment, stdin
/// closed and stdout/stderr piped.
pub(crate) fn spawn(
    program: &Path,
    args: &[String],
    cwd: &Path,
    sup: &Supervision,
) -> Result<(Child, Tree), ExecutorError> {
    let mut cmd = if sup.limits.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("prlimit");
        if let Some(b) = sup.limits.address_space_bytes {
            c.arg(format!("--as={b}"));
        }
        if let Some(s) = sup.limits.cpu_seconds {
            c.arg(format!("--cpu={s}"));
        }
        c.arg("--").arg(program);
        c
    };
    cmd.args(args)
        .current_dir(cwd)
        .env_clear()
        .envs(sup.child_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| ExecutorError::Spawn(format!("{}: {e}", program.display())))?;
    let Some(pid) = child.id() else {
        return Err(ExecutorError::Spawn(
            "the child exited before it could be tracked".into(),
        ));
    };
    let tree = Tree::new(pid as i32);
    Ok((child, tree))
}

fn exit_code(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

/// Reads lines (lossy UTF-8) from a pipe; cancel-safe because the partial line stays in `buf`.
struct LineReader<R> {
    inner: Option<BufReader<R>>,
    buf: Vec<u8>,
    done: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(r: Option<R>) -> Self {
        let done = r.is_none();
        Self {
            inner: r.map(|r| BufReader::with_capacity(64 * 1024, r)),
            buf: Vec::new(),
            done,
        }
    }

    async fn next(&mut self) -> Option<String> {
        let inner = self.inner.as_mut()?;
        match inner.read_until(b'\n', &mut self.buf).await {
            Ok(0) | Err(_) => {
                self.done = true;
                if self.buf.is_empty() {
                    None
                } else {
                    Some(take_line(&mut self.buf))
                }
            }
            Ok(_) => Some(take_line(&mut self.buf)),
        }
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    let s = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    s
}

/// A process identity that survives pid reuse: pid plus start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Proc {
    pid: i32,
    start: u64,
}

#[derive(Debug)]
struct Stat {
    state: char,
    ppid: i32,
    pgrp: i32,
    start: u64,
}

fn read_stat(pid: i32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After the command: state(0) ppid(1) pgrp(2) … starttime(19).
    Some(Stat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` is a live (non-zombie) process, optionally with the given start time.
#[must_use]
pub fn process_alive(pid: i32) -> bool {
    read_stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

fn alive(p: Proc) -> bool {
    read_stat(p.pid).is_some_and(|s| s.state != 'Z' && s.state != 'X' && s.start == p.start)
}

/// The child and everything it started, as far as `/proc` showed. Dropped before the run was
/// stopped properly (the executor's future was dropped), it kills everything it knows.
pub(crate) struct Tree {
    root: i32,
    known: BTreeMap<i32, Proc>,
    own_pgrp: i32,
    finished: bool,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if !self.finished {
            self.scan();
            self.signal(Signal::SIGKILL);
        }
    }
}

impl Tree {
    fn new(root: i32) -> Self {
        let mut known = BTreeMap::new();
        if let Some(s) = read_stat(root) {
            known.insert(
                root,
                Proc {
                    pid: root,
                    start: s.start,
                },
            );
        }
        Self {
            root,
            known,
            own_pgrp: nix::unistd::getpgrp().as_raw(),
            finished: false,
        }
    }

    /// Adds every process whose parent is known or that is in the child's process group.
    pub(crate) fn scan(&mut self) {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut all: Vec<(i32, Stat)> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| read_stat(pid).map(|s| (pid, s)))
            .filter(|(_, s)| s.state != 'Z')
            .collect();
        loop {
            let before = self.known.len();
            all.retain(|(pid, s)| {
                let ours = s.pgrp == self.root || self.known.contains_key(&s.ppid);
                if ours && !self.known.contains_key(pid) {
                    self.known.insert(
                        *pid,
                        Proc {
                            pid: *pid,
                            start: s.start,
                        },
                    );
                }
                !ours
            });
            if self.known.len() == before {
                break;
            }
        }
    }

    fn living(&self) -> Vec<Proc> {
        self.known.values().copied().filter(|p| alive(*p)).collect()
    }

    fn signal(&self, sig: Signal) {
        let _ = killpg(Pid::from_raw(self.root), sig);
        for p in self.living() {
            if let Some(s) = read_stat(p.pid) {
                // Never our own group (a descendant may join it), never init's.
                if s.pgrp > 1 && s.pgrp != self.root && s.pgrp != self.own_pgrp {
                    let _ = killpg(Pid::from_raw(s.pgrp), sig);
                }
            }
            if p.pid != std::process::id() as i32 {
                let _ = kill(Pid::from_raw(p.pid), sig);
            }
        }
    }
}

fn group_has_live_member(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(read_stat)
        .any(|s| s.pgrp == pgid && s.state != 'Z' && s.state != 'X')
}

/// SIGTERM to every known group and process, SIGKILL after `grace`, then wait until all are gone.
pub(crate) async fn terminate(child: &mut Child, tree: &mut Tree, grace: Duration) {
    tree.scan();
    let nothing_left = |tree: &Tree| tree.living().is_empty() && !group_has_live_member(tree.root);
    if !nothing_left(tree) {
        tree.signal(Signal::SIGTERM);
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if child.try_wait().ok().flatten().is_none() {
                tree.scan();
            }
            if nothing_left(tree) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Everything still there is killed; repeat until nothing is left (bounded).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().ok().flatten().is_none() {
            tree.scan();
        }
        if nothing_left(tree) {
            break;
        }
        tree.signal(Signal::SIGKILL);
        if Instant::now() >= until {
            tracing::warn!(pid = tree.root, "processes of a run survived SIGKILL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.wait().await;
    tree.finished = true;
}

#[cfg(feature = "claude-code")]
/// Resolves a program: a path with a slash is used as is, a bare name is looked up in `PATH`.
pub(crate) fn resolve_program(program: &Path) -> std::path::PathBuf {
    if program.components().count() > 1 {
        return program.to_path_buf();
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let cand = dir.join(program);
            if cand.is_file() {
                return cand;
            }
        }
    }
    program.to_path_buf()
}
