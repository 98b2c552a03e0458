//! Subprocess supervision shared by the process-based executors.
//!
//! A child is started from an argument vector (never a shell) in its own process group, with a
//! scrubbed environment, optionally inside a bubblewrap sandbox ([`Sandbox::Bwrap`]) and always
//! (unless turned off) under util-linux `setpriv --pdeathsig KILL`, so that it dies with the
//! server even when the server is killed with `SIGKILL`.
//!
//! While a child runs, its descendants are tracked by reading `/proc` on tokio's blocking pool
//! (a tool such as Claude Code's `Bash` puts its commands into process groups of their own, so
//! killing the child's group alone would leave them behind). Each tracked process is known by
//! its pid *and* its start time, and a signal is only sent to a pid or a process group after the
//! start time read from `/proc/<pid>/stat` matched, so a recycled pid is never signalled. Stopping
//! sends `SIGTERM` to every known group, waits a grace period, then sends `SIGKILL`, and returns
//! only when every known process is gone. A scan reads the processes it knows and those whose
//! pid was handed out after the run's root's (going round `pid_max`), not every process on the
//! host, while the host's fork count shows the pid counter cannot have come round past the
//! root's pid since; otherwise it reads them all.
//!
//! A descendant that detaches (a double fork, `setsid`) and leaves the child's process group
//! between two scans (every 100 ms) is no longer a descendant of anything known. So every child
//! also gets a mark in its environment, [`RUN_MARK_ENV`] with a value unique to the run, which
//! its descendants inherit; stopping the run (and dropping it) also stops every live process
//! that carries the mark, wherever it was re-parented to. Limits: a process that dropped or
//! rewrote the variable (`env -i`), or whose environment the server may not read (another
//! user's, a non-dumpable one), is not found this way; inside a sandbox nothing escapes the
//! sandbox's PID namespace, which dies as a whole.
//!
//! About `PDEATHSIG`: the kernel delivers it when the *thread* that started the child exits, not
//! the process. Children are started from the task that runs the executor, i.e. from a tokio
//! worker thread (or the thread of a current-thread runtime), and those live as long as the
//! runtime, which for a server is as long as the process. Do not run an executor from a thread
//! that ends before the run does (e.g. inside `spawn_blocking`, whose threads retire when idle).
//! `PDEATHSIG` reaches the agent process itself; processes the agent starts in turn are covered
//! by the sandbox (its PID namespace is torn down with it) or, unsandboxed, by the normal stop
//! path: after a `kill -9` of the server nothing signals them at once, and what an unsandboxed
//! agent started (a tool's `sleep`, detached or not) lives on under init until a server starts
//! again on the host: its first process-based executor stops every process whose run mark
//! names a server that is gone ([`stop_leftovers_of_dead_servers`]). (A child subreaper,
//! `PR_SET_CHILD_SUBREAPER`, does not change that: it adopts orphans only while it lives, and
//! would have to be set in the server itself, with the adopted processes to reap.)

// With only the `opencode` feature, the run loop is unused (only spawning is).
#![cfg_attr(
    not(any(feature = "claude-code", feature = "codex", feature = "command")),
    allow(dead_code)
)]

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiwg_core::ExecutorError;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{AgentError, ConfigError};

/// Prompts longer than this many bytes go to an agent CLI (`claude`, `codex`) on its standard
/// input instead of its argument vector (Linux refuses a single argument longer than 128 KiB).
pub const MAX_ARGV_PROMPT: usize = 100 * 1024;

/// The variable that marks every process of a run (a value unique to the run): stopping the
/// run also stops the processes that carry it, wherever they detached to.
pub const RUN_MARK_ENV: &str = "AIWG_RUN_ID";

/// A value no other run of this server (or another server) has:
/// `<server pid>-<server start>-<pid namespace>-<n>-<nanos>`. The first three name the server
/// whose run it is ([`ServerId`]), so that a later server can tell what a dead one left
/// behind ([`stop_leftovers_of_dead_servers`]).
fn run_mark() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let server = ServerId::own().map_or_else(
        || format!("{}-0-0", std::process::id()),
        |s| format!("{}-{}-{}", s.pid, s.start, s.pid_ns),
    );
    format!("{server}-{n}-{nanos:x}")
}

/// The server a run belongs to: its pid and start time (clock ticks since boot), and its pid
/// namespace (the inode of `/proc/self/ns/pid`), in which that pid means that process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ServerId {
    pid: i32,
    start: u64,
    pid_ns: u64,
}

impl ServerId {
    /// This process, or `None` when `/proc` does not say.
    fn own() -> Option<Self> {
        static OWN: std::sync::OnceLock<Option<ServerId>> = std::sync::OnceLock::new();
        *OWN.get_or_init(|| {
            let pid = i32::try_from(std::process::id()).ok()?;
            let start = read_stat(pid)?.start;
            let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
            let pid_ns = ns
                .to_str()?
                .strip_prefix("pid:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some(Self { pid, start, pid_ns })
        })
    }

    /// The server named by a run's mark (the value of [`RUN_MARK_ENV`]); `None` for a mark
    /// that does not name one (an older form, or not ours).
    fn of_mark(mark: &[u8]) -> Option<Self> {
        let mut f = std::str::from_utf8(mark).ok()?.split('-');
        let id = Self {
            pid: f.next()?.parse().ok()?,
            start: f.next()?.parse().ok()?,
            pid_ns: f.next()?.parse().ok()?,
        };
        (f.count() == 2 && id.start != 0).then_some(id)
    }
}

/// Stops (`SIGKILL`) every process that carries the mark of a run of a server that is gone:
/// what an unsandboxed agent started and left behind when its server was killed with
/// `SIGKILL` (the agent itself dies with the server by `PDEATHSIG`; what it started, re-parented
/// to init, does not). Only marks of servers in this process's pid namespace are judged (a pid
/// means nothing in another one), a server counts as gone when no live process has its pid and
/// start time, and a process is signalled only after its start time was read again. Returns how
/// many were stopped.
///
/// Process-based executors call it once per process when the first of them is built (unless
/// `die_with_server` is off), so a server that starts again on the same host clears what its
/// predecessor left. Environments of other users' processes are not readable (unless the server
/// runs as root), and a process that dropped the variable is not found.
pub fn stop_leftovers_of_dead_servers() -> usize {
    let Some(me) = ServerId::own() else {
        return 0;
    };
    let mut stopped = 0;
    for pid in proc_pids() {
        if pid == me.pid {
            continue;
        }
        let Some(stat) = read_stat(pid).filter(Stat::live) else {
            continue;
        };
        let Some(server) = read_run_mark(pid).and_then(|m| ServerId::of_mark(&m)) else {
            continue;
        };
        if server.pid_ns != me.pid_ns || server == me {
            continue;
        }
        let alive = verified(Proc {
            pid: server.pid,
            start: server.start,
        })
        .is_some();
        let p = Proc {
            pid,
            start: stat.start,
        };
        if !alive && verified(p).is_some() && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
            tracing::warn!(
                pid,
                server = server.pid,
                "stopped a process a run of a server that is gone left behind"
            );
            stopped += 1;
        }
    }
    stopped
}

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

