//! What the process tests share: the example server binaries started as real processes on a
//! loopback port, with a config written to a temporary folder.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The API key `start` gives the server (`AIWG_API_KEY`).
pub(crate) const KEY: &str = "process-test-key-0123456789";

/// A running server: killed (and reaped) on drop.
pub(crate) struct Server {
    /// The process.
    pub(crate) child: Child,
    /// Its standard output, line by line.
    pub(crate) lines: mpsc::Receiver<String>,
    /// `http://127.0.0.1:<port>`.
    pub(crate) base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin` with `config` (written to `dir/aiwg.yaml`), `dir` as the project root and port
/// 0, and waits until it prints the address it listens on.
pub(crate) fn start(bin: &str, config: &str, dir: &std::path::Path) -> Server {
    let path = dir.join("aiwg.yaml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .env("AIWG_API_KEY", KEY)
        .env("AIWG_PROJECT_ROOT", dir)
        .env("AIWG_API_PORT", "0")
        .env("SECRET_THAT_MUST_NOT_LEAK", "hunter2-hunter2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the server");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let base = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the server prints its address");
        if let Some(rest) = line.strip_prefix("aiwg listening on ") {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    Server { child, lines, base }
}
