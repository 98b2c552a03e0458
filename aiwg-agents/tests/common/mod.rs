//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The path a peer test needs, from `var`. Missing: `None` with a note, or a panic under CI.
pub fn peer(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{var} is not set; run `bash scripts/install-peers.sh` and `source .peers/env`"
                );
            }
            eprintln!(
                "skipping: {var} is not set (run scripts/install-peers.sh, source .peers/env)"
            );
            None
        }
    }
}

/// Live (non-zombie) processes whose working directory is `dir` or below it.
pub fn pids_in_dir(dir: &Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.starts_with(&dir) && aiwg_agents::process_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Live processes whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) && aiwg_agents::process_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Polls `cond` until it holds; false after `timeout`.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    tokio::time::timeout(timeout, async {
        loop {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await
    .is_ok()
}

/// Records every live process seen in `dir` until the returned sender is dropped or fired.
pub fn watch_dir(
    dir: PathBuf,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<i32>>,
) {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut seen = std::collections::BTreeSet::new();
        loop {
            seen.extend(pids_in_dir(&dir));
            tokio::select! {
                _ = &mut rx => break,
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        seen.into_iter().collect()
    });
    (tx, task)
}

/// Whether bubblewrap is installed. Missing: false with a note, or a panic under CI.
pub fn bwrap() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("bwrap").is_file()));
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("bwrap is not installed; run `bash scripts/install-peers.sh`");
        }
        eprintln!("skipping: bwrap is not installed (apt-get install bubblewrap)");
    }
    found
}