/// Where a child runs: directly, or inside a bubblewrap sandbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Sandbox {
    /// No sandbox (the default): the child sees the system as the server does, minus the
    /// server's environment.
    #[default]
    None,
    /// Under bubblewrap (`bwrap`, Debian package `bubblewrap`): new PID, IPC and UTS namespaces,
    /// the whole system read-only, a fresh `/dev` and `/proc`, a per-run temporary directory as
    /// `HOME` and `TMPDIR` (removed afterwards), the project directory the only other writable
    /// path, no capabilities, a new session, and the sandbox killed with its parent. The network
    /// stays unless [`ProcessOptions::network`] is `false`.
    Bwrap,
}

/// How a child process is started and supervised: its environment, watchdogs, resource limits
/// and sandbox. One type shared by [`ClaudeCode`](crate::ClaudeCode),
/// [`CommandExecutor`](crate::CommandExecutor) and [`OpenCodeServer`](crate::OpenCodeServer);
/// give it to their builders' `process` method.
///
/// ```
/// use std::time::Duration;
/// use aiwg_agents::{ProcessOptions, ResourceLimits, Sandbox};
///
/// let opts = ProcessOptions::new()
///     .env("ANTHROPIC_BASE_URL", "http://127.0.0.1:8080")
///     .pass_env("ANTHROPIC_API_KEY")
///     .idle_timeout(Duration::from_secs(300))
///     .grace(Duration::from_secs(2))
///     .limits(ResourceLimits::new().cpu_time(600))
///     .sandbox(Sandbox::None);
/// // Values set with `env` never show in Debug output: they may be secrets.
/// assert!(!format!("{opts:?}").contains("127.0.0.1"));
/// ```
#[derive(Clone)]
#[must_use]
pub struct ProcessOptions {
    env_allow: Vec<String>,
    env: BTreeMap<String, String>,
    idle_timeout: Option<Duration>,
    grace: Duration,
    limits: ResourceLimits,
    sandbox: Sandbox,
    network: bool,
    die_with_server: bool,
    hide: Vec<PathBuf>,
    writable: Vec<PathBuf>,
}

impl std::fmt::Debug for ProcessOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only the names of explicit variables: their values may be secrets.
        f.debug_struct("ProcessOptions")
            .field("env_allow", &self.env_allow)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("idle_timeout", &self.idle_timeout)
            .field("grace", &self.grace)
            .field("limits", &self.limits)
            .field("sandbox", &self.sandbox)
            .field("network", &self.network)
            .field("die_with_server", &self.die_with_server)
            .field("hide", &self.hide)
            .field("writable", &self.writable)
            .finish()
    }
}

impl Default for ProcessOptions {
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
            sandbox: Sandbox::None,
            network: true,
            die_with_server: true,
            hide: Vec::new(),
            writable: Vec::new(),
        }
    }
}

impl ProcessOptions {
    /// The defaults: [`DEFAULT_ENV_ALLOW_LIST`], no idle watchdog, a 5 s grace period, no
    /// limits, no sandbox, network on, the child dies with the server.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a variable in the child's environment (after the allow-list; it wins).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Sets several variables (see [`env`](Self::env)).
    pub fn envs<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Lets the child inherit `name` from the server's environment (added to the allow-list).
    pub fn pass_env(mut self, name: impl Into<String>) -> Self {
        self.env_allow.push(name.into());
        self
    }

    /// Replaces the allow-list of inherited variables.
    pub fn env_allow_list<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.env_allow = names.into_iter().map(Into::into).collect();
        self
    }

    /// Stops a run that printed nothing for `idle` ([`ExecutorError::Idle`]).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// Time between `SIGTERM` and `SIGKILL` when stopping a run (default 5 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Resource limits for the child.
    pub fn limits(mut self, limits: ResourceLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Runs the child in a sandbox (default [`Sandbox::None`]).
    pub fn sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = sandbox;
        self
    }

    /// With `false`, a sandboxed child gets a network namespace of its own with nothing but a
    /// loopback interface (`bwrap --unshare-net`). Requires [`Sandbox::Bwrap`].
    pub fn network(mut self, network: bool) -> Self {
        self.network = network;
        self
    }

    /// Hides `path` from a sandboxed child: a directory becomes an empty one, a file an empty
    /// one (e.g. the server's configuration file and data directory). Requires
    /// [`Sandbox::Bwrap`]; a path that does not exist when a run starts is ignored.
    pub fn hide(mut self, path: impl Into<PathBuf>) -> Self {
        self.hide.push(path.into());
        self
    }

    /// Makes `path` (a directory that exists when a run starts) writable inside the sandbox,
    /// besides the project directory and the run's temporary home: e.g. the `CODEX_HOME` where
    /// the Codex CLI keeps the sessions a later step resumes. Without a sandbox it changes
    /// nothing (the child can write what the server can).
    pub fn writable(mut self, path: impl Into<PathBuf>) -> Self {
        self.writable.push(path.into());
        self
    }

    /// With `true` (the default) the child runs under `setpriv --pdeathsig KILL` (util-linux)
    /// so that the kernel kills it when the server dies, whatever the signal.
    pub fn die_with_server(mut self, die: bool) -> Self {
        self.die_with_server = die;
        self
    }

    /// The sandbox chosen.
    #[must_use]
    pub fn sandbox_kind(&self) -> Sandbox {
        self.sandbox
    }

    /// Checks the options and finds the helper programs they need (`bwrap`, `setpriv`,
    /// `prlimit`). Errors name the option (`sandbox`, `idle_timeout`, …).
    pub(crate) fn check(self) -> Result<Supervision, ConfigError> {
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new("idle_timeout", "must be more than zero"));
        }
        if !self.network && self.sandbox != Sandbox::Bwrap {
            return Err(ConfigError::new(
                "network",
                "`network: false` needs `sandbox: bwrap`",
            ));
        }
        if !self.hide.is_empty() && self.sandbox != Sandbox::Bwrap {
            return Err(ConfigError::new("hide", "`hide` needs `sandbox: bwrap`"));
        }
        if let Some(p) = self.writable.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::new(
                "writable",
                format!("`{}` is not an absolute path", p.display()),
            ));
        }
        if let Some(p) = self.hide.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::new(
                "hide",
                format!("`{}` is not an absolute path", p.display()),
            ));
        }
        let bwrap = match self.sandbox {
            Sandbox::None => None,
            Sandbox::Bwrap => Some(find_program("bwrap").ok_or_else(|| {
                ConfigError::new(
                    "sandbox",
                    "`bwrap` (bubblewrap) is not installed (Debian: apt-get install bubblewrap)",
                )
            })?),
        };
        if self.die_with_server {
            // Once per process: what the runs of a server that was killed left behind.
            static SWEPT: std::sync::Once = std::sync::Once::new();
            SWEPT.call_once(|| {
                stop_leftovers_of_dead_servers();
            });
        }
        let setpriv = if self.die_with_server {
            Some(find_program("setpriv").ok_or_else(|| {
                ConfigError::new(
                    "die_with_server",
                    "`setpriv` (util-linux) is not installed; install it or set `die_with_server: false`",
                )
            })?)
        } else {
            None
        };
        let prlimit = if self.limits.is_empty() {
            None
        } else {
            Some(find_program("prlimit").ok_or_else(|| {
                ConfigError::new("limits", "`prlimit` (util-linux) is not installed")
            })?)
        };
        Ok(Supervision {
            opts: self,
            bwrap,
            setpriv,
            prlimit,
        })
    }
}

/// Checked [`ProcessOptions`] with the helper programs found.
#[derive(Clone, Debug)]
pub(crate) struct Supervision {
    pub(crate) opts: ProcessOptions,
    bwrap: Option<PathBuf>,
    setpriv: Option<PathBuf>,
    prlimit: Option<PathBuf>,
}

impl Supervision {
    /// The environment a child gets.
    pub(crate) fn child_env(&self) -> Vec<(OsString, OsString)> {
        let mut out: BTreeMap<OsString, OsString> = BTreeMap::new();
        for name in &self.opts.env_allow {
            if let Some(v) = std::env::var_os(name) {
                out.insert(name.into(), v);
            }
        }
        for (k, v) in &self.opts.env {
            out.insert(k.into(), v.into());
        }
        out.into_iter().collect()
    }

    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.opts.idle_timeout
    }

    pub(crate) fn grace(&self) -> Duration {
        self.opts.grace
    }

    /// Sets a variable after the check (used for values only known at start, e.g. a password).
    #[cfg_attr(not(feature = "opencode"), allow(dead_code))]
    pub(crate) fn set_env(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.opts.env.insert(name.into(), value.into());
    }
}

/// Finds `name` on the server's `PATH` (or checks an explicit path).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// Finds the executable `program` would run: a path with a slash (relative to `cwd`), or a
/// name looked up in `path`.
fn locate(program: &Path, cwd: &Path, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 || program.is_absolute() {
        let full = cwd.join(program);
        return runnable(&full).then_some(full);
    }
    std::env::split_paths(path?)
        .map(|d| cwd.join(d).join(program))
        .find(|c| runnable(c))
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

/// What a run reads on its standard input.
#[derive(Debug, Default)]
pub(crate) enum Input {
    /// Nothing (`/dev/null`).
    #[default]
    Null,
    /// These bytes, then end of file.
    #[cfg_attr(not(any(feature = "claude-code", feature = "codex")), allow(dead_code))]
    Bytes(Vec<u8>),
}

/// Runs `program args…` in `cwd` under `sup`, feeding each output line to `on_line`, until it
/// exits, `cancel` fires, `timeout` passes or the idle watchdog fires. On any of the last three
/// every process of the run is stopped before the error is returned.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    program: &Path,
    args: &[String],
    cwd: &Path,
    sup: &Supervision,
    input: Input,
    cancel: &CancellationToken,
    timeout: Duration,
    mut on_line: impl FnMut(OutputLine),
) -> Result<Finished, ExecutorError> {
    let mut spawned = spawn(program, args, cwd, sup, input)?;
    let mut stdout = LineReader::new(spawned.child.stdout.take());
    let mut stderr = LineReader::new(spawned.child.stderr.take());
    let mut tail: VecDeque<String> = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let started = Instant::now();
    // The timers are made once: output moves only `last_output`, and the idle timer, when it
    // fires before the idle time has passed since then, is set again (a timer set again for
    // every line cost more than reading the line).
    let deadline = tokio::time::sleep_until(aiwg_core::util::deadline(started, timeout));
    tokio::pin!(deadline);
    let idle_timeout = sup.idle_timeout();
    let mut last_output = started;
    let idle = tokio::time::sleep_until(aiwg_core::util::deadline(
        started,
        idle_timeout.unwrap_or(Duration::MAX),
    ));
    tokio::pin!(idle);
    // Once the child exited, leftovers holding the pipes open get a short while to finish.
    let drain = tokio::time::sleep_until(aiwg_core::util::deadline(started, Duration::MAX));
    tokio::pin!(drain);
    // The first look at the child's descendants is a tick from now: at its start it has none.
    let mut scan = tokio::time::interval_at(started + SCAN_EVERY, SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status = None;
    let mut draining = false;
    // A line of standard error, kept among the last ones.
    let stderr_line = |l: String, tail: &mut VecDeque<String>| {
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(l.clone());
        OutputLine::Stderr(l)
    };

    let stop: Option<ExecutorError> = loop {
        if status.is_some() && stdout.done && stderr.done {
            break None;
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => break Some(ExecutorError::Cancelled),
            () = &mut deadline => break Some(ExecutorError::TimedOut(timeout)),
            () = &mut idle, if idle_timeout.is_some() => {
                let idle_timeout = idle_timeout.unwrap_or_default();
                let due = aiwg_core::util::deadline(last_output, idle_timeout);
                if due <= Instant::now() {
                    break Some(ExecutorError::Idle(idle_timeout));
                }
                idle.as_mut().reset(due);
            }
            line = stdout.next(), if !stdout.done => {
                if let Some(l) = line {
                    last_output = Instant::now();
                    on_line(OutputLine::Stdout(l));
                    // The lines already read are handed on without another turn of the loop.
                    for _ in 0..BUFFERED_LINES_AT_ONCE {
                        let Some(l) = stdout.next_buffered() else { break };
                        on_line(OutputLine::Stdout(l));
                    }
                }
            }
            line = stderr.next(), if !stderr.done => {
                if let Some(l) = line {
                    last_output = Instant::now();
                    on_line(stderr_line(l, &mut tail));
                    for _ in 0..BUFFERED_LINES_AT_ONCE {
                        let Some(l) = stderr.next_buffered() else { break };
                        on_line(stderr_line(l, &mut tail));
                    }
                }
            }
            st = spawned.child.wait(), if status.is_none() => {
                // Reaped: the root's group id is no longer signalled blindly (recorded before
                // any await, so a drop cannot do it either); one last scan adopts its members.
                // With its output already closed, the run ends now and the end's own scan,
                // made before any other await, is that scan.
                spawned.tree.reaped();
                if !(stdout.done && stderr.done) {
                    spawned.tree.scan().await;
                }
                status = Some(st.map_err(|e| ExecutorError::from(AgentError::Wait(e)))?);
                draining = true;
                drain.as_mut().reset(Instant::now() + Duration::from_millis(500));
            }
            () = &mut drain, if draining => {
                // Something the child left behind keeps its output open: stop it.
                terminate(&mut spawned.child, &mut spawned.tree, sup.grace()).await;
                draining = false;
                stdout.done = true;
                stderr.done = true;
            }
            _ = scan.tick() => {
                if status.is_none() {
                    spawned.tree.scan().await;
                }
            }
        }
    };

    // Stopped or exited: either way nothing of the run may outlive it.
    terminate(&mut spawned.child, &mut spawned.tree, sup.grace()).await;
    drop(spawned.run_dir);
    if let Some(err) = stop {
        return Err(err);
    }
    let code = status.and_then(|s| exit_code(&s));
    Ok(Finished {
        exit_code: code,
        stderr_tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}

/// A started child: the process, what is known of its descendants, and the sandbox's
/// temporary directory (removed when dropped).
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) tree: Tree,
    pub(crate) run_dir: Option<tempfile::TempDir>,
}

/// The argument vector that starts `program args…` under `sup` (helpers first).
fn command_line(
    program: &Path,
    args: &[String],
    cwd: &Path,
    sup: &Supervision,
    run_dir: Option<&Path>,
) -> (PathBuf, Vec<OsString>) {
    let mut argv: Vec<OsString> = Vec::new();
    if let Some(setpriv) = &sup.setpriv {
        argv.push(setpriv.into());
        argv.extend(["--pdeathsig", "KILL", "--"].map(OsString::from));
    }
    if let (Some(bwrap), Some(dir)) = (&sup.bwrap, run_dir) {
        argv.push(bwrap.into());
        argv.extend(
            [
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--die-with-parent",
                "--new-session",
                "--cap-drop",
                "ALL",
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
            ]
            .map(OsString::from),
        );
        if !sup.opts.network {
            argv.push("--unshare-net".into());
        }
        let extra = sup.opts.writable.iter().filter(|p| p.is_dir());
        for path in [dir, cwd].into_iter().chain(extra.map(PathBuf::as_path)) {
            argv.push("--bind".into());
            argv.push(path.into());
            argv.push(path.into());
        }
        // After the binds: bwrap applies its mounts in order, each bind from the host's tree,
        // so a path hidden inside the project or a writable directory would come back with it.
        for hidden in &sup.opts.hide {
            match std::fs::metadata(hidden) {
                Ok(m) if m.is_dir() => {
                    argv.push("--tmpfs".into());
                    argv.push(hidden.into());
                }
                Ok(_) => {
                    argv.extend(["--ro-bind", "/dev/null"].map(OsString::from));
                    argv.push(hidden.into());
                }
                Err(_) => {}
            }
        }
        argv.push("--chdir".into());
        argv.push(cwd.into());
        argv.push("--".into());
    }
    if let Some(prlimit) = &sup.prlimit {
        argv.push(prlimit.into());
        if let Some(b) = sup.opts.limits.address_space_bytes {
            argv.push(format!("--as={b}").into());
        }
        if let Some(s) = sup.opts.limits.cpu_seconds {
            argv.push(format!("--cpu={s}").into());
        }
        argv.push("--".into());
    }
    argv.push(program.into());
    argv.extend(args.iter().map(OsString::from));
    let first = PathBuf::from(argv.remove(0));
    (first, argv)
}

/// Starts `program args…` in `cwd` in a new process group with the scrubbed environment,
/// stdout/stderr piped and stdin from `input`, under the sandbox and helpers `sup` names.
pub(crate) fn spawn(
    program: &Path,
    args: &[String],
    cwd: &Path,
    sup: &Supervision,
    input: Input,
) -> Result<Spawned, AgentError> {
    let run_dir = if sup.bwrap.is_some() {
        Some(
            tempfile::Builder::new()
                .prefix("aiwg-run-")
                .tempdir()
                .map_err(AgentError::RunDir)?,
        )
    } else {
        None
    };
    let mut env = sup.child_env();
    // Every process of the run inherits the mark, however it detaches (a new session, a double
    // fork, re-parented to init): stopping the run finds it by the mark as well.
    let mark = run_mark();
    env.retain(|(k, _)| k != RUN_MARK_ENV);
    env.push((RUN_MARK_ENV.into(), mark.clone().into()));
    // Found here, with the child's PATH, so that a missing program is a spawn error and not the
    // exit status of a helper (`setpriv`, `bwrap`, `prlimit`) that could not run it.
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    let program = locate(program, cwd, path.as_deref()).ok_or_else(|| AgentError::Spawn {
        program: program.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such program"),
    })?;
    let (first, rest) = command_line(&program, args, cwd, sup, run_dir.as_ref().map(|d| d.path()));
    if let Some(dir) = &run_dir {
        // The sandbox's own HOME and TMPDIR; nothing else of the host is writable.
        env.retain(|(k, _)| k != "HOME" && k != "TMPDIR");
        env.push(("HOME".into(), dir.path().into()));
        env.push(("TMPDIR".into(), dir.path().into()));
    }
    let mut cmd = Command::new(&first);
    // The environment travels in the environment (never in argv, which every local user can
    // read in /proc/<pid>/cmdline); bwrap passes it on unchanged.
    cmd.args(&rest)
        .current_dir(cwd)
        .env_clear()
        .envs(env)
        .stdin(match input {
            Input::Null => Stdio::null(),
            Input::Bytes(_) => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| AgentError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let Some(pid) = child.id() else {
        return Err(AgentError::ExitedEarly);
    };
    if let (Input::Bytes(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        tokio::spawn(async move {
            // A child that exits without reading everything closes the pipe: not our error.
            let _ = stdin.write_all(&bytes).await;
            let _ = stdin.shutdown().await;
        });
    }
    let tree = Tree::new(pid as i32, Some(mark.into_bytes()));
    Ok(Spawned {
        child,
        tree,
        run_dir,
    })
}

fn exit_code(status: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

/// The longest line read from a child's output: a longer one (or output without newlines) is
/// handed on in pieces of this size, so a child can never make the server buffer an unbounded
/// line. Large enough for an agent's whole answer on one JSON line (Claude Code's `result`,
/// Codex's last `agent_message`): cut into pieces, such a line is no longer JSON and the answer
/// was lost (64 KiB, before: a run whose answer was longer failed "without a result line").
pub(crate) const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// The most lines handed on in one turn of a run's loop after the one it read: lines already
/// whole in the reader's buffer (at most 64 KiB of them), so a flood of output is handed on a
/// buffer at a time, with the run's cancellation and deadlines checked between buffers.
const BUFFERED_LINES_AT_ONCE: usize = 1024;

/// Reads lines (lossy UTF-8) from a pipe, at most [`MAX_LINE_BYTES`] at a time; cancel-safe
/// because the partial line stays in `buf` and nothing is consumed across an await.
pub(crate) struct LineReader<R> {
    inner: Option<BufReader<R>>,
    buf: Vec<u8>,
    done: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(r: Option<R>) -> Self {
        let done = r.is_none();
        Self {
            inner: r.map(|r| BufReader::with_capacity(64 * 1024, r)),
            buf: Vec::new(),
            done,
        }
    }

    pub(crate) async fn next(&mut self) -> Option<String> {
        let inner = self.inner.as_mut()?;
        loop {
            let chunk = match inner.fill_buf().await {
                Ok(c) if !c.is_empty() => c,
                _ => {
                    self.done = true;
                    return (!self.buf.is_empty()).then(|| take_line(&mut self.buf));
                }
            };
            let room = MAX_LINE_BYTES - self.buf.len();
            let window = &chunk[..chunk.len().min(room)];
            if let Some(i) = memchr::memchr(b'\n', window) {
                let line = line_ending_at(&mut self.buf, window, i);
                inner.consume(i + 1);
                return Some(line);
            }
            let n = window.len();
            self.buf.extend_from_slice(window);
            inner.consume(n);
            if self.buf.len() >= MAX_LINE_BYTES {
                return Some(take_line(&mut self.buf));
            }
        }
    }
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// The next line when it is whole in what was read already, without reading the pipe.
    pub(crate) fn next_buffered(&mut self) -> Option<String> {
        let inner = self.inner.as_mut()?;
        let chunk = inner.buffer();
        let window = &chunk[..chunk.len().min(MAX_LINE_BYTES - self.buf.len())];
        let i = memchr::memchr(b'\n', window)?;
        let line = line_ending_at(&mut self.buf, window, i);
        inner.consume(i + 1);
        Some(line)
    }
}

/// The line that ends at `window[i]` (a newline), after what `buf` holds of it: made from the
/// window itself when `buf` holds nothing (one copy, not two).
fn line_ending_at(buf: &mut Vec<u8>, window: &[u8], i: usize) -> String {
    if buf.is_empty() {
        let mut text = &window[..i];
        if let [rest @ .., b'\r'] = text {
            text = rest;
        }
        return lossy(text);
    }
    buf.extend_from_slice(&window[..=i]);
    take_line(buf)
}

fn take_line(buf: &mut Vec<u8>) -> String {
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    let s = lossy(buf);
    buf.clear();
    s
}

/// `bytes` as text, invalid UTF-8 replaced: checked by the standard library's quick validation
/// first, and only when that fails by the slower lossy conversion (which was a tenth of the
/// time a line of output took).
fn lossy(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
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

impl Stat {
    fn live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

fn read_stat(pid: i32) -> Option<Stat> {
    // One `read` into the stack (a stat line is a few hundred bytes): no size query, no heap.
    let mut buf = [0u8; 1024];
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let n = std::io::Read::read(&mut file, &mut buf).ok()?;
    if n < buf.len() {
        parse_stat(std::str::from_utf8(&buf[..n]).ok()?)
    } else {
        parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }
}

/// The fields of a `/proc/<pid>/stat` line that tell what a process is and where it belongs.
fn parse_stat(s: &str) -> Option<Stat> {
    // After the command (which may hold anything, `)` included): state(0) ppid(1) pgrp(2) …
    // starttime(19).
    let mut f = s.get(s.rfind(')')? + 2..)?.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let start = f.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start,
    })
}

/// Where every pid handed out since a run's root lies: after the root's, going round, up to the
/// last one handed out (`ns_last_pid`). A scan reads `/proc/<pid>/stat` only of those (and of
/// the processes it knows), not of every process on the host: on a host running a thousand
/// processes, a run's end read a thousand files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PidWindow {
    root: i32,
    last: i32,
}

impl PidWindow {
    /// The window now, or `None` when it cannot be told: the pid counter may have gone round
    /// past the root's pid since `forks_then` (or `/proc` does not say, or is another pid
    /// namespace's than this process's).
    fn since(root: i32, forks_then: Option<u64>) -> Option<Self> {
        let forks = forks_since_boot()?.checked_sub(forks_then?)?;
        let last = read_last_pid()?;
        let threads = read_threads()?;
        let max = (*PID_MAX.get_or_init(|| read_pid_max().filter(|_| proc_is_ours())))?;
        Self::from_counts(root, last, forks, threads, max)
    }

    /// The window after `forks` forks since the root, with `threads` pids in use, the last pid
    /// handed out `last`, and `pid_max` `max`.
    fn from_counts(root: i32, last: i32, forks: u64, threads: u64, max: u64) -> Option<Self> {
        // To hand out a pid at or before the root's again, the counter goes once round (the
        // pids below `pid_max`, less up to 300 reserved ones), skipping only the pids in use
        // (every thread's, `threads`): far more pids handed out, and so forks, than half of
        // it. (Both counts are the whole system's, more than this namespace's; the half leaves
        // room for the forks between the root's and the count read after it.)
        (forks.saturating_add(threads) < max / 2).then_some(Self { root, last })
    }

    fn holds(self, pid: i32) -> bool {
        if self.last >= self.root {
            pid > self.root && pid <= self.last
        } else {
            pid > self.root || pid <= self.last
        }
    }
}

/// `pid_max`, once `/proc` was found to be this process's pid namespace's (`None` otherwise).
static PID_MAX: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

fn read_pid_max() -> Option<u64> {
    read_number("/proc/sys/kernel/pid_max")
}

/// A file of `/proc` that holds one number.
fn read_number<T: std::str::FromStr>(path: &str) -> Option<T> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `/proc` names this process by the pid it knows itself by: the listing and the last pid
/// handed out (`ns_last_pid`, this namespace's) count the same pids.
fn proc_is_ours() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        == Some(std::process::id())
}

/// The system's forks (and threads started) since boot: `processes` in `/proc/stat`.
fn forks_since_boot() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("processes "))?
        .trim()
        .parse()
        .ok()
}

/// The last pid handed out in this pid namespace (`/proc/sys/kernel/ns_last_pid`; kernels built
/// without checkpoint/restore lack it, and then every scan reads every process).
/// (`/proc/loadavg` names it too, but container tools such as LXCFS rewrite that file.)
fn read_last_pid() -> Option<i32> {
    read_number("/proc/sys/kernel/ns_last_pid")
}

/// The threads (pids in use) on the system, or in the container when LXCFS counts its own
/// (`/proc/loadavg`: `1.40 2.10 1.94 1/168 22591`).
fn read_threads() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_ascii_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The pids `/proc` lists now (none when it cannot be read).
fn proc_pids() -> Vec<i32> {
    std::fs::read_dir("/proc").map_or_else(
        |_| Vec::new(),
        |dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        },
    )
}

/// The value of [`RUN_MARK_ENV`] in `pid`'s environment (readable for the server's own user's
/// processes), when it carries one.
fn read_run_mark(pid: i32) -> Option<Vec<u8>> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|b| *b == 0)
        .find_map(|e| e.strip_prefix(RUN_MARK_ENV.as_bytes())?.strip_prefix(b"="))
        .map(<[u8]>::to_vec)
}

/// Whether `pid` is a live (non-zombie) process. This reads `/proc/<pid>/stat`, a blocking call
/// (cheap, but do not call it in a loop on an async runtime thread).
#[must_use]
pub fn process_alive(pid: i32) -> bool {
    read_stat(pid).is_some_and(|s| s.live())
}

/// `p` is still the same live process (same start time).
fn verified(p: Proc) -> Option<Stat> {
    read_stat(p.pid).filter(|s| s.live() && s.start == p.start)
}

/// One process, known by pid and start time, that can be asked whether it still runs: e.g.
/// before a password is sent to the port a supervised server listened on (once the server is
/// gone, any local process may bind that port).
#[cfg_attr(not(feature = "opencode"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity(Proc);

#[cfg_attr(not(feature = "opencode"), allow(dead_code))]
impl Identity {
    /// The live process `pid` is now.
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let pid = i32::try_from(pid).ok()?;
        read_stat(pid).filter(Stat::live).map(|s| {
            Identity(Proc {
                pid,
                start: s.start,
            })
        })
    }

    /// It still runs (not exited, not a zombie, its pid not reused). Reads `/proc/<pid>/stat`.
    pub(crate) fn alive(&self) -> bool {
        verified(self.0).is_some()
    }
}

/// What is known of a run's processes. Only touched on the blocking pool (or in `Drop`).
#[derive(Debug)]
struct TreeState {
    root: i32,
    /// The root was reaped: its pid, and so its process-group id, may be reused.
    root_reaped: bool,
    /// The next scan still adopts the members of the root's group: it runs right after the
    /// reap, while the members that kept the group id alive are the run's own (Linux does not
    /// hand out a pid that is still some process's group id).
    adopt_group_once: bool,
    known: BTreeMap<i32, Proc>,
    own_pgrp: i32,
    /// This run's mark: the value of [`RUN_MARK_ENV`] in the environment of each of its
    /// processes.
    mark: Option<Vec<u8>>,
    /// When the root started (clock ticks since boot, as `/proc/<pid>/stat` says): a process
    /// that started before it cannot be the run's, and its environment is not read.
    since: u64,
    /// The system's forks since boot when the root had started ([`PidWindow`]).
    forks_then: Option<u64>,
}

impl TreeState {
    /// Adds every process whose (verified) parent is known, and while the root's process group
    /// provably exists, every member of it.
    fn scan(&mut self) {
        self.scan_proc(false);
    }

    /// One pass over `/proc`: adds the descendants and group members [`Self::scan`] adds and,
    /// with `marked`, every other live process whose environment carries the run's mark
    /// (readable for the server's own user's processes): what detached from the tree between
    /// two scans (a double fork, a new session) and now belongs to init. The mark is read when
    /// the run is stopped, not on every scan, and only of processes that started after the
    /// root (an older one cannot be the run's).
    fn scan_proc(&mut self, marked: bool) {
        let pids = proc_pids();
        // Read after the listing, so it holds every pid listed that was handed out since the
        // root's. Only those, and the ones known, can be the run's.
        let window = PidWindow::since(self.root, self.forks_then);
        let mut all: Vec<(i32, Stat)> = pids
            .into_iter()
            .filter(|pid| window.is_none_or(|w| w.holds(*pid)) || self.known.contains_key(pid))
            .filter_map(|pid| read_stat(pid).map(|s| (pid, s)))
            .filter(|(_, s)| s.live())
            .collect();
        let starts: BTreeMap<i32, u64> = all.iter().map(|(p, s)| (*p, s.start)).collect();
        let is_known = |known: &BTreeMap<i32, Proc>, pid: i32| {
            known
                .get(&pid)
                .is_some_and(|p| starts.get(&pid) == Some(&p.start))
        };
        let group_exists = !self.root_reaped
            || std::mem::take(&mut self.adopt_group_once)
            || all
                .iter()
                .any(|(pid, s)| s.pgrp == self.root && is_known(&self.known, *pid));
        loop {
            let before = self.known.len();
            all.retain(|(pid, s)| {
                let ours = is_known(&self.known, s.ppid) || (group_exists && s.pgrp == self.root);
                if ours && !is_known(&self.known, *pid) {
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
        self.known.retain(|_, p| verified(*p).is_some());
        if marked {
            self.adopt_marked(&all);
        }
    }

    /// Adds, of `candidates` (live processes not adopted by the tree walk), those started after
    /// the root whose environment carries the run's mark.
    fn adopt_marked(&mut self, candidates: &[(i32, Stat)]) {
        let Some(mark) = &self.mark else { return };
        let me = std::process::id() as i32;
        for (pid, stat) in candidates {
            let pid = *pid;
            if pid == me || stat.start < self.since || self.known.contains_key(&pid) {
                continue;
            }
            if read_run_mark(pid).as_ref() != Some(mark) {
                continue;
            }
            // The environment read was this process's (not a reused pid's).
            let p = Proc {
                pid,
                start: stat.start,
            };
            if verified(p).is_some() {
                self.known.insert(pid, p);
            }
        }
    }

    /// Signals every verified live process and its process group (never ours, never init's).
    fn signal(&self, sig: Signal) {
        if !self.root_reaped {
            // The unreaped root holds its pid, so this group id is still the run's.
            let _ = killpg(Pid::from_raw(self.root), sig);
        }
        let me = std::process::id() as i32;
        for p in self.known.values() {
            let Some(s) = verified(*p) else { continue };
            if s.pgrp > 1 && s.pgrp != self.own_pgrp {
                // A live member (checked just now) keeps the group id from being reused.
                let _ = killpg(Pid::from_raw(s.pgrp), sig);
            }
            if p.pid != me {
                let _ = kill(Pid::from_raw(p.pid), sig);
            }
        }
    }

    /// Nothing of the run is alive (after a fresh scan, the run's mark included).
    fn nothing_left(&mut self) -> bool {
        self.scan_proc(true);
        self.known.is_empty()
    }
}

/// The child and everything it started, as far as `/proc` showed. Dropped before the run was
/// stopped properly (the executor's future was dropped), it kills everything it knows.
pub(crate) struct Tree {
    state: Arc<Mutex<TreeState>>,
    finished: bool,
}

impl Drop for Tree {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let state = Arc::clone(&self.state);
        let kill_all = move || {
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            st.scan_proc(true);
            st.signal(Signal::SIGKILL);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(kill_all)),
            Err(_) => kill_all(),
        }
    }
}

impl Tree {
    fn new(root: i32, mark: Option<Vec<u8>>) -> Self {
        let mut known = BTreeMap::new();
        let mut since = 0;
        if let Some(s) = read_stat(root) {
            since = s.start;
            known.insert(
                root,
                Proc {
                    pid: root,
                    start: s.start,
                },
            );
        }
        Self {
            state: Arc::new(Mutex::new(TreeState {
                root,
                root_reaped: false,
                adopt_group_once: false,
                known,
                own_pgrp: nix::unistd::getpgrp().as_raw(),
                mark,
                since,
                forks_then: forks_since_boot(),
            })),
            finished: false,
        }
    }

    /// Runs `f` on the state on tokio's blocking pool.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut TreeState) -> R + Send + 'static,
    ) -> R {
        let state = Arc::clone(&self.state);
        let job = move || f(&mut state.lock().unwrap_or_else(|e| e.into_inner()));
        match tokio::task::spawn_blocking(job).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Looks for new descendants.
    pub(crate) async fn scan(&self) {
        self.blocking(TreeState::scan).await;
    }

    /// Kills every descendant known or found now, and the root, here and now (not on tokio's
    /// blocking pool): for a `Drop` that must act while the root is alive, before the root's
    /// own kill re-parents the descendants that left its process group to init, where no
    /// later scan finds them.
    #[cfg_attr(not(feature = "opencode"), allow(dead_code))]
    pub(crate) fn kill_now(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.scan_proc(true);
        st.signal(Signal::SIGKILL);
    }

    /// The root was reaped (its pid may be reused from now on).
    pub(crate) fn reaped(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.root_reaped {
            st.root_reaped = true;
            st.adopt_group_once = true;
        }
    }
}

/// Reaps the child if it exited (without blocking), and records it.
fn try_reap(child: &mut Child, tree: &Tree) {
    if let Ok(Some(_)) = child.try_wait() {
        tree.reaped();
    }
}

/// SIGTERM to every known group and process, SIGKILL after `grace`, then wait until all are gone.
pub(crate) async fn terminate(child: &mut Child, tree: &mut Tree, grace: Duration) {
    let mut clear = tree.blocking(TreeState::nothing_left).await;
    if !clear {
        tree.blocking(|st| st.signal(Signal::SIGTERM)).await;
        let until = aiwg_core::util::deadline(Instant::now(), grace);
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            clear = tree.blocking(TreeState::nothing_left).await;
            if clear {
                break;
            }
        }
    }
    // Everything still there is killed; repeat until nothing is left (bounded).
    let until = Instant::now() + Duration::from_secs(10);
    while !clear {
        tree.blocking(|st| st.signal(Signal::SIGKILL)).await;
        try_reap(child, tree);
        if Instant::now() >= until {
            let root = tree.blocking(|st| st.root).await;
            tracing::warn!(pid = root, "processes of a run survived SIGKILL");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        clear = tree.blocking(TreeState::nothing_left).await;
    }
    let _ = child.wait().await;
    tree.reaped();
    tree.finished = true;
}

/// Resolves a program: a path with a slash is used as is, a bare name is looked up in `PATH`.
#[cfg(any(feature = "claude-code", feature = "codex"))]
pub(crate) fn resolve_program(program: &Path) -> PathBuf {
    program
        .to_str()
        .and_then(find_program)
        .unwrap_or_else(|| program.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's answer of a few hundred kilobytes on one JSON line is read as one line.
    #[tokio::test]
    async fn a_long_json_line_is_read_whole() {
        let answer = "x".repeat(300 * 1024);
        let line = serde_json::json!({"type": "result", "result": answer}).to_string();
        let input = format!("{{\"type\":\"system\"}}\n{line}\n");
        let mut r = LineReader::new(Some(input.as_bytes()));
        assert_eq!(r.next().await.as_deref(), Some(r#"{"type":"system"}"#));
        let read = r.next().await.expect("the result line");
        let v: serde_json::Value = serde_json::from_str(&read).expect("one JSON line");
        assert_eq!(v["result"].as_str().map(str::len), Some(300 * 1024));
        assert_eq!(r.next().await, None);
    }

    /// Lines whole in what was read already are taken without reading the pipe, and one
    /// that is not whole is left for `next`, which reads its end; a `\r\n` ending and bytes
    /// that are not UTF-8 come out as from `next`.
    #[tokio::test]
    async fn lines_already_read_are_taken_without_reading() {
        let input: &[u8] = b"one\r\ntwo\n\xff three\nfour";
        let mut r = LineReader::new(Some(input));
        assert_eq!(r.next_buffered(), None, "nothing read yet");
        assert_eq!(r.next().await.as_deref(), Some("one"));
        assert_eq!(r.next_buffered().as_deref(), Some("two"));
        assert_eq!(r.next_buffered().as_deref(), Some("\u{fffd} three"));
        assert_eq!(r.next_buffered(), None, "`four` has no end yet");
        assert!(!r.done);
        assert_eq!(r.next().await.as_deref(), Some("four"));
        assert_eq!(r.next().await, None);
        assert!(r.done);
    }

    #[tokio::test]
    async fn lines_are_read_in_bounded_pieces() {
        let mut input = vec![b'a'; MAX_LINE_BYTES * 2 + 10];
        input.extend_from_slice(b"\nshort\r\nlast");
        let mut r = LineReader::new(Some(&input[..]));
        let mut lines = Vec::new();
        while let Some(l) = r.next().await {
            lines.push(l);
        }
        let lens: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, MAX_LINE_BYTES, 10, 5, 4]);
        assert_eq!((lines[3].as_str(), lines[4].as_str()), ("short", "last"));
        assert!(r.done);
    }

    #[test]
    fn the_sandbox_command_line_has_every_isolation_flag() {
        let sup = Supervision {
            opts: ProcessOptions::new()
                .sandbox(Sandbox::Bwrap)
                .network(false)
                .limits(ResourceLimits::new().cpu_time(3)),
            bwrap: Some("/usr/bin/bwrap".into()),
            setpriv: Some("/usr/bin/setpriv".into()),
            prlimit: Some("/usr/bin/prlimit".into()),
        };
        let (first, rest) = command_line(
            Path::new("sleep"),
            &["1".into()],
            Path::new("/srv/p"),
            &sup,
            Some(Path::new("/tmp/run")),
        );
        assert_eq!(first, Path::new("/usr/bin/setpriv"));
        let rest: Vec<String> = rest.into_iter().map(|s| s.into_string().unwrap()).collect();
        let joined = rest.join(" ");
        for flag in [
            "--pdeathsig KILL -- /usr/bin/bwrap",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--die-with-parent",
            "--new-session",
            "--ro-bind / /",
            "--dev /dev",
            "--proc /proc",
            "--bind /tmp/run /tmp/run",
            "--bind /srv/p /srv/p",
            "--chdir /srv/p",
            "-- /usr/bin/prlimit --cpu=3 -- sleep 1",
        ] {
            assert!(joined.contains(flag), "{flag} missing in {joined}");
        }
    }

    /// A stat line's fields are found after the last `)`, whatever the command's name holds.
    #[test]
    fn a_stat_line_is_read_past_a_command_with_parentheses_and_spaces() {
        let line = "4242 (a) b (c) S 17 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 \
                    987654 2000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0\n";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.start), ('S', 17, 4242, 987_654));
        assert!(parse_stat("4242 (cut short) S 17").is_none());
        // This process's own line reads, and it is alive.
        let me = read_stat(std::process::id() as i32).unwrap();
        assert!(me.live() && me.start > 0);
    }

    /// The window holds the pids after the root's up to the last one handed out, going round
    /// past `pid_max` when the counter did.
    #[test]
    fn a_pid_window_holds_what_was_handed_out_after_its_root() {
        let plain = PidWindow {
            root: 100,
            last: 200,
        };
        assert!(plain.holds(101) && plain.holds(200));
        assert!(!plain.holds(100) && !plain.holds(201) && !plain.holds(99) && !plain.holds(1));
        let round = PidWindow {
            root: 32_000,
            last: 400,
        };
        assert!(round.holds(32_001) && round.holds(32_767) && round.holds(301) && round.holds(400));
        assert!(!round.holds(32_000) && !round.holds(401) && !round.holds(20_000));
        let none = PidWindow {
            root: 100,
            last: 100,
        };
        assert!(!none.holds(100) && !none.holds(101) && !none.holds(99));
        // Told only while the counter cannot have come round past the root's pid.
        let told = |forks, threads, max| PidWindow::from_counts(100, 200, forks, threads, max);
        assert_eq!(told(100, 200, 32_768), Some(plain));
        assert_eq!(told(16_183, 200, 32_768), Some(plain));
        assert_eq!(told(16_184, 200, 32_768), None);
        assert_eq!(told(16_184, 200, 4_194_304), Some(plain));
        assert_eq!(told(u64::MAX, 1, 4_194_304), None);
    }

    /// On this machine the window can be told, and a process started after the root lies in
    /// it, while the root does not; without a count of forks at the root's start it tells
    /// nothing.
    #[test]
    fn a_child_started_after_the_root_is_in_its_window() {
        let root = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let forks = forks_since_boot();
        assert!(forks.is_some(), "/proc/stat has a `processes` line");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let w = PidWindow::since(root.id() as i32, forks).expect("the window can be told");
        assert!(w.holds(child.id() as i32), "{w:?} {}", child.id());
        assert!(!w.holds(root.id() as i32));
        assert!(PidWindow::since(root.id() as i32, None).is_none());
        child.kill().unwrap();
        child.wait().unwrap();
        let mut root = root;
        root.kill().unwrap();
        root.wait().unwrap();
    }

    /// A run's mark names its server; marks of the older form, or cut short, name none.
    #[test]
    fn a_run_mark_names_its_server() {
        let own = ServerId::own().expect("/proc names this process");
        assert_eq!(own.pid, std::process::id() as i32);
        assert_eq!(ServerId::of_mark(run_mark().as_bytes()), Some(own));
        assert_ne!(run_mark(), run_mark());
        assert_eq!(ServerId::of_mark(b"4242-7-1a2b3c"), None, "the older form");
        assert_eq!(ServerId::of_mark(b"4242-99-4026531836-7"), None);
        assert_eq!(ServerId::of_mark(b"4242-0-4026531836-7-1a"), None);
        assert_eq!(
            ServerId::of_mark(b"4242-99-4026531836-7-1a"),
            Some(ServerId {
                pid: 4242,
                start: 99,
                pid_ns: 4_026_531_836
            })
        );
    }
}
